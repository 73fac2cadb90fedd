"""Where a request's CPU time goes: a sampling profile of a real ``xma2 serve`` process
under the closed loop of ``bench/serve.py``, its samples grouped by stage.

Needs py-spy (``pip install py-spy``; it attaches to the server's process id). The
server runs on loopback with the 8 tasks of ``bench/serve.py``; ``--clients`` clients
send the same small PNGs to one 64-px task back to back for ``--seconds`` while py-spy
samples every thread of the server that is not idle. Each sample is charged to the
innermost stage its stack is in (accept and HTTP parsing, body read, decode, resize and
normalise, queue and batching, chip, response, logging, metrics), so the shares add up
to the server's busy CPU time; ``--source`` profiles another source tree's server.

    python bench/request_path.py [--seconds 20] [--source ../old-tree] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import TASK_PES, add_copies, closed_loop, images

from server.launcher import ServerProcess

STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # (stage, markers): a frame "function (file:line)" matches a marker it contains; the
    # stage of a sample is that of the innermost matching frame.
    ("chip: forward pass", ("forward_mixed (core/engine/engine.py",)),
    ("chip: batch set-up and results", ("infer_batch (server/runtime.py",)),
    ("queue and batching", ("server/batcher.py", "server/scheduler.py")),
    ("decode", ("decode_image (server/images.py", "open_image (server/images.py",
                "load_image (server/images.py")),
    ("resize and normalise", ("core/backbones/preprocess.py", "preprocess (server/runtime.py",
                              "preprocess_for (server/runtime.py")),
    ("body read", ("image_bytes (server/routers/predict.py", "body (starlette/requests.py")),
    ("response", ("serialize_response", "jsonable_encoder", "render (starlette/responses.py",
                  "prediction_response", "model_dump_json", "__init__ (starlette/responses.py",
                  "send (uvicorn/protocols/http")),
    ("metrics", ("prometheus_client/",)),
    ("logging (access log)", ("logging/__init__.py", "server/logs.py")),
    ("thread hand-offs", ("anyio/", "concurrent/futures/thread.py", "starlette/concurrency.py",
                          "run_in_executor")),
    ("accept and HTTP parsing", ("uvicorn/protocols/http", "httptools", "h11")),
    ("predict handler (own code)", ("answer (server/routers/predict.py",
                                    "predict (server/routers/predict.py", "server/fastpath.py",
                                    "server/errors.py")),
    ("routing, middleware, dependencies", ("fastapi/", "starlette/", "BodyLimit")),
)


def stage_of(stack: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first)."""
    for frame in reversed(stack):
        for stage, markers in STAGES:
            if any(m in frame for m in markers):
                return stage
    return "event loop and other"


def profile(server: ServerProcess, bodies: list[bytes], clients: int, seconds: float,
            rate: int, raw_out: Path | None = None, gil: bool = False
            ) -> tuple[float, Counter[str], int]:
    """Closed-loop throughput and the server's busy samples by stage."""
    assert server.process is not None
    raw = Path(tempfile.mkdtemp()) / "profile.txt"
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    sampler = subprocess.Popen([spy, "record", "--pid", str(server.process.pid), "--rate",
                                str(rate), "--duration", str(int(seconds)), "--format", "raw",
                                "--output", str(raw), "--nonblocking",
                                *(["--gil"] if gil else [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let py-spy attach before the load starts
    throughput = asyncio.run(closed_loop(server.url, "mnist", bodies, clients, seconds))
    _, err = sampler.communicate(timeout=120)
    if sampler.returncode != 0 or not raw.exists():
        raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
    stages: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stages[stage_of(stack.split(";"))] += int(count)
        total += int(count)
    if raw_out is not None:
        shutil.copyfile(raw, raw_out)
    shutil.rmtree(raw.parent, ignore_errors=True)
    return throughput, stages, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--source", type=Path, default=None,
                        help="profile the server of this source tree (default: this one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--gil", action="store_true",
                        help="sample only the thread holding the GIL (Python work; the "
                             "chip's native kernels run without it)")
    parser.add_argument("--raw", type=Path, default=None,
                        help="also keep py-spy's raw stacks here (flamegraph input)")
    args = parser.parse_args()
    bodies = images(32, args.seed)
    with tempfile.TemporaryDirectory() as root:
        server = ServerProcess(Path(root), source=args.source, spare_pes=8 * TASK_PES,
                               mask_entries=8, max_batch_size=args.max_batch_size).start()
        try:
            add_copies(server)
            asyncio.run(closed_loop(server.url, "mnist", bodies, args.clients, 3.0))  # warm
            throughput, stages, total = profile(server, bodies, args.clients, args.seconds,
                                                args.rate, args.raw, args.gil)
        finally:
            server.stop()
    # Samples of busy threads at ``rate``/s over ``seconds``: CPU-seconds per request.
    busy_s = total / args.rate
    requests = throughput * args.seconds
    table = {stage: {"share": round(n / total, 3),
                     "ms_per_request": round(1e3 * n / args.rate / requests, 3)}
             for stage, n in stages.most_common()}
    result: dict[str, Any] = {
        "command": "python bench/request_path.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items() if v is not None and v is not False),
        "throughput_rps": round(throughput, 2), "busy_thread_seconds": round(busy_s, 2),
        "busy_ms_per_request": round(1e3 * busy_s / requests, 3), "stages": table}
    print(f"closed loop: {throughput:.1f} req/s; server threads busy {busy_s:.1f} s "
          f"({result['busy_ms_per_request']:.2f} ms per request)")
    for stage, row in table.items():
        print(f"  {stage:34s} {100 * row['share']:5.1f}%  {row['ms_per_request']:6.3f} ms/req")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
