"""Backbone layers as they sit on the accelerator.

A :class:`CrossbarConv2d` owns the frozen weight codes and scales (what the
cells and the digital periphery hold), its input quantizer (the DAC) and the
calibrated range of its column ADCs. A task reaches it with the engine's call
(:mod:`core.nn.forward_context`): its folded weights in code units (codes times
mask values, spare PEs' codes where replaced), which ideal fidelity convolves
with the integer input codes before applying ``input step * weight scale`` once
per output. Every partial sum is an integer (or a multiple of the smallest
shift) below ``2**24``, so that is exact and equals what a lossless crossbar
computes, bit for bit; pointwise layers multiply the codes as int8 with int32 sums
where codes and weights fit (the same bits, a quarter of the weight's bytes). With a
program in the call (crossbar fidelity) the layer
runs the crossbar-exact operator instead. Training code may set
``effective_weight`` (dequantized, differentiable) on its own copy directly.
The digital periphery between two layers is :class:`core.nn.periphery.DigitalNorm`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.chip.config import OperatorImplementation
from core.chip.mapping import LayerMapping, Placement
from core.errors import ConfigError
from core.nn.forward_context import NO_LAYER_CALL, LayerCall, current_forward_context
from core.nn.quant import (
    ActivationQuantizer,
    fake_quant_weight,
    mse_weight_scale,
    quantize_weight_codes,
)
from core.ops.crossbar import (
    ConvGeometry,
    CrossbarProgram,
    crossbar_conv2d,
    crossbar_conv2d_blocks,
)
from core.ops.derived import derived
from core.ops.extension import crossbar_extension
from core.ops.int8 import (
    block_kernel,
    block_products,
    code_product,
    int8_matrix,
    int8_products,
    packed_forms,
    shared_int8,
)

log = logging.getLogger(__name__)

def pointwise_matrix(codes: Tensor) -> Tensor:
    """A pointwise layer's ``[Cout, Cin, 1, 1]`` codes as the contiguous ``[Cin, Cout]``
    matrix its channels-last product reads (a transposed operand is slower), made once
    per weight tensor and kept while that tensor lives and is unchanged."""
    return derived(codes, "pointwise", lambda c: c.detach().reshape(c.shape[0], -1).t()
                   .contiguous())


def conv_taps(codes: Tensor) -> Tensor:
    """A convolution's ``[Cout, Cin, kh, kw]`` codes as the ``[kh, kw, Cin, Cout]`` taps
    the compiled blocks convolution reads (kept as :func:`pointwise_matrix` is)."""
    return derived(codes, "taps", lambda c: c.detach().permute(2, 3, 1, 0).contiguous())


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    """A 2-D convolution's (height, width) setting."""
    if len(value) != 2:
        raise ConfigError(f"expected a (height, width) pair, got {value}")
    return value[0], value[1]


