"""Every method runs on tiny in-process models; PromptKD's step touches exactly what it should."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from promptkd.config import config_from_dict
from promptkd.errors import NonFiniteError, UserError
from promptkd.methods.promptkd import collapse_warning_step
from promptkd.testing import byte_tokenizer, tiny_llama
from promptkd.training.loop import Trainer


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


def full_logits(model, batch) -> torch.Tensor:
    """(B, T, V) logits of a plain forward; position t predicts token t + 1."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding skipped
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos, use_cache=False).logits


AB = (0.3, 0.5)  # ABKD's (alpha, beta) in the runs below


def token_losses(name, logits, target_logits, batch, alpha=0.1) -> torch.Tensor:
    """(N,) per response token, written out: q = softmax(logits) (student), p = softmax(target_logits)."""
    mask = batch.loss_mask[:, 1:]  # (B, T-1)
    q = logits[:, :-1][mask].softmax(-1)  # (N, V)
    p = None if target_logits is None else target_logits[:, :-1][mask].softmax(-1)  # (N, V)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    return {
        "ce": lambda: -q.log().gather(-1, batch.input_ids[:, 1:][mask][:, None])[:, 0],
        "forward_kl": lambda: kl(p, q),
        "reverse_kl": lambda: kl(q, p),
        "skew_forward_kl": lambda: kl(p, alpha * p + (1 - alpha) * q),
        "skew_reverse_kl": lambda: kl(q, alpha * q + (1 - alpha) * p),
        "abkd": lambda: -(p**AB[0] * q**AB[1] - AB[0] / sum(AB) * p ** sum(AB) - AB[1] / sum(AB) * q ** sum(AB)).sum(-1)
        / (AB[0] * AB[1]),
    }[name]()


def supervised_terms(student, teacher, batches, divergence=None) -> tuple[float, float | None]:
    """(CE, divergence(student, teacher) or None), each a mean over the step's response tokens (float64)."""
    student = copy.deepcopy(student).double()
    teacher = copy.deepcopy(teacher).double() if divergence else None
    ce = kd = 0.0
    with torch.no_grad():
        for b in batches:
            s = full_logits(student, b)
            ce += token_losses("ce", s, None, b).sum()
            if divergence:
                kd += token_losses(divergence, s, full_logits(teacher, b), b).sum()
    n = sum(b.loss_mask.sum() for b in batches)
    return float(ce / n), float(kd / n) if divergence else None


def record_batches(tr, monkeypatch) -> list:
    """[(step, source, batch)] for every batch the method trains on; source: "data" (collated
    dataset / file responses), "student" or "teacher" (sampled by that model)."""
    seen = []
    collate, sample = tr.ctx.collate, tr.ctx.sample

    def recording_collate(examples):
        seen.append((tr.step, "data", collate(examples)))
        return seen[-1][2]

    def recording_sample(examples, *, from_teacher=False, **kwargs):
        seen.append((tr.step, "teacher" if from_teacher else "student", sample(examples, from_teacher=from_teacher, **kwargs)))
        return seen[-1][2]

    monkeypatch.setattr(tr.ctx, "collate", recording_collate)
    monkeypatch.setattr(tr.ctx, "sample", recording_sample)
    return seen


