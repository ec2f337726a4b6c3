"""train.fsdp: both models sharded with FSDP2 over 2 CPU processes (gloo) take the same steps as one
unsharded process on the same global batch.

Runs (float32, greedy decoding so the samples match across world sizes, as in test_multiprocess.py):
- PromptKD, step 1: 2 processes x batch 2 with train.fsdp, and 2 processes x 2 accumulated
  micro-batches of 1 with train.fsdp (the separate student-target forward, FSDP2's gradients
  reduce-scattered per micro-batch), against 1 unsharded process x batch 4. Then step 2 resumed from
  the sharded step-1 checkpoint (torch.distributed.checkpoint, each rank's shards) with 2 sharded
  processes and with 1 process, and from a 1-process train.fsdp checkpoint with 2 sharded processes,
  against the 1-process run resumed with 1 process.
- GKD (generalized JSD, beta 0.5, on-policy) and DistiLLM (a fresh and a replayed step, dev loss
  each step): 2 steps, 2 sharded processes x 2 against 1 process x 4.

Tolerance, from the arithmetic. Both sides compute the same sums in float32 in another order and
with other left padding (a 2-row batch against a 4-row one): gradient elements differ by rounding,
relatively little except where a gradient element is a near-cancelling sum. The first AdamW step
is lr * g / (|g| + eps) per element (bias-corrected m / sqrt(v)); its derivative is
eps / (|g| + eps)^2, so a relative change rho of g moves the update by at most lr * rho / 4
(worst at |g| = eps). ATOL = 2e-5 = lr / 50 admits rho up to 8% on single elements (rounding;
measured: 3e-7 for the student, 2e-9 for the prompt), while a gradient computed from one
process's half of the batch moves elements by O(lr) (without the prompt's all-reduce test_multiprocess
measured 2e-3), and a head gradient lost on the way to the shards leaves the embedding rows that
only the head trains unmoved by lr (measured: 2e-3). Step 2 is not sign-like and depends on the
restored optimizer state: twice the tolerance, as in test_multiprocess. Logged values (token-weighted
losses, gradient norms after the reduction: a factor 2 in the gradient scale leaves AdamW's update
unchanged but not the norm) agree to 1e-4 relative, or 1e-7 absolute: a KL near 0 (PromptKD's
drift, 4e-5 at step 1) is a difference of float32 log-probabilities of magnitude ~5, which rounding
leaves about 1e-7 apart (measured: 2e-8 with micro-batches of 1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from launch import LR, final_weights, max_diff, metrics, run_all, write_config

ATOL = 2e-5
FSDP = ["--train.fsdp", "true"]
METHODS = {  # 2 steps each; DistiLLM as in test_multiprocess: step 1 fresh samples, step 2 a replay
    "gkd": {"gkd": {"beta": 0.5}},
    "distillm": {"distillm": {"initial_student_prob": 0.9, "capacity": 2, "replay_ratio": "constant",
                              "adapt_every": 1, "loss_eps": 10.0}},
}
ONE = {"distillm": ["--distillm.capacity", "4"]}  # capacity is per process: the same 4 in all for 1 process
LOGGED = {
    "promptkd": ("prompt/loss", "prompt/kl_to_student", "prompt/drift", "prompt/grad_norm", "student/loss",
                 "student/grad_norm", "generated_tokens"),
    "gkd": ("student/loss", "student/grad_norm", "generated_tokens"),
    "distillm": ("distillm/source", "distillm/dev_loss", "student/kd", "student/loss", "student/grad_norm",
                 "generated_tokens"),
}


def _config(root: Path, method: str) -> Path:
    config, _ = write_config(root)
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["mixed_precision"] = "no"
    if method != "promptkd":
        cfg.update(method=method, **METHODS[method])
        cfg["train"].update(max_steps=2, eval_metric="loss")
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: run dir}, the logs directory and the wall times of every run."""
    root = tmp_path_factory.mktemp("fsdp")
    logs = root / "logs"
    logs.mkdir()
    configs = {m: _config(root / m, m) for m in ("promptkd", *METHODS)}
    out = {}

    def job(name, method, launcher, *args):
        out[name] = root / name
        verbose = launcher == "torchrun"  # the info lines say whether the models were sharded and chunked
        return name, (launcher, ["--config", str(configs[method]), "--train.output_dir", str(out[name]), *args],
                      verbose)

    four = ["--train.batch_size", "4"]
    times = run_all(dict([
        job("promptkd_two", "promptkd", "torchrun", *FSDP),
        job("promptkd_two_accum", "promptkd", "torchrun", *FSDP, "--train.batch_size", "1",
            "--train.gradient_accumulation_steps", "2"),
        job("promptkd_one", "promptkd", "single", *four),
        job("promptkd_one_fsdp", "promptkd", "single", *FSDP, *four),
        *(job(f"{m}_two", m, "torchrun", *FSDP) for m in METHODS),
        *(job(f"{m}_one", m, "single", *four, *ONE.get(m, [])) for m in METHODS),
    ]), logs)
    # step 2 from the sharded checkpoint of step 1, with 2 sharded processes and with 1 process
    for name, source in (("promptkd_two_then_two", "promptkd_two"), ("promptkd_two_then_one", "promptkd_two"),
                         ("promptkd_one_fsdp_then_two", "promptkd_one_fsdp"), ("promptkd_one_then_one", "promptkd_one")):
        out[name] = root / name
        shutil.copytree(out[source], out[name])
    step2 = ["--train.max_steps", "2", "--train.eval_metric", "loss"]
    times.update(run_all({
        "promptkd_two_then_two": ("torchrun", ["--resume", str(out["promptkd_two_then_two"]), *step2]),
        "promptkd_two_then_one": ("single", ["--resume", str(out["promptkd_two_then_one"]), *step2, *four]),
        "promptkd_one_fsdp_then_two": ("torchrun", ["--resume", str(out["promptkd_one_fsdp_then_two"]), *step2,
                                                    "--train.batch_size", "2"]),
        "promptkd_one_then_one": ("single", ["--resume", str(out["promptkd_one_then_one"]), *step2]),
    }, logs))
    print(f"\nrun times (s, from each batch's start): {json.dumps({k: round(v, 1) for k, v in times.items()})}")
    return out, logs, root


