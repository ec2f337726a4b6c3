"""Multi-process training on CPU (gloo) is the same optimisation as one process.

2 processes x batch b must take the same first optimizer step as 1 process x batch 2b, for the
student (DDP averages its gradients) and for the soft prompt (its gradients are averaged by
`TrainingContext.apply_update`); checkpoints are written once, by the main process, and resume
across world sizes. Greedy decoding (`sampling.do_sample false`) makes the on-policy samples
the same whatever the per-process RNG; left padding differs between a 2-row and a 4-row batch,
which leaves float32 rounding differences only (hence the tolerances below). A LoRA student
(model.student_lora) gets the same first-step comparison and a 2-process -> 1-process resume.

Launchers: `torch.distributed.run` for the 2-process run and `accelerate launch` with the
shipped configs/accelerate/cpu_2proc.yaml for the 2-process resume, both as subprocesses.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from launch import LR, final_weights, max_diff, metrics, run_all, write_config

from promptkd.data.order import DataOrder

STEP1_ATOL = 2e-5  # measured: student 3e-6, prompt 5e-10; without the prompt all-reduce 2e-3


# --------------------------------------------------------------------------- data order


def _shards(world: int, bs: int, accum: int, steps: int, n: int = 10) -> list[list[list[list[int]]]]:
    """[step][rank] -> that process's micro-batches (example indices), as the trainer takes them."""
    out = [[None] * world for _ in range(steps)]
    for rank in range(world):
        order = DataOrder(n, seed=3)
        for k in range(steps):
            out[k][rank] = order.micro_batches(bs, accum, world, rank)
        assert order.position == steps * bs * accum * world  # global, so resumable anywhere
    return out


@pytest.mark.parametrize("world,bs,accum", [(2, 2, 1), (2, 1, 2), (4, 1, 1), (1, 2, 2)])
def test_global_batch_of_each_step_is_independent_of_world_size(world, bs, accum):
    """Step k trains on the same examples, in the same order, for any (world, batch, accumulation)
    with the same product; each process gets accum micro-batches of its batch_size."""
    steps = 6  # 6 x 4 examples from 10: crosses two epoch boundaries
    reference = [s[0][0] for s in _shards(1, 4, 1, steps)]  # 1 process, batch 4
    for k, per_rank in enumerate(_shards(world, bs, accum, steps)):
        assert all(len(mbs) == accum and all(len(mb) == bs for mb in mbs) for mbs in per_rank)
        # micro-batch m of rank r holds global slots (m * world + r) * bs ...
        ordered = [i for m in range(accum) for r in range(world) for i in per_rank[r][m]]
        assert ordered == reference[k], f"step {k + 1}"


@dataclass
class Runs:
    """The finished runs of the module's fixture: run directories, the init, logs, wall times."""

    dirs: dict
    student_init: Path
    logs: dict
    times: dict


