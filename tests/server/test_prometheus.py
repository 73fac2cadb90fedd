"""A real Prometheus scrapes the server and sees per-task reprogramming energy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.live import LiveServer, encode, photo, prometheus_server, wait_for


@pytest.fixture
def small_pool_server(tmp_path: Path) -> Iterator[LiveServer]:
    # 110 spare PEs hold one shipped task (about 102 replaced PEs each), so every switch
    # between the shipped tasks evicts one and programs the other.
    live = LiveServer(tmp_path / "server", spare_pes=110).start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def prometheus(tmp_path: Path, small_pool_server: LiveServer) -> Iterator[str]:
    config = ("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
              "scrape_configs:\n  - job_name: xma2\n    static_configs:\n"
              f"      - targets: ['127.0.0.1:{small_pool_server.port}']\n")
    with prometheus_server(tmp_path / "prometheus", config) as url:
        yield url


def _query(url: str, promql: str) -> dict[str, float]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    return {s["metric"].get("task", ""): float(s["value"][1]) for s in r.json()["data"]["result"]}


def test_prometheus_sees_reprogramming_energy_per_task(small_pool_server: LiveServer,
                                                       prometheus: str) -> None:
    body = encode(photo("camera"))
    with small_pool_server.client() as c:
        for _ in range(2):
            for task in ("mnist", "fashion-mnist", "animal-mnist"):
                r = c.post("/predict", params={"task": task}, content=body)
                assert r.status_code == 200, r.text
                assert r.json()["programmed"] and r.json()["energy"]["reprogramming_j"] > 0
        energy = c.get("/energy").json()["tasks"]

    def scraped() -> dict[str, float] | None:
        # Loads first: a scrape landing between the two queries then gives energy at
        # least as new as the loads (read the other way round, it gave one load's energy)
        loads = _query(prometheus, "xma2_task_loads_total")
        tasks = ("mnist", "fashion-mnist", "animal-mnist")
        if all(loads.get(t) == 2 for t in tasks):
            return _query(prometheus, "xma2_reprogramming_energy_joules_total")
        return None

    series = wait_for(scraped, timeout=60, every=1, what="Prometheus to scrape the switches")
    for task in ("mnist", "fashion-mnist", "animal-mnist"):
        assert series[task] == pytest.approx(energy[task]["reprogramming_j"], rel=1e-9)
        assert series[task] > 0
    evictions = _query(prometheus, "xma2_task_evictions_total")
    assert sum(evictions.values()) >= 5
    requests = _query(prometheus, 'sum by (task) (xma2_requests_total{status="ok"})')
    assert requests["mnist"] == 2
