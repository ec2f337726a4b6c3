"""build_optimizer: weight-decay groups and the fused AdamW kernel."""

from __future__ import annotations

import torch

from promptkd.training.optim import build_optimizer


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(6, 5, generator=g)),
        torch.nn.Parameter(torch.randn(5, generator=g)),  # 1-D: no weight decay
        torch.nn.Parameter(torch.randn(3, 3, generator=g), requires_grad=False),  # frozen: left out
    ]


def test_fused_adamw_on_cpu_matches_the_default_update():
    fused_params, plain_params = _params(), _params()
    fused = build_optimizer(fused_params, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] is True
    assert [len(g["params"]) for g in fused.param_groups] == [1, 1]
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    plain = torch.optim.AdamW(
        [{"params": [plain_params[0]], "weight_decay": 0.1}, {"params": [plain_params[1]], "weight_decay": 0.0}],
        lr=1e-2,
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in fused_params[:2]]
        for params in (fused_params, plain_params):
            for p, grad in zip(params[:2], grads, strict=True):
                p.grad = grad.clone()
        fused.step()
        plain.step()
    for a, b in zip(fused_params[:2], plain_params[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused_params[2], plain_params[2])  # the frozen one never moved
