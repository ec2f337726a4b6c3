"""GPU check: PromptKD and GKD steps of ~1B / ~0.25B Llamas in bf16 on CUDA, and numerics vs float64.

    python benchmarks/gpu_check.py                            # the check, on CUDA (< 5 min on one H100 / H200)
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_<date>.md
    python benchmarks/gpu_check.py --device cpu --tiny        # dry run of the whole flow on tiny models (< 60 s)

Status: NOT YET RUN ON A GPU. No GPU has been lent to this project so far; the script has only
run as the CPU dry run above (tests/test_gpu_check.py), so every GPU figure it prints is still
unseen and its GPU-only paths (CUDA memory counters, synchronised phase clock, TF32 switch,
torch.compile of the losses on CUDA) have not been exercised.

Nothing is downloaded: the models are randomly initialised Llamas built on the device, the
tokenizer is a word-level tokenizer built in memory, and only promptkd's own dependencies
(torch, transformers, accelerate, peft, tokenizers) are used.

1. Numerics (first, a few seconds). Tiny random Llamas (promptkd.testing.tiny_llama, byte
   tokenizer, vocabulary 259; final-norm gain 12 so the next-token distributions are peaked
   like a trained model's instead of near uniform) take one PromptKD step and one GKD step
   (lmbda 1, beta 1) from the same init on the same fixed batch (a replayed batch: no sampling,
   so every run trains on the same tokens). The reference runs in float64 on the CPU; it is
   compared with float32 on the device (TF32 off) and bf16 autocast on the device: the losses
   (relative difference), and the gradients of the student and of the soft prompt at that step
   (cosine, relative error |g - g64| / |g64|). The updated weights are compared too
   (cosine of the update vs the float64 update; informational: AdamW's first update is about
   lr * sign(g), so it amplifies sign flips of near-zero gradient entries).
   Pass thresholds: float32 loss rel. diff < 1e-4 and gradient cosine > 0.99999; bf16 loss
   rel. diff < 2e-2 and gradient cosine > 0.99.
2. Throughput. Teacher ~1.1B (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads, 4 KV
   heads, MLP 5632, vocabulary 32,000, untied), student ~0.25B (hidden 1024, 16 layers, 16
   heads, 4 KV heads, MLP 2816), both random, built on the device. The tokenizer is a
   word-level one with --vocab tokens ("t4", "t5", ...), so the LM head and the (B, R, V)
   logits are as large as a Llama-2-sized vocabulary makes them (--vocab 128256: Llama 3's).
   Prompts are --prompt-tokens random token ids each (no padding), the student samples up to
   --new-tokens tokens (T 1, no top-k / top-p; random models almost never emit EOS, so sampling
   runs to the cap). PromptKD (library defaults) and GKD (on-policy reverse KL: lmbda 1, beta 1)
   each take --warmup unmeasured steps (first-call costs, torch.compile of the loss chunks)
   and then up to --steps measured ones, with train.mixed_precision bf16, through
   Trainer.train_step. Per method: median s/step (min-max), trained and generated tokens/s,
   decode tokens/s (generated tokens / generation time), peak GPU memory
   (torch.cuda.max_memory_allocated, reset before each method; weights + optimizer states +
   activations), a per-phase profile (the trainer's on_phase hook; on CUDA the phase clock
   synchronises the device at phase boundaries so kernels are charged to their phase), and an
   MFU estimate (see `flops_per_step` for the formula).
3. FSDP2 (train.fsdp), with 2 or more GPUs. The tiny pair of tests/test_fsdp.py (tiny Llamas,
   byte tokenizer, float32, greedy decoding) trains 2 PromptKD steps through `promptkd train`
   subprocesses: once in 1 unsharded process x batch 4 on one GPU, and once with `--train.fsdp
   true` in 2 processes x batch 2 under torchrun (NCCL); each run takes step 1, writes its
   checkpoint (the sharded one: each rank's shards, torch.distributed.checkpoint) and takes step 2
   resumed from it. The exported student and prompt must
   equal the unsharded run's within 4e-5 (lr / 25, test_fsdp.py's tolerance for a second step) and
   the logged losses within 1e-4 relative (float32 matmuls: torch's default, TF32 off). With fewer than 2 GPUs the check is skipped and the
   report says so; --device cpu runs it on the CPU with gloo (the dry run of this flow).
--max-seconds (default 270) bounds the wall time: measured steps stop early once the next one
would end past it (at least one measured step per method is taken unless the budget is spent
before the method starts; then the method is skipped, and the report says so).

The last stdout line is one JSON document with every figure; --out also writes the markdown
report. Exit status: 0 when everything ran and the numerics (and the FSDP2 check, when it ran)
passed, 1 when one of them failed, 2 when --device cuda was asked and CUDA is not available (or on bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHASES = ("generation", "student_fwd", "teacher_fwd_prompt_grad", "teacher_fwd_base", "teacher_fwd_target",
          "losses", "backward_prompt", "backward_student", "optimizer", "other")

# Dense (no sparsity) bf16 tensor-core peak of NVIDIA's datasheets, TFLOP/s, matched in this
# order against torch.cuda.get_device_name(); anything else needs --peak-tflops.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # SXM, GH200 too
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)

LABELS = {"promptkd": "PromptKD (library defaults)", "gkd": "GKD, on-policy reverse KL (lmbda 1, beta 1)"}

# Llama shapes: the full check and --tiny (the CPU dry run).
SHAPES = {
    "full": {
        "teacher": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                    "num_attention_heads": 32, "num_key_value_heads": 4},
        "student": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
                    "num_attention_heads": 16, "num_key_value_heads": 4},
    },
    "tiny": {
        "teacher": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2},
        "student": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2},
    },
}
# (batch size, prompt tokens, new tokens, vocabulary, warm-up steps, measured steps)
DEFAULTS = {"full": (8, 128, 128, 32000, 2, 5), "tiny": (2, 16, 16, 512, 1, 2)}

# numerics: (max loss relative difference, min gradient cosine) per precision on the device
THRESHOLDS = {"float32": (1e-4, 0.99999), "bf16": (2e-2, 0.99)}
# FSDP2 check: max |diff| of the weights after 2 steps (lr 1e-3), max relative diff of logged losses
FSDP_WEIGHT_ATOL, FSDP_LOSS_RTOL = 4e-5, 1e-4
FSDP_LOGGED = ("prompt/loss", "prompt/kl_to_student", "student/loss", "student/grad_norm")
NORM_GAIN = 12.0  # final-norm gain of the tiny numerics models (peaked next-token distributions)
MESSAGE_NO_CUDA = (
    "gpu_check: --device cuda was asked but CUDA is not available here (torch {torch}, CUDA build: {cuda}, "
    "visible GPUs: {n}). Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch, or "
    "dry-run the flow on CPU with: python benchmarks/gpu_check.py --device cpu --tiny"
)


# ============================================================================ small helpers


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device, override: float | None) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, where the figure comes from)."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "none for a CPU (give --peak-tflops for an MFU figure)"
    import torch

    name = torch.cuda.get_device_name(device)
    value, key = peak_for_name(name)
    if value is None:
        return None, f"unknown GPU '{name}': give --peak-tflops for an MFU figure"
    return value, f"datasheet dense bf16 peak for '{key}' (matched '{name}')"


def peak_for_name(name: str) -> tuple[float | None, str | None]:
    """(dense bf16 TFLOP/s, table key) of the first PEAK_BF16_TFLOPS key in a GPU name."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, key
    return None, None