def _first_step_runs(config: Path, out: dict, logs: Path) -> dict:
    """Step 1 with 2 processes x 2 ("two") and 1 process x 4 ("one"), each copied to
    "<name>_then_one" for a resume; returns the wall times."""
    logs.mkdir()
    base = ["--config", str(config)]
    times = run_all({
        "two": ("torchrun", [*base, "--train.output_dir", str(out["two"])]),
        "one": ("single", [*base, "--train.output_dir", str(out["one"]), "--train.batch_size", "4"]),
    }, logs)
    shutil.copytree(out["two"], out["two_then_one"])
    shutil.copytree(out["one"], out["one_then_one"])
    return times


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Step 1 with 2 processes x 2 and 1 process x 4; then step 2 resumed across world sizes."""
    root = tmp_path_factory.mktemp("mp")
    config, student = write_config(root)
    out = {k: root / k for k in ("two", "one", "two_then_one", "one_then_one", "one_then_two")}
    logs = root / "logs"
    times = _first_step_runs(config, out, logs)
    shutil.copytree(out["one"], out["one_then_two"])
    # step 2 evaluates the dev loss (step 1: sampled ROUGE-L), so both sharded evaluations run
    step2 = ["--train.max_steps", "2", "--train.eval_metric", "loss"]
    times.update(run_all({
        "two_then_one": ("single", ["--resume", str(out["two_then_one"]), *step2, "--train.batch_size", "4"]),
        "one_then_one": ("single", ["--resume", str(out["one_then_one"]), *step2]),
        # 2 processes x 2 micro-batches of 1: also covers DDP no_sync + accumulation
        "one_then_two": ("accelerate", ["--resume", str(out["one_then_two"]), *step2, "--train.batch_size", "1",
                                        "--train.gradient_accumulation_steps", "2"]),
    }, logs))
    return Runs(dirs=out, student_init=student, logs=logs, times=times)


# --------------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_two_processes_take_the_same_first_step_as_one(runs):
    from safetensors.torch import load_file

    student2, prompt2 = final_weights(runs.dirs["two"])
    student1, prompt1 = final_weights(runs.dirs["one"])
    init = load_file(runs.student_init / "model.safetensors")
    moved = max_diff(student1, {k: init[k] for k in student1})
    assert moved > 0.5 * LR, "the student did not take a step"
    d_student, d_prompt = max_diff(student2, student1), max_diff(prompt2, prompt1)
    print(f"\nstep 1, 2 procs x 2 vs 1 proc x 4: max |diff| student {d_student:.3g}, prompt {d_prompt:.3g}"
          f" (step size ~{moved:.3g}); run times {json.dumps({k: round(v, 1) for k, v in runs.times.items()})}")
    assert d_student <= STEP1_ATOL
    assert d_prompt <= STEP1_ATOL
    # the logged (globally reduced) values agree too: token-weighted losses and the gradient
    # norms after the all-reduce, which a missing or wrong reduction would change
    (m2,), (m1,) = metrics(runs.dirs["two"]), metrics(runs.dirs["one"])
    for key in ("prompt/loss", "prompt/kl_to_student", "prompt/drift", "prompt/grad_norm", "student/loss",
                "student/grad_norm", "generated_tokens", "dev/rougeL"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-9), key
    # compute counts non-pad tokens (greedy samples here), summed over processes: the same totals
    assert {k: v for k, v in m2.items() if k.startswith("compute/")} == {k: v for k, v in m1.items() if k.startswith("compute/")}
    assert m2["prompt/grad_norm"] > 0 and m2["student/grad_norm"] > 0


@pytest.mark.slow
def test_two_process_run_writes_one_complete_checkpoint_from_the_main_process(runs):
    run = runs.dirs["two"]
    ckpts = run / "checkpoints"
    # no .tmp-/.old-/.del- leftovers, one step directory, named by `latest`
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000001"]
    assert (ckpts / "latest").read_text().strip() == "step-00000001"
    step = ckpts / "step-00000001"
    files = {p.name for p in step.iterdir()}
    # student + its optimizer/scheduler, prompt optimizer/scheduler, the prompt (custom state),
    # one RNG file per process (each rank saves its own), the trainer state
    assert {"model.safetensors", "optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin",
            "custom_checkpoint_0.pkl", "random_states_0.pkl", "random_states_1.pkl",
            "trainer_state.json"} <= files, files
    state = json.loads((step / "trainer_state.json").read_text())
    assert (state["step"], state["data_position"], state["world_size"]) == (1, 4, 2)
    # only the main process logs and exports
    assert len(metrics(run)) == 1
    assert sorted(p.name for p in run.iterdir()) == ["best", "checkpoints", "config.yaml", "final", "metrics.jsonl",
                                                     "precision.json"]
    for d in ("final", "best"):
        assert (run / d / "student" / "model.safetensors").is_file()
        assert (run / d / "prompt_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("resumed", ["two_then_one", "one_then_two"])
def test_checkpoints_resume_across_world_sizes(runs, resumed):
    """Step 2 after resuming a 2-process checkpoint with 1 process (and a 1-process one with 2
    processes x 2 accumulated micro-batches of 1) matches step 2 of a 1-process run resumed with
    1 process. Unlike step 1, AdamW's step 2 is not sign(grad)-like, so it is sensitive to the
    restored optimizer states and to the gradient magnitudes."""
    reference = runs.dirs["one_then_one"]
    run = runs.dirs[resumed]
    world = {"two_then_one": 1, "one_then_two": 2, "one_then_one": 1}
    for name, d in ((resumed, run), ("one_then_one", reference)):
        state = json.loads((d / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
        # the launcher really ran that many processes (`accelerate launch --cpu` would run one)
        assert (state["step"], state["data_position"], state["world_size"]) == (2, 8, world[name])
    assert [m["step"] for m in metrics(run)] == [1, 2]
    student, prompt = final_weights(run)
    ref_student, ref_prompt = final_weights(reference)
    d_student, d_prompt = max_diff(student, ref_student), max_diff(prompt, ref_prompt)
    print(f"\nstep 2, {resumed} vs one_then_one: max |diff| student {d_student:.3g}, prompt {d_prompt:.3g}")
    assert d_student <= 2 * STEP1_ATOL
    assert d_prompt <= 2 * STEP1_ATOL
    m, ref = metrics(run)[-1], metrics(reference)[-1]
    for key in ("prompt/loss", "prompt/grad_norm", "student/loss", "student/grad_norm", "prompt/lambda", "dev/loss"):
        assert m[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-9), key
    # the totals since step 0 come back from the checkpoint, whatever the number of processes (student
    # forwards and FLOPs aside: with 2 micro-batches PromptKD runs a separate student target forward)
    for key in ("generated_tokens", "student_backward_tokens", "teacher_forward_tokens", "teacher_backward_tokens"):
        assert m[f"compute/{key}"] == ref[f"compute/{key}"] > 0, key



# --------------------------------------------------------------------------- LoRA student


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """The same with a LoRA student (merged export on): step 1 with 2 processes x 2 and 1 x 4,
    then step 2 of each resumed in 1 process x 4."""
    root = tmp_path_factory.mktemp("mp_lora")
    config, student = write_config(root, student_lora={"r": 4, "lora_alpha": 8, "merge": True})
    out = {k: root / k for k in ("two", "one", "two_then_one", "one_then_one")}
    logs = root / "logs"
    times = _first_step_runs(config, out, logs)
    step2 = ["--train.max_steps", "2", "--train.eval_metric", "loss", "--train.batch_size", "4"]
    times.update(run_all({
        "two_then_one": ("single", ["--resume", str(out["two_then_one"]), *step2]),
        "one_then_one": ("single", ["--resume", str(out["one_then_one"]), *step2]),
    }, logs))
    return Runs(dirs=out, student_init=student, logs=logs, times=times)


def _lora_weights(run_dir: Path) -> tuple[dict, dict, dict]:
    """(adapter, merged student, prompt) exported by a LoRA-student run."""
    from safetensors.torch import load_file

    final = run_dir / "final"
    return (load_file(final / "student_adapter" / "adapter_model.safetensors"),
            load_file(final / "student" / "model.safetensors"),
            load_file(final / "prompt_adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_lora_student_two_processes_take_the_same_first_step_as_one(lora_runs):
    adapter2, merged2, prompt2 = _lora_weights(lora_runs.dirs["two"])
    adapter1, merged1, prompt1 = _lora_weights(lora_runs.dirs["one"])
    assert adapter1 and all(".lora_" in k for k in adapter1)
    moved = max(float(v.abs().max()) for k, v in adapter1.items() if "lora_B" in k)  # B starts at 0
    assert moved > 0.5 * LR, "the adapter did not take a step"
    diffs = {name: max_diff(a, b) for name, a, b in (("adapter", adapter2, adapter1),
                                                     ("merged", merged2, merged1), ("prompt", prompt2, prompt1))}
    print(f"\nLoRA step 1, 2 procs x 2 vs 1 proc x 4: max |diff| {diffs}; "
          f"run times {json.dumps({k: round(v, 1) for k, v in lora_runs.times.items()})}")
    assert all(d <= STEP1_ATOL for d in diffs.values()), diffs
    (m2,), (m1,) = metrics(lora_runs.dirs["two"]), metrics(lora_runs.dirs["one"])
    for key in ("prompt/loss", "prompt/grad_norm", "student/loss", "student/grad_norm", "generated_tokens", "dev/rougeL"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-9), key
    # the 2-process checkpoint holds the wrapped student, written once, by the main process
    step = lora_runs.dirs["two"] / "checkpoints" / "step-00000001"
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in step.iterdir()}
    assert json.loads((step / "trainer_state.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_lora_student_two_process_checkpoint_resumes_in_one_process(lora_runs):
    run, reference = lora_runs.dirs["two_then_one"], lora_runs.dirs["one_then_one"]
    state = json.loads((run / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert (state["step"], state["data_position"], state["world_size"]) == (2, 8, 1)
    assert [m["step"] for m in metrics(run)] == [1, 2]
    diffs = {name: max_diff(a, b) for name, a, b in zip(("adapter", "merged", "prompt"),
                                                        _lora_weights(run), _lora_weights(reference), strict=True)}
    print(f"\nLoRA step 2, two_then_one vs one_then_one: max |diff| {diffs}")
    assert all(d <= 2 * STEP1_ATOL for d in diffs.values()), diffs
    m, ref = metrics(run)[-1], metrics(reference)[-1]
    for key in ("prompt/loss", "student/loss", "student/grad_norm", "dev/loss"):
        assert m[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-9), key


# --------------------------------------------------------------------------- MiniLLM and DistiLLM

# Two steps each, greedy rollouts. MiniLLM: teacher-mixed rollouts at step 1 (the mixture's argmax),
# reused at step 2 (ppo_epochs 2). DistiLLM with seed 5: step 1 draws u = 0.20 < phi = 0.9 with the
# buffer not full (fresh samples fill it: capacity 2 per process = the global batch of 4), step 2 draws u = 0.88 in
# [phi / 2, phi) (replay from the buffer); a dev-loss check after every step (adapt_every 1; phi
# stays 0.9 as the loss never rises by loss_eps 10).
# Tolerance on the student after 2 AdamW steps, measured: DistiLLM 1.1e-8, MiniLLM 3.7e-5 (whitened
# advantages divide float32 rounding by a small spread). The first PPO step's loss is a near-zero
# difference (whitened advantages sum to 0; measured |diff| 2.5e-6), so values also get an absolute
# tolerance of 1e-5.
STUDENT_ATOL = {"minillm": 1e-4, "distillm": 2 * STEP1_ATOL}
METHOD_SECTIONS = {
    "minillm": {"minillm": {"teacher_mix_alpha": 0.2, "ppo_epochs": 2}},
    "distillm": {"distillm": {"initial_student_prob": 0.9, "capacity": 2, "replay_ratio": "constant",
                              "adapt_every": 1, "loss_eps": 10.0}},
}
ONE_PROCESS = {"distillm": ["--distillm.capacity", "4"]}  # capacity is per process: 4 in all either way


@pytest.fixture(scope="module", params=sorted(METHOD_SECTIONS))
def method_runs(request, tmp_path_factory):
    """Two steps of the method with 2 processes x 2 and with 1 process x 4."""
    method = request.param
    root = tmp_path_factory.mktemp(f"mp_{method}")
    config, student = write_config(root)
    cfg = yaml.safe_load(config.read_text())
    cfg.update(method=method, **METHOD_SECTIONS[method])
    cfg["train"].update(max_steps=2, eval_metric="loss")
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    out = {k: root / k for k in ("two", "one")}
    logs = root / "logs"
    logs.mkdir()
    base = ["--config", str(config)]
    times = run_all({
        "two": ("torchrun", [*base, "--train.output_dir", str(out["two"])]),
        "one": ("single", [*base, "--train.output_dir", str(out["one"]), "--train.batch_size", "4",
                           *ONE_PROCESS.get(method, [])]),
    }, logs)
    return method, Runs(dirs=out, student_init=student, logs=logs, times=times)


@pytest.mark.slow
def test_minillm_and_distillm_two_processes_take_the_same_steps_as_one(method_runs):
    from safetensors.torch import load_file

    method, runs = method_runs
    two, one = (load_file(runs.dirs[k] / "final" / "student" / "model.safetensors") for k in ("two", "one"))
    init = load_file(runs.student_init / "model.safetensors")
    moved = max_diff(one, {k: init[k] for k in one})
    assert moved > 0.5 * LR, "the student did not move"
    diff = max_diff(two, one)
    print(f"\n{method}, 2 steps, 2 procs x 2 vs 1 proc x 4: max |diff| student {diff:.3g} (moved {moved:.3g}); "
          f"run times {json.dumps({k: round(v, 1) for k, v in runs.times.items()})}")
    assert diff <= STUDENT_ATOL[method]
    m2, m1 = metrics(runs.dirs["two"]), metrics(runs.dirs["one"])
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == [1, 2]
    keys = {"minillm": ("minillm/pg", "minillm/single_step", "minillm/importance_weight", "minillm/log_ratio",
                        "minillm/fresh_rollouts", "student/loss", "student/grad_norm", "generated_tokens"),
            "distillm": ("distillm/source", "distillm/buffer", "distillm/student_prob", "distillm/dev_loss",
                         "student/kd", "student/loss", "student/grad_norm", "generated_tokens")}[method]
    for a, b in zip(m2, m1, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    if method == "minillm":
        assert [m["minillm/fresh_rollouts"] for m in m1] == [1.0, 0.0]  # step 2 reuses step 1's rollouts
        assert m1[0]["minillm/importance_weight"] != 1.0  # the teacher was mixed in
    else:
        assert [m["distillm/source"] for m in m1] == [1.0, 2.0]  # fresh samples, then a replay
        assert [m["distillm/buffer"] for m in m1] == [4.0, 4.0]
