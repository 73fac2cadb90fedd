"""On-disk form of one task version: packed tensors in safetensors plus a JSON manifest.

A version is two files, ``task.safetensors`` and ``manifest.json`` (docs/task-store.md).
Per-layer tensors are concatenated per kind, each layer's segment starting on a byte
boundary, and packed as little-endian bit streams (value ``i`` occupies bits
``[i*b, (i+1)*b)``, bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``):

- ``pe_mask``: 1 bit per PE, row-major ``[row_groups, col_groups]``;
- ``spare_codes``: ``weight_bits`` per weight code, stored offset-binary
  (``code + 2**(weight_bits-1)``, the cell encoding), ``[replaced, outputs_per_pe,
  rows_per_group]`` in ``pe_mask.nonzero()`` order;
- ``column_codes``: :func:`code_bits` per logical column, ``[row_groups, out_channels]``.

Head and digital tensors keep their dtype, so a round trip is bit-identical. Nothing
here unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from core.confidence import UNCALIBRATED, Confidence
from core.errors import ConfigError
from core.task_state import (
    LayerTaskState,
    TaskHead,
    TaskState,
    column_code_bits,
    ones_code,
    validate_task_name,
)
from task_store.errors import FormatError

SCHEMA_VERSION = 1
TENSORS_FILE = "task.safetensors"
MANIFEST_FILE = "manifest.json"
VERSION_FILES = (MANIFEST_FILE, TENSORS_FILE)
MAX_MANIFEST_BYTES = 16 * 2**20
FORMAT_TAG = f"xma2-task/{SCHEMA_VERSION}"

_PE_MASK = "pe_mask"
_SPARE = "spare_codes"
_COLUMNS = "column_codes"
_HEAD_WEIGHT = "head/weight"
_HEAD_BIAS = "head/bias"
_DIGITAL = "digital/"


def code_bits(shift_levels: int) -> int:
    """Bits per stored column code (:func:`core.task_state.column_code_bits`), for the shift
    levels a task file may declare."""
    if not 0 <= shift_levels <= 7:
        raise FormatError(f"shift_levels must be in 0..7, got {shift_levels}")
    return column_code_bits(shift_levels)


def packed_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_uint(values: Tensor, bits: int) -> Tensor:
    """Non-negative integers below ``2**bits`` -> uint8 bit stream (layout in the module doc)."""
    v = values.reshape(-1).to(torch.int64).numpy()
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise FormatError(f"values must be in [0, {2**bits - 1}] to pack in {bits} bits")
    if bits == 8:
        out = v.astype(np.uint8)
    elif bits == 4:
        nibbles = np.zeros(v.size + v.size % 2, dtype=np.uint8)
        nibbles[: v.size] = v
        out = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8, copy=False)
    else:
        bit_matrix = (v[:, None] >> np.arange(bits)) & 1
        out = np.packbits(bit_matrix.astype(np.uint8).reshape(-1), bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.uint8))


def unpack_uint(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_uint`: the first ``count`` values as int64."""
    return torch.from_numpy(_unpack(packed.numpy(), bits, count).astype(np.int64))


