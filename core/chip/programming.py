"""Cell levels of crossbar weights and the cost of writing them.

Reprogramming energy in XMA2 depends on the write voltage, the pulses and the
*conductance level change* of each cell (paper, section 5), so weights are
first turned into per-cell levels (offset or differential encoding, slice 0 = most
significant bits) and the cost of moving every cell from its old to its new level is
counted. :class:`CellWriteCounter` keeps per-cell write counts for endurance.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from core.chip.config import NonIdealities, WeightEncoding
from core.errors import ConfigError


def _check_bits(weight_bits: int, bits_per_cell: int) -> int:
    if weight_bits < 2:
        raise ConfigError(f"weight_bits must be >= 2 (signed weights), got {weight_bits}")
    if not 1 <= bits_per_cell <= 8:
        raise ConfigError(f"bits_per_cell must be in 1..8, got {bits_per_cell}")
    return math.ceil(weight_bits / bits_per_cell)


def _check_integer(t: Tensor, what: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ConfigError(f"{what} must be an integer tensor, got {t.dtype}")


def _digits(values: Tensor, slices: int, bits_per_cell: int) -> Tensor:
    shifts = bits_per_cell * torch.arange(slices - 1, -1, -1, dtype=torch.int64)
    return ((values.unsqueeze(-1) >> shifts) & ((1 << bits_per_cell) - 1)).to(torch.uint8)


def weight_codes_to_cell_levels(
    codes: Tensor, *, weight_bits: int, bits_per_cell: int,
    encoding: WeightEncoding = WeightEncoding.OFFSET,
) -> Tensor:
    """Signed weight codes ``[...]`` -> cell levels ``[..., columns]`` (uint8).

    OFFSET encoding (``columns = slices``): the stored value is
    ``u = code + 2**(weight_bits-1)``, split into ``bits_per_cell``-bit digits with
    slice 0 the most significant (which holds the leftover bits when ``weight_bits`` is
    not a multiple). DIFFERENTIAL (``columns = 2 * slices``): the digits of
    ``max(code, 0)`` on the positive array, then those of ``max(-code, 0)`` on the
    negative array (a magnitude of at most ``2**(weight_bits-1)`` fits the same slices).
    """
    slices = _check_bits(weight_bits, bits_per_cell)
    _check_integer(codes, "weight codes")
    half = 1 << (weight_bits - 1)
    signed = codes.to(torch.int64)
    if signed.numel() and (int(signed.min()) < -half or int(signed.max()) >= half):
        raise ConfigError(f"{weight_bits}-bit weight codes must be in [{-half}, {half - 1}]")
    if WeightEncoding(encoding) is WeightEncoding.DIFFERENTIAL:
        return torch.cat([_digits(signed.clamp(min=0), slices, bits_per_cell),
                          _digits((-signed).clamp(min=0), slices, bits_per_cell)], dim=-1)
    return _digits(signed + half, slices, bits_per_cell)


def cell_levels_to_weight_codes(
    levels: Tensor, *, weight_bits: int, bits_per_cell: int,
    encoding: WeightEncoding = WeightEncoding.OFFSET,
) -> Tensor:
    """Inverse of :func:`weight_codes_to_cell_levels`: ``[..., columns]`` -> int64 codes."""
    slices = _check_bits(weight_bits, bits_per_cell)
    _check_integer(levels, "cell levels")
    differential = WeightEncoding(encoding) is WeightEncoding.DIFFERENTIAL
    columns = 2 * slices if differential else slices
    if levels.dim() == 0 or levels.shape[-1] != columns:
        raise ConfigError(f"cell levels need a last dimension of {columns} columns, "
                          f"got shape {tuple(levels.shape)}")
    lv = levels.to(torch.int64)
    if lv.numel() and (int(lv.min()) < 0 or int(lv.max()) >= 2**bits_per_cell):
        raise ConfigError(f"cell levels out of range for {bits_per_cell}-bit cells")
    shifts = bits_per_cell * torch.arange(slices - 1, -1, -1, dtype=torch.int64)
    half = 1 << (weight_bits - 1)
    if differential:
        codes = (lv[..., :slices] << shifts).sum(-1) - (lv[..., slices:] << shifts).sum(-1)
        if codes.numel() and (int(codes.min()) < -half or int(codes.max()) >= half):
            raise ConfigError(f"cell levels out of range for {weight_bits}-bit weights")
        return codes
    top_bits = weight_bits - bits_per_cell * (slices - 1)
    if lv.numel() and int(lv[..., 0].max()) >= 2**top_bits:
        raise ConfigError(f"cell levels out of range for {weight_bits}-bit weights in "
                          f"{bits_per_cell}-bit cells")
    return (lv << shifts).sum(dim=-1) - half


@dataclass(frozen=True)
class ProgrammingConfig:
    """Write physics of one ReRAM cell."""

    write_voltage_v: float = 4.0
    """Write pulse amplitude (NeuroSim V2.1 ``writeVoltage`` = 4 V)."""
    pulse_width_s: float = 50e-9
    """Write pulse width (NeuroSim V2.1 ``writePulseWidth``; Wu et al. VLSI 2018: 50 ns)."""
    r_on_ohm: float = 100e3
    """On-state resistance (Wu et al. VLSI 2018 HfOx, NeuroSim V2.1 ``resistanceOn``)."""
    r_off_ohm: float = 1e6
    """Off-state resistance: the 10x window of the same device."""
    bits_per_cell: int = 2
    """Levels per cell are ``2**bits_per_cell``, linear in conductance from off to on."""
    full_range_pulses: int = 31
    """Identical pulses for a full off->on sweep: NeuroSim V2.1 models 32 conductance states
    per LTP/LTD sweep (``maxNumLevelLTP = 32``) with linear analog steps, i.e. 31 steps."""
    endurance: float = 1e6
    """Writes a cell survives: the conservative end of ReRAM's 1e6..1e12 range."""

    def __post_init__(self) -> None:
        for name in ("write_voltage_v", "pulse_width_s", "r_on_ohm", "r_off_ohm", "endurance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {value}")
        if self.r_off_ohm <= self.r_on_ohm:
            raise ConfigError("r_off_ohm must exceed r_on_ohm")
        if not 1 <= self.bits_per_cell <= 8:
            raise ConfigError(f"bits_per_cell must be in 1..8, got {self.bits_per_cell}")
        if self.full_range_pulses < 1:
            raise ConfigError(f"full_range_pulses must be >= 1, got {self.full_range_pulses}")

    @property
    def levels(self) -> int:
        return 1 << self.bits_per_cell

    @property
    def pulses_per_level(self) -> int:
        """Pulses per one-level step: 31 / 3 ~ 10 for 2-bit cells."""
        return max(1, round(self.full_range_pulses / (self.levels - 1)))

    def conductance_s(self, level: Tensor) -> Tensor:
        """Conductance of each level (siemens), linear between off and on."""
        g_off, g_on = 1.0 / self.r_off_ohm, 1.0 / self.r_on_ohm
        return g_off + level.to(torch.float64) * ((g_on - g_off) / (self.levels - 1))

    def write_energy_j(self, old_level: int, new_level: int) -> float:
        """One cell's write: ``Vw^2 * G_avg(old, new) * t_pulse * pulses``."""
        report = programming_cost(torch.tensor([old_level]), torch.tensor([new_level]), self)
        return report.energy_j