def _compare(run: Path, reference: Path, method: str, atol: float) -> dict[str, float]:
    """Max |diff| of the exported student (and prompt) after the run's last step; the logged values
    of every step agree."""
    student, prompt = final_weights(run)
    ref_student, ref_prompt = final_weights(reference)
    diffs = {"student": max_diff(student, ref_student)}
    if ref_prompt:
        diffs["prompt"] = max_diff(prompt, ref_prompt)
    print(f"\n{run.name} vs {reference.name}: max |diff| {diffs}")
    assert all(d <= atol for d in diffs.values()), diffs
    m_run, m_ref = metrics(run), metrics(reference)
    assert [m["step"] for m in m_run] == [m["step"] for m in m_ref]
    for a, b in zip(m_run, m_ref, strict=True):
        for key in LOGGED[method]:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key)
    return diffs


# --------------------------------------------------------------------------- fast checks (one process)


def _train_cfg(tmp_path, tiny_pair_dirs, tiny_jsonl, **train):
    from promptkd.config import config_from_dict

    teacher, student = tiny_pair_dirs
    return config_from_dict({
        "method": "gkd",
        "model": {"teacher": str(teacher), "student": str(student)},
        "data": {"train": str(tiny_jsonl), "max_prompt_length": 256, "max_length": 300},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "warmup_steps": 0, "seed": 5,
                  "learning_rate": 1e-3, "fsdp": True, **train},
        "sampling": {"max_new_tokens": 6},
    })