def _unpack(p: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unpack in numpy (no per-call torch overhead: a task has ~100 segments)."""
    if p.size != packed_bytes(count, bits):
        raise FormatError(f"{count} values of {bits} bits need {packed_bytes(count, bits)} "
                          f"bytes, found {p.size}")
    if bits == 8:
        return p
    if bits == 4:
        out = np.empty(2 * p.size, dtype=np.uint8)
        out[0::2] = p & 0x0F
        out[1::2] = p >> 4
        return out[:count]
    bit_matrix = np.unpackbits(p, count=count * bits, bitorder="little").reshape(count, bits)
    if bits == 1:
        return bit_matrix[:, 0]
    weights = (1 << np.arange(bits, dtype=np.int32)).astype(np.int32)
    return bit_matrix.astype(np.int32) @ weights


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- manifest ------------------------------------------------------------------------


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise FormatError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise FormatError(f"{where}: field {key!r} has the wrong type {type(value).__name__}")
    return value


@dataclass(frozen=True)
class LayerRecord:
    """Shape of one layer's packed segments; decoding needs nothing else."""

    name: str
    row_groups: int
    col_groups: int
    outputs_per_pe: int
    rows_per_group: int
    out_channels: int
    weight_bits: int
    replaced_pes: int

    @property
    def pe_mask_bytes(self) -> int:
        return packed_bytes(self.row_groups * self.col_groups, 1)

    @property
    def spare_count(self) -> int:
        return self.replaced_pes * self.outputs_per_pe * self.rows_per_group

    @property
    def spare_bytes(self) -> int:
        return packed_bytes(self.spare_count, self.weight_bits)

    def column_bytes(self, bits: int) -> int:
        return packed_bytes(self.row_groups * self.out_channels, bits)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerRecord:
        where = "manifest layer"
        name = _field(data, "name", str, where)
        values = {k: _field(data, k, int, f"{where} {name}")
                  for k in ("row_groups", "col_groups", "outputs_per_pe", "rows_per_group",
                            "out_channels", "weight_bits", "replaced_pes")}
        if any(v < 0 for v in values.values()) or not 2 <= values["weight_bits"] <= 16:
            raise FormatError(f"{where} {name}: negative size or weight_bits outside 2..16")
        if values["replaced_pes"] > values["row_groups"] * values["col_groups"]:
            raise FormatError(f"{where} {name}: more replaced PEs than PEs")
        return cls(name=name, **values)


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """Everything about a task version except its tensors (``manifest.json``)."""

    task: str
    version: int
    method: str
    backbone_fingerprint: str
    shift_levels: int
    labels: tuple[str, ...]
    layers: tuple[LayerRecord, ...]
    digital: tuple[str, ...]
    files: dict[str, FileRecord]
    sizes: dict[str, int]
    created: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    origin: dict[str, Any] | None = None
    """Where an imported version came from (its task, version and creation time)."""
    schema_version: int = SCHEMA_VERSION
    confidence: Confidence | None = None
    """Temperature and OOD threshold (:mod:`core.confidence`); None (and absent from the
    JSON, as in versions written before it existed): T = 1, nothing flagged."""

    def to_json(self) -> bytes:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["digital"] = list(self.digital)
        if self.confidence is None:
            del data["confidence"]
        else:
            data["confidence"] = self.confidence.to_dict()
        return (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise FormatError(f"manifest of {len(raw)} bytes exceeds {MAX_MANIFEST_BYTES}")
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant,
                              parse_float=_finite_float)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"manifest is not valid UTF-8 JSON: {e}") from e
        except RecursionError as e:
            raise FormatError("manifest JSON is nested too deeply") from e
        if not isinstance(data, dict):
            raise FormatError("manifest must be a JSON object")
        schema = _field(data, "schema_version", int, "manifest")
        if schema != SCHEMA_VERSION:
            raise FormatError(f"manifest schema version {schema}, this xma2 reads "
                              f"{SCHEMA_VERSION}; upgrade xma2 or re-export the task")
        task = _field(data, "task", str, "manifest")
        try:
            validate_task_name(task)
        except ValueError as e:
            raise FormatError(f"manifest: {e}") from e
        files = {}
        for name, rec in _field(data, "files", dict, "manifest").items():
            if name not in VERSION_FILES or name == MANIFEST_FILE:
                raise FormatError(f"manifest lists an unexpected file {name!r}")
            sha = _field(rec, "sha256", str, f"manifest file {name}")
            size = _field(rec, "bytes", int, f"manifest file {name}")
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha) or size < 0:
                raise FormatError(f"manifest file {name}: bad sha256 or size")
            files[name] = FileRecord(sha, size)
        if TENSORS_FILE not in files:
            raise FormatError(f"manifest does not list {TENSORS_FILE}")
        labels = _field(data, "labels", list, "manifest")
        digital = _field(data, "digital", list, "manifest")
        if not all(isinstance(x, str) for x in [*labels, *digital]):
            raise FormatError("manifest labels and digital names must be strings")
        metrics = _field(data, "metrics", dict, "manifest")
        if not all(isinstance(v, int | float) and not isinstance(v, bool)
                   and abs(v) < 1e300 for v in metrics.values()):
            raise FormatError("manifest metrics must be finite numbers")
        sizes = _field(data, "sizes", dict, "manifest")
        if not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
            raise FormatError("manifest sizes must be non-negative integers")
        origin = data.get("origin")
        if origin is not None and not isinstance(origin, dict):
            raise FormatError("manifest origin must be an object or null")
        shift_levels = _field(data, "shift_levels", int, "manifest")
        code_bits(shift_levels)
        confidence = data.get("confidence")
        if confidence is not None:
            if not isinstance(confidence, dict):
                raise FormatError("manifest confidence must be an object or absent")
            try:
                confidence = Confidence.from_dict(confidence)
            except ConfigError as e:
                raise FormatError(f"manifest confidence: {e}") from e
        version = _field(data, "version", int, "manifest")
        if version < 1:
            raise FormatError(f"manifest version must be >= 1, got {version}")
        return cls(
            task=task,
            version=version,
            method=_field(data, "method", str, "manifest"),
            backbone_fingerprint=_field(data, "backbone_fingerprint", str, "manifest"),
            shift_levels=shift_levels,
            labels=tuple(labels),
            layers=tuple(LayerRecord.from_dict(x)
                         for x in _field(data, "layers", list, "manifest")),
            digital=tuple(digital),
            files=files,
            sizes=dict(sizes),
            created=_field(data, "created", str, "manifest"),
            hyperparameters=_field(data, "hyperparameters", dict, "manifest"),
            metrics={k: float(v) for k, v in metrics.items()},
            origin=origin,
            schema_version=schema,
            confidence=confidence,
        )

    def renamed(self, task: str, version: int, *, origin: dict[str, Any] | None) -> Manifest:
        """The same tensors under another name and version (an import)."""
        return replace(self, task=validate_task_name(task), version=version, origin=origin)


