"""One live server for the API tests (real uvicorn, real HTTP, shipped tasks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