@dataclass(frozen=True)
class ProgrammingReport:
    """Cost of one batch of writes."""

    energy_j: float = 0.0
    cells_written: int = 0
    pulses: int = 0
    level_changes: int = 0
    """Sum over written cells of ``|new - old|`` levels."""

    def __add__(self, other: ProgrammingReport) -> ProgrammingReport:
        if not isinstance(other, ProgrammingReport):
            return NotImplemented
        return ProgrammingReport(
            energy_j=self.energy_j + other.energy_j,
            cells_written=self.cells_written + other.cells_written,
            pulses=self.pulses + other.pulses,
            level_changes=self.level_changes + other.level_changes,
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _check_levels(old: Tensor, new: Tensor, levels: int) -> None:
    _check_integer(old, "old levels")
    _check_integer(new, "new levels")
    if old.shape != new.shape:
        raise ConfigError(f"old and new levels differ in shape: {tuple(old.shape)} "
                          f"vs {tuple(new.shape)}")
    for t in (old, new):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= levels):
            raise ConfigError(f"cell levels must be in 0..{levels - 1}")


def programming_cost(
    old_levels: Tensor, new_levels: Tensor, config: ProgrammingConfig | None = None
) -> ProgrammingReport:
    """Energy and pulses to move every cell from its old to its new level.

    A cell whose level does not change is not written (no energy, no pulse).
    """
    cfg = config if config is not None else ProgrammingConfig()
    _check_levels(old_levels, new_levels, cfg.levels)
    # Every cell's cost depends only on its (old, new) pair: count the pairs, then price
    # the few possible transitions once (levels^2 of them) instead of every cell.
    levels = cfg.levels
    pairs = old_levels.reshape(-1).to(torch.int32) * levels + new_levels.reshape(-1)
    counts = torch.bincount(pairs, minlength=levels * levels).view(levels, levels)
    level = torch.arange(levels)
    steps = (level.view(1, -1) - level.view(-1, 1)).abs()  # [old, new]
    pulses = steps * cfg.pulses_per_level
    conductance = cfg.conductance_s(level)
    g_avg = (conductance.view(-1, 1) + conductance.view(1, -1)) / 2
    energy = (cfg.write_voltage_v**2 * cfg.pulse_width_s) * (
        counts.to(torch.float64) * g_avg * pulses).sum()
    return ProgrammingReport(
        energy_j=float(energy),
        cells_written=int(counts[steps != 0].sum()),
        pulses=int((counts * pulses).sum()),
        level_changes=int((counts * steps).sum()),
    )


