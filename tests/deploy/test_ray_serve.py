"""Ray Serve: two chip replicas on a local Ray cluster, each task routed to the chip that holds it.

Each replica may hold two stored tasks (``tasks_per_replica=2``) and there are three, so
routing that ignored the task would make replicas unload and reload tasks all the time.
Task-affine routing settles every task on one replica: after the first request per task
nothing is loaded again, and every prediction equals the single-process server's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from core.data.datasets import load_raw
from server.images import decode_image
from server.runtime import build_runtime
from server.settings import Settings
from server.shipped_tasks import SHIPPED_DIR
from task_store import TaskStore
from task_store.archive import read_archive
from tests.server.live import encode, free_port, photo, wait_for

try:
    import ray
    from ray import serve

    from server.ray.app import APP_NAME, RayOptions, build, prepare_store
    from server.ray.gateway import REPLICA_HEADER, REPLICA_TASKS_HEADER
except ImportError as e:  # pragma: no cover - a missing test dependency must fail, not skip
    raise ImportError(f"{e}: install the Ray extra (`pip install -e '.[ray]'`)") from e

TASKS = {"fashion-mnist": "fashion_mnist", "mnist": "mnist5k", "animal-mnist": "animal_mnist"}
"""Stored (shipped) task -> the dataset its test images come from."""
PER_TASK = 8
CAT_CLASSES = range(281, 286)  # ImageNet's five domestic cats
TOP_K = 3
RAY_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "ray.yml"


@dataclass(frozen=True)
class Sample:
    task: str
    body: bytes
    truth: str | None


@dataclass(frozen=True)
class Answer:
    status: int
    replica: str
    held: frozenset[str]
    body: dict


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("ray")
    settings = Settings(store=root / "store", data_root=root / "data", default_tasks=True,
                        inference_threads=1)
    imported = prepare_store(settings)
    assert sorted(imported) == sorted(TASKS), "the shipped tasks are missing"
    return settings


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    """Interleaved: one image of every task, then the next image of every task, ..."""
    rows: dict[str, list[Sample]] = {}
    for task, dataset in TASKS.items():
        raw = load_raw(dataset)
        picks = range(len(raw.images) - PER_TASK, len(raw.images))
        rows[task] = [Sample(task, encode(raw.images[i]), raw.classes[int(raw.labels[i])])
                      for i in picks]
    photos = ("chelsea", "coffee", "astronaut", "rocket")
    rows["imagenet"] = [Sample("imagenet", encode(photo(photos[i % len(photos)])), None)
                        for i in range(PER_TASK)]
    return [row[i] for i in range(PER_TASK) for row in rows.values()]


@pytest.fixture(scope="module")
def reference(settings: Settings, samples: list[Sample]) -> dict[bytes, list[dict]]:
    """Predictions of the single-process runtime (what `xma2 serve` answers), by image."""
    threads = torch.get_num_threads()
    runtime = build_runtime(settings)  # as `xma2 serve` and every chip replica build it
    store = runtime.store
    try:
        runtime.load_all()  # on this thread: nothing else touches this engine
        out = {}
        for s in samples:
            x = runtime.preprocess(s.task, decode_image(s.body, max_pixels=10**8))
            p = runtime.infer(s.task, x, None, TOP_K)
            out[s.task.encode() + s.body] = [
                {"label": label, "probability": prob} for label, prob in p.top]
        return out
    finally:
        runtime.close()
        store.close()
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class RayApp:
    url: str
    metrics_url: str


@pytest.fixture(scope="module")
def ray_app(settings: Settings, reference: dict[bytes, list[dict]]) -> Iterator[RayApp]:
    metrics_port, http_port = free_port(), free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage report: nothing leaves the box
        # A proxy worker that imports Serve on two busy cores can miss the 5 s readiness
        # check; after three misses Serve kills it before it ever served.
        env.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 _metrics_export_port=metrics_port,
                 _system_config={"metrics_report_interval_ms": 500})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
            options = RayOptions(replicas=2, tasks_per_replica=2, replica_cpus=0.75,
                                 ingress_cpus=0.25)
            serve.run(build(settings, options), name=APP_NAME, route_prefix="/")
            yield RayApp(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}")
        finally:
            serve.shutdown()
            ray.shutdown()


def _predict(client: httpx.Client, s: Sample) -> Answer:
    r = client.post("/predict", params={"task": s.task, "top_k": TOP_K}, content=s.body,
                    headers={"content-type": "image/png"})
    held = r.headers.get(REPLICA_TASKS_HEADER, "")
    return Answer(r.status_code, r.headers.get(REPLICA_HEADER, ""),
                  frozenset(held.split(",")) - {""}, r.json())


def _ray_metrics(app: RayApp) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"{app.metrics_url}/metrics", timeout=10).text
    series: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series[sample.name].append((sample.labels, sample.value))
    return series


def _by(series: list[tuple[dict[str, str], float]], *keys: str) -> dict[tuple[str, ...], float]:
    """Sum of a series' samples grouped by the given labels."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for labels, value in series:
        out[tuple(labels.get(k, "") for k in keys)] += value
    return dict(out)