# -- tensors -------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedTask:
    """A task's tensor file and the facts its manifest records about it."""

    data: bytes
    layers: tuple[LayerRecord, ...]
    digital: tuple[str, ...]
    sizes: dict[str, int]

    @property
    def sha256(self) -> str:
        return sha256_hex(self.data)


def encode_task(task: TaskState, layer_bits: Mapping[str, int] | None = None) -> EncodedTask:
    """Pack a task's tensors into one safetensors blob (deterministic for equal states).

    Args:
        task: the task state.
        layer_bits: weight precision of each layer (from the backbone mapping); a
            layer missing here is packed at the fewest bits (>= 4) its codes need.
    """
    bits = code_bits(task.shift_levels)
    records, masks, spares, columns = [], [], [], []
    for name in sorted(task.layers):
        state = task.layers[name]
        n, outputs, rows = state.spare_codes.shape
        row_groups, col_groups = state.pe_mask.shape
        weight_bits = (layer_bits or {}).get(name) or _weight_bits_of(state)
        records.append(LayerRecord(name, row_groups, col_groups, outputs, rows,
                                   state.column_codes.shape[1], weight_bits, n))
        masks.append(pack_uint(state.pe_mask.to(torch.int64), 1))
        spares.append(pack_uint(state.spare_codes.to(torch.int64) + 2 ** (weight_bits - 1),
                                weight_bits))
        columns.append(pack_uint(state.column_codes, bits))
    empty = torch.zeros(0, dtype=torch.uint8)
    tensors: dict[str, Tensor] = {
        _PE_MASK: torch.cat(masks) if masks else empty,
        _SPARE: torch.cat(spares) if spares else empty.clone(),
        _COLUMNS: torch.cat(columns) if columns else empty.clone(),
        _HEAD_WEIGHT: task.head.weight.detach().contiguous().clone(),
        _HEAD_BIAS: task.head.bias.detach().contiguous().clone(),
    }
    for name in sorted(task.digital):
        tensors[_DIGITAL + name] = task.digital[name].detach().contiguous().clone()
    data = save_tensors(tensors, metadata={"format": FORMAT_TAG})
    sizes = {
        "pe_mask": tensors[_PE_MASK].numel(),
        "spare_codes": tensors[_SPARE].numel(),
        "column_codes": tensors[_COLUMNS].numel(),
        "head": _nbytes(tensors[_HEAD_WEIGHT]) + _nbytes(tensors[_HEAD_BIAS]),
        "digital": sum(_nbytes(tensors[_DIGITAL + n]) for n in task.digital),
        "tensors_file": len(data),
    }
    return EncodedTask(data, tuple(records), tuple(sorted(task.digital)), sizes)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _weight_bits_of(state: LayerTaskState) -> int:
    """Spare codes carry no precision of their own; 4 bits unless a code needs more."""
    if state.spare_codes.numel() == 0:
        return 4
    lo, hi = int(state.spare_codes.min()), int(state.spare_codes.max())
    bits = 4
    while lo < -(2 ** (bits - 1)) or hi > 2 ** (bits - 1) - 1:
        bits += 1
    return bits


def build_manifest(
    encoded: EncodedTask, task: TaskState, *, version: int, method: str,
    backbone_fingerprint: str, hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None, created: str | None = None,
) -> Manifest:
    return Manifest(
        task=task.task_id,
        version=version,
        method=method,
        backbone_fingerprint=backbone_fingerprint,
        shift_levels=task.shift_levels,
        labels=tuple(task.head.labels),
        layers=encoded.layers,
        digital=encoded.digital,
        files={TENSORS_FILE: FileRecord(encoded.sha256, len(encoded.data))},
        sizes=dict(encoded.sizes),
        created=created or utc_now(),
        hyperparameters=dict(hyperparameters or {}),
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        confidence=None if task.confidence == UNCALIBRATED else task.confidence,
    )


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FormatError(f"{text[:40]} overflows a finite number; a manifest holds finite "
                          "numbers only")
    return value


def _no_constant(name: str) -> float:
    """NaN and Infinity are not JSON; a manifest holding them could not be served back."""
    raise FormatError(f"{name} is not a JSON number; a manifest holds finite numbers only")


