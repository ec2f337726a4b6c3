"""Every method runs on tiny in-process models; PromptKD's step touches exactly what it should."""

from __future__ import annotations

import json

import pytest
import torch

from promptkd.config import config_from_dict
from promptkd.training.loop import NonFiniteError, Trainer


def make_cfg(tmp_path, teacher, student, train_file, method="promptkd", **sections):
    cfg = {
        "method": method,
        "model": {"teacher": str(teacher), "student": str(student)},
        "data": {"train": str(train_file), "max_prompt_length": 256, "max_length": 300},
        "train": {"output_dir": str(tmp_path / f"run_{method}"), "max_steps": 2, "batch_size": 2,
                  "warmup_steps": 0, "seed": 5, "learning_rate": 1e-3},
        "sampling": {"max_new_tokens": 6},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return config_from_dict(cfg)


def trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, method="promptkd", **sections):
    return Trainer(make_cfg(tmp_path, *tiny_pair_dirs, tiny_jsonl, method, **sections), show_progress=False).setup()


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_promptkd_step_freezes_teacher_and_moves_prompt_and_student(tmp_path, tiny_pair_dirs, tiny_jsonl):
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl)
    teacher0 = snapshot(tr.teacher)
    prompt0 = [p.detach().clone() for p in tr.method.prompt_params]
    student0 = snapshot(tr.unwrapped_student)
    metrics = tr.method.step(tr.next_micro_batches())
    for k, v in snapshot(tr.teacher).items():
        assert torch.equal(v, teacher0[k]), f"teacher weight {k} changed"
    assert all(not p.requires_grad for p in tr.teacher.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(tr.method.prompt_params, prompt0, strict=True)), "prompt did not move"
    moved = [k for k, v in snapshot(tr.unwrapped_student).items() if not torch.equal(v, student0[k])]
    assert moved, "student did not move"
    for key in ("prompt/kd", "prompt/reg", "prompt/lambda", "student/loss"):
        assert torch.isfinite(torch.tensor(metrics[key]))
    assert metrics["prompt/lambda"] == 1.0  # base_coef * (1 - 0/K)


def test_regulariser_schedule(tmp_path, tiny_pair_dirs, tiny_jsonl):
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, promptkd={"base_coef": 0.5}, train={"max_steps": 4})
    assert [tr.method.regulariser_weight(k) for k in range(5)] == [0.5, 0.375, 0.25, 0.125, 0.0]


def test_frozen_prompt_is_plain_on_policy_reverse_kl(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """freeze_prompt: the prompt never moves and the student loss equals GKD(lmbda 1, beta 1)."""
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, promptkd={"freeze_prompt": True})
    prompt0 = [p.detach().clone() for p in tr.method.prompt_params]
    torch.manual_seed(0)
    m1 = tr.method.step(tr.next_micro_batches())
    assert all(torch.equal(p, q) for p, q in zip(tr.method.prompt_params, prompt0, strict=True))
    assert "prompt/kd" not in m1

    g = trainer_for(tmp_path / "g", tiny_pair_dirs, tiny_jsonl, method="gkd", gkd={"lmbda": 1.0, "beta": 1.0})
    torch.manual_seed(0)
    m2 = g.method.step(g.next_micro_batches())
    assert m1["student/loss"] == pytest.approx(m2["student/loss"], rel=1e-5)


@pytest.mark.parametrize("method,sections", [
    ("sft", {}),
    ("kd", {"kd": {"kd_ratio": 0.5}}),
    ("kd", {"kd": {"divergence": "skew_forward_kl"}}),
    ("gkd", {"gkd": {"lmbda": 0.5, "divergence": "skew_reverse_kl"}}),
    ("gkd", {"gkd": {"lmbda": 0.0, "seq_kd": True}}),
    ("promptkd", {"promptkd": {"lagged_target": True, "base_coef": 0.0}}),
    ("promptkd", {"promptkd": {"teacher_gradient_checkpointing": True}, "train": {"gradient_accumulation_steps": 2}}),
])
def test_methods_run_end_to_end(tmp_path, tiny_pair_dirs, tiny_jsonl, method, sections):
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, method, **sections)
    last = tr.train()
    assert last["step"] == 2
    assert (tr.output_dir / "final" / "student" / "config.json").is_file()
    records = [json.loads(x) for x in (tr.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["student/loss"])) for r in records)


def test_seqkd_trains_on_generated_teacher_responses(tmp_path, tiny_pair_dirs, tiny_jsonl):
    from promptkd.generate import GenerationJob, run_generation

    teacher, _ = tiny_pair_dirs
    out = run_generation(GenerationJob(model=str(teacher), data=str(tiny_jsonl), out=str(tmp_path / "t.jsonl"),
                                       max_new_tokens=5, batch_size=8), show_progress=False)
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "seqkd", data={"teacher_responses": str(out)})
    assert tr.teacher is None  # kd_ratio 0: no teacher loaded
    assert tr.train()["step"] == 2