def test_fsdp_refuses_fp16_a_lora_student_and_minillms_teacher_mixing(tmp_path, tiny_pair_dirs, tiny_jsonl):
    from promptkd.config import config_from_dict
    from promptkd.errors import ConfigError

    data = _train_cfg(tmp_path, tiny_pair_dirs, tiny_jsonl).to_dict()
    data["train"]["mixed_precision"] = "fp16"
    data["model"]["student_lora"]["r"] = 4
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert any("'train.mixed_precision' = 'fp16'" in p and "train.fsdp" in p for p in err.value.problems)
    assert any("'model.student_lora.r' = 4" in p and "train.fsdp" in p for p in err.value.problems)
    data = _train_cfg(tmp_path, tiny_pair_dirs, tiny_jsonl).to_dict()
    data.update(method="minillm", minillm={"teacher_mix_alpha": 0.2})
    with pytest.raises(ConfigError, match="'minillm.teacher_mix_alpha' = 0.2 is not supported with 'train.fsdp'"):
        config_from_dict(data)


def test_decoder_layers_are_the_classes_named_in_no_split_modules():
    from promptkd.errors import UserError
    from promptkd.models.sharding import decoder_layers
    from promptkd.testing import tiny_llama

    model = tiny_llama(num_layers=3)
    assert decoder_layers(model) == list(model.model.layers)
    model._no_split_modules = []
    with pytest.raises(UserError, match="_no_split_modules"):
        decoder_layers(model)


def test_accelerates_fsdp2_and_fsdp_under_accelerates_fsdp_or_deepspeed_are_refused(tmp_path, tiny_pair_dirs,
                                                                                   tiny_jsonl):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from promptkd.errors import UserError
    from promptkd.training.assembly import check_distributed_backend

    fsdp = _train_cfg(tmp_path, tiny_pair_dirs, tiny_jsonl)
    plain = _train_cfg(tmp_path, tiny_pair_dirs, tiny_jsonl, fsdp=False)
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    with pytest.raises(UserError, match="accelerate's FSDP2 .* set train.fsdp true"):
        check_distributed_backend(plain, fsdp2)
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(UserError, match="train.fsdp shards the models itself"):
            check_distributed_backend(fsdp, SimpleNamespace(distributed_type=kind, is_fsdp2=False))
    check_distributed_backend(fsdp, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_fsdp2=False))