def test_tasks_stay_on_the_replica_that_holds_them(
        ray_app: RayApp, samples: list[Sample], reference: dict[bytes, list[dict]]) -> None:
    with httpx.Client(base_url=ray_app.url, timeout=120) as client:
        # Warm-up: the first request per task loads it on some replica; Serve then learns
        # (within about a second) which replica holds which task.
        home: dict[str, str] = {}
        for s in samples[:len(TASKS) + 1]:
            answer = _predict(client, s)
            assert answer.status == 200, answer.body
            if s.task in TASKS:
                home[s.task] = answer.replica
                assert s.task in answer.held
            time.sleep(0.5)

        def routing_known() -> bool:
            gauge = _ray_metrics(ray_app).get("ray_serve_registered_multiplexed_model_id", [])
            return {lab["model_id"] for lab, v in gauge if v == 1} == set(TASKS)

        wait_for(routing_known, timeout=30, every=0.5, what="replicas to report their tasks")
        time.sleep(1.0)  # the controller's broadcast to the ingress's router

        answers = [(s, _predict(client, s)) for s in samples]
        # The same again from four clients at once: affinity must hold under concurrency.
        with ThreadPoolExecutor(4) as pool:
            answers += list(zip(samples, pool.map(lambda s: _predict(client, s), samples),
                                strict=True))
        unknown = client.post("/predict", params={"task": "nope"}, content=samples[0].body)
        not_image = client.post("/predict", params={"task": "mnist"}, content=b"not an image")

    held: dict[str, frozenset[str]] = {}
    correct: dict[str, int] = defaultdict(int)
    for s, a in answers:
        assert a.status == 200, a.body
        assert a.body["task"] == s.task and len(a.body["predictions"]) == TOP_K
        expected = reference[s.task.encode() + s.body]
        assert [p["label"] for p in a.body["predictions"]] == [p["label"] for p in expected]
        assert [p["probability"] for p in a.body["predictions"]] == pytest.approx(
            [p["probability"] for p in expected], rel=1e-5, abs=1e-7)
        correct[s.task] += a.body["predictions"][0]["label"] == s.truth
        held[a.replica] = a.held  # ends as each replica's last word
        if s.task in TASKS:
            assert a.replica == home[s.task], f"{s.task} left its replica"
            assert not a.body["programmed"] and a.body["energy"]["reprogramming_j"] == 0
    for task in TASKS:
        assert correct[task] >= PER_TASK * 5 // 8, (task, correct[task])
    cat = next(a for s, a in answers if s.task == "imagenet")
    assert cat.body["predictions"][0]["label"] in _imagenet_cats()

    # Each task is held by exactly one of the two replicas, at most two per replica.
    assert len(held) == 2 and set(home.values()) == set(held)
    assert sorted(t for tasks in held.values() for t in tasks) == sorted(TASKS)
    assert all(len(tasks) <= 2 for tasks in held.values())
    assert {task: rep for rep, tasks in held.items() for task in tasks} == home

    assert unknown.status_code == 404 and "served tasks" in unknown.json()["error"]["message"]
    assert not_image.status_code == 415, not_image.text

    # Serve's multiplex metrics: one load per task, no unload; the registered-task gauge
    # of each replica is its held set. The chips' own series: each task programmed once.
    requests_ok: dict[str, int] = defaultdict(int)
    for s in [*samples[:len(TASKS) + 1], *(s for s, _ in answers)]:
        requests_ok[s.task] += 1

    def settled() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        m = _ray_metrics(ray_app)
        ok = _by([(lab, v) for lab, v in m.get("ray_xma2_requests_total", [])
                  if lab["status"] == "ok"], "task")
        programmed = _by(m.get("ray_xma2_task_loads_total", []), "task")
        waits = _by(m.get("ray_xma2_queue_wait_seconds_count", []), "task")
        done = (ok == {(t,): float(n) for t, n in requests_ok.items()} == waits
                and programmed == {(t,): 1.0 for t in TASKS})
        return m if done else None

    m = wait_for(settled, timeout=30, every=0.5, what="Ray to export the request counts")
    loads = _by(m["ray_serve_multiplexed_models_load_counter_total"], "replica")
    assert loads == {(rep,): float(len(tasks)) for rep, tasks in held.items()}
    unloads = _by(m.get("ray_serve_multiplexed_models_unload_counter_total", []), "replica")
    assert sum(unloads.values()) == 0
    registered = {(lab["replica"], lab["model_id"]) for lab, v
                  in m["ray_serve_registered_multiplexed_model_id"] if v == 1}
    assert registered == {(rep, t) for rep, tasks in held.items() for t in tasks}
    models = _by(m["ray_serve_num_multiplexed_models"], "replica")
    assert models == {(rep,): float(len(tasks)) for rep, tasks in held.items()}
    programmed = _by(m["ray_xma2_task_loads_total"], "task")
    assert programmed == {(t,): 1.0 for t in TASKS}
    assert sum(v for _, v in m["ray_xma2_reprogramming_energy_joules_total"]) > 0
    assert all(v > 0 for v in _by(m["ray_xma2_inference_energy_joules_total"], "task").values())
    # Every answered request waited in its replica's batcher (one queue wait each, as
    # `settled` checked) and ran in one of its batches.
    batches = sum(v for _, v in m["ray_xma2_batch_size_count"])
    assert 0 < batches <= sum(requests_ok.values())
    # deploy/prometheus/rules/ray.yml gives every xma2 series Ray exports its server name.
    (group,) = yaml.safe_load(RAY_RULES.read_text())["groups"]
    recorded = {rule["expr"] for rule in group["rules"]}
    assert {n for n in m if n.startswith("ray_xma2_")} <= recorded


