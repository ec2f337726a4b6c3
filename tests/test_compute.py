"""The compute of a run (`promptkd.training.compute`): token-passes counted by hand from the batches a
step trains on, the FLOPs estimate from the recorded N, N itself, and exact totals after a resume."""

from __future__ import annotations

import json

from fakes import crash_in_step
from test_methods import make_cfg, record_batches, trainer_for

from promptkd.testing import tiny_llama, write_tiny_jsonl
from promptkd.training.compute import Compute, matmul_params
from promptkd.training.loop import Trainer

FIELDS = ("student_forward_tokens", "student_backward_tokens", "teacher_forward_tokens", "teacher_backward_tokens",
          "generated_tokens")


def run(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch, method, steps=1, **sections):
    """(the last metrics record of a run, the batches its steps trained on, N of student and teacher).
    With data.dev, the dev set is evaluated after every step, through the same context."""
    if "data" in sections:
        sections["train"] = {**sections.get("train", {}), "eval_every": 1}
    sections["train"] = {**sections.get("train", {}), "max_steps": steps}
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, method, **sections)
    seen, trained, step = record_batches(tr, monkeypatch), [], tr.method.step

    def recording_step(ctx, micro_batches):
        start = len(seen)
        result = step(ctx, micro_batches)
        trained.extend(batch for _, _, batch in seen[start:])
        return result

    monkeypatch.setattr(tr.method, "step", recording_step)
    tr.train()
    assert len(seen) > len(trained) or "data" not in sections  # the dev evaluation's batches
    record = json.loads((tr.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    params = json.loads((tr.output_dir / "precision.json").read_text())["matmul_params"]
    return record, trained, params


def counts(record) -> dict[str, float]:
    return {k: record[f"compute/{k}"] for k in FIELDS}


def tokens(batches) -> float:
    return sum(float(b.attention_mask.sum()) for b in batches)


def prompt_and_generated(batches) -> tuple[float, float]:
    return (sum(float(b.attention_mask[:, : b.prompt_length].sum()) for b in batches),
            sum(float(b.attention_mask[:, b.prompt_length :].sum()) for b in batches))


def test_sft_counts_the_collated_tokens_once_forward_once_backward_and_not_its_dev_loss(
        tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    dev = write_tiny_jsonl(tmp_path / "dev.jsonl", 4)
    record, batches, params = run(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch, "sft", steps=2,
                                  data={"dev": str(dev)})
    assert "dev/loss" in record and len(batches) == 2
    n = tokens(batches)
    assert counts(record) == {"student_forward_tokens": n, "student_backward_tokens": n, "teacher_forward_tokens": 0.0,
                              "teacher_backward_tokens": 0.0, "generated_tokens": 0.0}
    assert params["teacher"] == 0
    assert record["compute/flops"] == 6.0 * params["student"] * n  # Kaplan et al.'s 6N per trained token


def test_on_policy_gkd_counts_generation_and_the_teacher_target(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    dev = write_tiny_jsonl(tmp_path / "dev.jsonl", 4)
    record, batches, _ = run(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch, "gkd", steps=2, gkd={"lmbda": 1.0},
                             data={"dev": str(dev)}, train={"eval_metric": "rougeL"})
    assert record["on_policy"] == 1.0 and "dev/rougeL" in record and len(batches) == 2
    prompt, generated = prompt_and_generated(batches)
    n = tokens(batches)
    assert generated > 0
    assert counts(record) == {"student_forward_tokens": prompt + generated + n, "student_backward_tokens": n,
                              "teacher_forward_tokens": n, "teacher_backward_tokens": 0.0,
                              "generated_tokens": generated}


def test_promptkd_counts_the_prompted_teacher_passes_and_flops_follow_from_n(
        tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    record, batches, params = run(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch, "promptkd",
                                  promptkd={"num_virtual_tokens": 3})
    (batch,) = batches
    prompt, generated = prompt_and_generated(batches)
    n = tokens(batches)
    prompted = n + 3 * batch.input_ids.shape[0]  # the virtual tokens run through the teacher too
    # one student forward with grad serves both updates (one micro-batch, no dropout); the teacher runs
    # the prompt update's forward with grad, the base forward and the student's target forward
    assert counts(record) == {"student_forward_tokens": prompt + generated + n, "student_backward_tokens": n,
                              "teacher_forward_tokens": prompted + n + prompted, "teacher_backward_tokens": prompted,
                              "generated_tokens": generated}
    c, n_s, n_t = counts(record), params["student"], params["teacher"]
    assert n_s > 0 and n_t > n_s
    assert record["compute/flops"] == (2 * n_s * c["student_forward_tokens"] + 4 * n_s * c["student_backward_tokens"]
                                       + 2 * n_t * (c["teacher_forward_tokens"] + c["teacher_backward_tokens"]))


def test_minillm_counts_the_teacher_inside_teacher_mixed_sampling(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    record, batches, _ = run(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch, "minillm",
                             minillm={"teacher_mix_alpha": 0.2})
    assert len(batches) == 1
    prompt, generated = prompt_and_generated(batches)
    n = tokens(batches)
    # both models run every sampled position once (KV caches); the update reuses the rollout's forwards
    assert counts(record) == {"student_forward_tokens": prompt + generated + n, "student_backward_tokens": n,
                              "teacher_forward_tokens": prompt + generated + n, "teacher_backward_tokens": 0.0,
                              "generated_tokens": generated}


def test_n_leaves_embedding_lookups_out_and_counts_a_tied_head_once():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tied = tiny_llama(num_layers=2)
    head = tied.get_output_embeddings().weight
    assert head is tied.get_input_embeddings().weight
    body = sum(p.numel() for name, p in tied.named_parameters() if "embed_tokens" not in name)
    assert matmul_params(tied) == body + head.numel()
    untied = LlamaForCausalLM(LlamaConfig(**{**tied.config.to_dict(), "tie_word_embeddings": False}))
    assert matmul_params(untied) == matmul_params(tied)  # the input embedding is out, the head in, either way
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    total = sum(p.numel() for p in gpt2.parameters())
    assert matmul_params(gpt2) == total - gpt2.transformer.wpe.weight.numel()  # learned positions are a lookup too
    assert matmul_params(None) == 0

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=2, target_modules=["q_proj"]))
    adapters = sum(p.numel() for name, p in lora.named_parameters() if "lora_" in name)
    assert adapters > 0 and matmul_params(lora) == matmul_params(tied) + adapters


def test_compute_adds_reduces_and_estimates_flops():
    a, b = Compute(1.0, 2.0, 3.0, 4.0, 5.0), Compute(10.0, 20.0, 30.0, 40.0, 50.0)
    assert a + b == Compute(11.0, 22.0, 33.0, 44.0, 55.0)
    assert a.reduced(lambda v: 2 * v) == a + a
    assert a.flops(100, 1000) == 2 * 100 * 1 + 4 * 100 * 2 + 2 * 1000 * (3 + 4)
    assert a.record(100, 1000) == {"compute/student_forward_tokens": 1.0, "compute/student_backward_tokens": 2.0,
                                   "compute/teacher_forward_tokens": 3.0, "compute/teacher_backward_tokens": 4.0,
                                   "compute/generated_tokens": 5.0, "compute/flops": a.flops(100, 1000)}


def test_a_resumed_run_ends_with_the_totals_of_an_uninterrupted_one(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    sections = {"train": {"max_steps": 3, "save_every": 1, "deterministic": True}}
    ref = Trainer(make_cfg(tmp_path / "ref", *tiny_pair_dirs, tiny_jsonl, **sections), show_progress=False)
    ref.train()

    cfg = make_cfg(tmp_path / "run", *tiny_pair_dirs, tiny_jsonl, **sections)
    crashed = Trainer(cfg, show_progress=False).setup()
    crash_in_step(crashed, monkeypatch)  # in step 3

    resumed = Trainer(cfg, resume=True, show_progress=False)
    resumed.train()
    records = [[json.loads(x) for x in (t.output_dir / "metrics.jsonl").read_text().splitlines()] for t in (ref, resumed)]
    totals = [[{k: v for k, v in r.items() if k.startswith("compute/")} for r in rs] for rs in records]
    assert totals[0] == totals[1] and len(totals[0]) == 3
    assert totals[0][0]["compute/flops"] < totals[0][1]["compute/flops"] < totals[0][2]["compute/flops"]
    assert resumed.compute == ref.compute and resumed.compute.generated_tokens > 0
    assert records[1][-1]["compute/flops"] == resumed.compute.flops(resumed.matmul_params["student"],
                                                                     resumed.matmul_params["teacher"])
