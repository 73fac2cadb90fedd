"""Serving under load: a mixed-task stream against a single-task stream, and the
reprogramming energy of the residency-aware scheduler against FIFO.

Starts real ``xma2 serve`` processes on loopback and drives them with an open-loop
generator (Poisson arrivals, at most ``--max-in-flight`` requests outstanding) over
plain keep-alive HTTP/1.1 connections (:class:`Connection`: the generator shares the
machine, so it spends as little CPU as it can). ``--baseline DIR`` serves another
source tree too (an older checkout) and runs steps 1-2 on both in turn:

0. the chip alone, in process: a batch of ``--max-batch-size`` single-task images
   against the same batch mixing the 8 tasks (Zipf), alternating, median of
   ``--repeats``;
1. capacity: a closed loop of ``--clients`` clients on one task for ``--seconds``;
2. at ``--loads`` x capacity, a single-task stream and a mixed stream over 8 tasks of
   Zipf popularity, alternating for ``--rounds`` rounds (same seed), with throughput,
   p50/p99 latency and the ratio of the median throughputs; one run of the mixed
   stream before the rounds warms the seven tasks step 1 did not use (not counted);
3. with a pool that holds 2 of the 8 tasks, the mixed stream under each scheduler
   (``lru``, ``energy``, ``fifo``): reprogramming energy per 1000 requests.

Step 0 runs in this process, so the script re-executes itself with the allocator
settings the servers run with (``MALLOC_MMAP_MAX_=0`` and a large
``MALLOC_TRIM_THRESHOLD_``) unless told not to (``--keep-malloc``).

    python bench/serve.py [--seconds 20] [--loads 0.7,1.0] [--baseline DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
from PIL import Image

from server.launcher import ServerProcess

SHIPPED = ("mnist", "fashion-mnist", "animal-mnist")
COPIES = ("mnist-b", "fashion-mnist-b", "animal-mnist-b", "mnist-c", "fashion-mnist-c")
TASKS = (*SHIPPED, *COPIES)
TASK_PES = 103  # spare PEs of each shipped task (at most)


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


def images(count: int, seed: int) -> list[bytes]:
    """Small PNGs (64x64 crops of noise-free gradients + noise) so decoding stays cheap."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = np.linspace(0, 255, 64)[None, :] * rng.random() + rng.normal(0, 30, (64, 64))
        buffer = io.BytesIO()
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def add_copies(server: ServerProcess) -> None:
    with server.client() as c:
        for copy in COPIES:
            source = copy.rsplit("-", 1)[0]
            archive = c.get(f"/tasks/{source}/archive").content
            r = c.post("/tasks", params={"name": copy}, content=archive)
            r.raise_for_status()