def _imagenet_cats() -> set[str]:
    from core.backbones import imagenet_labels

    labels = imagenet_labels()
    return {labels[i] for i in CAT_CLASSES}



def test_replicas_follow_the_shared_store(ray_app: RayApp, settings: Settings,
                                          samples: list[Sample]) -> None:
    """A version activated in the store is served within ``refresh_s``; a deleted task is
    refused. (Runs after the routing test: it changes the store.)"""
    archive = SHIPPED_DIR / "fashion-mnist.tar"
    manifest, _ = read_archive(archive)
    with TaskStore(settings.store_root,
                   backbone_fingerprint=manifest.backbone_fingerprint) as store:
        # Version 2 of "mnist" is the Fashion-MNIST task: its answers change labels.
        record = store.import_archive(archive, name="mnist")
        store.delete("animal-mnist")
    digit = next(s for s in samples if s.task == "mnist")
    animal = next(s for s in samples if s.task == "animal-mnist")
    patience = RayOptions().refresh_s + 20
    with httpx.Client(base_url=ray_app.url, timeout=120) as client:
        def upgraded() -> Answer | None:
            answer = _predict(client, digit)
            assert answer.status == 200, answer.body
            return answer if answer.body["version"] == record.version else None

        answer = wait_for(upgraded, timeout=patience, every=0.5, what="mnist v2 to be served")
        assert {p["label"] for p in answer.body["predictions"]} <= set(manifest.labels)
        gone = wait_for(lambda: (a := _predict(client, animal)).status == 404 and a,
                        timeout=patience, every=0.5, what="animal-mnist to be refused")
        assert "animal-mnist" in gone.body["error"]["message"]
