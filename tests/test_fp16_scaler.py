"""fp16 loss scaling: an overflow lowers the scale and skips that update, and training goes on.

accelerate creates a GradScaler only for fp16 on an accelerator, so these tests install a CPU
`torch.amp.GradScaler` into a prepared trainer the way `Accelerator.prepare` would have.
"""

from __future__ import annotations

import logging

import pytest
import torch
from accelerate.optimizer import patch_optimizer_step
from test_methods import snapshot, trainer_for


def install_cpu_scaler(tr, init_scale: float = 2.0**12):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10_000)
    tr.accelerator.scaler = scaler
    for opt in tr.accelerator._optimizers:  # what AcceleratedOptimizer.__init__ does with a scaler
        opt.scaler = scaler
        opt._accelerate_step_called = False
        opt._optimizer_original_step_method = opt.optimizer.step
        opt._optimizer_patched_step_method = patch_optimizer_step(opt, opt.optimizer.step)
    return scaler


def trained_params(tr):
    params = dict(tr.unwrapped_student.named_parameters())
    if tr.cfg.method == "promptkd":
        params.update({f"prompt.{i}": p for i, p in enumerate(tr.method.prompt_params)})
    return params


@pytest.mark.parametrize("method", ["sft", "promptkd"])
def test_overflow_lowers_the_scale_skips_the_update_and_the_next_step_succeeds(
    tmp_path, tiny_pair_dirs, tiny_jsonl, method
):
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, method, train={"max_steps": 3})
    scaler = install_cpu_scaler(tr)
    scale0 = scaler.get_scale()
    params = trained_params(tr)
    hooks = [p.register_hook(lambda g: g * float("inf")) for p in params.values()]  # every update overflows
    before = {k: p.detach().clone() for k, p in params.items()}

    metrics = tr.train_step().metrics
    for h in hooks:
        h.remove()

    for k, p in params.items():
        assert torch.equal(p.detach(), before[k]), f"{k} changed on an overflowing step"
    num_updates = 2 if method == "promptkd" else 1
    assert scaler.get_scale() == scale0 * 0.5**num_updates  # one backoff per overflowing update
    assert tr.nonfinite_skips == 0, "a loss-scale overflow is not a non-finite failure"
    assert metrics["student/overflows"] == 1
    if method == "promptkd":
        assert metrics["prompt/overflows"] == 1

    # the next, finite step must run (it raised "unscale_() has already been called" before)
    student0 = snapshot(tr.unwrapped_student)
    metrics = tr.train_step().metrics
    assert metrics["student/overflows"] == 1  # no new overflow
    assert any(not torch.equal(v, student0[k]) for k, v in snapshot(tr.unwrapped_student).items())
    assert scaler.get_scale() == scale0 * 0.5**num_updates
    assert tr.nonfinite_skips == 0


def test_nonfinite_loss_under_a_scaler_is_a_failure_and_keeps_the_scaler_usable(
    tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch, caplog
):
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "sft", train={"max_steps": 3})
    scaler = install_cpu_scaler(tr)
    # a NaN loss value with NaN gradients: poison the first step's gradients and its loss
    hooks = [p.register_hook(lambda g: g * float("nan")) for p in tr.unwrapped_student.parameters()]
    real_apply = tr.ctx.apply_update
    monkeypatch.setattr(tr.ctx, "apply_update", lambda name, loss: real_apply(name, float("nan")))
    with caplog.at_level(logging.WARNING):
        tr.train_step()
    assert any("non-finite student update at step 1" in r.getMessage() for r in caplog.records)
    for h in hooks:
        h.remove()
    monkeypatch.setattr(tr.ctx, "apply_update", real_apply)
    assert tr.nonfinite_skips == 1
    assert scaler.get_scale() < 2.0**12
    student0 = snapshot(tr.unwrapped_student)
    tr.train_step()  # the scaler's protocol was closed: no error
    assert any(not torch.equal(v, student0[k]) for k, v in snapshot(tr.unwrapped_student).items())
