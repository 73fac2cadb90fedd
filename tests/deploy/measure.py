"""Sizing numbers for docs/deploy.md: memory per served task and requests/s per replica.

    python -m tests.deploy.measure memory [--tasks 8]
    python -m tests.deploy.measure load --url http://127.0.0.1:8000 --task mnist \
        [--clients 1,4,16] [--seconds 15]
    python -m tests.deploy.measure server-load [--task mnist] [--clients 1,4,16]

``memory`` starts ``xma2 serve`` with room on the chip for every task, imports copies of
a shipped task and reads the process's VmRSS and VmHWM (/proc/<pid>/status) after the
first request of each further task. ``load`` drives a running server (``xma2 serve`` or
the Ray Serve app) with a closed loop of back-to-back clients on one task;
``server-load`` starts an ``xma2 serve`` for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from server.shipped_tasks import SHIPPED
from tests.server.live import LiveServer, encode, photo

TASK_PES = 103
"""Spare PEs one shipped task replaces (at most)."""


def process_memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def _body(task: str) -> bytes:
    if task == "imagenet":
        return encode(photo("chelsea"))
    return encode(photo("camera")[::8, ::8])


def memory(tasks: int) -> list[dict[str, Any]]:
    """Memory of ``xma2 serve`` after serving 0, 1 (imagenet), then 1 + k stored tasks."""
    rows = []
    with tempfile.TemporaryDirectory() as root:
        server = LiveServer(Path(root), spare_pes=(tasks + 1) * TASK_PES,
                            mask_entries=tasks + 1, max_prepared_tasks=tasks + 2).start()
        try:
            assert server.process is not None
            pid = server.process.pid
            with server.client() as c:
                names = list(SHIPPED)
                archive = c.get("/tasks/mnist/archive").content
                for i in range(tasks - len(names)):
                    name = f"mnist-copy{i}"
                    c.post("/tasks", params={"name": name}, content=archive).raise_for_status()
                    names.append(name)
                time.sleep(1)
                rows.append({"served": 0, **process_memory(pid)})
                print(json.dumps(rows[-1]))
                for n, task in enumerate(["imagenet", *names[:tasks]], 1):
                    for _ in range(3):
                        c.post("/predict", params={"task": task},
                               content=_body(task)).raise_for_status()
                    resident = sum(t["resident"] for t in c.get("/tasks").json()["tasks"])
                    rows.append({"served": n, "task": task, "resident": resident,
                                 **process_memory(pid)})
                    print(json.dumps(rows[-1]))
        finally:
            server.stop()
    return rows


async def closed_loop(url: str, task: str, clients: int, seconds: float) -> dict[str, Any]:
    """Back-to-back requests from ``clients`` clients for ``seconds``: rate and latency."""
    body = _body(task)
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            while time.monotonic() < deadline:
                started = time.monotonic()
                r = await c.post("/predict", params={"task": task}, content=body)
                if r.status_code == 200:
                    latencies.append(time.monotonic() - started)
                else:
                    errors += 1

    async with httpx.AsyncClient(base_url=url, timeout=120) as warm:
        for _ in range(3):
            (await warm.post("/predict", params={"task": task}, content=body)).raise_for_status()
    started = time.monotonic()
    await asyncio.gather(*[client() for _ in range(clients)])
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"task": task, "clients": clients, "seconds": round(elapsed, 1),
            "requests": len(latencies), "errors": errors,
            "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1e3 * statistics.median(latencies), 1),
            "p95_ms": round(1e3 * latencies[int(0.95 * (len(latencies) - 1))], 1)}


def load(url: str, task: str, clients: list[int], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for n in clients:
        rows.append(asyncio.run(closed_loop(url, task, n, seconds)))
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mem = commands.add_parser("memory")
    mem.add_argument("--tasks", type=int, default=8, help="stored tasks to serve")
    for name in ("load", "server-load"):
        sub = commands.add_parser(name)
        if name == "load":
            sub.add_argument("--url", required=True)
        sub.add_argument("--task", default="mnist")
        sub.add_argument("--clients", default="1,4,16")
        sub.add_argument("--seconds", type=float, default=15.0)
        sub.add_argument("--inference-threads", type=int, default=1)
    args = parser.parse_args()
    if args.command == "memory":
        memory(args.tasks)
        return
    clients = [int(c) for c in args.clients.split(",")]
    if args.command == "load":
        load(args.url, args.task, clients, args.seconds)
        return
    with tempfile.TemporaryDirectory() as root:
        server = LiveServer(Path(root), inference_threads=args.inference_threads).start()
        try:
            load(server.url, args.task, clients, args.seconds)
            assert server.process is not None
            print(json.dumps({"server": process_memory(server.process.pid)}))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
