"""The digital periphery between two crossbar layers, as one BatchNorm pass.

In the code domain of its neighbours a :class:`DigitalNorm` takes the partial sums of
the layer before it, applies that layer's output scale, the BatchNorm, the ReLU6 and
the next layer's DAC quantization as one BatchNorm kernel call plus a clamp and a
round, and hands the next layer its input codes. Both fidelities and the training
code's inference pass run the same modules, so they stay equal bit for bit.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.nn.forward_context import current_forward_context
from core.nn.layers import CrossbarConv2d
from core.ops.extension import crossbar_extension

log = logging.getLogger(__name__)


class DigitalNorm(nn.BatchNorm2d):
    """A BatchNorm of the digital periphery, optionally with the ReLU6 after it.

    In the code domain of its neighbours it also applies the output scale of the
    layer before it (``producer``: that layer then skips its own multiply) and the
    DAC quantization of the layer after it (``consumer``, which alone reads this
    output: it then skips its own), folded into the BatchNorm's per-channel terms
    so the whole periphery costs one BatchNorm pass plus a clamp and a round, not
    six passes. Elsewhere (training, calibration) it is BatchNorm then ReLU6.
    A task's own terms come with the engine's call (:class:`core.nn.forward_context.NormCall`),
    one ``[4, C]`` (mean, var, weight, bias) per block of rows of a batch sorted by task:
    the same BatchNorm kernel then normalises each block in place of the output (every
    element gets the same arithmetic as in a batch of its task alone), and the module's
    own tensors never hold a task's.
    """

    clamp_top: float | None = None
    """The absorbed ReLU6's top (None: no activation here)."""
    train_periphery: Callable[[Tensor], Tensor] | None = None
    """Passes with autograd: this BatchNorm, the activation and the consumer's input
    quantization in one, given this module's input (a task model sets it and has the
    consumer skip its own quantization)."""

    @classmethod
    def from_batchnorm(cls, norm: nn.BatchNorm2d) -> DigitalNorm:
        digital = cls(norm.num_features, norm.eps, norm.momentum, norm.affine,
                      norm.track_running_stats)
        digital.load_state_dict(norm.state_dict())
        return digital.train(norm.training)

    def link(self, producer: CrossbarConv2d | None, consumer: CrossbarConv2d | None) -> None:
        """Fold ``producer``'s output scale and ``consumer``'s input quantization in here."""
        if producer is not None and producer.bias is not None:
            producer = None  # a bias lands between the scale and the norm: keep them apart
        # Plain attributes (not submodules): the layers stay where the model tree has them.
        object.__setattr__(self, "_producer", producer)
        object.__setattr__(self, "_consumer", consumer)
        if producer is not None:
            producer.scale_in_norm = True
        if consumer is not None:
            consumer.codes_from_norm = True

    def _links(self) -> tuple[CrossbarConv2d | None, CrossbarConv2d | None]:
        return self.__dict__.get("_producer"), self.__dict__.get("_consumer")

    def _terms(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert self.running_mean is not None and self.running_var is not None
        ones = torch.ones_like(self.running_mean)
        return (self.running_mean, self.running_var,
                ones if self.weight is None else self.weight,
                torch.zeros_like(ones) if self.bias is None else self.bias)

    def _fold(self, rows: Tensor | None, producer: CrossbarConv2d | None,
              consumer: CrossbarConv2d | None) -> tuple[Tensor, tuple[float, float] | None]:
        """``[4, C]`` BatchNorm terms (mean, var, weight, bias) with ``producer``'s output
        scale and ``consumer``'s input step folded in, and the clamp bounds; of the
        module's own terms, or of a task's ``rows`` in a mixed batch."""
        mean, var, weight, bias = self._terms() if rows is None else rows.unbind(0)
        if producer is not None:
            scale = producer.output_scale()
            mean, weight = mean / scale, weight * scale
        bounds: tuple[float, float] | None = None
        if consumer is not None:
            step = consumer.input_quant.step.detach()
            weight, bias = weight / step, bias / step
            low, high = consumer.input_quant.qrange
            top = float(high)
            if self.clamp_top is not None:
                low, top = max(low, 0), min(top, self.clamp_top / float(step))
            bounds = (float(low), top)
        elif self.clamp_top is not None:
            bounds = (0.0, float(self.clamp_top))
        return torch.stack([mean, var, weight, bias]).detach(), bounds

    def _folded(self, producer: CrossbarConv2d | None, consumer: CrossbarConv2d | None,
                sample_terms: list[Tensor] | None
                ) -> tuple[list[Tensor], tuple[float, float] | None]:
        """:meth:`_fold` for every block (``[4, C]`` each), kept until a tensor it
        comes from is replaced or changed in place: folding is about ten small tensor
        operations per layer and task, which at 2x2 maps cost more than the layer's
        arithmetic. The links' part of the check is made once per call, each task's
        rows by identity and version."""
        links = (None if producer is None else producer.input_quant.step,
                 None if producer is None else producer.weight_scale,
                 None if consumer is None else consumer.input_quant.step)
        key = (tuple(-1 if t is None else t._version for t in links), self.clamp_top,
               None if consumer is None else consumer.input_quant.qrange)
        state = self.__dict__.get("_folded_cache")
        if state is None or state[1] != key or any(
                a is not b for a, b in zip(state[0], links, strict=True)):
            state = self.__dict__["_folded_cache"] = (links, key, {}, {})
        cache: dict[int | None, tuple[tuple[Tensor | None, ...], tuple[int, ...],
                                      tuple[Tensor, tuple[float, float] | None]]] = state[2]
        lists: dict[int, tuple[list[Tensor], tuple[int, ...], list[Tensor],
                               tuple[float, float] | None]] = state[3]
        if sample_terms is None:
            sources: tuple[Tensor | None, ...] = (self.running_mean, self.running_var,
                                                  self.weight, self.bias)
            versions = tuple(-1 if t is None else t._version for t in sources)
            hit = cache.get(None)
            if (hit is None or hit[1] != versions
                    or any(a is not b for a, b in zip(hit[0], sources, strict=True))):
                hit = cache[None] = (sources, versions, self._fold(None, producer, consumer))
            return [hit[2][0]], hit[2][1]
        # A mixed batch's call keeps its list of terms while the same tasks come together:
        # one lookup for the list, then each task's rows by identity and version.
        versions = tuple(rows._version for rows in sample_terms)
        whole = lists.get(id(sample_terms))
        if whole is not None and whole[0] is sample_terms and whole[1] == versions:
            return whole[2], whole[3]
        terms: list[Tensor] = []
        bounds: tuple[float, float] | None = None
        for rows in sample_terms:  # a mixed batch's tasks: the loop runs per norm and task
            hit = cache.get(id(rows))
            if hit is None or hit[0][0] is not rows or hit[1] != (rows._version,):
                if len(cache) >= FOLDED_CACHE_ENTRIES:  # tasks come and go
                    cache.clear()
                hit = cache[id(rows)] = ((rows,), (rows._version,),
                                         self._fold(rows, producer, consumer))
            terms.append(hit[2][0])
            bounds = hit[2][1]
        if len(lists) >= FOLDED_LISTS_KEPT:
            lists.clear()
        lists[id(sample_terms)] = (sample_terms, versions, terms, bounds)
        return terms, bounds

    def forward(self, x: Tensor) -> Tensor:
        if self.train_periphery is not None and torch.is_grad_enabled():
            return self.train_periphery(x)
        producer, consumer = self._links()
        scaled = producer is not None and producer.emits_partial_sums()
        quantize = consumer is not None and consumer.takes_codes()
        context = current_forward_context()
        call = None if context is None else context.norms.get(self)
        if self.training or not (scaled or quantize or call is not None):
            out = super().forward(x)
            # In place only without autograd: with it, torch clones the input first (a
            # copy of every activation per training step).
            return out if self.clamp_top is None else F.hardtanh(
                out, 0.0, self.clamp_top, inplace=not torch.is_grad_enabled())
        unit = 1.0
        if x.dtype == torch.int32:  # the producer's int8 product's sums, as they came
            assert producer is not None and scaled
            unit = producer.sum_unit()
        terms, bounds = self._folded(producer if scaled else None,
                                     consumer if quantize else None,
                                     None if call is None else call.terms)
        blocks = ((None if call is None or context is None else context.task_rows)
                  or [(0, x.shape[0])])
        extension = fused_periphery()
        if extension is not None and (x.is_contiguous() or x.is_contiguous(
                memory_format=torch.channels_last)):
            # int8 codes for a layer that multiplies them as int8 (channels-last only: its
            # product reads the codes as [pixels, channels] rows)
            codes = (quantize and consumer is not None and x.dim() == 4
                     and x.is_contiguous(memory_format=torch.channels_last)
                     and consumer.takes_int8_codes())
            out = torch.empty_like(x, dtype=torch.int8 if codes else torch.float32)
            extension.periphery_norm(x, out, [b[0] for b in blocks], [b[1] for b in blocks],
                                     terms, self.eps, bounds is not None,
                                     *(bounds or (0.0, 0.0)), quantize, unit)
            return out
        if x.dtype == torch.int32:
            x = x.to(torch.float32).mul_(unit)
        if len(blocks) > 1:
            out = torch.empty_like(x)
            empty = x.new_empty(0)
            for (start, stop), block_terms in zip(blocks, terms, strict=True):
                mean, var, weight, bias = block_terms.unbind(0)
                torch.ops.aten.native_batch_norm.out(
                    x[start:stop], weight, bias, mean, var, False, 0.0, self.eps,
                    out=out[start:stop], save_mean=empty, save_invstd=empty)
        else:
            mean, var, weight, bias = terms[0].unbind(0)
            out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        if bounds is not None:
            out.clamp_(*bounds)
        return out.round_() if quantize else out


@functools.cache
def fused_periphery() -> ModuleType | None:
    """The compiled one-pass periphery (BatchNorm, clamp, round), if it equals torch's
    ``F.batch_norm`` bit for bit on this build of torch (None otherwise: the periphery
    then runs torch's kernels). It reproduces the arithmetic of ATen's inference kernel
    (fused multiply-adds); a build whose kernel rounds differently fails the check on
    random data in both layouts, odd channel counts and single pixels."""
    extension = crossbar_extension()
    if extension is None:
        return None
    generator = torch.Generator().manual_seed(0)
    for channels, size in ((5, 3), (16, 8), (37, 1), (96, 4), (1280, 2), (24, 16)):
        x = torch.randn(3, channels, size, size, generator=generator) * 1e3
        mean = torch.randn(channels, generator=generator) * 10
        var = torch.rand(channels, generator=generator) * 5 + 1e-3
        weight = torch.randn(channels, generator=generator)
        bias = torch.randn(channels, generator=generator) * 3
        terms = (mean, var, weight, bias)
        expected = F.batch_norm(x, mean, var, weight, bias, False, 0.0, 1e-5)
        for memory in (torch.contiguous_format, torch.channels_last):
            source = x.contiguous(memory_format=memory)
            out = torch.empty_like(source)
            extension.periphery_norm(source, out, [0, 1], [1, 3], [torch.stack(terms)] * 2,
                                     1e-5, False, 0.0, 0.0, False, 1.0)
            if not torch.equal(out, expected):
                log.warning("the compiled periphery does not match this torch's BatchNorm "
                            "bit for bit: using torch's kernels")
                return None
    return extension


FOLDED_CACHE_ENTRIES = 64
"""Folded BatchNorm terms kept per module (its own and those of recent tasks)."""
FOLDED_LISTS_KEPT = 128
"""Per module, the folded terms of the recent mixed batches' sets of tasks (lists of
the per-task entries above)."""
