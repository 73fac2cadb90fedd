"""A real ``xma2 serve`` process on loopback, and the images the server tests send."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from server.launcher import ServerProcess, free_port

LiveServer = ServerProcess
__all__ = ["LiveServer", "encode", "free_port", "photo", "photo_dataset",
           "prometheus_server", "wait_for", "wait_job"]


PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@contextmanager
def prometheus_server(folder: Path, config: str) -> Iterator[str]:
    """A real Prometheus on a free loopback port with ``config`` (YAML); yields its URL."""
    assert Path(PROMETHEUS).exists(), (
        "the Prometheus server is missing: `apt-get install prometheus` (deploy/setup.sh "
        "installs it)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _prometheus_ready(url), timeout=60, what="Prometheus to be ready")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def _prometheus_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


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


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar of these regular files, in memory (an archive as uploaded)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return out.getvalue()
