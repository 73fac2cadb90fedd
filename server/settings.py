"""Server settings, read from ``XMA2_*`` environment variables or ``xma2 serve`` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.chip.config import Fidelity

DEFAULT_STORE = Path.home() / ".local" / "share" / "xma2" / "store"
DEFAULT_DATA_ROOT = Path.home() / ".local" / "share" / "xma2" / "datasets"


class Settings(BaseSettings):
    """Everything an operator can set; each field is also ``XMA2_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="XMA2_", frozen=True, extra="forbid",
                                      use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on."""
    keep_alive_s: int = Field(75, ge=1)
    """How long an idle keep-alive connection stays open. Longer than the 60 s idle timeout
    of common load balancers and proxies, so that they, not the server, close idle
    connections: a client (or proxy) that reuses a connection the server has just closed
    gets no answer at all."""
    backbone_file: Path | None = None
    """Calibrated 4-bit backbone (default: the MobileNetV2 backbone shipped with xma2)."""
    store: Path = DEFAULT_STORE
    """Task store directory (task versions, their index, job records and checkpoints)."""
    data_root: Path = DEFAULT_DATA_ROOT
    """Adaptation jobs may read ImageFolder datasets only below this directory."""
    default_tasks: bool = True
    """Import each shipped adapted task once per store at start-up (deleted ones stay deleted)."""
    api_key: SecretStr | None = None
    """Bearer token of the operator endpoints (tasks, adaptations); None: they are open.
    Only from the environment (XMA2_API_KEY), so it never shows in a process list."""
    predict_requires_key: bool = False
    """Ask for the API key on /predict too."""
    fidelity: Fidelity = Fidelity.IDEAL
    """Default fidelity of /predict (a request may ask for the other)."""
    top_k: int = Field(5, ge=1, le=100)
    """Labels returned by /predict unless the request asks for another number."""
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """Largest request body accepted (images, archives); larger ones get 413."""
    max_image_pixels: int = Field(16_000_000, ge=1)
    """Largest decoded image (width x height); larger ones get 413."""
    spare_pes: int | None = Field(None, ge=0)
    """Spare PEs of the emulated chip (default: two tasks at P = 10%)."""
    mask_entries: int = Field(4, ge=1)
    """Mask-buffer entries per column: how many tasks' column masks are held at once."""
    eviction: Literal["lru", "energy"] = "lru"
    """Which resident task makes room: least recently used, or cheapest to reload."""
    max_batch_size: int = Field(16, ge=1, le=256)
    """Requests run together in one forward pass (they may mix tasks)."""
    max_queue_delay_ms: float = Field(5.0, ge=0)
    """How long the first queued request may wait for others to batch with."""
    max_queue: int = Field(256, ge=1)
    """Requests waiting at most; more are refused with 429 and Retry-After."""
    scheduler: Literal["fifo", "lru", "energy"] = "lru"
    """Batch order: fifo (arrival order), or residency-aware: resident tasks first, then the
    task with the oldest request (lru) or the most waiting requests per joule (energy)."""
    max_reorder_wait_ms: float = Field(200.0, ge=0)
    """Residency-aware schedulers take a request that has waited this long before any that
    has not, oldest first (the oldest overdue request is in the next batch)."""
    max_prepared_tasks: int = Field(8, ge=1)
    """Tasks whose folded weights stay in memory."""
    inference_threads: int = Field(1, ge=1)
    """torch threads of the inference worker."""
    job_threads: int = Field(1, ge=1)
    """torch threads of the adaptation worker process."""
    max_concurrent_jobs: int = Field(1, ge=1)
    """Adaptation jobs running at once (each in its own process)."""
    cancel_grace_s: float = Field(10.0, gt=0)
    """How long a cancelled job may take to stop before its process is terminated."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Server and access log level."""

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def store_root(self) -> Path:
        return self.store.expanduser()

    @property
    def data_dir(self) -> Path:
        return self.data_root.expanduser()