def train_two_steps(tr) -> list[dict]:
    """tr.train() for 2 steps; checks the export and the metrics log; returns the records."""
    assert tr.train()["step"] == 2
    assert (tr.output_dir / "final" / "student" / "config.json").is_file()
    records = [json.loads(x) for x in (tr.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    return records


def test_promptkd_step_freezes_teacher_and_moves_prompt_and_student(tmp_path, tiny_pair_dirs, tiny_jsonl):
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl)
    teacher0 = snapshot(tr.teacher)
    prompt0 = [p.detach().clone() for p in tr.method.prompt_params]
    student0 = snapshot(tr.unwrapped_student)
    metrics = tr.train_step().metrics
    for k, v in snapshot(tr.teacher).items():
        assert torch.equal(v, teacher0[k]), f"teacher weight {k} changed"
    assert all(not p.requires_grad for p in tr.teacher.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(tr.method.prompt_params, prompt0, strict=True)), "prompt did not move"
    moved = [k for k, v in snapshot(tr.unwrapped_student).items() if not torch.equal(v, student0[k])]
    assert moved, "student did not move"
    for key in ("prompt/kl_to_student", "prompt/drift", "prompt/lambda", "student/loss"):
        assert torch.isfinite(torch.tensor(metrics[key]))
    assert metrics["prompt/lambda"] == 0.5  # base_coef * (1 - k/K) for step k = 1 of K = 2


def test_regulariser_schedule_counts_steps_from_one_and_reaches_zero(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """lambda_k = base_coef (1 - k/K) with k = 1..K as in the reference (global_step starts at 1),
    so the last step's weight is exactly 0 and the first is below base_coef."""
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, promptkd={"base_coef": 0.5}, train={"max_steps": 4})
    assert [tr.method.regulariser_weight(done, 4) for done in range(4)] == [0.375, 0.25, 0.125, 0.0]
    lambdas = []
    for _ in range(4):
        lambdas.append(tr.train_step().metrics["prompt/lambda"])
    assert lambdas == [0.375, 0.25, 0.125, 0.0]


def test_promptkd_logs_both_distances_every_step(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """kl_to_student = KL(p_TP || p_S) and drift = KL(p_TP || p_T) are the prompt loss's two terms;
    at the last step (lambda 0) the drift is still measured, outside the loss."""
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl)
    first, last = tr.train_step().metrics, tr.train_step().metrics
    assert first["prompt/lambda"] > 0 and last["prompt/lambda"] == 0
    assert first["prompt/loss"] == pytest.approx(first["prompt/kl_to_student"] + first["prompt/lambda"] * first["prompt/drift"])
    assert last["prompt/drift"] > 0 and last["prompt/loss"] == last["prompt/kl_to_student"]


def collapsing_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl, **promptkd):
    """A prompt driven toward the student: prompt LR 0.5, no regulariser, and a student that starts
    as a copy of the teacher and follows p_TP, so KL(p_TP || p_S) < KL(p_TP || p_T) after a few
    steps (measured: from step 4 of 8 on; teacher dropout off for a noise-free drift)."""
    teacher, _ = tiny_pair_dirs
    return trainer_for(tmp_path, (teacher, teacher), tiny_jsonl, train={"max_steps": 8, "learning_rate": 1e-3},
                       promptkd={"prompt_learning_rate": 0.5, "base_coef": 0.0, "teacher_dropout": False, **promptkd})


def test_promptkd_collapse_warns_once(tmp_path, tiny_pair_dirs, tiny_jsonl, caplog):
    tr = collapsing_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl, collapse_window=3)
    with caplog.at_level(logging.WARNING):
        metrics = [tr.train_step().metrics for _ in range(8)]
    collapse = [r.getMessage() for r in caplog.records if "closer to the student than to the teacher" in r.getMessage()]
    assert len(collapse) == 1, [m["prompt/kl_to_student"] - m["prompt/drift"] for m in metrics]
    message = collapse[0]
    assert "promptkd.prompt_learning_rate" in message
    step = int(message.split("step ")[1].split(":")[0])
    m = metrics[step - 1]
    assert f"{m['prompt/kl_to_student']:.4g}" in message and f"{m['prompt/drift']:.4g}" in message
    assert all(x["prompt/kl_to_student"] < x["prompt/drift"] for x in metrics[step - 3 : step])
    # the study report recomputes the warning step from the logged distances by the same rule
    logged = [(i, x["prompt/kl_to_student"], x["prompt/drift"]) for i, x in enumerate(metrics, 1)]
    assert collapse_warning_step(logged, 3) == step


def test_collapse_warning_step_needs_a_whole_window_of_consecutive_steps():
    log = [(1, 1.0, 0.5), (2, 1.0, 2.0), (3, 1.0, 2.0), (4, 1.0, 0.5), (5, 0.1, 0.2), (6, 0.1, 0.2), (7, 0.1, 0.2)]
    assert collapse_warning_step(log, 2) == 3
    assert collapse_warning_step(log, 3) == 7  # the streak restarts after step 4
    assert collapse_warning_step(log, 4) is None
    assert collapse_warning_step(log, 0) is None  # off
    assert collapse_warning_step([(1, 0.5, 0.5)], 1) is None  # equal distances are not a collapse


