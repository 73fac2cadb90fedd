"""A real ``xma2 serve`` process on loopback, and the images the server tests send."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """Starts ``python -m server.cli serve`` with its own store and settings."""

    def __init__(self, root: Path, *, api_key: str | None = None, **settings: Any) -> None:
        self.root = root
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

    def start(self) -> LiveServer:
        self.data_root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "XMA2_STORE": str(self.store), "XMA2_DATA_ROOT": str(self.data_root),
               "XMA2_PORT": str(self.port), "XMA2_LOG_LEVEL": "info", "XMA2_JOB_THREADS": "1"}
        env.pop("XMA2_API_KEY", None)
        if self.api_key is not None:
            env["XMA2_API_KEY"] = self.api_key
        for name, value in self.settings.items():
            env[f"XMA2_{name.upper()}"] = str(value)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready()
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


def wait_for(check: Callable[[], Any], *, timeout: float = 180.0, every: float = 0.5,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def wait_job(client: httpx.Client, job_id: str, *, timeout: float = 300.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/adaptations/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout=timeout, what=f"job {job_id} to end")


# -- images --------------------------------------------------------------------------


def photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def photo_dataset(folder: Path, classes: dict[str, str], per_class: int, *, size: int = 64,
                  seed: int = 0) -> Path:
    """An ImageFolder of random square crops of scikit-image photos (class -> photo name)."""
    rng = np.random.default_rng(seed)
    for label, name in classes.items():
        image = photo(name)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        h, w = image.shape[:2]
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(image[y:y + side, x:x + side]).resize((size, size))
            crop.save(folder / label / f"{i:03d}.png")
    return folder
