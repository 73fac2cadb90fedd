"""Server test fixtures: one live server for the API tests (real uvicorn, real HTTP,
shipped tasks), and one chip runtime for the tests that drive the runtime, the batcher
and the jobs in-process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from server.runtime import TaskRuntime, build_runtime
from server.settings import Settings
from server.shipped_tasks import import_default_tasks
from tests.server.live import LiveServer

API_KEY = "test-operator-key"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("server"), api_key=API_KEY,
                      max_image_pixels=4_000_000, max_body_bytes=2_000_000,
                      cancel_grace_s=20)
    live.start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def chip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskRuntime]:
    """The runtime ``xma2 serve`` builds (shipped backbone, shipped tasks loaded), without
    HTTP. Shared: a test that registers a task of its own removes it again."""
    root = tmp_path_factory.mktemp("chip")
    threads = torch.get_num_threads()
    runtime = build_runtime(Settings(store=root / "store", data_root=root / "data",
                                     inference_threads=1))
    torch.set_num_threads(threads)  # build_runtime sets the process's; keep the suite's
    try:
        import_default_tasks(runtime.store)
        runtime.worker.submit(runtime.load_all).result()
        yield runtime
    finally:
        runtime.close()
        runtime.store.close()