def test_promptkd_collapse_window_is_part_of_the_checkpointed_state(tmp_path, tiny_pair_dirs, tiny_jsonl, caplog):
    """A resumed run continues the streak and does not warn a second time."""
    tr = collapsing_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl, collapse_window=3)
    with caplog.at_level(logging.WARNING):
        for _ in range(8):
            tr.train_step()
    assert any("closer to the student" in r.getMessage() for r in caplog.records)
    state = tr.method.state_dict()
    assert state["collapse_warned"] is True and state["collapse_streak"] >= 3
    fresh = collapsing_trainer(tmp_path / "again", tiny_pair_dirs, tiny_jsonl, collapse_window=3)
    fresh.setup()
    fresh.method.load_state_dict(state)
    assert (fresh.method.collapse_streak, fresh.method.collapse_warned) == (state["collapse_streak"], True)
    assert torch.equal(fresh.method.prompt_params[0], tr.method.prompt_params[0])
    fresh.method.load_state_dict({k: v for k, v in state.items() if not k.startswith("collapse")})  # older checkpoints
    assert (fresh.method.collapse_streak, fresh.method.collapse_warned) == (0, False)


@pytest.mark.parametrize("method,sections,source,kd_ratio,divergence", [
    ("sft", {}, "data", 0.0, None),
    ("kd", {"kd": {"kd_ratio": 0.5}}, "data", 0.5, "forward_kl"),
    ("kd", {"kd": {"divergence": "skew_forward_kl"}}, "data", 0.5, "skew_forward_kl"),
    # lmbda 0.5 with seed 5 draws on-policy for both steps; lmbda 0 is the dataset path
    ("gkd", {"gkd": {"lmbda": 0.5, "divergence": "skew_reverse_kl"}}, "student", 1.0, "skew_reverse_kl"),
    ("gkd", {"gkd": {"lmbda": 0.0}}, "data", 1.0, "reverse_kl"),  # generalized_jsd, beta 1
    ("gkd", {"gkd": {"lmbda": 0.5, "divergence": "alpha_beta_divergence", "ab_alpha": AB[0], "ab_beta": AB[1]}},
     "student", 1.0, "abkd"),
    ("kd", {"kd": {"divergence": "alpha_beta_divergence", "ab_alpha": AB[0], "ab_beta": AB[1]}}, "data", 0.5, "abkd"),
    ("gkd", {"gkd": {"lmbda": 0.0, "seq_kd": True}}, "teacher", 1.0, "reverse_kl"),
])
def test_methods_train_on_their_data_with_their_loss(
    tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch, method, sections, source, kd_ratio, divergence
):
    """End to end (train, log, export), and the first step's logged loss is the method's loss
    written out in float64 on the very batches it trained on, which came from the right source."""
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, method, **sections)
    student0 = copy.deepcopy(tr.unwrapped_student)
    seen = record_batches(tr, monkeypatch)
    records = train_two_steps(tr)
    assert [(step, src) for step, src, _ in seen] == [(0, source), (1, source)]
    if method == "gkd":
        assert [r["on_policy"] for r in records] == [float(source == "student")] * 2
    batches = [b for step, _, b in seen if step == 0]
    num_tokens = float(sum(b.loss_mask.sum() for b in batches))
    assert records[0]["trained_tokens"] == num_tokens
    assert records[0]["generated_tokens"] == (num_tokens if source in ("student", "teacher") else 0.0)
    # the terms one by one: the divergence is ~1e-3 of the CE, and forward and reverse KL of two
    # near-uniform tiny models differ by only 1.1e-3 to 1.9e-3 relative (observed float32 error
    # of the divergence: up to 5.8e-6 relative, of the CE 2e-8)
    ce, kd = supervised_terms(student0, tr.teacher, batches, divergence)
    assert records[0]["student/ce"] == pytest.approx(ce, rel=1e-5)
    if kd_ratio > 0:
        assert records[0]["student/kd"] == pytest.approx(kd, rel=5e-5)
    assert records[0]["student/loss"] == pytest.approx((1 - kd_ratio) * ce + kd_ratio * (kd or 0.0), rel=5e-5)


