"""Frozen configuration of the emulated crossbar accelerator.

Array and precision defaults follow the XMA2 paper (sections 3.3.2, 4 and 5): 72x72
crossbars, 4-bit weights and activations, 2-bit cells, one 5-bit SAR ADC per column
and a three-level shift mask. The periphery default keeps the paper's 4-bit DAC and
5-bit ADC but stores each weight as a differential pair (the columns' currents
subtracted before the ADC, so its sums are signed and centred near zero) and reads 36
rows at once instead of 72 (the ADC of half a column's rows draws less current): the
paper's offset cells (:data:`PAPER_CHIP`) classify at chance with a 5-bit ADC, the
differential pairs within a point of ideal with tasks trained with the chip in the loop
(docs/results.md, "The default chip"). :data:`LOSSLESS_CHIP` (bit-serial inputs, 9 rows
per read) fits every column sum into the ADC exactly, at 2.9x the energy per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum, StrEnum
from typing import Any

from core.errors import ConfigError


class DacMode(StrEnum):
    """How an input activation reaches the source lines."""

    MULTI_BIT = "multi_bit"
    """One multi-level voltage per input: one read cycle per input vector."""
    BIT_SERIAL = "bit_serial"
    """One input bit per cycle (as in NeuroSim): ``activation_bits`` read cycles."""


class Fidelity(StrEnum):
    """How faithfully the engine emulates the chip."""

    IDEAL = "ideal"
    """Fake-quantized weights and inputs with masks and spare PEs folded into the
    weights: what a lossless ADC would give. Fastest; the reference for training."""
    CROSSBAR = "crossbar"
    """Per-column partial sums, ADC, shift-add, masks after the ADC and optional
    device non-idealities (:mod:`core.ops.crossbar`)."""


class AdcRange(StrEnum):
    """Where a column ADC's top code sits."""

    CALIBRATED = "calibrated"
    """Per layer and cell slice, chosen from data to minimise the output error and stored
    with the backbone (:meth:`core.nn.model.CrossbarModel.calibrate_adc`)."""
    FULL_SCALE = "full_scale"
    """The largest partial sum a full column can produce; a ``b``-bit ADC keeps the top
    ``b`` bits of it, so it is lossless when ``b`` covers the column's sum."""


class OperatorImplementation(StrEnum):
    AUTO = "auto"
    """The compiled C++ operator when a compiler is available, else the reference."""
    COMPILED = "compiled"
    REFERENCE = "reference"
    """Pure torch, same semantics; the ground truth of the tests."""


class DepthwiseMapping(StrEnum):
    """Where depthwise convolutions run."""

    DIGITAL = "digital"
    """In the digital periphery (a small MAC array). The default: block-diagonal
    crossbar mapping would use 8 of 72 columns per row group (see docs/architecture.md)."""


class WeightEncoding(StrEnum):
    """How signed weights are stored in non-negative conductances."""

    OFFSET = "offset"
    """Cell level ``w + 2**(bits-1)``; the periphery subtracts ``offset * sum(inputs)``
    once per row group (one digital accumulation shared by every column of the PE).
    Column sums are non-negative: the ADC range is unsigned."""
    DIFFERENTIAL = "differential"
    """A PE is a pair of arrays: ``max(w, 0)`` in the positive array, ``max(-w, 0)`` in the
    negative one, and each bit line pair's currents are subtracted before the ADC. Column
    sums are signed and centred near zero: the ADC range is signed. Twice the cells (and
    cell reads and writes) of OFFSET, no digital offset correction."""