def test_fsdp_with_one_process_warns_and_its_dcp_checkpoint_resumes_exactly(tmp_path, tiny_pair_dirs, tiny_jsonl,
                                                                           caplog):
    """One process has nothing to shard (one warning), but the checkpoint has train.fsdp's layout:
    the student's model and optimizer in student_dcp/ (torch.distributed.checkpoint, one file of
    whole tensors), the schedule in accelerate's custom_checkpoint_0.pkl. GKD resumed at step 1
    takes the same step 2 as an uninterrupted run."""
    import torch

    from promptkd.training.loop import Trainer

    with caplog.at_level("WARNING"):
        Trainer(_train_cfg(tmp_path / "a", tiny_pair_dirs, tiny_jsonl, max_steps=1), show_progress=False).train()
    assert "train.fsdp with one process: nothing to shard" in caplog.text
    assert "single process" not in caplog.text  # DCP's no-process-group warning is filtered
    step = tmp_path / "a" / "run" / "checkpoints" / "step-00000001"
    assert sorted(p.name for p in (step / "student_dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    metadata = _dcp_metadata(step)
    assert "model.model.embed_tokens.weight" in metadata and "optimizer.state.model.embed_tokens.weight.exp_avg" in metadata
    assert len(metadata["model.model.layers.0.mlp.up_proj.weight"].chunks) == 1
    scheduler = torch.load(step / "custom_checkpoint_0.pkl", map_location="cpu", weights_only=False)
    assert scheduler["last_epoch"] == 1
    resumed = Trainer(_train_cfg(tmp_path / "a", tiny_pair_dirs, tiny_jsonl), resume=True, show_progress=False)
    resumed.train()
    whole = Trainer(_train_cfg(tmp_path / "b", tiny_pair_dirs, tiny_jsonl), show_progress=False)
    whole.train()
    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    assert max_diff(a[0], b[0]) == 0.0
    assert metrics(tmp_path / "a" / "run")[-1]["student/loss"] == metrics(tmp_path / "b" / "run")[-1]["student/loss"]


# --------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_sharded_runs_say_so_and_keep_the_chunked_losses(runs):
    out, logs, _ = runs
    for name in ("promptkd_two", "promptkd_two_accum", *(f"{m}_two" for m in METHODS)):
        log = (logs / f"{name}.log").read_text(errors="replace")
        assert "sharded over 2 processes (FSDP2" in log, name
        assert "full (batch, response, vocabulary) logits" not in log, name  # no fallback
        checkpoints = out[name] / "checkpoints"
        latest = checkpoints / (checkpoints / "latest").read_text().strip()
        assert json.loads((latest / "trainer_state.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("run", ["promptkd_two", "promptkd_two_accum"])
def test_promptkd_sharded_first_step_equals_one_process(runs, run):
    out, _, root = runs
    from safetensors.torch import load_file

    init = load_file(root / "promptkd" / "models" / "student" / "model.safetensors")
    one, _ = final_weights(out["promptkd_one"])
    assert max_diff(one, {k: init[k] for k in one}) > 0.5 * LR, "the student did not take a step"
    _compare(out[run], out["promptkd_one"], "promptkd", ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sharded_steps_equal_one_process(runs, method):
    out, _, _ = runs
    _compare(out[f"{method}_two"], out[f"{method}_one"], method, 2 * ATOL)


def _dcp_metadata(checkpoint: Path) -> dict:
    """{flattened key: its DCP storage metadata (size, chunks)} of a checkpoint's student_dcp/."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(checkpoint / "student_dcp").read_metadata().state_dict_metadata


@pytest.mark.slow
def test_sharded_checkpoint_holds_each_processs_shards_and_reshards_on_resume(runs):
    """The step-1 checkpoint of the sharded run is a torch.distributed.checkpoint directory: one file
    per rank, each with half of the rows of every weight and AdamW moment (nothing gathered). Step 2
    resumed from it with 2 sharded processes or with 1 process (DCP reshards on load), and step 2 of
    a 1-process train.fsdp run resumed with 2 sharded processes, equal step 2 of the 1-process run
    resumed with 1 process."""
    out, _, _ = runs
    step = out["promptkd_two"] / "checkpoints" / "step-00000001"
    files = {p.name: p.stat().st_size for p in (step / "student_dcp").iterdir()}
    assert set(files) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert 0.4 < files["__0_0.distcp"] / files["__1_0.distcp"] < 2.5, files  # each rank wrote its shards
    metadata = _dcp_metadata(step)
    one, _ = final_weights(out["promptkd_one"])
    shapes = {f"model.{name}": tuple(w.shape) for name, w in one.items()}  # the export stores the tied head once
    shapes["model.lm_head.weight"] = shapes["model.model.embed_tokens.weight"]
    assert shapes == {k: tuple(v.size) for k, v in metadata.items() if k.startswith("model.")}
    tensors = {k: v for k, v in metadata.items() if getattr(v, "chunks", None) and len(v.size) > 0}
    assert sum(k.endswith((".exp_avg", ".exp_avg_sq")) for k in tensors) == 2 * len(one)  # one per parameter
    for key, meta in tensors.items():  # weights and AdamW moments: the rows split between the ranks
        assert len(meta.chunks) == 2 and sum(c.sizes[0] for c in meta.chunks) == meta.size[0], key
    for name in ("promptkd_two_then_two", "promptkd_two_then_one", "promptkd_one_fsdp_then_two"):
        assert [m["step"] for m in metrics(out[name])] == [1, 2]
        _compare(out[name], out["promptkd_one_then_one"], "promptkd", 2 * ATOL)


@pytest.mark.slow
def test_sharded_generate_keeps_ranks_in_step_when_one_finishes_first(tmp_path):
    """tests/fsdp_generate.py: rank 0's greedy response ends after 1 token, rank 1's runs to the cap of
    8; both equal the unsharded model's samples. With transformers' synced_gpus off (checked by hand:
    the root's _is_fsdp_managed_module set to False) rank 1 waits for rank 0's all-gathers forever."""
    import subprocess
    import sys

    from launch import ROOT, env

    out = tmp_path / "result"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "fsdp_generate.py"), str(out)], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(out.with_name(f"{out.name}.{rank}").read_text()) for rank in (0, 1)]
    assert [(r["new_tokens"], r["equal"]) for r in results] == [(1, True), (8, True)]
