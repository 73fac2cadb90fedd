"""The learning methods' optimizer: torch's fused Adam."""

from __future__ import annotations

import torch

from core.learning.optim import adam


def test_cpu_parameters_get_the_fused_kernel_with_the_plain_results():
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn_like(p) for p in start]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = (adam(params, lr=0.1) if fused
                     else torch.optim.Adam(params, lr=0.1))
        assert bool(optimizer.defaults["fused"]) is fused
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results.append(params)
    for fused, plain in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


def test_a_step_counts_its_writes_in_the_parameters_versions():
    """Caches of terms derived from a parameter (the periphery's folded BatchNorm terms)
    see a change by its version counter, which the fused kernel leaves alone."""
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = adam([param], lr=0.1)
    param.grad = torch.randn(4)
    version = param._version
    optimizer.step()
    assert param._version > version

