"""Compose, Prometheus and Grafana files: consistent with each other and with a live server.

The dashboard is only useful if every series it queries is one the server exports, so
its queries are checked against a real server's ``/metrics`` and run on a real
Prometheus scraping that server with deploy/prometheus/prometheus.yml.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from prometheus_client.parser import text_string_to_metric_families

from tests.server.live import (
    LiveServer,
    encode,
    photo,
    prometheus_server,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "xma2.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
GRID_COLUMNS = 24

# -- PromQL: which metrics a query reads -------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL (or Grafana ``label_values``) expression selects."""
    grafana = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)\s*", expr)
    if grafana:
        return {grafana.group(1)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][\w:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group(0).lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(match.group(0))
    return names


def test_metric_names_of_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (task, le) (rate(xma2_request_latency_seconds_bucket'
            '{task=~"$task",status!="ok"}[$__rate_interval]))) / on (task) group_left '
            'sum without (le) (xma2_b) > bool 0')
    assert metric_names(expr) == {"xma2_request_latency_seconds_bucket", "xma2_b"}
    assert metric_names("label_values(xma2_requests_total, task)") == {"xma2_requests_total"}


# -- the dashboard -----------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    where: str
    expr: str


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    queries = [Query(f"panel {p['title']!r} {t['refId']}", t["expr"])
               for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        queries.append(Query(f"variable {variable['name']}",
                             query["query"] if isinstance(query, dict) else query))
    return queries


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_dashboard_is_valid_and_uses_the_provisioned_datasource() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    (source,) = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" /
                      "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        mine = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"])
                for dy in range(grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == source["uid"]
    # What the issue asks the dashboard to show.
    everything = " ".join(q.expr for q in dashboard_queries(dashboard))
    for metric in ("xma2_requests_total", "xma2_request_latency_seconds_bucket",
                   "xma2_reprogramming_energy_joules_total",
                   "xma2_inference_energy_joules_total", "xma2_task_loads_total",
                   "xma2_queue_depth", "xma2_adaptation_jobs"):
        assert metric in everything, metric


# -- compose, provisioning, Prometheus configuration -------------------------------------


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to deploy/) or named volume."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[target] = source
    return out


def test_compose_wires_server_prometheus_and_grafana() -> None:
    compose = _yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"xma2", "prometheus", "grafana"}
    server = services["xma2"]
    context = (DEPLOY / server["build"]["context"]).resolve()
    assert context == ROOT and (context / server["build"]["dockerfile"]).is_file()
    dockerfile = DockerfileParser(str(ROOT / "Dockerfile"))
    port = dockerfile.envs["XMA2_PORT"]
    assert any(p.split(":")[-1] == port for p in server["ports"])
    volumes = [v for i in dockerfile.structure if i["instruction"] == "VOLUME"
               for v in json.loads(i["value"])]
    store_mounts = _mounts(server)
    assert set(volumes) <= set(store_mounts), "the image's volume must be a named volume"
    assert all(store_mounts[v] in compose["volumes"] for v in volumes)

    for name in ("prometheus", "grafana"):  # every bind mount exists in the repository
        for source in _mounts(services[name]).values():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source

    prometheus = services["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    config_file = DEPLOY / _mounts(prometheus)[config_path]
    (job,) = _yaml(config_file)["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"xma2:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"

    grafana = _mounts(services["grafana"])
    (source,) = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" /
                      "prometheus.yml")["datasources"]
    prom_port = prometheus["ports"][0].split(":")[-1]
    assert source["url"] == f"http://prometheus:{prom_port}"
    (provider,) = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" /
                        "xma2.yml")["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (DEPLOY / grafana[dashboards_dir] / DASHBOARD.name).resolve() == DASHBOARD
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-ray.yml"])
def test_prometheus_configs_pass_promtool(config: str) -> None:
    result = subprocess.run([PROMTOOL, "check", "config", str(DEPLOY / "prometheus" / config)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ray_rules_record_each_ray_series_under_its_server_name() -> None:
    (group,) = _yaml(DEPLOY / "prometheus" / "rules" / "ray.yml")["groups"]
    for rule in group["rules"]:
        assert rule["expr"] == f"ray_{rule['record']}", rule
    recorded = {r["record"] for r in group["rules"]}
    # The series the dashboard needs that a Ray deployment has at all.
    for metric in ("xma2_requests_total", "xma2_request_latency_seconds_bucket",
                   "xma2_inference_energy_joules_total",
                   "xma2_reprogramming_energy_joules_total", "xma2_task_loads_total"):
        assert metric in recorded


# -- against a live server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("monitoring")).start()
    try:
        with server.client() as c:
            photo_png, digit_png = encode(photo("chelsea")), encode(photo("camera")[::8, ::8])
            # Three stored tasks on a chip with room for two: loads and an eviction.
            for task in ("imagenet", "fashion-mnist", "mnist", "animal-mnist"):
                body = digit_png if "mnist" in task else photo_png
                r = c.post("/predict", params={"task": task}, content=body)
                assert r.status_code == 200, r.text
            assert c.post("/predict", params={"task": "mnist"}, content=b"x").status_code == 415
        yield server
    finally:
        server.stop()


def _exported(server: LiveServer) -> tuple[set[str], set[str]]:
    """Sample names the server declares on /metrics, and those with at least one sample."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    declared, sampled = set(), set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "summary": ("_sum", "_count")}.get(family.type, ("",))
        declared |= {family.name + s for s in suffixes} | {family.name}
        sampled |= {s.name for s in family.samples}
    return declared, sampled


def test_every_dashboard_metric_exists_on_a_live_server(live: LiveServer) -> None:
    declared, _ = _exported(live)
    missing = {q.where: sorted(metric_names(q.expr) - declared)
               for q in dashboard_queries(_dashboard()) if metric_names(q.expr) - declared}
    assert not missing, f"the dashboard queries series /metrics does not export: {missing}"


@pytest.fixture(scope="module")
def prometheus(live: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """deploy/prometheus/prometheus.yml, pointed at the live server, on a real Prometheus."""
    folder = tmp_path_factory.mktemp("prometheus")
    config = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{live.port}"]}]
    with prometheus_server(folder, yaml.safe_dump(config)) as url:
        def scraped() -> bool:
            try:
                r = httpx.get(f"{url}/api/v1/query", params={"query": "count(up == 1)"},
                              timeout=2)
            except httpx.TransportError:
                return False
            result = r.json()["data"]["result"] if r.status_code == 200 else []
            return bool(result) and float(result[0]["value"][1]) >= 1
        wait_for(scraped, timeout=60, what="Prometheus to scrape the server")
        yield url


def test_dashboard_queries_run_on_prometheus(live: LiveServer, prometheus: str) -> None:
    """Each query parses; each one whose series have samples returns data."""
    time.sleep(4)  # a few scrapes, so that rates over the window have two points
    _, sampled = _exported(live)
    empty = []
    for q in dashboard_queries(_dashboard()):
        if q.where.startswith("variable"):
            continue  # Grafana's own function, not PromQL
        expr = q.expr.replace("$__rate_interval", "1m").replace("$task", ".*")
        r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "success", (q.where, r.text)
        if metric_names(q.expr) <= sampled and not r.json()["data"]["result"]:
            empty.append(q.where)
    assert not empty, f"queries without data although their series exist: {empty}"