def test_gradient_accumulation_uses_global_token_count(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """batch 4 x 1 micro-batch and batch 2 x 2 micro-batches give the same update (SFT, exact data)."""
    a = trainer_for(tmp_path / "a", tiny_pair_dirs, tiny_jsonl, "sft", train={"batch_size": 4, "max_grad_norm": 0.0})
    b = trainer_for(tmp_path / "b", tiny_pair_dirs, tiny_jsonl, "sft",
                    train={"batch_size": 2, "gradient_accumulation_steps": 2, "max_grad_norm": 0.0})
    ma = a.method.step(a.next_micro_batches())
    mb = b.method.step(b.next_micro_batches())
    assert ma["student/loss"] == pytest.approx(mb["student/loss"], rel=1e-5)
    for (k, va), vb in zip(a.unwrapped_student.state_dict().items(), b.unwrapped_student.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-6, msg=k)


def test_nonfinite_loss_is_skipped_with_warning(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "sft", train={"max_steps": 3})
    before = snapshot(tr.unwrapped_student)
    original = tr.method.supervised_step

    def poisoned(batches, **kw):
        for p in tr.unwrapped_student.parameters():  # a NaN gradient reaches the guard
            p.register_hook(lambda g: g * float("nan")) if tr.step == 0 and p.ndim > 1 else None
        return original(batches, **kw)

    monkeypatch.setattr(tr.method, "supervised_step", poisoned)
    with pytest.warns(RuntimeWarning, match="non-finite student update at step 1"):
        tr.method.step(tr.next_micro_batches())
    assert tr.nonfinite_skips == 1
    for k, v in snapshot(tr.unwrapped_student).items():
        assert torch.equal(v, before[k]), "a non-finite update was applied"


def test_nonfinite_stop_writes_checkpoint(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """nonfinite stop: the bad update is skipped, the step finishes and is checkpointed as a
    consistent state (prompt updated, student not, data and RNG past the step), then it raises."""
    from promptkd.training.checkpoint import latest_checkpoint, load_trainer_state

    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "promptkd", train={"nonfinite": "stop", "max_steps": 3})
    student0 = snapshot(tr.unwrapped_student)
    prompt0 = [p.detach().clone() for p in tr.method.prompt_params]
    monkeypatch.setattr(tr.method, "student_loss", lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(NonFiniteError, match="non-finite student update at step 1.*stopped with a checkpoint at step 1"):
        tr.train()
    ckpt = latest_checkpoint(tr.checkpoints_dir)
    assert ckpt is not None and ckpt.name == "step-00000001"
    state = load_trainer_state(ckpt)
    assert (state["step"], state["nonfinite_skips"], state["data_position"]) == (1, 1, 2)
    for k, v in snapshot(tr.unwrapped_student).items():
        assert torch.equal(v, student0[k]), "a non-finite update was applied"
    assert any(not torch.equal(p, q) for p, q in zip(tr.method.prompt_params, prompt0, strict=True))
    records = [json.loads(x) for x in (tr.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and records[0]["nonfinite_skips"] == 1
    assert not (tr.output_dir / "final").exists()


def test_bf16_teacher_linear_weights_give_the_same_promptkd_step(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """Under bf16 autocast the teacher's linears are held in bf16: the step is bit-identical."""
    from accelerate.state import AcceleratorState

    # accelerate keeps one mixed-precision setting per process: a fresh state for this test,
    # the original one restored afterwards
    monkeypatch.setattr(AcceleratorState, "_shared_state", {})
    results = []
    for cast in (True, False):
        AcceleratorState._shared_state.clear()
        if not cast:
            monkeypatch.setattr(Trainer, "_teacher_linears_to_compute_dtype", lambda self: None)
        tr = trainer_for(tmp_path / str(cast), tiny_pair_dirs, tiny_jsonl, train={"mixed_precision": "bf16"})
        dtypes = {m.weight.dtype for m in tr.teacher.modules() if isinstance(m, torch.nn.Linear)}
        assert dtypes == ({torch.bfloat16, torch.float32} if cast else {torch.float32})  # tied LM head stays
        torch.manual_seed(0)
        metrics = tr.method.step(tr.next_micro_batches())
        results.append((metrics, [p.detach().clone() for p in tr.method.prompt_params], snapshot(tr.unwrapped_student)))
    (m1, p1, s1), (m2, p2, s2) = results
    assert m1["student/loss"] == m2["student/loss"] and m1["prompt/kd"] == m2["prompt/kd"]
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    assert all(torch.equal(v, s2[k]) for k, v in s1.items())