@contextlib.contextmanager
def ieee_float32_matmuls(device):
    """float32 matmuls without TF32 on CUDA for the float32 numerics run (restored afterwards)."""
    import torch

    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        old = (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = old
    else:
        old = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "peft", "tokenizers", "triton", "promptkd"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def device_info(device) -> dict:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    return {"name": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def peak_rss_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # Linux: KiB


def loss_compile_state() -> str:
    """Whether any loss chunk fell back to eager after a torch.compile failure in this process."""
    from promptkd import losses

    failures = losses._COMPILE_FAILED  # the driver's record of compiler failures (first one kept)
    if failures:
        return f"fell back to eager after a torch.compile failure ({failures[0][:300]})"
    return (f"no fallback (chunks of >= {losses.COMPILE_MIN_ELEMENTS:,} logits compiled with torch.compile, "
            "smaller ones eager)")


# ============================================================================ tokenizer and models


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of `vocab_size` tokens built in memory: <pad> <s> </s> <unk>, then
    "t4" ... "t{V-1}" (one token per whitespace-separated word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_llama(shape: dict, tokenizer, device, seed: int):
    """A random-init Llama (float32, untied embeddings) built directly on `device`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=torch.float32)


def param_counts(model) -> dict:
    """Parameters by role: body (decoder layers + final norm), input embedding, LM head."""
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is embed
    body = total - embed.numel() - (0 if tied else head.numel())
    cfg = model.config
    return {"total": total, "body": body, "embedding": embed.numel(), "lm_head": head.numel(), "tied": tied,
            "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers}


# ============================================================================ FLOPs and MFU


def forward_flops(m: dict, rows: int, length: int, keep: int) -> float:
    """One forward of `rows` sequences of `length` tokens, the LM head on the last `keep`:
    2 x body params per token + 2 x head params per kept position + causal attention
    (QK^T and AV, 4 L^2 d per layer and sequence, halved by causality)."""
    return (2.0 * m["body"] * rows * length + 2.0 * m["lm_head"] * rows * keep
            + 2.0 * rows * length**2 * m["hidden"] * m["layers"])


FLOPS_FORMULA = (
    "F(model, L, K) = 2 N_body B L + 2 N_head B K + 2 B L^2 d n_layers (one forward of B rows of L "
    "tokens, LM head on the last K positions, causal attention). With T = the batch width "
    "(prompt P + response R), v = 7 soft-prompt positions: generation = F(S, T, R) (KV cache: every "
    "token through the student once); student forward + backward = 3 F(S, T, R+1) (backward = "
    "2x forward: activation and weight gradients); PromptKD teacher = 2 F(T, T+v, R+1) (prompted "
    "forward with grad + its backward, activation gradients only, ~1x forward) + F(T, T, R+1) "
    "(base) + F(T, T+v, R+1) (target); GKD teacher = F(T, T, R+1). Optimizer, loss maths and "
    "norms are not counted. MFU = counted FLOPs / step time / dense bf16 peak; 'train MFU' leaves "
    "out the generation FLOPs and time (generation is latency-bound: small matmuls, one token at a time)."
)


def flops_per_step(method: str, teacher: dict, student: dict, shapes: list[tuple[int, int, int]],
                   virtual_tokens: int) -> tuple[float, float]:
    """(all counted FLOPs, of which generation) of one step from the sampled batches'
    (rows, width, prompt width); see FLOPS_FORMULA."""
    total = gen = 0.0
    for rows, width, prompt in shapes:
        resp = width - prompt
        g = forward_flops(student, rows, width, resp)
        s = 3 * forward_flops(student, rows, width, resp + 1)
        if method == "promptkd":
            t = (3 * forward_flops(teacher, rows, width + virtual_tokens, resp + 1)
                 + forward_flops(teacher, rows, width, resp + 1))
        else:
            t = forward_flops(teacher, rows, width, resp + 1)
        gen += g
        total += g + s + t
    return total, gen


# ============================================================================ trainer plumbing


FIXED = {"batch": None}  # the batch the numerics runs train on (replayed by the sampler below)
FIXED_SAMPLER = "gpu-check-fixed"


class FixedBatchSampler:
    """A sampler backend that returns FIXED["batch"] whatever it is asked: every numerics run
    trains on the same tokens, so only precision separates them."""

    supports_logits_processor = True

    def __init__(self, context=None):
        self.context = context

    def __call__(self, model, prompt_ids, prompt_mask, *, eos_token_ids, pad_token_id, config,
                 logits_processor=None):
        return FIXED["batch"].to(prompt_ids.device)


def make_trainer(method: str, *, student, teacher, tokenizer, device, precision: str, work: Path,
                 batch_size: int, prompt_tokens: int, new_tokens: int, seed: int, sampler: str = "hf",
                 learning_rate: float = 5e-5, on_phase=None):
    from promptkd.config import config_from_dict
    from promptkd.testing import TINY_RECORDS
    from promptkd.training.loop import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix=f"{method}_", dir=work))
    cfg = config_from_dict(
        {
            "method": method,
            "data": {"template": "plain", "max_prompt_length": max(prompt_tokens, 64),
                     "max_length": max(prompt_tokens, 64) + new_tokens + 8},
            "sampling": {"max_new_tokens": new_tokens, "do_sample": sampler == "hf"},
            "train": {
                "output_dir": str(run_dir / "run"),
                "batch_size": batch_size,
                "mixed_precision": precision,
                "max_steps": 1000,
                "learning_rate": learning_rate,
                "warmup_steps": 0,
                "seed": seed,
                "cpu": device.type == "cpu",
                "sampler": sampler,
            },
            "gkd": {"lmbda": 1.0, "beta": 1.0, "divergence": "generalized_jsd"},
        },
        check_required=False,
    )
    # the trainer tokenises a train set at setup; the steps get their examples directly
    records = [{"instruction": r["instruction"], "input": r["input"]} for r in TINY_RECORDS[:4]]
    reset_accelerate_state()
    trainer = Trainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, train_dataset=records,
                      show_progress=False, on_phase=on_phase)
    trainer.setup()
    if trainer.accelerator.device.type != device.type:  # never measure on the wrong device silently
        raise RuntimeError(f"the trainer runs on {trainer.accelerator.device}, not on {device}")
    trainer.student.train()
    return trainer


def reset_accelerate_state() -> None:
    """accelerate keeps one process-wide state (device, mixed precision) and refuses, or silently
    ignores, another precision or device for a later Accelerator. This script builds trainers with
    float64 on the CPU, float32 and bf16 on the device, one after the other in one process, so it
    clears that state before each (single process: nothing distributed is torn down)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ============================================================================ 1. numerics


def numerics_batch(tokenizer, seed: int):
    """4 rows, prompts of 6-14 byte tokens (left-padded), responses of 5-12 tokens ending in EOS."""
    import torch

    from promptkd.data.collate import collate_sequences
    from promptkd.data.dataset import Example

    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(4):
        p = int(torch.randint(6, 15, (), generator=g))
        r = int(torch.randint(5, 13, (), generator=g))
        ids = torch.randint(0, 256, (p + r - 1,), generator=g).tolist()
        examples.append(Example(prompt_ids=ids[:p], response_ids=ids[p:] + [tokenizer.eos_token_id], references=[]))
    return examples, collate_sequences(examples, tokenizer.pad_token_id)


def numerics_step(method: str, teacher, student, tokenizer, device, precision: str, examples, work: Path) -> dict:
    """One step of `method` on FIXED["batch"]: losses, gradients at the step, update."""
    import torch

    tr = make_trainer(method, student=student, teacher=teacher, tokenizer=tokenizer, device=device,
                      precision=precision, work=work, batch_size=len(examples), prompt_tokens=16,
                      new_tokens=16, seed=0, sampler=FIXED_SAMPLER, learning_rate=1e-3)
    grads: dict[str, dict[int, torch.Tensor]] = {"student": {}, "prompt": {}}

    def keep(name, index):
        def hook(p):
            grads[name][index] = p.grad.detach().double().cpu().flatten().clone()
        return hook

    params = {"student": [p for p in tr.unwrapped_student.parameters() if p.requires_grad]}
    if method == "promptkd":
        params["prompt"] = list(tr.method.prompt_params)
    before = {name: [p.detach().double().cpu().flatten().clone() for p in ps] for name, ps in params.items()}
    handles = [p.register_post_accumulate_grad_hook(keep(name, i)) for name, ps in params.items() for i, p in enumerate(ps)]
    out = tr.train_step([list(examples)])
    for h in handles:
        h.remove()
    result = {"metrics": {k: v for k, v in out.metrics.items() if k in ("prompt/kl_to_student", "prompt/drift", "student/loss")}}
    for name, ps in params.items():
        g = grads[name]
        result[f"{name}_grad"] = torch.cat([g.get(i, torch.zeros(p.numel(), dtype=torch.float64)) for i, p in enumerate(ps)])
        after = torch.cat([p.detach().double().cpu().flatten() for p in ps])
        result[f"{name}_update"] = after - torch.cat(before[name])
    del tr
    return result


def _cosine(x, y) -> float:
    denom = float(x.norm() * y.norm())
    return float(x @ y) / denom if denom > 0 else float("nan")


def compare(ref: dict, got: dict, precision: str) -> list[dict]:
    """Rows (quantity, value, threshold, ok) of one device run against the float64 reference."""
    max_rel, min_cos = THRESHOLDS[precision]
    rows = []
    for key, r in ref["metrics"].items():
        rel = abs(got["metrics"][key] - r) / max(abs(r), 1e-30)
        rows.append({"quantity": f"{key} rel. diff", "value": rel, "threshold": f"< {max_rel:g}", "ok": rel < max_rel,
                     "reference": r, "device": got["metrics"][key]})
    for name in ("student", "prompt"):
        if f"{name}_grad" not in ref:
            continue
        x, y = got[f"{name}_grad"], ref[f"{name}_grad"]
        cos = _cosine(x, y)
        rows.append({"quantity": f"{name} gradient cosine", "value": cos, "threshold": f"> {min_cos:g}", "ok": cos > min_cos})
        rows.append({"quantity": f"{name} gradient rel. error", "value": float((x - y).norm() / y.norm()),
                     "threshold": "info", "ok": None})
        rows.append({"quantity": f"{name} update cosine", "value": _cosine(got[f"{name}_update"], ref[f"{name}_update"]),
                     "threshold": "info", "ok": None})
    return rows


def run_numerics(device, work: Path, methods: list[str]) -> dict:
    import torch

    from promptkd.samplers import register_sampler
    from promptkd.testing import byte_tokenizer, tiny_llama

    register_sampler(FIXED_SAMPLER, FixedBatchSampler, replace=True)
    tok = byte_tokenizer()
    teacher0 = tiny_llama(num_layers=4, hidden_size=64, seed=0)
    student0 = tiny_llama(num_layers=2, hidden_size=32, seed=1)
    for m in (teacher0, student0):
        with torch.no_grad():
            m.model.norm.weight.mul_(NORM_GAIN)
    examples, batch = numerics_batch(tok, seed=1234)
    FIXED["batch"] = batch
    cpu = torch.device("cpu")
    out = {"setup": {"teacher_params": sum(p.numel() for p in teacher0.parameters()),
                     "student_params": sum(p.numel() for p in student0.parameters()),
                     "rows": batch.input_ids.shape[0], "width": batch.input_ids.shape[1],
                     "response_tokens": int(batch.loss_mask.sum())},
           "runs": {}}
    for method in methods:
        start = time.perf_counter()
        ref = numerics_step(method, copy.deepcopy(teacher0).double(), copy.deepcopy(student0).double(), tok, cpu,
                            "no", examples, work)
        for precision in ("float32", "bf16"):
            with ieee_float32_matmuls(device) if precision == "float32" else contextlib.nullcontext():
                got = numerics_step(method, copy.deepcopy(teacher0), copy.deepcopy(student0), tok, device,
                                    "no" if precision == "float32" else "bf16", examples, work)
            rows = compare(ref, got, precision)
            out["runs"][f"{method}/{precision}"] = rows
            verdict = "PASS" if all(r["ok"] is not False for r in rows) else "FAIL"
            log(f"numerics {method} {precision} on {device.type} vs float64 on cpu: {verdict} "
                + ", ".join(f"{r['quantity']} {r['value']:.3g}" for r in rows if r["ok"] is not None))
        log(f"numerics {method}: {time.perf_counter() - start:.1f} s")
    out["passed"] = all(r["ok"] is not False for rows in out["runs"].values() for r in rows)
    FIXED["batch"] = None
    return out


# ============================================================================ 3. FSDP2 (train.fsdp)


def _train_cli(args: list[str], *, processes: int, device, log_path: Path) -> None:
    """`promptkd train ARGS` in a subprocess: 1 process, or `processes` under torchrun (NCCL on CUDA,
    gloo on the CPU). Raises RuntimeError with the log's tail when it fails."""
    import subprocess

    train = ["-m", "promptkd.cli", "-v", "train", "--no-progress", *args]  # -v: the info lines (sharded or not)
    if device.type == "cpu":
        train += ["--train.cpu", "true"]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    with open(log_path, "w") as log_file:
        proc = subprocess.run([sys.executable, *launch, *train], stdout=log_file, stderr=subprocess.STDOUT, env=env,
                              timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"promptkd train with {processes} process(es) exited {proc.returncode}:\n"
                           + log_path.read_text(errors="replace")[-3000:])


def run_fsdp(device, work: Path) -> dict:
    """The 2-process train.fsdp equality check (see the module docstring, 3.); {"skipped": why} with
    fewer than 2 GPUs."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from promptkd.testing import save_tiny_pair, write_tiny_jsonl

    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 or more CUDA GPUs, this machine has {torch.cuda.device_count()}"}
    start = time.perf_counter()
    root = work / "fsdp"
    teacher, student = save_tiny_pair(root / "models")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "method": "promptkd",
        "model": {"teacher": str(teacher), "student": str(student)},
        "data": {"train": str(write_tiny_jsonl(root / "train.jsonl", 16)), "max_prompt_length": 256, "max_length": 300},
        "train": {"max_steps": 1, "batch_size": 2, "warmup_steps": 0, "seed": 5, "learning_rate": 1e-3,
                  "mixed_precision": "no", "eval_metric": "loss"},
        "sampling": {"max_new_tokens": 6, "do_sample": False},
    }), encoding="utf-8")
    base = ["--config", str(config)]
    one, two = root / "one", root / "two"
    # both sides stop after step 1 and resume for step 2 (as in test_fsdp.py: PromptKD's step depends on
    # train.max_steps, so a run of 2 steps straight takes another step 1)
    for run, processes, args in ((one, 1, ["--train.batch_size", "4"]), (two, 2, ["--train.fsdp", "true"])):
        _train_cli([*base, "--train.output_dir", str(run), *args], processes=processes, device=device,
                   log_path=root / f"{run.name}_step1.log")
        _train_cli(["--resume", str(run), "--train.max_steps", "2"], processes=processes, device=device,
                   log_path=root / f"{run.name}_step2.log")
    sharded_log = (root / "two_step1.log").read_text(errors="replace")
    rows = []
    for name, rel in (("student", "final/student/model.safetensors"),
                      ("prompt", "final/prompt_adapter/adapter_model.safetensors")):
        a, b = load_file(one / rel), load_file(two / rel)
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        rows.append({"quantity": f"{name} weights max |diff|", "value": diff, "threshold": f"<= {FSDP_WEIGHT_ATOL:g}",
                     "ok": a.keys() == b.keys() and diff <= FSDP_WEIGHT_ATOL})
    records = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    for key in FSDP_LOGGED:
        rel = max(abs(a[key] - b[key]) / max(abs(a[key]), 1e-12) for a, b in zip(*records, strict=True))
        rows.append({"quantity": f"{key} max rel. diff", "value": rel, "threshold": f"< {FSDP_LOSS_RTOL:g}",
                     "ok": rel < FSDP_LOSS_RTOL})
    rows.append({"quantity": "sharded over 2 processes (log line)", "value": float("sharded over 2 processes" in sharded_log),
                 "threshold": "1", "ok": "sharded over 2 processes" in sharded_log})
    out = {"backend": "nccl" if device.type == "cuda" else "gloo", "rows": rows,
           "passed": all(r["ok"] for r in rows), "seconds": time.perf_counter() - start}
    log(f"fsdp2 check ({out['backend']}, 2 processes): {'PASS' if out['passed'] else 'FAIL'} "
        + ", ".join(f"{r['quantity']} {r['value']:.3g}" for r in rows) + f"; {out['seconds']:.0f} s")
    return out


# ============================================================================ 2. throughput


def run_method(method: str, args, device, tokenizer, shapes: dict, work: Path, deadline: float) -> dict:
    import torch

    from promptkd.data.dataset import Example

    if time.perf_counter() >= deadline:
        return {"method": method, "label": LABELS[method],
                "skipped": f"--max-seconds {args.max_seconds:g} spent before {method} started"}
    load_start = time.perf_counter()
    teacher = build_llama(shapes["teacher"], tokenizer, device, seed=0)
    student = build_llama(shapes["student"], tokenizer, device, seed=1)
    counts = {"teacher": param_counts(teacher), "student": param_counts(student)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phase_totals: dict[str, float] = {}

    def on_phase(name: str, seconds: float) -> None:
        phase_totals[name] = phase_totals.get(name, 0.0) + seconds

    tr = make_trainer(method, student=student, teacher=teacher, tokenizer=tokenizer, device=device,
                      precision=args.precision, work=work, batch_size=args.batch_size,
                      prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, seed=args.seed, on_phase=on_phase)
    del teacher, student  # the trainer holds them
    shapes_seen: list[tuple[int, int, int]] = []
    sample = tr.ctx.sample

    def recording_sample(*a, **k):
        batch = sample(*a, **k)
        shapes_seen.append((int(batch.input_ids.shape[0]), int(batch.input_ids.shape[1]), int(batch.prompt_length)))
        return batch

    tr.ctx.sample = recording_sample
    synchronize(device)
    setup_s = time.perf_counter() - load_start
    after_setup = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    g = torch.Generator().manual_seed(args.seed)
    vocab = len(tokenizer)
    steps: list[dict] = []
    stopped: list[str] = []
    i = 0
    while i < args.warmup + args.steps:
        measured = i >= args.warmup
        # the time guard: would the next step (as long as the last one) end past the deadline?
        if steps and time.perf_counter() + steps[-1]["seconds"] > deadline:
            done = sum(s["measured"] for s in steps)
            if done:
                stopped.append(f"{method}: --max-seconds {args.max_seconds:g} reached, measured {done} of "
                               f"{args.steps} step(s)")
                break
            if not measured:  # keep one measured step: skip the remaining warm-up steps
                stopped.append(f"{method}: --max-seconds {args.max_seconds:g} reached, warm-up cut to {len(steps)} step(s)")
                i, measured = args.warmup, True
        ids = torch.randint(4, vocab, (args.batch_size, args.prompt_tokens), generator=g)
        examples = [Example(prompt_ids=row.tolist(), response_ids=None, references=[]) for row in ids]
        phase_totals.clear()
        shapes_seen.clear()
        torch.manual_seed(args.seed * 1000 + i)
        synchronize(device)
        start = time.perf_counter()
        out = tr.train_step([examples])
        synchronize(device)
        seconds = time.perf_counter() - start
        phases = dict(phase_totals)
        phases["other"] = max(0.0, seconds - sum(phases.values()))
        flops, gen_flops = flops_per_step(method, counts["teacher"], counts["student"], shapes_seen,
                                          tr.cfg.promptkd.num_virtual_tokens)
        steps.append({"index": i, "measured": measured, "seconds": seconds, "trained_tokens": out.trained_tokens,
                      "generated_tokens": out.generated_tokens, "phases": phases, "flops": flops,
                      "generation_flops": gen_flops, "shapes": list(shapes_seen),
                      "loss": out.metrics.get("student/loss")})
        log(f"{method} step {i}{'' if measured else ' (warm-up)'}: {seconds:.2f} s, "
            f"{out.generated_tokens:.0f} generated tokens, student/loss {out.metrics.get('student/loss', float('nan')):.4f}")
        i += 1
    memory = {}
    if device.type == "cuda":
        memory = {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                  "after_setup_gib": after_setup / 2**30}
    else:
        memory = {"peak_rss_gib": peak_rss_gib()}
    tr.ctx.sample = sample
    del tr
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summarise(method, steps, counts, memory, setup_s, stopped, args)


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)} if values else {}


def summarise(method, steps, counts, memory, setup_s, stopped, args) -> dict:
    measured = [s for s in steps if s["measured"]]
    warm = [s for s in steps if not s["measured"]]
    peak = args.peak_tflops_value
    secs = [s["seconds"] for s in measured]
    out = {
        "method": method,
        "label": LABELS[method],
        "params": counts,
        "setup_seconds": setup_s,
        "warmup_seconds": [s["seconds"] for s in warm],
        "seconds_per_step": _spread(secs),
        "memory": memory,
        # the trainer's phase clock synchronises a CUDA device at phase boundaries itself
        "phase_clock": "device synchronised at phase boundaries (the trainer's phase clock)"
        + (" (CPU: synchronous anyway)" if args.device == "cpu" else ""),
        "stopped_early": "; ".join(stopped) or None,
        "steps": steps,
    }
    if not measured:
        return out
    gen_secs = [s["phases"].get("generation", 0.0) for s in measured]
    out.update(
        generated_tokens_per_step=statistics.mean(s["generated_tokens"] for s in measured),
        trained_tokens_per_s=statistics.median(s["trained_tokens"] / s["seconds"] for s in measured),
        generated_tokens_per_s=statistics.median(s["generated_tokens"] / s["seconds"] for s in measured),
        decode_tokens_per_s=statistics.median(s["generated_tokens"] / g for s, g in zip(measured, gen_secs, strict=True) if g > 0)
        if any(g > 0 for g in gen_secs) else None,
        phases_median_s={p: statistics.median(s["phases"].get(p, 0.0) for s in measured) for p in PHASES},
        tflops_per_step=statistics.median(s["flops"] for s in measured) / 1e12,
        achieved_tflops=statistics.median(s["flops"] / s["seconds"] for s in measured) / 1e12,
    )
    train_rates = [(s["flops"] - s["generation_flops"]) / (s["seconds"] - g)
                   for s, g in zip(measured, gen_secs, strict=True) if s["seconds"] - g > 0]
    out["achieved_train_tflops"] = statistics.median(train_rates) / 1e12 if train_rates else None
    if peak:
        out["mfu"] = out["achieved_tflops"] / peak
        out["train_mfu"] = out["achieved_train_tflops"] / peak if out["achieved_train_tflops"] else None
    return out


# ============================================================================ report


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def markdown(meta: dict, numerics: dict | None, results: dict, fsdp: dict | None = None) -> str:
    dev = meta["device"]
    on_gpu = meta["device_type"] == "cuda"
    lines = [
        f"# GPU check, {meta['date']}",
        "",
        f"- Device: {dev['name']}" + (f", {dev['memory_gib']} GiB, compute capability {dev['capability']}" if on_gpu else f", {dev.get('cores')} cores (CPU)"),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
        f"- Command: `{meta['command']}`",
        f"- Wall time: {meta['wall_s']:.0f} s (budget --max-seconds {meta['max_seconds']:g}).",
        f"- Loss chunks at the end of the run: {meta['loss_compile']}.",
    ]
    if not on_gpu:
        lines.append("- **CPU run (--device cpu): a dry run of the flow. Its timings, throughputs and MFU say "
                     "nothing about a GPU; no GPU figure exists until the check runs on one.**")
    if meta["tiny"]:
        lines.append("- **--tiny: tiny models, not the ~1B / ~0.25B pair of the check.**")
    lines += ["", "## Numerics against float64 (tiny models, one step from the same init on the same batch)", ""]
    if numerics is None:
        lines.append("Skipped (--skip-numerics).")
    else:
        s = numerics["setup"]
        lines += [
            f"Teacher {s['teacher_params']:,} / student {s['student_params']:,} parameters (promptkd.testing.tiny_llama, "
            f"final-norm gain {NORM_GAIN:g}), byte tokenizer; a fixed batch of {s['rows']} rows x {s['width']} tokens "
            f"with {s['response_tokens']} response tokens (left-padded prompts). Reference: float64 on the CPU. "
            f"Device: {meta['device_type']}; float32 with TF32 off, bf16 = train.mixed_precision bf16.",
            "",
            "| method / precision | quantity | device | float64 | value | threshold | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for run, rows in numerics["runs"].items():
            for r in rows:
                res = "info" if r["ok"] is None else ("pass" if r["ok"] else "**FAIL**")
                dv = f"{r['device']:.6g}" if "device" in r else ""
                rv = f"{r['reference']:.6g}" if "reference" in r else ""
                val = f"{r['value']:.6f} (1 - cos = {1 - r['value']:.1e})" if "cosine" in r["quantity"] else f"{r['value']:.3g}"
                lines.append(f"| {run} | {r['quantity']} | {dv} | {rv} | {val} | {r['threshold']} | {res} |")
        lines += ["", f"Numerics: **{'PASS' if numerics['passed'] else 'FAIL'}**."]
    lines += ["", "## FSDP2 (train.fsdp), 2 processes against 1 unsharded process", ""]
    if fsdp is None:
        lines.append("Skipped (--skip-fsdp).")
    elif "skipped" in fsdp:
        lines.append(f"Skipped: {fsdp['skipped']}. The FSDP2 path has not run on this machine's GPU.")
    else:
        lines += [
            f"Tiny PromptKD pair, float32, greedy; 2 steps of 1 process x batch 4 against train.fsdp with 2 processes "
            f"x batch 2 ({fsdp['backend']}): step 1, a sharded checkpoint, step 2 resumed from it. {fsdp['seconds']:.0f} s.",
            "", "| quantity | value | threshold | result |", "|---|---|---|---|",
        ]
        lines += [f"| {r['quantity']} | {r['value']:.3g} | {r['threshold']} | {'pass' if r['ok'] else '**FAIL**'} |"
                  for r in fsdp["rows"]]
        lines += ["", f"FSDP2: **{'PASS' if fsdp['passed'] else 'FAIL'}**."]
    lines += ["", "## Throughput", ""]
    spec = meta["spec"]
    lines.append(
        f"Batch {spec['batch_size']}, prompts of {spec['prompt_tokens']} random token ids, up to {spec['new_tokens']} "
        f"new tokens (T 1), vocabulary {spec['vocab']:,} (word-level tokenizer built in memory), "
        f"train.mixed_precision {spec['precision']}; {spec['warmup']} warm-up + up to {spec['steps']} measured steps per method."
    )
    lines.append("")
    first = next((r for r in results.values() if "params" in r), None)
    if first:
        for role in ("teacher", "student"):
            c = first["params"][role]
            lines.append(f"- {role}: {_fmt_params(c['total'])} parameters ({_fmt_params(c['body'])} in the decoder layers, "
                         f"{_fmt_params(c['embedding'])} embedding, {_fmt_params(c['lm_head'])} LM head; hidden {c['hidden']}, "
                         f"{c['layers']} layers)")
        lines.append("")
    mem_col = "peak GPU GiB (after setup)" if on_gpu else "peak RSS GiB (process)"
    lines += [
        f"| method | s/step median (min-max, n) | warm-up s | gen. tokens/step | trained tok/s | generated tok/s | decode tok/s | {mem_col} | TFLOP/step | TFLOP/s | MFU | train MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        if "skipped" in r:
            lines.append(f"| {r['label']} | skipped: {r['skipped']} |||||||||||")
            continue
        sp = r["seconds_per_step"]
        if not sp:
            lines.append(f"| {r['label']} | no measured step |||||||||||")
            continue
        mem = r["memory"]
        memtxt = (f"{mem['peak_allocated_gib']:.1f} ({mem['after_setup_gib']:.1f})" if on_gpu else f"{mem['peak_rss_gib']:.2f}")

        def pct(x):
            return f"{100 * x:.3g}%" if x is not None else "n/a"

        dec = f"{r['decode_tokens_per_s']:.0f}" if r.get("decode_tokens_per_s") else "n/a"
        lines.append(
            f"| {r['label']} | {sp['median']:.3f} ({sp['min']:.3f}-{sp['max']:.3f}, {sp['n']}) | "
            f"{', '.join(f'{x:.1f}' for x in r['warmup_seconds'])} | {r['generated_tokens_per_step']:.0f} | "
            f"{r['trained_tokens_per_s']:.0f} | {r['generated_tokens_per_s']:.0f} | {dec} | {memtxt} | "
            f"{r['tflops_per_step']:.3g} | {r['achieved_tflops']:.3g} | {pct(r.get('mfu'))} | {pct(r.get('train_mfu'))} |"
        )
    notes = [r["stopped_early"] for r in results.values() if r.get("stopped_early")]
    lines += [""] + [f"- {n}" for n in notes]
    lines += [
        "",
        f"MFU is an estimate: counted model FLOPs / step time / {meta['peak_source']}"
        + (f" = {meta['peak_tflops']:g} TFLOP/s." if meta["peak_tflops"] else "; no peak figure, so no MFU.")
        + " " + FLOPS_FORMULA,
        "",
        "## Per-phase profile (median seconds per measured step)",
        "",
    ]
    ran = [r for r in results.values() if r.get("phases_median_s")]
    if ran:
        lines.append("| phase | " + " | ".join(r["method"] for r in ran) + " |")
        lines.append("|---|" + "---|" * len(ran))
        for p in PHASES:
            vals = [r["phases_median_s"][p] for r in ran]
            if any(v > 0 for v in vals):
                lines.append(f"| {p} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
        lines.append("| step | " + " | ".join(f"{r['seconds_per_step']['median']:.4f}" for r in ran) + " |")
        lines += ["", "Phase clock: " + "; ".join(f"{r['method']}: {r['phase_clock']}" for r in ran) + "."]
    return "\n".join(lines) + "\n"


# ============================================================================ main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny models and batch (the CPU dry run)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per method (default 5; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps per method (default 2; --tiny 1)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (--tiny 2)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 128 (--tiny 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (--tiny 16)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary of the throughput models (default 32000; --tiny 512)")
    p.add_argument("--methods", default="promptkd,gkd", help="comma list of promptkd, gkd")
    p.add_argument("--precision", default="bf16", choices=["bf16", "no"], help="train.mixed_precision of the throughput runs")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, TFLOP/s (for MFU)")
    p.add_argument("--max-seconds", type=float, default=270.0, help="wall-time budget; measured steps stop early past it")
    p.add_argument("--skip-numerics", action="store_true")
    p.add_argument("--skip-fsdp", action="store_true", help="skip the 2-process train.fsdp check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(MESSAGE_NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda or "none",
                                     n=torch.cuda.device_count() if torch.version.cuda else 0), file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ("promptkd", "gkd")]
    if bad or not methods:
        p.error(f"--methods: unknown {bad}; choose from promptkd, gkd")
    size = "tiny" if args.tiny else "full"
    defaults = dict(zip(("batch_size", "prompt_tokens", "new_tokens", "vocab", "warmup", "steps"), DEFAULTS[size], strict=True))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("batch_size", "prompt_tokens", "new_tokens", "steps"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.vocab < 16:
        p.error("--warmup must be >= 0 and --vocab >= 16")

    device = torch.device(args.device)
    deadline = t0 + args.max_seconds
    args.peak_tflops_value, peak_source = peak_tflops(device, args.peak_tflops)
    meta = {
        "date": datetime.date.today().isoformat(),
        "device_type": device.type,
        "device": device_info(device),
        "versions": versions(),
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "tiny": args.tiny,
        "max_seconds": args.max_seconds,
        "peak_tflops": args.peak_tflops_value,
        "peak_source": peak_source,
        "spec": {k: getattr(args, k) for k in ("batch_size", "prompt_tokens", "new_tokens", "vocab", "warmup", "steps", "precision")},
        "shapes": SHAPES[size],
    }
    log(f"device {meta['device']['name']} ({device.type}); {size} models; budget {args.max_seconds:g} s")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        numerics = None
        if not args.skip_numerics:
            numerics = run_numerics(device, work, methods)
        fsdp = None if args.skip_fsdp else run_fsdp(device, work)
        if fsdp and "skipped" in fsdp:
            log(f"fsdp2 check skipped: {fsdp['skipped']}")
        tokenizer = word_tokenizer(args.vocab)
        results = {}
        for method in methods:
            results[method] = run_method(method, args, device, tokenizer, SHAPES[size], work, deadline)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    meta["wall_s"] = time.perf_counter() - t0
    meta["loss_compile"] = loss_compile_state()
    report = markdown(meta, numerics, results, fsdp)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report, encoding="utf-8")
    numerics_ok = numerics is None or numerics["passed"]
    fsdp_ok = fsdp is None or "skipped" in fsdp or fsdp["passed"]
    passed = numerics_ok and fsdp_ok
    fsdp_verdict = "skipped" if fsdp is None or "skipped" in fsdp else "PASS" if fsdp_ok else "FAIL"
    log(f"done in {meta['wall_s']:.0f} s; numerics {'skipped' if numerics is None else 'PASS' if numerics_ok else 'FAIL'}"
        f"; fsdp2 {fsdp_verdict}")
    complete = all("skipped" not in r and r["seconds_per_step"] for r in results.values())
    if not complete:
        log("not every method was measured (see the report): raise --max-seconds")
    print(json.dumps({"meta": meta, "numerics": numerics, "fsdp": fsdp, "results": results, "passed": passed,
                      "complete": complete}, default=str))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
