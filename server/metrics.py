"""Prometheus series of one server, on its own registry (no process-wide globals).

Request, latency and inference-energy series are updated as requests finish. Residency
series (task loads, evictions, reprogramming energy, cell writes) are read from the
spare-PE pool when Prometheus scrapes, so they can never drift from what the chip did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.chip.pool import SparePEPool
from server.runtime import Prediction

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _PoolCollector(Collector):
    def __init__(self, pool: SparePEPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        stats = list(self.pool.task_stats.items())
        loads = CounterMetricFamily("xma2_task_loads", "Times a task was made resident "
                                    "(spare PEs programmed, column masks loaded)",
                                    labels=["task"])
        evictions = CounterMetricFamily("xma2_task_evictions",
                                        "Times a task lost residency", labels=["task"])
        energy = CounterMetricFamily("xma2_reprogramming_energy_joules",
                                     "Energy of the spare-PE writes and mask-buffer loads "
                                     "charged to a task", labels=["task"])
        writes = CounterMetricFamily("xma2_cell_writes", "Spare-PE cells written for a task",
                                     labels=["task"])
        for task, s in stats:
            loads.add_metric([task], s.loads)
            evictions.add_metric([task], s.evictions)
            energy.add_metric([task], s.energy_j)
            writes.add_metric([task], s.programming.cells_written)
        resident = GaugeMetricFamily("xma2_task_resident",
                                     "1 while a task's spare PEs and masks are on the chip",
                                     labels=["task"])
        for task in self.pool.resident_tasks():
            resident.add_metric([task], 1.0)
        free = GaugeMetricFamily("xma2_spare_pes_free", "Spare PEs holding no resident task")
        free.add_metric([], self.pool.free_slots)
        yield from (loads, evictions, energy, writes, resident, free)


class _CallbackCollector(Collector):
    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        return self._collect()


class ServerMetrics:
    """Every series the server exports; ``registry`` is what ``/metrics`` renders."""

    def __init__(self, pool: SparePEPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("xma2_requests", "Prediction requests by task and outcome",
                                ["task", "status"], registry=r)
        self.latency = Histogram("xma2_request_latency_seconds",
                                 "Prediction latency from arrival to answer",
                                 ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.load_latency = Histogram("xma2_task_load_latency_seconds",
                                      "Time to make a task current when it was not "
                                      "(folding its weights, programming spare PEs)",
                                      ["task"], buckets=LOAD_BUCKETS, registry=r)
        self.inference_energy = Counter("xma2_inference_energy_joules",
                                        "Emulated chip energy of inference", ["task"],
                                        registry=r)
        self.crossbar_read_energy = Counter("xma2_crossbar_read_energy_joules",
                                            "Emulated crossbar cell-read energy of inference",
                                            ["task"], registry=r)
        self.adc_energy = Counter("xma2_adc_energy_joules",
                                  "Emulated ADC energy of inference", ["task"], registry=r)
        self.ready = Gauge("xma2_backbone_programmed",
                           "1 once the backbone is programmed and tasks are loaded",
                           registry=r)
        self.queue_depth = Gauge("xma2_queue_depth", "Requests waiting for a batch",
                                 registry=r)
        self.batch_size = Histogram("xma2_batch_size", "Requests per batch run on the chip",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("xma2_queue_wait_seconds",
                                    "Time a request waited in the queue before its batch ran",
                                    ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("xma2_rejected_requests", "Requests refused before queueing",
                                ["reason"], registry=r)
        r.register(_PoolCollector(pool))

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def observe_batch(self, size: int, waits: list[tuple[str, float]]) -> None:
        self.batch_size.observe(size)
        for task, seconds in waits:
            self.queue_wait.labels(task).observe(seconds)

    def observe_reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def add_collector(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self.registry.register(_CallbackCollector(collect))

    def observe_prediction(self, prediction: Prediction) -> None:
        task = prediction.task
        self.inference_energy.labels(task).inc(prediction.energy.total_j)
        self.crossbar_read_energy.labels(task).inc(prediction.energy.cell_read_j)
        self.adc_energy.labels(task).inc(prediction.energy.adc_j)
        if prediction.programmed or prediction.switched:
            self.load_latency.labels(task).observe(prediction.load_seconds)