class CellWriteCounter:
    """Per-cell write counts of a fixed set of PEs (the chip's spare-PE pool).

    Only cells whose level changes count as written, matching
    :func:`programming_cost`; endurance is a per-cell limit, so the worn-out
    risk is the *maximum* count, not the total.
    """

    def __init__(self, num_pes: int, rows: int, cols: int, *, endurance: float = 1e6) -> None:
        if min(num_pes, rows, cols) < 1:
            raise ConfigError(f"a write counter needs >= 1 PE, row and column, got "
                              f"({num_pes}, {rows}, {cols})")
        if not (math.isfinite(endurance) and endurance > 0):
            raise ConfigError(f"endurance must be finite and > 0, got {endurance}")
        self.endurance = float(endurance)
        self._counts = torch.zeros(num_pes, rows, cols, dtype=torch.int64)

    @classmethod
    def from_counts(cls, counts: Tensor, *, endurance: float = 1e6) -> CellWriteCounter:
        """Restore a counter saved with :attr:`counts`."""
        if counts.dim() != 3 or counts.dtype != torch.int64 or (
            counts.numel() and int(counts.min()) < 0
        ):
            raise ConfigError("write counts must be a non-negative int64 [pes, rows, cols] tensor")
        counter = cls(*counts.shape, endurance=endurance)
        counter._counts.copy_(counts)
        return counter

    @property
    def counts(self) -> Tensor:
        """A copy, so callers cannot corrupt the wear record."""
        return self._counts.clone()

    @property
    def shape(self) -> tuple[int, int, int]:
        n, r, c = self._counts.shape
        return n, r, c

    def record(self, pe_indices: Tensor | list[int], old_levels: Tensor,
               new_levels: Tensor) -> int:
        """Count one write of every changed cell of the given PEs; returns cells written.

        ``old_levels`` / ``new_levels`` are ``[len(pe_indices), rows, cols]``; a PE
        listed twice is counted twice (two successive writes).
        """
        idx = torch.as_tensor(pe_indices, dtype=torch.int64).reshape(-1)
        n, r, c = self.shape
        want = (idx.numel(), r, c)
        if tuple(old_levels.shape) != want or tuple(new_levels.shape) != want:
            raise ConfigError(f"levels must have shape {want}, got {tuple(old_levels.shape)} "
                              f"and {tuple(new_levels.shape)}")
        _check_integer(old_levels, "old levels")
        _check_integer(new_levels, "new levels")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ConfigError(f"PE indices must be in 0..{n - 1}")
        changed = (old_levels.to(torch.int64) != new_levels.to(torch.int64)).to(torch.int64)
        self._counts.index_add_(0, idx, changed)
        return int(changed.sum())

    @property
    def max_writes(self) -> int:
        return int(self._counts.max())

    @property
    def total_writes(self) -> int:
        return int(self._counts.sum())

    @property
    def endurance_used(self) -> float:
        """Fraction of the endurance consumed by the most-written cell."""
        return self.max_writes / self.endurance


def part_seed(base: int, what: str) -> int:
    """A stable seed per chip part (Python's ``hash`` of a string changes per process)."""
    return (base * 1_000_003 + zlib.crc32(what.encode())) % (2**63)


def program_cells(levels: Tensor, noise: NonIdealities, *, bits_per_cell: int,
                  seed: int) -> Tensor:
    """Target levels -> the levels the cells hold: variation and stuck cells, drawn once.

    The draws depend on the seed and the shape alone, never on the levels, so a trainer
    that knows the seed sees the chip instance the engine serves on. Every cell of a tile
    is drawn, including rows past the layer's weights: their inputs are zero, so it
    changes nothing but keeps draws independent of the shape."""
    if not noise.alters_cells:
        return levels
    top = float(2**bits_per_cell - 1)
    generator = torch.Generator().manual_seed(seed)
    programmed = levels.clone()
    if noise.programming_sigma:
        drift = torch.randn(levels.shape, generator=generator) * noise.programming_sigma
        programmed = (programmed + drift).clamp_(0, top)
    if noise.stuck_on_rate or noise.stuck_off_rate:
        draw = torch.rand(levels.shape, generator=generator)
        programmed = torch.where(draw < noise.stuck_on_rate, top, programmed)
        stuck_off = (draw >= noise.stuck_on_rate) & (
            draw < noise.stuck_on_rate + noise.stuck_off_rate)
        programmed = torch.where(stuck_off, 0.0, programmed)
    return programmed