class CrossbarConv2d(nn.Module):
    """A convolution whose weights are programmed into crossbar PEs (or the digital periphery).

    Args:
        conv: the fp32 convolution to quantize (or a same-shaped placeholder when loading).
        weight_bits: precision of the weight codes.
        input_quant: the quantizer of this layer's inputs.
        quantize: compute codes and MSE scales from ``conv.weight`` (False when the codes
            are about to be loaded from a file).
    """

    # Buffers (registered in __init__, so nn.Module alone would not know their types).
    weight_scale: Tensor
    weight_codes: Tensor
    bias: Tensor | None
    _task_codes: Tensor | None
    _task_weight: Tensor | None
    adc_range: Tensor | None

    def __init__(
        self, conv: nn.Conv2d, weight_bits: int, input_quant: ActivationQuantizer,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(conv.padding, str):  # the mapping and the crossbar operator need sizes
            raise ConfigError(f"padding={conv.padding!r} is not supported; give sizes")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = _pair(conv.kernel_size)
        self.stride = _pair(conv.stride)
        self.padding = _pair(conv.padding)
        self.dilation = _pair(conv.dilation)
        self.groups = conv.groups
        self.weight_bits = weight_bits
        self.input_quant = input_quant
        self.mapping: LayerMapping | None = None
        weight = conv.weight.detach().float()
        if quantize:
            scale = mse_weight_scale(weight, weight_bits)
        else:
            scale = torch.ones(conv.out_channels)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_codes", quantize_weight_codes(weight, scale, weight_bits))
        self.register_buffer(
            "bias", None if conv.bias is None else conv.bias.detach().float().clone()
        )
        self.register_buffer("_task_codes", self.weight_codes.float(), persistent=False)
        self.register_buffer("_task_weight", None, persistent=False)
        self.register_buffer("adc_range", None)
        """``[dac modes, slices]`` top of each column ADC's range (partial-sum units) per
        DAC mode and cell slice; zeros until calibrated. Crossbar layers only."""
        self.latent_weight: nn.Parameter | None = None
        self.scale_in_norm = False
        """The :class:`DigitalNorm` after this layer applies its output scale (code domain)."""
        self.codes_from_norm = False
        """The :class:`DigitalNorm` before this layer hands it input codes (code domain)."""

    @property
    def on_crossbar(self) -> bool:
        return self.mapping is not None and self.mapping.placement is Placement.CROSSBAR

    def backbone_weight(self) -> Tensor:
        """Dequantized frozen weight: what every task sees on its frozen PEs."""
        return self.weight_codes.float() * self.weight_scale.reshape(-1, 1, 1, 1)

    @property
    def effective_weight(self) -> Tensor:
        """The active task's dequantized weight."""
        if self._task_weight is not None:
            return self._task_weight
        assert self._task_codes is not None  # the setters keep exactly one of the two
        return self._task_codes * self.weight_scale.reshape(-1, 1, 1, 1)

    @effective_weight.setter
    def effective_weight(self, weight: Tensor) -> None:
        self._task_weight = weight
        self._task_codes = None

    @property
    def effective_codes(self) -> Tensor | None:
        """The active task's weight in code units (None when a float weight was set)."""
        return self._task_codes

    @effective_codes.setter
    def effective_codes(self, codes: Tensor) -> None:
        self._task_codes = codes
        self._task_weight = None

    def reset_effective_weight(self) -> None:
        self.effective_codes = self.weight_codes.float()

    def start_weight_training(self) -> list[nn.Parameter]:
        """Expose a latent fp32 weight and a learnable scale for quantization-aware training."""
        latent = nn.Parameter(self.backbone_weight())
        scale = nn.Parameter(self.weight_scale.clone())
        self.latent_weight, self.weight_scale = latent, scale
        return [latent, scale]

    def finish_weight_training(self) -> None:
        """Freeze the trained latent weight back into codes and scales."""
        if self.latent_weight is None:
            return
        scale = self.weight_scale.detach().abs().clamp_min(1e-12).clone()
        codes = quantize_weight_codes(self.latent_weight.detach(), scale, self.weight_bits)
        del self.weight_scale
        self.register_buffer("weight_scale", scale)
        self.weight_codes = codes
        self.latent_weight = None
        self.reset_effective_weight()

    def _exact_inputs(self) -> bool:
        """Whether inputs are quantized to codes here (inference, quantizer active)."""
        quant = self.input_quant
        return (not torch.is_grad_enabled() and type(quant) is ActivationQuantizer
                and quant.observer is None and quant.fake_quant_enabled)

    def _layer_call(self) -> LayerCall:
        """This layer's part of the engine's call (the layer's own state outside one)."""
        context = current_forward_context()
        return NO_LAYER_CALL if context is None else context.layers.get(self, NO_LAYER_CALL)

    def _codes(self, call: LayerCall) -> Tensor | None:
        """The code-unit weight a pass convolves: the call's task's, else the layer's."""
        return self._task_codes if call.codes is None else call.codes

    def code_domain(self) -> bool:
        """Whether this forward pass takes integer input codes to integer partial sums."""
        call = self._layer_call()
        return call.program is not None or (
            self.latent_weight is None and self._codes(call) is not None
            and self._exact_inputs())

    def emits_partial_sums(self) -> bool:
        """Whether forward returns unscaled partial sums (the next norm scales them)."""
        return self.scale_in_norm and not self.training and self.code_domain()

    def takes_codes(self) -> bool:
        """Whether forward's input is already the DAC codes (the norm before made them)."""
        return self.codes_from_norm and not self.training and self.code_domain()

    def takes_int8_codes(self) -> bool:
        """Whether this pass multiplies its input codes as int8 (a pointwise layer on the
        code path of an engine call, codes and weight within int8): the norm before it
        then writes int8 codes, which spares a conversion pass over the activation."""
        context = current_forward_context()
        if (context is None or context.implementation is OperatorImplementation.REFERENCE
                or not self.pointwise or not int8_products() or not self.takes_codes()):
            return False
        qmin, qmax = self.input_quant.qrange
        call = context.layers.get(self, NO_LAYER_CALL)
        codes = self._codes(call)
        if qmin < -128 or qmax > 127 or call.block_programs is not None or codes is None:
            return False
        if call.program is not None and not (call.program.lossless
                                             and self._lossless_path(codes)):
            return False
        return self.latent_weight is None and self._int8_unit(call, codes) is not None

    def sum_unit(self) -> float:
        """Code units of one unit of the int32 sums this pass handed the norm after it."""
        call = self._layer_call()
        codes = self._codes(call)
        unit = None if codes is None else self._int8_unit(call, codes)
        assert unit is not None, "int32 sums come only from int8 weights"
        return unit

    def _int8_unit(self, call: LayerCall, codes: Tensor) -> float | None:
        """The power of two of this pass's int8 weights (a mixed batch's in one unit);
        None where they do not fit int8."""
        if call.sample_channels is not None:
            shared = self._mixed_int8(call.sample_channels, codes)
            return None if shared is None else shared[1]
        packed = int8_matrix(pointwise_matrix(codes))
        return None if packed is None else packed[1]

    def _mixed_int8(self, plan: SampleChannels, backbone_codes: Tensor
                    ) -> tuple[list[Tensor], float] | None:
        """A mixed batch's int8 weights in one unit: each segment's; without the compiled
        block product also, first, the backbone's and each task's changed channels (the
        map size picks which of them a pass uses; see :func:`_mixed_sums`)."""
        if not plan.int8:
            matrices = [pointwise_matrix(w) for w in plan.segment_codes]
            if block_kernel() is None:
                matrices = [pointwise_matrix(backbone_codes), *plan.matrices, *matrices]
            plan.int8.append(shared_int8(matrices))
        return plan.int8[0]

    def input_codes(self, x: Tensor) -> Tensor:
        """The DAC codes of this layer's forward input (which may be codes already)."""
        return x if self.takes_codes() else self.input_quant.codes(x)

    def output_scale(self) -> Tensor:
        """``[Cout]`` real units of one partial-sum unit: input step times weight scale."""
        return (self.input_quant.step * self.weight_scale).detach()

    def _finish(self, acc: Tensor) -> Tensor:
        if self.emits_partial_sums():
            return acc
        out = acc.mul_(self.output_scale().reshape(1, -1, 1, 1))
        return out if self.bias is None else out.add_(self.bias.reshape(1, -1, 1, 1))

    def add_adc_range(self, dac_modes: int, slices: int) -> None:
        self.adc_range = torch.zeros(dac_modes, slices)

    @property
    def geometry(self) -> ConvGeometry:
        return ConvGeometry(self.stride, self.padding, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        context = current_forward_context()
        call = NO_LAYER_CALL if context is None else context.layers.get(self, NO_LAYER_CALL)
        program, task_codes = call.program, self._codes(call)
        if call.block_programs is not None:
            return self._finish(self._block_reads(self.input_codes(x), call.block_programs))
        if program is not None and not (program.lossless and self._lossless_path(task_codes)):
            assert context is not None
            codes = self.input_codes(x)  # either layout: the operator takes it
            acc = crossbar_conv2d(
                codes, program, self.geometry, implementation=context.implementation,
                generator=context.read_generator,
                max_chunk_elements=context.max_chunk_elements,
            )
            return self._finish(acc)
        if self.latent_weight is not None:
            weight = fake_quant_weight(self.latent_weight, self.weight_scale, self.weight_bits)
        elif task_codes is not None and self._exact_inputs():
            codes = self.input_codes(x)
            if call.sample_channels is not None:
                assert context is not None and context.task_rows is not None
                acc = self._blocks_forward(codes, call.sample_channels, context.task_rows,
                                           task_codes, context.implementation)
            else:  # int32 sums go to the norm after, which scales them (engine calls)
                acc = self._code_conv(codes, task_codes, sums=context is not None
                                      and self.emits_partial_sums())
            return self._finish(acc)
        else:
            weight = self.effective_weight
        # Training passes run in the layout their caller chose (a task model trains
        # channels-last: an NCHW copy here would make every convolution and BatchNorm of the
        # step convert); other float passes (calibration) convolve NCHW, as they always did.
        if not torch.is_grad_enabled():
            x = x.contiguous()
        return F.conv2d(
            self.input_quant(x), weight, self.bias, self.stride, self.padding,
            self.dilation, self.groups,
        )

    @property
    def pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded, ungrouped layer: one matrix product over pixels."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1)
                and self.padding == (0, 0) and self.groups == 1)

    def _code_conv(self, codes: Tensor, weight: Tensor, int8_rows: Tensor | None = None,
                   *, sums: bool = False) -> Tensor:
        """Integer codes convolved with code-unit weights: exact in any summation order,
        so a pointwise layer over channels-last codes is one matrix product
        ``[B*H*W, Cin] @ [Cin, Cout]`` (in int8 where it fits, :func:`code_product`;
        ``sums``: its int32 sums may come back as they are) whose result is channels-last
        again (no copy)."""
        if self.pointwise and codes.is_contiguous(memory_format=torch.channels_last):
            batch, cin, height, width = codes.shape
            rows = codes.permute(0, 2, 3, 1).reshape(-1, cin)
            if int8_rows is None:
                int8_rows = self._int8_rows(rows)
            out = code_product(rows, pointwise_matrix(weight), int8_rows, sums=sums,
                               signed=self._signed_codes())
            return out.view(batch, height, width, -1).permute(0, 3, 1, 2)
        compiled = self._compiled_blocks_conv(codes, [(0, codes.shape[0], weight)])
        if compiled is not None:
            return compiled
        return F.conv2d(codes, weight, None, self.stride, self.padding, self.dilation,
                        self.groups)

    def _compiled_blocks_conv(self, codes: Tensor, segments: list[tuple[int, int, Tensor]]
                              ) -> Tensor | None:
        """The stem's convolution over channels-last codes, each block of samples with its
        own codes, in one compiled call (exact sums, so the bits of ``F.conv2d``); None
        where it does not apply (grouped, dilated or unevenly strided layers, NCHW or
        non-float codes, the reference implementation, no compiled operator) or would be
        slow (a build without its vectorized loops, i.e. without AVX-512 or AVX2: its
        plain loops took 5.0 ms against oneDNN's 1.1 ms for the stem of a batch of 16 at
        64 px; the AVX2 loops 1.0 ms against oneDNN's 1.4, and 1.0 against 3.1 for the
        seven blocks of a mixed batch)."""
        context = current_forward_context()
        if (self.groups != 1 or self.dilation != (1, 1) or self.stride[0] != self.stride[1]
                or self.padding[0] != self.padding[1] or codes.dtype != torch.float32
                or not codes.is_contiguous(memory_format=torch.channels_last)
                or context is None
                or context.implementation is OperatorImplementation.REFERENCE):
            return None
        extension = crossbar_extension()
        if extension is None or not extension.blocks_conv2d_vectorized():
            return None
        batch, _, height, width = codes.shape
        out_height = (height + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        out_width = (width + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        out = torch.empty(batch, self.out_channels, out_height, out_width,
                          memory_format=torch.channels_last)
        extension.blocks_conv2d(codes, out, [start for start, _, _ in segments],
                                [stop for _, stop, _ in segments],
                                [conv_taps(weight) for _, _, weight in segments],
                                self.stride[0], self.padding[0])
        return out

    def _signed_codes(self) -> bool:
        """Whether this layer's input codes can be negative (a block's residual sum; a
        ReLU's codes are not, and the int8 kernel multiplies those as they are)."""
        return self.input_quant.qrange[0] < 0

    def _int8_rows(self, rows: Tensor) -> Tensor | None:
        """The input codes as int8 for :func:`code_product` (as they came, where the norm
        wrote int8); None with the reference implementation (float products), without
        the int8 product, or where the quantizer's codes do not fit int8."""
        if rows.dtype == torch.int8:
            return rows
        context = current_forward_context()
        if (context is not None and context.implementation
                is OperatorImplementation.REFERENCE) or not int8_products():
            return None
        qmin, qmax = self.input_quant.qrange
        return rows.to(torch.int8) if qmin >= -128 and qmax <= 127 else None

    def _blocks_forward(self, codes: Tensor, plan: SampleChannels,
                        task_rows: list[tuple[int, int]], backbone_codes: Tensor,
                        implementation: OperatorImplementation) -> Tensor:
        """A mixed batch, whose samples the engine sorted by task (one block of rows each).

        Each block is convolved with its own task's codes: a pointwise layer's blocks in
        one int8 call written in place (see :func:`_mixed_sums`; without int8 weights,
        blocks with few pixels per sample share one product with the backbone's codes
        and each task recomputes the channels it changed), the stem's and depthwise
        layers' blocks concatenated (a convolution costs in proportion to its samples,
        so one per block adds only the calls; the stem's blocks go in one compiled
        call)."""
        last = codes.is_contiguous(memory_format=torch.channels_last)
        segments = plan.segment_rows(task_rows)
        if self.pointwise and last:
            batch, cin, height, width = codes.shape
            rows = codes.permute(0, 2, 3, 1).reshape(-1, cin)
            int8_rows = self._int8_rows(rows)
            shared = (None if int8_rows is None
                      else self._mixed_int8(plan, backbone_codes))
            if int8_rows is not None and shared is not None:
                sums = _mixed_sums(int8_rows, plan, segments, task_rows, shared[0],
                                   height * width, signed=self._signed_codes())
                acc = sums.view(batch, height, width, -1).permute(0, 3, 1, 2)
                if self.emits_partial_sums():  # the norm after scales them
                    return acc
                return acc.to(torch.float32).mul_(shared[1])
            if height * width < SHARED_PASS_PIXELS:
                acc = self._code_conv(codes, backbone_codes)
                _block_channels_1x1(codes, acc, plan, plan.changed_rows(task_rows),
                                    implementation)
                return acc
            out = rows.new_empty(rows.shape[0], self.out_channels, dtype=torch.float32)
            per_sample = height * width
            matrices = [pointwise_matrix(weight) for _, _, weight in segments]
            extension = (crossbar_extension() if implementation
                         is not OperatorImplementation.REFERENCE else None)
            if rows.dtype != torch.float32:  # int8 codes, weights beyond int8
                rows = rows.to(torch.float32)
            if extension is not None:
                extension.blocks_pointwise(rows, out,
                                           [s[0] * per_sample for s in segments],
                                           [s[1] * per_sample for s in segments],
                                           matrices)
            else:
                for (start, stop, _), matrix in zip(segments, matrices, strict=True):
                    torch.mm(rows[start * per_sample : stop * per_sample], matrix,
                             out=out[start * per_sample : stop * per_sample])
            return out.view(batch, height, width, -1).permute(0, 3, 1, 2)
        compiled = self._compiled_blocks_conv(codes, segments)
        if compiled is not None:
            return compiled
        parts = [self._code_conv(codes[start:stop], weight)
                 for start, stop, weight in segments]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts).contiguous(
            memory_format=torch.channels_last if last else torch.contiguous_format)

    def _block_reads(self, codes: Tensor, blocks: list[tuple[int, int, CrossbarProgram]]
                     ) -> Tensor:
        """Each block of a mixed batch read with its own task's cells: the bits the task
        alone gets on those rows."""
        context = current_forward_context()
        assert context is not None
        return crossbar_conv2d_blocks(codes, blocks, self.geometry,
                                      implementation=context.implementation,
                                      generator=context.read_generator,
                                      max_chunk_elements=context.max_chunk_elements)

    def _lossless_path(self, task_codes: Tensor | None) -> bool:
        """Whether a lossless program may run as the code-domain convolution (equal bit
        for bit): the pass has the task's codes and inputs are exact codes."""
        return self.latent_weight is None and task_codes is not None and self._exact_inputs()

    def extra_repr(self) -> str:
        where = self.mapping.placement.value if self.mapping else "unmapped"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, groups={self.groups}, weight_bits={self.weight_bits}, {where}"
        )


SHARED_PASS_PIXELS = 16
"""Without the compiled block product, a pointwise layer of a mixed batch with fewer
output pixels per sample than this shares one product with the backbone's codes and
recomputes each task's changed channels (a call per task's few rows costs more than its
arithmetic there); with more, each task's block of samples is multiplied by its own
codes."""


@dataclass(frozen=True, slots=True)
class SampleChannels:
    """One layer's weights for a batch that mixes tasks, its samples sorted by task so
    that each task's samples are one block of rows (the call's ``task_rows``).

    It speaks of tasks, not rows: the engine keeps it while the same tasks come
    together, so what is made from the weights (int8 codes in one unit, their packed
    forms) is made once for many batches, not once per batch.

    Args:
        changed: the tasks (indices into the call's tasks) that changed the layer.
        channels: per such task, long ``[c]`` output channels it changed.
        matrices: per such task, its code-unit weight of those channels as a contiguous
            ``[Cin * kh * kw, c]``.
        segment_tasks: the whole batch as ``(first, stop)`` runs of tasks, each run
            convolving one full code-unit weight (adjacent tasks that kept the
            backbone's codes share one run).
        segment_codes: per run, that weight.
        int8: the layer's int8 weights in one unit, once made (the norms on both sides
            of the layer ask for them too), and their packed tiles and column sums.

    Kept for many batches, so it holds few objects that the garbage collector walks
    (tuples of ints are not among them).
    """

    changed: tuple[int, ...]
    channels: list[Tensor]
    matrices: list[Tensor]
    segment_tasks: tuple[tuple[int, int], ...]
    segment_codes: list[Tensor]
    int8: list[tuple[list[Tensor], float] | None] = field(default_factory=list, repr=False,
                                                          compare=False)
    packed: list[tuple[list[Tensor], list[Tensor]]] = field(default_factory=list,
                                                            repr=False, compare=False)

    def segment_rows(self, task_rows: list[tuple[int, int]]) -> list[tuple[int, int, Tensor]]:
        """The runs as ``(start, stop, codes)`` rows of this batch."""
        return [(task_rows[first][0], task_rows[stop - 1][1], codes)
                for (first, stop), codes in zip(self.segment_tasks, self.segment_codes,
                                                strict=True)]

    def changed_rows(self, task_rows: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The rows of each task that changed the layer, in this batch."""
        return [task_rows[task] for task in self.changed]


def _mixed_sums(int8_rows: Tensor, plan: SampleChannels, segments: list[tuple[int, int, Tensor]],
                task_rows: list[tuple[int, int]], weights: list[Tensor], per_sample: int, *,
                signed: bool) -> Tensor:
    """A mixed batch's pointwise layer as int32 sums ``[pixels, Cout]`` of one unit
    (``weights``: :meth:`CrossbarConv2d._mixed_int8`'s; ``segments``: the plan's, in
    rows): each task's block of rows times its own codes, all blocks in one call of the
    compiled block product. Without it (one oneDNN call per block), below
    :data:`SHARED_PASS_PIXELS` pixels per sample the batch shares one product with the
    backbone's codes and each task overwrites the channels it changed on its block of
    rows."""
    if block_kernel() is not None:
        if not plan.packed:
            plan.packed.append(packed_forms(weights))
        sums = int8_rows.new_empty(int8_rows.shape[0], weights[0].shape[1], dtype=torch.int32)
        block_products(int8_rows, sums, [(start * per_sample, stop * per_sample)
                                         for start, stop, _ in segments],
                       weights, signed=signed, packed=plan.packed[0])
        return sums
    tasks = len(plan.matrices)
    if per_sample < SHARED_PASS_PIXELS:
        sums = torch._int_mm(int8_rows, weights[0])
        for (start, stop), channels, weight in zip(plan.changed_rows(task_rows), plan.channels,
                                                   weights[1 : 1 + tasks], strict=True):
            lo, hi = start * per_sample, stop * per_sample
            sums[lo:hi].index_copy_(1, channels, torch._int_mm(int8_rows[lo:hi], weight))
        return sums
    sums = int8_rows.new_empty(int8_rows.shape[0], weights[0].shape[1], dtype=torch.int32)
    for (start, stop, _), weight in zip(segments, weights[1 + tasks :], strict=True):
        lo, hi = start * per_sample, stop * per_sample
        torch._int_mm(int8_rows[lo:hi], weight, out=sums[lo:hi])
    return sums


def _block_channels_1x1(codes: Tensor, out: Tensor, plan: SampleChannels,
                        blocks: list[tuple[int, int]],
                        implementation: OperatorImplementation) -> None:
    """Overwrite every task's changed output channels on its block of rows (``blocks``,
    the plan's ``changed_rows``) of a channels-last pointwise layer (weights beyond
    int8): one compiled call for all tasks, or a float product and an index copy per
    task. Sums of integer codes are exact, so either equals the task's own layer bit
    for bit."""
    cin, cout = codes.shape[1], out.shape[1]
    rows, out_rows = codes.permute(0, 2, 3, 1).reshape(-1, cin), out.permute(0, 2, 3, 1)
    out_rows = out_rows.reshape(-1, cout)  # a view: out is channels-last contiguous
    per_sample = codes.shape[2] * codes.shape[3]
    extension = (crossbar_extension() if implementation
                 is not OperatorImplementation.REFERENCE else None)
    if extension is not None:
        extension.block_channels_rows(rows, out_rows, [b[0] * per_sample for b in blocks],
                                      [b[1] * per_sample for b in blocks],
                                      plan.channels, plan.matrices)
        return
    for (start, stop), channels, matrix in zip(blocks, plan.channels, plan.matrices,
                                               strict=True):
        lo, hi = start * per_sample, stop * per_sample
        out_rows[lo:hi].index_copy_(1, channels, torch.mm(rows[lo:hi], matrix))


def crossbar_layers(model: nn.Module) -> list[tuple[str, CrossbarConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CrossbarConv2d)]