def tensor_file_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob, read from its header alone."""
    if len(data) < 8:
        raise FormatError("tensor file is shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, 100 * 2**20):
        raise FormatError("tensor file header length is out of range")
    try:
        header = json.loads(data[8 : 8 + header_len], parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"tensor file header is not JSON: {e}") from e
    except RecursionError as e:
        raise FormatError("tensor file header JSON is nested too deeply") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def check_float_tensor(name: str, tensor: Tensor) -> None:
    """A head or digital tensor that can be computed with: floating point, finite, and a
    variance never negative; anything else fails or poisons inference. (Whether its dtype
    and shape fit a backbone is the serving side's check.)"""
    if not tensor.is_floating_point():
        raise FormatError(f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; "
                          "head and digital tensors are floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise FormatError(f"tensor {name} holds NaN or infinite values")
    if name.endswith("running_var") and bool((tensor < 0).any()):
        raise FormatError(f"tensor {name} holds negative variances")


def decode_task(data: bytes, manifest: Manifest) -> TaskState:
    """Rebuild the TaskState a tensor file and its manifest describe."""
    meta = tensor_file_metadata(data)
    if meta.get("format") != FORMAT_TAG:
        raise FormatError(f"tensor file is {meta.get('format')!r}, not an {FORMAT_TAG} file")
    try:
        tensors = load_tensors(data)
    except Exception as e:  # safetensors raises its own error types for malformed input
        raise FormatError(f"tensor file is not valid safetensors: {e}") from e
    expected = {_PE_MASK, _SPARE, _COLUMNS, _HEAD_WEIGHT, _HEAD_BIAS,
                *(_DIGITAL + n for n in manifest.digital)}
    if set(tensors) != expected:
        raise FormatError(f"tensor file holds {sorted(set(tensors) ^ expected)[:4]} "
                          "contrary to its manifest")
    for name in (_PE_MASK, _SPARE, _COLUMNS):
        if tensors[name].dtype != torch.uint8 or tensors[name].dim() != 1:
            raise FormatError(f"packed tensor {name} must be 1-D uint8")
    for name, tensor in tensors.items():
        if name not in (_PE_MASK, _SPARE, _COLUMNS):
            check_float_tensor(name, tensor)
    bits = code_bits(manifest.shift_levels)
    streams = {kind: tensors[kind].numpy() for kind in (_PE_MASK, _SPARE, _COLUMNS)}
    offsets = dict.fromkeys(streams, 0)

    def segment(kind: str, size: int) -> np.ndarray:
        start = offsets[kind]
        offsets[kind] = start + size
        if offsets[kind] > streams[kind].size:
            raise FormatError(f"{kind} is shorter than its manifest layers need")
        return streams[kind][start : start + size]

    top = ones_code(manifest.shift_levels)
    layers = {}
    for rec in manifest.layers:
        mask = _unpack(segment(_PE_MASK, rec.pe_mask_bytes), 1, rec.row_groups * rec.col_groups)
        replaced = int(np.count_nonzero(mask))
        if replaced != rec.replaced_pes:
            raise FormatError(f"layer {rec.name}: PE mask replaces {replaced} PEs, "
                              f"the manifest says {rec.replaced_pes}")
        spare = _unpack(segment(_SPARE, rec.spare_bytes), rec.weight_bits, rec.spare_count)
        spare = (spare.astype(np.int16) - 2 ** (rec.weight_bits - 1)).astype(np.int8)
        cols = _unpack(segment(_COLUMNS, rec.column_bytes(bits)), bits,
                       rec.row_groups * rec.out_channels)
        if cols.size and int(cols.max()) > top:
            raise FormatError(f"layer {rec.name}: column code above {top}")
        layers[rec.name] = LayerTaskState(
            torch.from_numpy(mask.astype(np.bool_).reshape(rec.row_groups, rec.col_groups)),
            torch.from_numpy(spare.reshape(rec.replaced_pes, rec.outputs_per_pe,
                                           rec.rows_per_group)),
            torch.from_numpy(cols.astype(np.uint8).reshape(rec.row_groups, rec.out_channels)),
        )
    for kind, used in offsets.items():
        if used != streams[kind].size:
            raise FormatError(f"{kind} holds {streams[kind].size - used} bytes no layer uses")
    try:
        head = TaskHead(tensors[_HEAD_WEIGHT], tensors[_HEAD_BIAS], manifest.labels)
        return TaskState(manifest.task, manifest.shift_levels, head, layers,
                         {n: tensors[_DIGITAL + n] for n in manifest.digital},
                         manifest.confidence or UNCALIBRATED)
    except ValueError as e:
        raise FormatError(f"task {manifest.task} v{manifest.version}: {e}") from e