@dataclass(frozen=True)
class CrossbarConfig:
    """Geometry and precision of the accelerator; hashed into the backbone fingerprint."""

    rows: int = 72
    """Word lines per crossbar (= PE). A row group holds whole input channels."""
    cols: int = 72
    """Bit lines per crossbar. A weight uses ``slices`` adjacent columns."""
    bits_per_cell: int = 2
    """Conductance levels per cell are ``2**bits_per_cell``."""
    weight_bits: int = 4
    """Precision of crossbar weights (signed, per-output-channel scale)."""
    activation_bits: int = 4
    """Precision of crossbar inputs (DAC resolution or bit-serial cycles)."""
    edge_bits: int = 8
    """Precision of the first convolution's weights and input (raw pixels need it)."""
    signed_input_bits: int = 8
    """Precision of signed crossbar inputs: MobileNetV2's linear-bottleneck outputs (the
    residual stream) feeding its expansion layers. At 4 bits they cost 3 points of
    linear-probe accuracy on Animal-MNIST (docs/results.md); ReLU outputs stay 4-bit."""
    depthwise_bits: int = 8
    """Precision of depthwise weights, which run in the digital periphery."""
    adc_bits: int = 5
    """SAR ADC resolution, one ADC per column."""
    dac_mode: DacMode = DacMode.MULTI_BIT
    """One 4-bit input per read cycle, as in the paper (bit-serial inputs fit every column
    sum of 9 rows into the 5-bit ADC, at four times the reads: :data:`LOSSLESS_CHIP`)."""
    rows_per_read: int = 36
    """Word lines driven together for one ADC conversion. A PE's rows are read in groups
    of whole input channels that tile its row group evenly (the largest such group of at
    most this many rows, and at least one channel: 9 rows of a 3x3 kernel); each group's
    column sums are converted on their own and added digitally."""
    shift_levels: int = 3
    """Shift levels N of the tier-2 mask: values {0, 2**-N, ..., 1/2, 1}; N=0 is binary."""
    depthwise: DepthwiseMapping = DepthwiseMapping.DIGITAL
    weight_encoding: WeightEncoding = WeightEncoding.DIFFERENTIAL

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "bits_per_cell", "weight_bits", "activation_bits",
                     "rows_per_read"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("edge_bits", "signed_input_bits", "depthwise_bits", "adc_bits"):
            if not 1 <= getattr(self, name) <= 16:
                raise ConfigError(f"{name} must be in 1..16, got {getattr(self, name)}")
        if self.weight_bits < 2:
            raise ConfigError("weight_bits must be >= 2 (signed weights need a sign bit)")
        if self.cols % self.slices:
            raise ConfigError(
                f"cols ({self.cols}) must be a multiple of the cell slices per weight "
                f"({self.slices} = ceil(weight_bits / bits_per_cell))"
            )
        if self.rows_per_read > self.rows:  # "at most N rows" of a smaller crossbar: all
            object.__setattr__(self, "rows_per_read", self.rows)
        if not 0 <= self.shift_levels <= 7:
            raise ConfigError(f"shift_levels must be in 0..7, got {self.shift_levels}")
        for name, enum in (("dac_mode", DacMode), ("depthwise", DepthwiseMapping),
                           ("weight_encoding", WeightEncoding)):
            value = getattr(self, name)
            if not isinstance(value, enum):
                try:
                    object.__setattr__(self, name, enum(value))
                except ValueError as e:
                    allowed = ", ".join(m.value for m in enum)
                    raise ConfigError(f"{name} must be one of {allowed}, got {value!r}") from e

    @property
    def slices(self) -> int:
        """Cell columns per weight (2 for 4-bit weights in 2-bit cells)."""
        return math.ceil(self.weight_bits / self.bits_per_cell)

    @property
    def outputs_per_pe(self) -> int:
        """Output channels held by one crossbar's columns."""
        return self.cols // self.slices

    @property
    def dac_bits(self) -> int:
        """Input bits the DAC applies per read cycle."""
        return self.activation_bits if self.dac_mode is DacMode.MULTI_BIT else 1

    @property
    def weight_offset(self) -> int:
        """Level added to a signed weight code so that it is a non-negative conductance."""
        return 2 ** (self.weight_bits - 1) if self.weight_encoding is WeightEncoding.OFFSET else 0

    @property
    def arrays_per_pe(self) -> int:
        """Crossbar arrays per PE: 2 for differential pairs."""
        return 2 if self.weight_encoding is WeightEncoding.DIFFERENTIAL else 1

    @property
    def adc_signed(self) -> bool:
        """Whether column sums (and so the ADC's range) are signed."""
        return self.weight_encoding is WeightEncoding.DIFFERENTIAL

    def describe(self) -> str:
        """One line naming the chip's periphery, for logs and reports."""
        return (f"{self.weight_encoding.value} cells, {self.rows_per_read} rows per read, "
                f"{self.dac_mode.value} DAC, {self.adc_bits}-bit "
                f"{'signed' if self.adc_signed else 'unsigned'} ADC")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for f in fields(self):
            if isinstance(out[f.name], Enum):
                out[f.name] = out[f.name].value
        return out

    def identity_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` less the settings added after task archives first bound to a
        chip, where they hold the value that chip had: one chip, one identity, before
        and after a field is added (:meth:`CrossbarModel.fingerprint`)."""
        out = self.to_dict()
        for name in _ADDED_AFTER_FINGERPRINTS:
            if out[name] == _LEGACY_DEFAULTS[name](out):
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrossbarConfig:
        """A saved config; fields it predates take the values the chip then had."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown crossbar settings {unknown}; known: {sorted(known)}")
        legacy = {name: value(data) for name, value in _LEGACY_DEFAULTS.items()
                  if name not in data}
        return cls(**{**legacy, **data})


_LEGACY_DEFAULTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "rows_per_read": lambda data: data.get("rows", 72),
    "weight_encoding": lambda data: WeightEncoding.OFFSET.value,
    "dac_mode": lambda data: DacMode.MULTI_BIT.value,
}
"""What a config saved before a field existed meant: the first chip read every row of a
PE at once, offset-encoded, through a multi-bit DAC."""
_ADDED_AFTER_FINGERPRINTS = ("rows_per_read",)
"""Fields newer than the shipped task archives (whose backbone fingerprint hashed the
config without them)."""

PAPER_CHIP: dict[str, Any] = {"weight_encoding": "offset", "rows_per_read": 72,
                              "dac_mode": "multi_bit", "adc_bits": 5}
"""The paper's periphery (72 rows at once, offset cells, 4-bit DAC, 5-bit ADC); its
crossbar fidelity collapses to chance (docs/results.md)."""

LOSSLESS_CHIP: dict[str, Any] = {"weight_encoding": "offset", "rows_per_read": 9,
                                 "dac_mode": "bit_serial", "adc_bits": 5}
"""Offset cells read 9 rows at a time with bit-serial inputs: every column sum fits the
5-bit ADC, so crossbar fidelity equals ideal fidelity bit for bit, for any task (the
default periphery until tasks could be trained with the chip in the loop; 2.8x the
default's energy per image)."""


CHIP_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"weight_encoding": "differential", "rows_per_read": 36,
                "dac_mode": "multi_bit", "adc_bits": 5},
    "paper": PAPER_CHIP,
    "lossless": LOSSLESS_CHIP,
}
"""Named peripheries (``xma2 calibrate-adc --chip``); ``default`` is CrossbarConfig's."""


@dataclass(frozen=True)
class NonIdealities:
    """Device non-idealities of crossbar fidelity; all off by default and seeded.

    Programming variation, stuck cells and the ADC offsets are drawn once when a
    layer or a spare PE is programmed and then belong to the chip: every request
    sees the same ones. Read noise is drawn per read.
    """

    programming_sigma: float = 0.0
    """Std of a programmed cell's level around its target, in levels (a 2-bit cell
    has levels 0..3), clipped to the cell's window."""
    read_sigma: float = 0.0
    """Std of a cell's level per read, in levels; a column of ``n`` driven rows with
    inputs ``a`` reads ``sum(a * g) + N(0, read_sigma**2 * sum(a**2))``."""
    stuck_on_rate: float = 0.0
    """Fraction of cells stuck at the top level."""
    stuck_off_rate: float = 0.0
    """Fraction of cells stuck at level 0."""
    adc_offset_sigma: float = 0.0
    """Std of each layer's ADC offset, in LSB."""
    adc_offset_trimmed: bool = False
    """The chip trims each ADC's offset by its whole LSBs (a one-time foreground
    calibration), leaving the fraction in [-0.5, 0.5]; where sums are integers read at
    unit step, a fraction below half an LSB then changes no code."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("programming_sigma", "read_sigma", "adc_offset_sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite value >= 0, got {value}")
        for name in ("stuck_on_rate", "stuck_off_rate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if self.stuck_on_rate + self.stuck_off_rate > 1:
            raise ConfigError("stuck_on_rate + stuck_off_rate must not exceed 1")

    @property
    def alters_cells(self) -> bool:
        return bool(self.programming_sigma or self.stuck_on_rate or self.stuck_off_rate)

    @property
    def any(self) -> bool:
        return self.alters_cells or bool(self.read_sigma or self.adc_offset_sigma)


NOISE_LEVELS: dict[str, NonIdealities] = {
    "low": NonIdealities(programming_sigma=0.05, read_sigma=0.02, stuck_on_rate=0.0005,
                         stuck_off_rate=0.0005, adc_offset_sigma=0.1, seed=0),
    "high": NonIdealities(programming_sigma=0.15, read_sigma=0.05, stuck_on_rate=0.005,
                          stuck_off_rate=0.005, adc_offset_sigma=0.5, seed=0),
}
"""Named device non-idealities (cell levels 0..3 of a 2-bit cell, ADC LSB), seed 0: the
levels of the accuracy studies in docs/results.md, and the chips a task can be adapted for."""


def noise_level(name: str) -> NonIdealities:
    """A level of :data:`NOISE_LEVELS` by name; ``none`` is the chip without them."""
    if name == "none":
        return NonIdealities()
    if name not in NOISE_LEVELS:
        raise ConfigError(f"noise level must be one of none, {', '.join(NOISE_LEVELS)}, "
                          f"got {name!r}")
    return NOISE_LEVELS[name]


@dataclass(frozen=True)
class CrossbarSettings:
    """How crossbar fidelity emulates the chip, beside the backbone's :class:`CrossbarConfig`.

    ``adc_bits`` and ``dac_mode`` default to the chip's; overriding them explores
    another periphery on the same programmed backbone (the energy follows).
    """

    adc_bits: int | None = None
    adc_range: AdcRange = AdcRange.CALIBRATED
    dac_mode: DacMode | None = None
    non_idealities: NonIdealities = NonIdealities()
    implementation: OperatorImplementation = OperatorImplementation.AUTO
    max_chunk_elements: int = 1 << 23
    """Bound on the partial sums held at once (floats): batches are cut to fit."""

    def __post_init__(self) -> None:
        if self.adc_bits is not None and not 1 <= self.adc_bits <= 16:
            raise ConfigError(f"adc_bits must be in 1..16, got {self.adc_bits}")
        if self.max_chunk_elements < 1:
            raise ConfigError("max_chunk_elements must be >= 1")
        for name, enum in (("adc_range", AdcRange), ("dac_mode", DacMode),
                           ("implementation", OperatorImplementation)):
            value = getattr(self, name)
            if value is None or isinstance(value, enum):
                continue
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError as e:
                allowed = ", ".join(m.value for m in enum)
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}") from e

    def chip(self, config: CrossbarConfig) -> CrossbarConfig:
        """The chip configuration these settings emulate."""
        changes: dict[str, Any] = {}
        if self.adc_bits is not None:
            changes["adc_bits"] = self.adc_bits
        if self.dac_mode is not None:
            changes["dac_mode"] = self.dac_mode
        return replace(config, **changes) if changes else config