def test_promptkd_without_regulariser_end_to_end(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """base_coef 0: no regulariser at any step, the prompt loss is KL(p_TP || p_S) alone, and the
    first step's is that of the initial prompt on the student's own samples."""
    from test_promptkd_step_pinned import prompted_forward  # checked against PromptedTeacher there

    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, promptkd={"base_coef": 0.0})
    student0, prompt0 = copy.deepcopy(tr.unwrapped_student).double(), tr.method.prompt_params[0].detach().double()
    seen = record_batches(tr, monkeypatch)
    records = train_two_steps(tr)
    assert all(r["prompt/lambda"] == 0.0 and r["prompt/loss"] == r["prompt/kl_to_student"] for r in records)
    assert [(step, src) for step, src, _ in seen] == [(0, "student"), (1, "student")]
    (batch,) = [b for step, _, b in seen if step == 0]
    with torch.no_grad():
        s, tp = full_logits(student0, batch), prompted_forward(copy.deepcopy(tr.teacher).double(), prompt0, batch)
    n = batch.loss_mask.sum()
    # observed float32 error 7e-6 relative; the other KL direction is 7.8e-4 away
    assert records[0]["prompt/kl_to_student"] == pytest.approx(float(token_losses("forward_kl", s, tp, batch).sum() / n), rel=5e-5)


