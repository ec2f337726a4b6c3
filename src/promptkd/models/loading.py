"""Loading and saving teachers and students, and checking that a pair can be distilled.

A model is named by a `ModelSpec`: a Hugging Face Hub id, a local `save_pretrained`
directory, or a path to a `.gguf` file (llama.cpp format). GGUF weights are dequantised to
dense tensors at load time and the result is an ordinary model that `save_model` can write
in `save_pretrained` format.

    from promptkd.models import ModelSpec, load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer(ModelSpec("~/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from promptkd.errors import UserError, require_extra

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
SPECIAL_TOKENS = ("eos", "pad", "bos", "unk")


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it.

    path:              Hub id, local `save_pretrained` directory, or path to a `.gguf` file.
    dtype:             "float32", "bfloat16", "float16" or "auto" (the checkpoint's own dtype).
    gguf_file:         file name of a GGUF checkpoint inside `path` (a directory or Hub repo);
                       not needed when `path` itself ends in `.gguf`.
    revision:          Hub branch, tag or commit.
    trust_remote_code: allow model code shipped with a Hub checkpoint to run.
    """

    path: str
    dtype: str = "float32"
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        self.path = str(self.path)
        if not self.path:
            raise UserError(
                "model path is empty: give a Hub id, a save_pretrained directory or a .gguf file"
            )
        if self.dtype not in DTYPES:
            raise UserError(
                f"model dtype {self.dtype!r} (for {self.path}) is not one of {sorted(DTYPES)}"
            )