class Connection:
    """One keep-alive HTTP/1.1 connection that posts a body and reads the answer: just
    what the load needs (the server frames every answer with Content-Length), so the
    generator's own CPU time, which shares the machine with the server, stays small."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.stale_retries = 0
        """Requests sent again on a new connection because the server had closed the idle
        one (its keep-alive timeout) before answering: what HTTP clients do, and what an
        older server (uvicorn's 5 s default) otherwise shows as requests without an answer."""

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` to ``path`` (with its query); the status and the answer."""
        reused = self.streams is not None
        try:
            return await self._post(path, body)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            if not reused or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                raise
            self.close()
            self.stale_retries += 1
            return await self._post(path, body)

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: "
                     f"{len(body)}\r\n\r\n".encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        answer = await reader.readexactly(int(headers["content-length"]))
        if headers.get("connection") == "close":
            self.close()
        return status, answer

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def predict_path(task: str) -> str:
    return f"/predict?task={quote(task)}"


async def closed_loop(url: str, task: str, bodies: list[bytes], clients: int,
                      seconds: float) -> float:
    """Requests per second of ``clients`` back-to-back clients."""
    done = 0
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal done
        connection = Connection(url)
        try:
            k = i
            while time.monotonic() < deadline:
                status, answer = await connection.post(predict_path(task),
                                                       bodies[k % len(bodies)])
                if status != 200:
                    raise RuntimeError(f"/predict answered {status}: {answer[:500]!r}")
                done += 1
                k += clients
        finally:
            connection.close()

    started = time.monotonic()
    await asyncio.gather(*[client(i) for i in range(clients)])
    return done / (time.monotonic() - started)


async def open_loop(url: str, tasks: list[str], bodies: list[bytes], rate: float,
                    seconds: float, max_in_flight: int, seed: int) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s; the i-th request asks for ``tasks[i]``."""
    rng = random.Random(seed)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    dropped = stale = 0
    in_flight = asyncio.Semaphore(max_in_flight)
    idle: list[Connection] = []  # at most max_in_flight are ever open
    try:

        async def one(task: str, body: bytes) -> None:
            nonlocal stale
            started = time.monotonic()
            connection = idle.pop() if idle else Connection(url)
            try:
                status, _ = await connection.post(predict_path(task), body)
                stale += connection.stale_retries
                connection.stale_retries = 0
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.monotonic() - started)
                idle.append(connection)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                connection.close()
                statuses[0] = statuses.get(0, 0) + 1  # no answer
            finally:
                in_flight.release()

        pending = []
        started = time.monotonic()
        next_at = started
        i = 0
        while next_at < started + seconds:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if in_flight.locked():
                dropped += 1  # the generator is bounded: it never queues without limit
            else:
                await in_flight.acquire()
                pending.append(asyncio.create_task(one(tasks[i % len(tasks)],
                                                       bodies[i % len(bodies)])))
            i += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*pending)
        elapsed = time.monotonic() - started
    finally:
        for connection in idle:
            connection.close()
    latencies.sort()
    ok = statuses.get(200, 0)
    return {
        "offered_rps": round(i / seconds, 2), "throughput_rps": round(ok / elapsed, 2),
        "p50_ms": round(1e3 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)
        if latencies else None,
        "statuses": statuses, "dropped_by_generator": dropped, "requests": i,
        "stale_connections_retried": stale,
    }


def chip_only(batch: int, repeats: int, seed: int, fidelity: str = "ideal") -> dict[str, Any]:
    """Forward time of one batch: single task vs 8 Zipf-mixed tasks, same images (wall
    and thread CPU time: the CPU time is what a busy machine's other work does not
    inflate)."""
    import torch

    from core.backbones.shipped import load_backbone
    from core.engine import CrossbarEngine
    from core.task_state import TaskState
    from server.shipped_tasks import SHIPPED_DIR
    from task_store.archive import read_archive
    from task_store.format import decode_task

    torch.set_num_threads(1)
    engine = CrossbarEngine(load_backbone(None), max_prepared_tasks=len(TASKS))
    for name in TASKS:
        source = name.rsplit("-", 1)[0] if name in COPIES else name
        manifest, data = read_archive(SHIPPED_DIR / f"{source}.tar")
        task = decode_task(data, manifest)
        engine.add_task(TaskState(name, task.shift_levels, task.head, task.layers,
                                  task.digital))
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    mixed = mixed_stream(batch, seed)
    single = ["mnist"] * batch
    times: dict[str, list[float]] = {"single": [], "mixed": []}
    cpu: dict[str, list[float]] = {"single": [], "mixed": []}
    for _ in range(2):  # warm: fold every task, build its changed-channel tables
        engine.forward_mixed(x, mixed, fidelity)
        engine.forward_mixed(x, single, fidelity)
    for _ in range(repeats):
        for name, ids in (("single", single), ("mixed", mixed)):
            started, started_cpu = time.perf_counter(), time.thread_time()
            engine.forward_mixed(x, ids, fidelity)
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.thread_time() - started_cpu)
    single_ms = 1e3 * statistics.median(times["single"])
    mixed_ms = 1e3 * statistics.median(times["mixed"])
    single_cpu_ms, mixed_cpu_ms = (1e3 * min(cpu[name]) for name in ("single", "mixed"))
    return {"fidelity": fidelity, "batch": batch, "distinct_tasks": len(set(mixed)),
            "single_ms": round(single_ms, 1),
            "mixed_ms": round(mixed_ms, 1), "single_over_mixed": round(single_ms / mixed_ms, 3),
            "single_cpu_ms": round(single_cpu_ms, 1), "mixed_cpu_ms": round(mixed_cpu_ms, 1),
            "single_over_mixed_cpu": round(single_cpu_ms / mixed_cpu_ms, 3)}


def mixed_stream(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return rng.choices(list(TASKS), zipf_weights(len(TASKS)), k=n)


def energy(server: ServerProcess) -> tuple[float, int]:
    with server.client() as c:
        table = c.get("/energy").json()
    return table["total_reprogramming_j"], sum(t["requests"] for t in table["tasks"].values())


def metric_sum(server: ServerProcess, name: str) -> float:
    with server.client() as c:
        text = c.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def process_cpu_s(server: ServerProcess) -> float:
    """CPU seconds (user + system, every thread) the server process has used so far."""
    assert server.process is not None
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def large_pool(servers: dict[str, ServerProcess], bodies: list[bytes],
               args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Steps 1 and 2 for each server (this tree, and the baseline's when given), the
    servers taking turns in every round so that machine noise hits them alike."""
    out: dict[str, dict[str, Any]] = {
        name: {"capacity_runs_rps": [], "capacity_mean_batch": []} for name in servers}
    for _ in range(args.capacity_rounds):
        for name, server in servers.items():
            batches = metric_sum(server, "xma2_batch_size_count")
            served = metric_sum(server, "xma2_batch_size_sum")
            cpu, own = process_cpu_s(server), time.process_time()
            rps = asyncio.run(closed_loop(server.url, "mnist", bodies, args.clients,
                                          args.seconds))
            cpu, own = process_cpu_s(server) - cpu, time.process_time() - own
            b = metric_sum(server, "xma2_batch_size_count") - batches
            requests = metric_sum(server, "xma2_batch_size_sum") - served
            row = out[name]
            row["capacity_runs_rps"].append(round(rps, 2))
            row["capacity_mean_batch"].append(round(requests / b, 2))
            row.setdefault("server_cpu_ms_per_request", []).append(
                round(1e3 * cpu / requests, 2))
            row.setdefault("client_cpu_ms_per_request", []).append(
                round(1e3 * own / requests, 2))
            print(f"{name}: capacity (closed loop, {args.clients} clients, mnist): "
                  f"{rps:.1f} req/s, mean batch {requests / b:.2f}, CPU per request: server "
                  f"{1e3 * cpu / requests:.2f} ms, load generator {1e3 * own / requests:.2f} ms")
    for row in out.values():
        row["capacity_rps"] = statistics.median(row["capacity_runs_rps"])
        row["loads"] = []
    if len(servers) > 1:  # paired: each round's ratio, both servers under that round's noise
        this, base = out["this"]["capacity_runs_rps"], out["baseline"]["capacity_runs_rps"]
        ratios = [round(a / b, 3) for a, b in zip(this, base, strict=True)]
        out["this"]["capacity_ratio_runs"] = ratios
        out["this"]["capacity_ratio_median"] = statistics.median(ratios)
        cpu = [statistics.median(out[n]["server_cpu_ms_per_request"]) for n in ("this",
                                                                                "baseline")]
        out["this"]["server_cpu_over_baseline"] = round(cpu[0] / cpu[1], 3)
    streams = {"single": ["mnist"] * 100_000, "mixed": mixed_stream(100_000, args.seed)}
    for load in (float(x) for x in args.loads.split(",")):
        rows = {name: {"load": load, "rate_rps": round(load * out[name]["capacity_rps"], 2),
                       "single": [], "mixed": []} for name in servers}
        # The capacity runs served one task only: the mixed stream's first round would
        # also pay the first use of the other seven (folding, programming their spare
        # PEs, planning their sets), a stall no later round has. One run of it first,
        # not counted (kept in the JSON as "warm_up").
        for name, server in servers.items():
            rows[name]["warm_up"] = open_loop_run(server, streams["mixed"], bodies,
                                                  rows[name]["rate_rps"], args)
            print(f"{name}: load {load:.1f} mixed, warm-up (not counted): "
                  f"{rows[name]['warm_up']}")
        for _ in range(args.rounds):
            for name, server in servers.items():
                for stream, tasks in streams.items():
                    run = open_loop_run(server, tasks, bodies, rows[name]["rate_rps"], args)
                    rows[name][stream].append(run)
                    print(f"{name}: load {load:.1f} {stream}: {run}")
        for name, row in rows.items():
            medians = {stream: statistics.median(r["throughput_rps"] for r in row[stream])
                       for stream in streams}
            row["median_throughput_rps"] = medians
            row["mixed_over_single"] = round(medians["mixed"] / medians["single"], 3)
            p99 = {stream: statistics.median(r["p99_ms"] or 0.0 for r in row[stream])
                   for stream in streams}
            row["median_p99_ms"] = p99
            row["mixed_over_single_p99"] = round(p99["mixed"] / p99["single"], 3) \
                if p99["single"] else None
            print(f"{name}: load {load:.1f}: mixed/single throughput "
                  f"{row['mixed_over_single']}, p99 {row['mixed_over_single_p99']}")
            out[name]["loads"].append(row)
    return out


def open_loop_run(server: ServerProcess, tasks: list[str], bodies: list[bytes], rate: float,
                  args: argparse.Namespace) -> dict[str, Any]:
    """One open-loop run, with the mean batch size the server formed meanwhile."""
    batches = metric_sum(server, "xma2_batch_size_count")
    served = metric_sum(server, "xma2_batch_size_sum")
    run = asyncio.run(open_loop(server.url, tasks, bodies, rate, args.seconds,
                                args.max_in_flight, args.seed))
    b = metric_sum(server, "xma2_batch_size_count") - batches
    s = metric_sum(server, "xma2_batch_size_sum") - served
    run["mean_batch"] = round(s / b, 2) if b else None
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--loads", default="0.7,1.0",
                        help="offered loads as fractions of the measured capacity")
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--capacity-rounds", type=int, default=1,
                        help="closed-loop runs per server (the median is the capacity)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="also serve this source tree (an older checkout) and measure "
                             "it in turn with this one in steps 1-2")
    parser.add_argument("--skip-reprogramming", action="store_true", help="skip step 3")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--chip-only", action="store_true",
                        help="only step 0, in both fidelities (no server)")
    parser.add_argument("--keep-malloc", action="store_true",
                        help="keep this process's allocator settings (the servers still "
                             "run with the ones `xma2 serve` sets)")
    args = parser.parse_args()
    from server.cli import MALLOC_ENV

    if not args.keep_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    bodies = images(32, args.seed)
    result: dict[str, Any] = {"command": "python bench/serve.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items() if v is not None and v is not False),
        "tasks": list(TASKS), "zipf_weights": [round(w, 3) for w in zipf_weights(8)]}
    result["chip"] = chip_only(args.max_batch_size, args.repeats, args.seed)
    print(f"chip alone: {result['chip']}")
    if args.chip_only:
        result["chip_crossbar"] = chip_only(args.max_batch_size, max(3, args.repeats // 5),
                                            args.seed, "crossbar")
        print(f"chip alone, crossbar fidelity: {result['chip_crossbar']}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        return
    with tempfile.TemporaryDirectory() as root:
        trees = {"this": None, **({"baseline": args.baseline} if args.baseline else {})}
        servers: dict[str, ServerProcess] = {}
        try:
            for name, source in trees.items():
                servers[name] = ServerProcess(
                    Path(root) / f"large-pool-{name}", source=source, spare_pes=8 * TASK_PES,
                    mask_entries=8, max_batch_size=args.max_batch_size).start()
                add_copies(servers[name])
            steps = large_pool(servers, bodies, args)
        finally:
            for server in servers.values():
                server.stop()
        result.update(steps.pop("this"))
        if args.baseline:
            base = steps["baseline"]
            result["baseline"] = {"source": str(args.baseline), **base}
            result["capacity_over_baseline"] = round(
                result["capacity_rps"] / base["capacity_rps"], 3)
            print(f"capacity: {result['capacity_rps']} req/s against the baseline's "
                  f"{base['capacity_rps']} ({result['capacity_over_baseline']}x)")

        if args.skip_reprogramming:
            if args.json:
                args.json.write_text(json.dumps(result, indent=1) + "\n")
            return
        result["reprogramming"] = {}
        rate = 0.7 * result["capacity_rps"]
        for policy in ("lru", "energy", "fifo"):
            server = ServerProcess(Path(root) / f"small-{policy}", spare_pes=2 * TASK_PES,
                                   mask_entries=4, scheduler=policy,
                                   max_batch_size=args.max_batch_size).start()
            try:
                add_copies(server)
                before_j, before_n = energy(server)
                run = asyncio.run(open_loop(server.url, mixed_stream(100_000, args.seed),
                                            bodies, rate, args.seconds, args.max_in_flight,
                                            args.seed))
                after_j, after_n = energy(server)
                loads = metric_sum(server, "xma2_task_loads_total")
            finally:
                server.stop()
            per_1000 = 1000 * (after_j - before_j) / max(1, after_n - before_n)
            result["reprogramming"][policy] = {
                "joules_per_1000_requests": per_1000, "task_loads": loads, **run}
            print(f"{policy}: {per_1000 * 1e3:.3f} mJ reprogramming per 1000 requests, "
                  f"{loads:.0f} loads, {run['throughput_rps']} req/s, p99 {run['p99_ms']} ms")
    fifo = result["reprogramming"]["fifo"]["joules_per_1000_requests"]
    for policy in ("lru", "energy"):
        mine = result["reprogramming"][policy]["joules_per_1000_requests"]
        result["reprogramming"][policy]["fifo_over_this"] = round(fifo / mine, 2) if mine else None
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "loads"}, indent=1))


if __name__ == "__main__":
    main()