def test_promptkd_teacher_gradient_checkpointing_changes_memory_not_the_run(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """2 steps with 2 micro-batches each: the same logged losses, prompt and student with the
    teacher checkpointed during the prompt backward as without."""
    runs = []
    for checkpointing in (True, False):
        tr = trainer_for(tmp_path / str(checkpointing), tiny_pair_dirs, tiny_jsonl,
                         promptkd={"teacher_gradient_checkpointing": checkpointing},
                         train={"gradient_accumulation_steps": 2})
        runs.append((train_two_steps(tr), tr.method.prompt_params[0].detach().clone(), snapshot(tr.unwrapped_student)))
    (records, prompt, student), (records_ref, prompt_ref, student_ref) = runs
    for r, r_ref in zip(records, records_ref, strict=True):
        for key in ("prompt/kl_to_student", "prompt/drift", "student/loss"):
            assert r[key] == pytest.approx(r_ref[key], rel=1e-5), (r["step"], key)
    torch.testing.assert_close(prompt, prompt_ref, rtol=1e-5, atol=1e-7)
    for k, v in student.items():
        torch.testing.assert_close(v, student_ref[k], rtol=1e-5, atol=1e-7, msg=k)


def test_seqkd_trains_on_generated_teacher_responses(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """Every trained response is one of the file's teacher responses (not a dataset output), and
    the loss is CE (kd_ratio 0: no teacher loaded) or, by default, the reference's SeqKD:
    0.5 CE + 0.5 forward KL to the teacher."""
    from promptkd.config import GenerateConfig
    from promptkd.generate import run_generation
    from promptkd.sampling import SamplingConfig

    teacher, _ = tiny_pair_dirs
    out = run_generation(GenerateConfig(model=str(teacher), data=str(tiny_jsonl), out=str(tmp_path / "t.jsonl"),
                                        sampling=SamplingConfig(max_new_tokens=5), batch_size=8), show_progress=False)
    generated = {json.loads(x)["output"] for x in out.read_text().splitlines()}
    assert generated.isdisjoint(json.loads(x).get("output") for x in tiny_jsonl.read_text().splitlines())
    for kd_ratio, seqkd in ((0.0, {"kd_ratio": 0.0}), (0.5, {})):
        tr = trainer_for(tmp_path / str(kd_ratio), tiny_pair_dirs, tiny_jsonl, "seqkd",
                         data={"teacher_responses": str(out)}, seqkd=seqkd)
        assert tr.cfg.seqkd.kd_ratio == kd_ratio and (tr.teacher is None) == (kd_ratio == 0)
        student0 = copy.deepcopy(tr.unwrapped_student)
        seen = record_batches(tr, monkeypatch)
        records = train_two_steps(tr)
        assert [(step, src) for step, src, _ in seen] == [(0, "data"), (1, "data")]
        batches = [b for step, _, b in seen if step == 0]
        for b in batches:
            for ids, mask in zip(b.input_ids, b.loss_mask, strict=True):
                assert tr.tokenizer.decode(ids[mask], skip_special_tokens=True) in generated
        ce, kd = supervised_terms(student0, tr.teacher, batches, "forward_kl" if kd_ratio else None)
        assert records[0]["student/ce"] == pytest.approx(ce, rel=1e-5)
        if kd_ratio:
            assert records[0]["student/kd"] == pytest.approx(kd, rel=5e-5)
        assert records[0]["student/loss"] == pytest.approx((1 - kd_ratio) * ce + kd_ratio * (kd or 0.0), rel=5e-5)


def test_gradient_accumulation_uses_global_token_count(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """batch 4 x 1 micro-batch and batch 2 x 2 micro-batches give the same update (SFT, exact data)."""
    a = trainer_for(tmp_path / "a", tiny_pair_dirs, tiny_jsonl, "sft", train={"batch_size": 4, "max_grad_norm": 0.0})
    b = trainer_for(tmp_path / "b", tiny_pair_dirs, tiny_jsonl, "sft",
                    train={"batch_size": 2, "gradient_accumulation_steps": 2, "max_grad_norm": 0.0})
    ma = a.train_step().metrics
    mb = b.train_step().metrics
    assert ma["student/loss"] == pytest.approx(mb["student/loss"], rel=1e-5)
    for (k, va), vb in zip(a.unwrapped_student.state_dict().items(), b.unwrapped_student.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-6, msg=k)


def test_nonfinite_loss_is_skipped_with_warning(tmp_path, tiny_pair_dirs, tiny_jsonl, caplog):
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "sft", train={"max_steps": 3})
    before = snapshot(tr.unwrapped_student)
    hooks = [p.register_hook(lambda g: g * float("nan"))  # a NaN gradient reaches the guard
             for p in tr.unwrapped_student.parameters() if p.ndim > 1]
    with caplog.at_level(logging.WARNING):
        tr.train_step()
    assert any("non-finite student update at step 1" in r.getMessage() for r in caplog.records)
    for h in hooks:
        h.remove()
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
            monkeypatch.setattr("promptkd.training.assembly.teacher_linears_to_compute_dtype", lambda *args: None)
        tr = trainer_for(tmp_path / str(cast), tiny_pair_dirs, tiny_jsonl, train={"mixed_precision": "bf16"})
        dtypes = {m.weight.dtype for m in tr.teacher.modules() if isinstance(m, torch.nn.Linear)}
        assert dtypes == ({torch.bfloat16, torch.float32} if cast else {torch.float32})  # tied LM head stays
        torch.manual_seed(0)
        metrics = tr.train_step().metrics
        results.append((metrics, [p.detach().clone() for p in tr.method.prompt_params], snapshot(tr.unwrapped_student)))
    (m1, p1, s1), (m2, p2, s2) = results
    assert m1["student/loss"] == m2["student/loss"] and m1["prompt/kl_to_student"] == m2["prompt/kl_to_student"]
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    assert all(torch.equal(v, s2[k]) for k, v in s1.items())


def test_seqkd_warns_once_for_teacher_responses_without_the_ended_flag(tmp_path, tiny_pair_dirs, tiny_jsonl, caplog):
    old = tiny_jsonl  # a file written before `promptkd generate` recorded `ended`
    rows = [dict(json.loads(line), ended=i % 2 == 0) for i, line in enumerate(old.read_text().splitlines())]
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def flag_warnings(method, run, **sections):
        caplog.clear()
        with caplog.at_level("WARNING"):
            tr = trainer_for(tmp_path / run, tiny_pair_dirs, tiny_jsonl, method, **sections)
        return tr, [r.getMessage() for r in caplog.records if "'ended' flag" in r.getMessage()]

    seqkd = {"seqkd": {"kd_ratio": 0.0}}
    tr, warned = flag_warnings("seqkd", "old", data={"teacher_responses": str(old)}, **seqkd)
    eos = tr.tokenizer.eos_token_id
    assert len(warned) == 1 and "16 of 16" in warned[0] and "promptkd generate" in warned[0]
    assert all(e.response_ids[-1] == eos for e in tr.train_examples)  # flagless: EOS appended, as before
    tr, warned = flag_warnings("seqkd", "new", data={"teacher_responses": str(new)}, **seqkd)
    assert warned == []
    assert [e.response_ids[-1] == eos for e in tr.train_examples] == [r["ended"] for r in rows]
    _, warned = flag_warnings("sft", "sft")  # ordinary reference data has no flag and needs none
    assert warned == []


def test_max_response_length_caps_reference_responses_and_the_trained_tokens(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """data.max_response_length gives off-policy methods the on-policy response budget."""
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "kd", data={"max_response_length": 3})
    assert max(len(e.response_ids) for e in tr.train_examples) == 3
    record = tr.train()
    assert record["trained_tokens"] <= tr.cfg.train.batch_size * 3


def test_from_config_takes_a_path_a_dict_or_a_config_with_overrides_and_objects(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """Trainer.from_config: YAML path, dict or Config, dotted overrides (list or nested dict)
    merged into nested sections, and objects that replace the config's paths."""
    import yaml

    from promptkd.testing import byte_tokenizer, tiny_llama

    cfg = make_cfg(tmp_path, *tiny_pair_dirs, tiny_jsonl)
    path = tmp_path / "cfg.yaml"
    cfg.save(path)
    over = ["--train.max_steps", "7", "--promptkd.base_coef", "0.5"]
    for source in (str(path), yaml.safe_load(path.read_text()), cfg):
        tr = Trainer.from_config(source, over)
        assert (tr.cfg.train.max_steps, tr.cfg.promptkd.base_coef) == (7, 0.5)
        assert tr.cfg.train.batch_size == cfg.train.batch_size  # the rest of the section is kept
    assert Trainer.from_config(cfg, {"train": {"seed": 9}}).cfg.train.max_steps == cfg.train.max_steps
    assert Trainer.from_config(cfg).cfg is cfg
    # objects in place of the paths: the config may leave them out
    data = yaml.safe_load(path.read_text())
    data["model"].update(student="", teacher=None)
    tr = Trainer.from_config(data, student=tiny_llama(num_layers=2, seed=1), teacher=tiny_llama(num_layers=4, seed=0),
                             tokenizer=byte_tokenizer())
    assert tr.train_step().metrics["student/loss"] >= 0


def test_the_progress_bar_shows_the_students_loss():
    """PromptKD reports prompt/loss first; the bar shows the student's loss and the two distances."""
    from promptkd.training.console import progress_postfix

    record = {"step": 3, "prompt/loss": 9.0, "prompt/kl_to_student": 0.25, "prompt/drift": 0.125,
              "student/loss": 2.0, "step_time": 1.5, "trained_tokens_per_s": 100.0}
    assert progress_postfix(record) == {"student/loss": "2.0000", "kl_to_student": "0.25", "drift": "0.125",
                                        "s/step": "1.50", "tok/s": "100"}
    del record["student/loss"]  # a method without one: its first loss
    assert next(iter(progress_postfix(record))) == "prompt/loss"


def test_objects_passed_in_the_student_trains_in_place_the_teacher_gets_its_flags_back(
    tmp_path, tiny_pair_dirs, tiny_jsonl
):
    """As the Trainer's docstring says: the student is trained in place; the teacher is never
    updated, and after train() its requires_grad and train / eval flags are the ones it came with."""
    teacher, student = tiny_llama(num_layers=4, seed=0), tiny_llama(num_layers=2, seed=1)
    teacher.train()
    teacher.model.norm.eval()
    teacher.model.layers[0].requires_grad_(False)
    grads = {n: p.requires_grad for n, p in teacher.named_parameters()}
    modes = {n: m.training for n, m in teacher.named_modules()}
    teacher0, student0 = snapshot(teacher), snapshot(student)
    cfg = make_cfg(tmp_path, *tiny_pair_dirs, tiny_jsonl, promptkd={"teacher_dropout": True})
    tr = Trainer(cfg, student=student, teacher=teacher, tokenizer=byte_tokenizer(), show_progress=False)
    tr.train()
    assert tr.unwrapped_student is student
    assert any(not torch.equal(v, student0[k]) for k, v in snapshot(student).items())
    assert all(torch.equal(v, teacher0[k]) for k, v in snapshot(teacher).items())
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == grads
    assert {n: m.training for n, m in teacher.named_modules()} == modes


def test_a_teacher_passed_in_keeps_its_weights_dtype_under_bf16(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """Only a teacher the trainer loads itself gets its linear weights held in bf16."""
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(AcceleratorState, "_shared_state", {})  # one precision per process (see above)
    teacher, student = tiny_llama(num_layers=4, seed=0), tiny_llama(num_layers=2, seed=1)
    cfg = make_cfg(tmp_path, *tiny_pair_dirs, tiny_jsonl, train={"mixed_precision": "bf16", "max_steps": 1})
    tr = Trainer(cfg, student=student, teacher=teacher, tokenizer=byte_tokenizer(), show_progress=False)
    tr.train()
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    loaded = trainer_for(tmp_path / "loaded", tiny_pair_dirs, tiny_jsonl, train={"mixed_precision": "bf16"})
    assert torch.bfloat16 in {p.dtype for p in loaded.teacher.parameters()}


def test_abkd_is_promptkds_student_loss_when_chosen(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """The student's loss takes promptkd.divergence with its parameters; the prompt's stays reverse KL."""
    from promptkd.losses import divergence

    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "promptkd",
                     promptkd={"divergence": "alpha_beta_divergence", "ab_alpha": AB[0], "ab_beta": AB[1]})
    assert tr.method.student_loss == divergence("alpha_beta_divergence", ab_alpha=AB[0], ab_beta=AB[1])
    assert tr.method.prompt_loss == divergence("reverse_kl")
    assert train_two_steps(tr)[0]["student/loss"] > 0


def test_minillm_lm_data_is_read_by_the_trainer_and_trained_on(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """minillm.lm_data goes through the trainer's data loading (template, lengths) into
    ctx.extra_examples, and the step trains the LM term on it."""
    lm_file = tmp_path / "lm.jsonl"
    lm_file.write_text("".join(json.dumps({"prompt": "x", "output": t}) + "\n" for t in ("The sky is blue.", "ok", "1 2 3")))
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "minillm", train={"max_steps": 1},
                     minillm={"lm_coef": 0.5, "lm_data": str(lm_file)})
    examples = tr.ctx.extra_examples["minillm.lm_data"]
    tok = byte_tokenizer()
    assert [tok.decode(e.response_ids, skip_special_tokens=True) for e in examples] == ["The sky is blue.", "ok", "1 2 3"]
    assert tr.method.lm_examples is examples
    metrics = tr.train()
    assert "minillm/lm" in metrics and metrics["minillm/lm"] > 0


def test_minillm_lm_data_without_usable_records_names_its_key(tmp_path, tiny_pair_dirs, tiny_jsonl):
    lm_file = tmp_path / "lm.jsonl"
    lm_file.write_text(json.dumps({"prompt": "x" * 400, "output": "too long a prompt"}) + "\n")
    with pytest.raises(UserError, match="minillm.lm_data"):
        trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "minillm", minillm={"lm_coef": 0.5, "lm_data": str(lm_file)})


def test_a_registered_method_decides_whether_it_needs_a_teacher(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch,
                                                                 caplog):
    """A registered method that uses no teacher (its needs_teacher is False) loads and trains
    without model.teacher, and warns that a given one is ignored; one that needs a teacher is
    refused without one, naming the key, before any model loads."""
    import promptkd
    import promptkd.methods as methods
    from promptkd.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
    from promptkd.methods.base import Method, supervised_step

    monkeypatch.setattr(methods, "_REGISTERED", dict(methods._REGISTERED))  # registrations end with the test

    class ReferencesOnly(Method):
        @classmethod
        def needs_teacher(cls, options):
            return False

        def step(self, ctx, micro_batches):
            return supervised_step(ctx, [ctx.collate(mb) for mb in micro_batches])

    class WithTeacher(ReferencesOnly):
        @classmethod
        def needs_teacher(cls, options):
            return True

    promptkd.register_method("references_only", ReferencesOnly)
    promptkd.register_method("with_teacher", WithTeacher)
    teacher, student = tiny_pair_dirs

    def config(method, name, teacher=""):
        return Config(method=method, model=ModelConfig(student=str(student), teacher=str(teacher) if teacher else None),
                      data=DataConfig(train=str(tiny_jsonl)),
                      train=TrainConfig(output_dir=str(tmp_path / name), max_steps=1, batch_size=2, warmup_steps=0,
                                        cpu=True))

    # a config file or mapping without a teacher is valid for it (the built-in rule is not applied)
    assert config_from_dict({"method": "references_only", "model": {"student": str(student)},
                             "data": {"train": str(tiny_jsonl)}}).model.teacher is None
    trainer = Trainer(config("references_only", "a"), show_progress=False)
    metrics = trainer.train()
    assert trainer.teacher is None and metrics["student/ce"] > 0
    with caplog.at_level(logging.WARNING, logger="promptkd.training.assembly"):
        ignored = Trainer(config("references_only", "b", teacher=teacher), show_progress=False).setup()
    assert ignored.teacher is None and "method 'references_only' uses none" in caplog.text
    with pytest.raises(ConfigError, match=r"'model.teacher' is not set but method 'with_teacher' needs a teacher"):
        Trainer(config("with_teacher", "c"), show_progress=False).setup()
    assert not (tmp_path / "c" / "checkpoints").exists()
