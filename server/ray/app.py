"""xma2 on Ray Serve: many emulated chips behind one HTTP ingress, with task-affine routing.

Two deployments make one Serve application: the ``Gateway`` ingress
(:mod:`server.ray.gateway`) and ``Chip`` replicas (:mod:`server.ray.replica`), each owning
one emulated chip. Every replica reads the same task store (a directory). Task management
(imports, adaptation jobs, activation) stays with one ``xma2 serve`` on that store; chips
pick up a newly activated version within ``refresh_s`` seconds. Start on a local Ray
cluster::

    python -m server.ray.app --replicas 2
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from ray import serve

from core.backbones.shipped import load_backbone
from server.cli import MALLOC_ENV
from server.ray.gateway import Gateway
from server.ray.replica import chip_class
from server.settings import Settings
from server.shipped_tasks import import_default_tasks
from task_store import TaskStore

logger = logging.getLogger(__name__)

APP_NAME = "xma2"


@dataclass(frozen=True)
class RayOptions:
    """How the Serve application is laid out; the chip itself is set by ``Settings``."""

    replicas: int = 2
    """Chip replicas (each loads its own backbone: about 0.5 GB)."""
    tasks_per_replica: int = 4
    """Stored tasks a replica holds before Serve unloads its least recently used one."""
    replica_cpus: float = 1.0
    """Ray CPUs reserved per chip replica (match XMA2_INFERENCE_THREADS)."""
    ingress_replicas: int = 1
    ingress_cpus: float = 0.25
    ingress_max_ongoing_requests: int = 256
    """Requests an ingress replica holds at once; it only waits on chips, so this is high:
    at Serve's default (5) the proxy backs off and retries, and throughput collapses."""
    max_ongoing_requests: int = 32
    """Requests a chip replica accepts at once (room for a batch running and one forming);
    the router sends more to a replica that does not hold the task yet."""
    refresh_s: float = 2.0
    """How stale a replica's view of a task's active version (and the ingress's task list)
    may be."""

    def __post_init__(self) -> None:
        for name in ("replicas", "tasks_per_replica", "ingress_replicas",
                     "max_ongoing_requests", "ingress_max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.replica_cpus < 0 or self.ingress_cpus < 0 or self.refresh_s < 0:
            raise ValueError("replica_cpus, ingress_cpus and refresh_s cannot be negative")


def prepare_store(settings: Settings) -> list[str]:
    """Create the store and import the shipped tasks once, before any replica starts.

    Done in one process because ``import_default_tasks`` is not safe to run from many
    replicas at once. Returns the names imported.
    """
    model = load_backbone(settings.backbone_file)
    with TaskStore.for_model(settings.store_root, model) as store:
        return import_default_tasks(store) if settings.default_tasks else []


def build(settings: Settings, options: RayOptions) -> serve.Application:
    """The Serve application (call ``serve.run`` on it); the store must exist already."""
    if settings.predict_requires_key:  # refuse rather than serve /predict unkeyed
        raise ValueError("XMA2_PREDICT_REQUIRES_KEY is not supported on Ray Serve: the "
                         "Gateway does not check API keys; put an authenticating proxy in "
                         "front of it")
    chip = serve.deployment(
        name="Chip", num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        # The same malloc settings as `xma2 serve` (freed activations stay in the process);
        # glibc reads them at start, so they go into the replica's environment.
        ray_actor_options={"num_cpus": options.replica_cpus,
                           "runtime_env": {"env_vars": dict(MALLOC_ENV)}},
    )(chip_class(options.tasks_per_replica))
    gateway = serve.deployment(
        name="Gateway", num_replicas=options.ingress_replicas,
        max_ongoing_requests=options.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": options.ingress_cpus},
    )(serve.ingress()(Gateway))
    return gateway.bind(chip.bind(settings, options.refresh_s), settings, options.refresh_s)


def build_app(args: dict[str, str]) -> serve.Application:
    """For ``serve run server.ray.app:build_app replicas=2 tasks_per_replica=4``.

    Settings come from the ``XMA2_*`` environment; the store is prepared here.
    """
    types = {f: type(getattr(RayOptions(), f)) for f in RayOptions.__dataclass_fields__}
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; choose from {sorted(types)}")
    options = RayOptions(**{k: types[k](v) for k, v in args.items()})
    settings = Settings()
    prepare_store(settings)
    return build(settings, options)


def main(argv: list[str] | None = None) -> int:
    """Start (or join) a Ray cluster, deploy the app, serve until SIGINT/SIGTERM."""
    import ray

    defaults = RayOptions()
    parser = argparse.ArgumentParser(
        prog="python -m server.ray.app",
        description="Serve xma2 on Ray Serve with task-affine routing. Chip and server "
                    "settings come from the XMA2_* environment (as for xma2 serve).")
    parser.add_argument("--address", default="local",
                        help="Ray cluster: 'local' starts one here (default), 'auto' joins "
                             "the cluster this node belongs to, or ray://host:port")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of a local cluster (default: all)")
    for name in RayOptions.__dataclass_fields__:
        default = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default),
                            default=default, help=f"(default {default})")
    args = parser.parse_args(argv)
    settings = Settings()
    options = RayOptions(**{n: getattr(args, n) for n in RayOptions.__dataclass_fields__})
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # In a child process, so that the driver does not keep a backbone's memory.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        imported = child.submit(prepare_store, settings).result()
    if imported:
        logger.info("imported the shipped tasks %s", ", ".join(imported))
    ray.init(address=args.address, num_cpus=args.num_cpus if args.address == "local" else None)
    serve.start(http_options={"host": settings.host, "port": settings.port,
                              "keep_alive_timeout_s": settings.keep_alive_s})
    serve.run(build(settings, options), name=APP_NAME, route_prefix="/")
    logger.info("serving on http://%s:%d with %d chip replica(s)", settings.host,
                settings.port, options.replicas)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    # Run the copy imported under its real name: Ray pickles classes of ``__main__`` by
    # value, which loses the names their (postponed) annotations refer to.
    from server.ray.app import main as _main

    raise SystemExit(_main())
