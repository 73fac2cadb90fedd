"""Start an ``xma2 serve`` process and wait until it is ready (tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """``python -m server.cli serve`` on a free loopback port, with its own store under
    ``root`` and any settings as keyword arguments (``spare_pes=110``). ``source``: run the
    server of that source tree instead of this one (benchmarks against an older tree)."""

    def __init__(self, root: Path, *, api_key: str | None = None, source: Path | None = None,
                 **settings: Any) -> None:
        self.root = root
        self.source = source
        self.api_key = api_key
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root / f"server-{self.port}.log"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    def start(self) -> ServerProcess:
        self.data_root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "XMA2_STORE": str(self.store), "XMA2_DATA_ROOT": str(self.data_root),
               "XMA2_PORT": str(self.port), "XMA2_LOG_LEVEL": "info", "XMA2_JOB_THREADS": "1"}
        env.pop("XMA2_API_KEY", None)
        if self.api_key is not None:
            env["XMA2_API_KEY"] = self.api_key
        for name, value in self.settings.items():
            env[f"XMA2_{name.upper()}"] = str(value)
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source.resolve())
            # its own compiled operator: one cache shared by two sources rebuilds in turn
            env["TORCH_EXTENSIONS_DIR"] = str(self.source.resolve() / ".torch_ext")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.source.resolve() if self.source else None)
        try:
            self.wait_ready()
        except BaseException:  # a server that never became ready must not outlive the caller
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n"
                                     f"{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def client(self, *, key: str | None = None, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def operator(self) -> httpx.Client:
        return self.client(key=self.api_key)