def _looks_like_local_path(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.endswith(".gguf") or os.path.exists(path)


def _resolve(spec: ModelSpec) -> tuple[str, str | None]:
    """(directory or Hub id, gguf file name or None); raises UserError for a missing local path."""
    path, gguf_file = spec.path, spec.gguf_file
    if not _looks_like_local_path(path):
        return path, gguf_file  # a Hub id: from_pretrained resolves (or rejects) it
    local = Path(path).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise UserError(f"model file {local} does not exist (expected a .gguf checkpoint file)")
        if gguf_file is not None and gguf_file != local.name:
            raise UserError(
                f"model path {local} is a .gguf file but gguf_file={gguf_file!r} names another one: "
                "give either the file path or a directory plus gguf_file"
            )
        return str(local.parent), local.name
    if not local.is_dir():
        raise UserError(
            f"model path {local} does not exist (expected a save_pretrained directory with "
            "config.json and weights, or a .gguf file)"
        )
    if gguf_file is not None:
        if not (local / gguf_file).is_file():
            raise UserError(f"gguf_file {gguf_file!r} not found in model directory {local}")
        return str(local), gguf_file
    if not (local / "config.json").is_file():
        ggufs = sorted(p.name for p in local.glob("*.gguf"))
        hint = (
            f"; it holds GGUF files {ggufs}: pass the file path or set gguf_file" if ggufs else ""
        )
        raise UserError(
            f"model directory {local} has no config.json (expected a save_pretrained directory "
            f"or a .gguf file){hint}"
        )
    return str(local), None


def _gguf_dequantize_kwargs() -> dict:
    """Ask transformers for a dense, unflagged model when its GGUF loader supports that."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers always dequantise GGUF and never flag the model
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def is_gguf_flagged(model) -> bool:
    """True when transformers flags a (dense) GGUF-loaded model as quantised, so `save_pretrained` refuses."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        quantizer = getattr(model, "hf_quantizer", None)
        config = getattr(quantizer, "quantization_config", None)
    method = (
        config.get("quant_method")
        if isinstance(config, dict)
        else getattr(config, "quant_method", None)
    )
    return str(getattr(method, "value", method)).lower() == "gguf"


def dequantized_copy(model):
    """A plain copy of a dequantised-but-flagged model (e.g. GGUF), which `save_pretrained` accepts.

    The model is rebuilt from its config minus `quantization_config` on the meta device and
    takes over the original's tensors (no copy of the weights), so the original must not be
    used afterwards. Tied embeddings are re-tied. Models that are not GGUF-flagged are returned
    as is.
    """
    if not is_gguf_flagged(model):
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        new = type(model)(config)
    new.load_state_dict(model.state_dict(), strict=True, assign=True)
    # Non-persistent buffers (e.g. rotary inverse frequencies) are not in the state dict.
    for name, buffer in model.named_buffers():
        module_name, _, attr = name.rpartition(".")
        new.get_submodule(module_name)._buffers[attr] = buffer
    new.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


CACHE_ENV = "PROMPTKD_CACHE"
DEFAULT_CACHE = Path("~/.cache/promptkd")
DENSE_GGUF_ENV = "PROMPTKD_DENSE_GGUF"  # "0" turns the dense copy off


def default_cache_dir() -> Path:
    """$PROMPTKD_CACHE, else ~/.cache/promptkd: models promptkd derives (dense GGUF copies, students)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def dense_gguf_dir(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the dense save_pretrained copy of a GGUF file lives: named after the file's resolved
    path, size and modification time, so a changed file gets a new copy."""
    import hashlib

    path = Path(gguf_path).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / "dense" / f"{path.stem}-{key}"


def ensure_dense_gguf_copy(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A save_pretrained directory (float32 weights + tokenizer) holding the dequantised GGUF model.

    Dequantising a GGUF file takes a while and shows its own progress bar; every later load of
    the same file reads this copy instead. Written to a temporary directory and renamed into
    place, so an interrupted conversion is never used.
    """
    import shutil

    out = dense_gguf_dir(gguf_path, cache_dir)
    if (out / "config.json").is_file():
        return out
    model, tokenizer = _load(ModelSpec(str(gguf_path)))
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    logger.info("dense copy of %s written to %s", gguf_path, out)
    return out


@contextlib.contextmanager
def no_transformers_progress_bars():
    """transformers' progress bars ("Loading weights", "Writing model shards", one per model load
    or save) off while inside; the command line shows them only with -v."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model_and_tokenizer(spec: ModelSpec | str):
    """Load a causal LM and its tokenizer.

    Args:
        spec: a ModelSpec, or a path / Hub id (then dtype float32).
    Returns:
        (model, tokenizer): the model in eval mode, never flagged as quantised (GGUF weights
        are dequantised); a tokenizer without a pad token gets pad = eos. A LoRA adapter
        directory (adapter_config.json, no config.json) loads its base model with the adapter
        merged in.
    Raises:
        UserError: a local path that does not exist or is not a model, an unknown dtype,
        or a Hub id / directory transformers cannot load.
    """
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec(path=str(spec))
    adapter_dir = Path(spec.path).expanduser()
    if (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "config.json").is_file():
        return _load_lora_adapter(adapter_dir, spec)
    source, gguf_file = _resolve(spec)
    local_gguf = Path(source).expanduser() / gguf_file if gguf_file is not None else None
    if local_gguf is not None and local_gguf.is_file() and os.environ.get(DENSE_GGUF_ENV, "1") != "0":
        # dequantise once into a cached save_pretrained copy, then load that (same weights)
        dense = ensure_dense_gguf_copy(local_gguf)
        return _load(dataclasses.replace(spec, path=str(dense), gguf_file=None))
    return _load(spec)


def _load_lora_adapter(adapter_dir: Path, spec: ModelSpec):
    """A peft LoRA adapter directory (e.g. a run's final/student_adapter): its base model with the
    adapter merged in, and the tokenizer saved beside it."""
    import json

    from peft import PeftModel

    base_path = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path:
        raise UserError(f"adapter {adapter_dir} does not name its base model (base_model_name_or_path)")
    base, tokenizer = load_model_and_tokenizer(dataclasses.replace(spec, path=str(base_path)))
    if (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    model.eval()
    return model, tokenizer


def _load(spec: ModelSpec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = _resolve(spec)
    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if gguf_file is not None:
        require_extra("gguf", "gguf", f"loading the GGUF file {gguf_file}")
        common["gguf_file"] = gguf_file
    model_kwargs = dict(common, dtype=DTYPES[spec.dtype])
    if gguf_file is not None:
        model_kwargs.update(_gguf_dequantize_kwargs())
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except OSError as err:
        where = f"{source}/{gguf_file}" if gguf_file else source
        raise UserError(
            f"could not load model {where!r}: {err} (expected a Hub id, a save_pretrained "
            "directory or a .gguf file)"
        ) from err
    model = dequantized_copy(model)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("tokenizer of %s has neither a pad nor an eos token", spec.path)
        else:
            # Pad positions are always masked out, so reusing eos as pad is safe.
            logger.info(
                "tokenizer of %s has no pad token; using eos %r as pad",
                spec.path,
                tokenizer.eos_token,
            )
            tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the model's generation_config EOS
    ids (e.g. an end-of-turn token), deduplicated, the tokenizer's first.

    Raises UserError when there is none (responses are trained to end with EOS).
    """
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (tokenizer.eos_token_id, gen_eos):
        if v is None:
            continue
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise UserError("the tokenizer has no EOS token: set tokenizer.eos_token (responses end with EOS)")
    return ids


def files_fingerprint(path: str | Path, skip: tuple[Path, ...] = ()) -> str | None:
    """A fingerprint of a local file or directory (a model, a data file): sha256 over each file's
    relative path, size and modification time, so a model retrained or a file rewritten at the
    same path gets another one without reading gigabytes of weights. Files in `skip`, or under a
    directory in it (a command's own output), are left out. None when `path` is not local (a Hub id)."""
    path = Path(path).expanduser()
    root = path.resolve()
    # a skipped directory that holds the whole model (an evaluation written next to it) skips nothing
    skipped = [q for q in (Path(p).expanduser().resolve() for p in skip) if q != root and q not in root.parents]
    if path.is_file():
        found = [path]
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(q == p.resolve() or q in p.resolve().parents for q in skipped))
    else:
        return None
    digest = hashlib.sha256()
    for p in found:
        stat = p.stat()
        name = p.name if p == path else p.relative_to(path).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save model (+ tokenizer if given) in save_pretrained format; GGUF-derived models too."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dequantized_copy(model).save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def output_vocab_size(model) -> int:
    """Number of logits the model produces per position (rows of its output embedding)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def tokenizer_difference(teacher_tokenizer, student_tokenizer) -> str | None:
    """How two tokenizers differ, or None when they are one tokenizer for the KD losses: the same
    vocabulary (size and token -> id map) and the same special-token ids (eos, pad, bos, unk)."""
    num_teacher_tokens, num_student_tokens = len(teacher_tokenizer), len(student_tokenizer)
    if num_teacher_tokens != num_student_tokens:
        return f"teacher tokenizer has {num_teacher_tokens} tokens but student tokenizer has {num_student_tokens}"
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda kv: kv[1])
        token, token_id = differing[0]
        return (f"teacher and student tokenizers both have {num_teacher_tokens} tokens but different "
                f"vocabularies ({len(differing)} differing token/id pairs, e.g. {token!r} -> {token_id})")
    special_diffs = [
        f"{name}: teacher {getattr(teacher_tokenizer, f'{name}_token_id')}, "
        f"student {getattr(student_tokenizer, f'{name}_token_id')}"
        for name in SPECIAL_TOKENS
        if getattr(teacher_tokenizer, f"{name}_token_id") != getattr(student_tokenizer, f"{name}_token_id")
    ]
    if special_diffs:
        return f"teacher and student special-token ids differ ({'; '.join(special_diffs)})"
    return None


def check_output_rows(model, tokenizer, who: str) -> int:
    """The model's logit columns (output rows); a UserError if they cannot score every token id of
    its tokenizer."""
    size = output_vocab_size(model)
    if size < len(tokenizer):
        raise UserError(
            f"{who} model has {size} output rows but its tokenizer has {len(tokenizer)} tokens: the model "
            f"cannot score every token id; check the {who} checkpoint matches its tokenizer"
        )
    return size


def check_tokenizer_compatibility(
    teacher_tokenizer, student_tokenizer, teacher_model, student_model
) -> int:
    """Check a teacher and student can be compared token by token; return the logit slice size.

    The KD losses compare p_T(v) with p_S(v) for every vocabulary id v, so both models must
    use one tokenizer (`tokenizer_difference`). Model output sizes may differ only by padding rows
    beyond the tokenizer (both >= len(tokenizer)); then a warning is emitted and the smaller size is
    returned.

    Returns:
        n such that `teacher_logits[..., :n]` and `student_logits[..., :n]` are comparable.
    Raises:
        UserError: naming both sizes, or the differing special tokens, and what to do.
    """
    difference = tokenizer_difference(teacher_tokenizer, student_tokenizer)
    if difference is not None:
        raise UserError(
            f"{difference}: the KD losses compare the two next-token distributions token by token, so "
            "teacher and student must share one tokenizer: use a student from the same model family "
            "(e.g. one made with make_student from this teacher)"
        )
    teacher_size = check_output_rows(teacher_model, teacher_tokenizer, "teacher")
    student_size = check_output_rows(student_model, student_tokenizer, "student")
    if teacher_size != student_size:
        warnings.warn(
            f"teacher model vocab size {teacher_size} != student model vocab size {student_size}; "
            f"the tokenizers match ({len(teacher_tokenizer)} tokens), so the extra rows are padding: "
            f"logits are sliced to the first {min(teacher_size, student_size)}",
            stacklevel=2,
        )
    return min(teacher_size, student_size)


def cast_frozen_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Hold the weights and biases of a frozen model's linear layers in `dtype`; return elements cast.

    For a model that only ever runs under autocast to `dtype` (the teacher with
    train.mixed_precision bf16 / fp16): autocast casts a linear layer's weight and bias to `dtype`
    at every call (it caches casts only for tensors that require grad), so holding them in
    `dtype` gives bit-identical outputs and gradients with respect to the inputs, without the
    per-forward casts and with less resident memory (see the note in the body). Covers torch.nn.Linear and transformers' Conv1D
    (GPT-2; addmm is cast the same way). Weights shared with an embedding (tied LM heads) stay
    as they are: the embedding's output starts the residual stream, which autocast keeps in the
    weights' dtype.

    Raises:
        ValueError: a linear parameter requires grad (only for frozen models).
    """
    from transformers.pytorch_utils import Conv1D

    embedding_ptrs = {
        m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)
    }
    cast = 0
    cast_ids: set[int] = set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear | Conv1D):
            continue
        if module.weight.data_ptr() in embedding_ptrs:
            continue
        params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
        if any(p.requires_grad for p in params):
            raise ValueError("cast_frozen_linear_weights: the model has trainable linear weights")
        for p in params:
            if p.dtype != dtype and p.is_floating_point():
                p.data = p.data.to(dtype)
                cast += p.numel()
                cast_ids.add(id(p))
    if cast:
        # Weights loaded from safetensors are views of one memory-mapped file, which stays mapped
        # (and its touched pages resident) while any tensor still points into it. Copying the
        # remaining parameters and buffers lets it go: without this, casting *adds* the
        # low-precision copies on top of the resident float32 pages (measured: +200 MB for
        # SmolLM2-135M) instead of saving memory.
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in cast_ids:
                t.data = t.data.clone()
    return cast
