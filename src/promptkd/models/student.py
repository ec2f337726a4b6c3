"""Students made by depth-pruning a teacher: keep some decoder layers, everything else shared.

A pruned student starts from the teacher's embeddings, final norm, LM head and a subset of
its decoder layers, so it shares the teacher's tokenizer by construction (what the KD losses
need) and starts far closer to the teacher than a random init.

    from promptkd.models import make_student_from_path
    make_student_from_path("teacher.gguf", "/tmp/student", num_layers=10)
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from pathlib import Path

import torch

from promptkd.errors import UserError
from promptkd.models.loading import ModelSpec, load_model_and_tokenizer, save_model

STUDENT_INFO_FILE = "promptkd_student.json"

# (parent attribute path, layer-list attribute) for the decoder stacks we know how to prune.
_LAYER_STACKS = (("model", "layers"), ("model.decoder", "layers"), ("transformer", "h"))


def evenly_spaced_layers(num_layers_total: int, num_keep: int) -> list[int]:
    """`num_keep` layer indices spread evenly over `num_layers_total`, first and last included.

    Index i is round-half-up(i * (L - 1) / (k - 1)); a single kept layer is layer 0.
    E.g. (30, 10) -> [0, 3, 6, 10, 13, 16, 19, 23, 26, 29].
    """
    if num_layers_total < 1:
        raise UserError(f"the teacher has {num_layers_total} layers; need at least 1")
    if not 1 <= num_keep <= num_layers_total:
        raise UserError(
            f"num_layers={num_keep} must be between 1 and the teacher's {num_layers_total} layers"
        )
    if num_keep == 1:
        return [0]
    span, steps = num_layers_total - 1, num_keep - 1
    # Integer round-half-up: strictly increasing because span >= steps (Python's round()
    # rounds half to even and could map two neighbours onto one layer).
    return [(2 * i * span + steps) // (2 * steps) for i in range(num_keep)]


def _layer_stack(model):
    """(parent module, attribute name) of the model's decoder layer ModuleList."""
    for parent_name, attr in _LAYER_STACKS:
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            continue
        if isinstance(getattr(parent, attr, None), torch.nn.ModuleList):
            return parent, attr
    arch = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    raise UserError(
        f"cannot prune {arch} (model_type {model_type!r}): make_student supports models with "
        "decoder layers at model.model.layers (Llama family), model.model.decoder.layers (OPT) "
        "or model.transformer.h (GPT-2)"
    )


def _validate_layers(layers, num_layers_total: int | None) -> list[int]:
    """`layers` as a list, or a UserError naming what is wrong; num_layers_total None checks all but
    the upper bound (before the teacher is loaded)."""
    if not layers:
        raise UserError("layers to keep is empty: give at least one teacher layer index")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise UserError(f"layers to keep must be integers, got {list(layers)!r}")
    layers = list(layers)
    negative = [i for i in layers if i < 0]
    if negative:
        raise UserError(f"layer indices {negative} are negative: teacher layers are numbered from 0")
    out_of_range = [i for i in layers if num_layers_total is not None and i >= num_layers_total]
    if out_of_range:
        raise UserError(
            f"layer indices {out_of_range} are out of range: the teacher has {num_layers_total} "
            f"layers (0..{num_layers_total - 1})"
        )
    duplicates = sorted({i for i in layers if layers.count(i) > 1})
    if duplicates:
        raise UserError(
            f"layer indices {duplicates} are repeated in layers {layers}: keep each layer once"
        )
    if layers != sorted(layers):
        raise UserError(
            f"layers {layers} are not in increasing order: the student keeps the teacher's layer "
            f"order, write them sorted ({sorted(layers)})"
        )
    return layers


def _slice_per_layer_config(config, layers: list[int], num_layers_total: int) -> None:
    """Slice config lists holding one entry per layer (e.g. `layer_types`) to the kept layers.

    A list counts as per-layer when its key mentions "layer" and it has one entry per teacher
    layer (lists of layer *indices*, e.g. Qwen-MoE's `mlp_only_layers`, are not handled).
    """
    for key, value in list(config.to_dict().items()):
        if "layer" in key and isinstance(value, list | tuple) and len(value) == num_layers_total:
            setattr(config, key, type(value)(value[i] for i in layers))


def make_student(teacher, layers: list[int]):
    """A depth-pruned copy of `teacher` keeping decoder `layers` (sorted teacher indices).

    The copy shares nothing with the teacher: it holds copies of the embeddings, final norm,
    LM head (tied if the teacher's is) and the chosen layers, in order.
    `config.num_hidden_layers` becomes len(layers), per-layer config lists are sliced, and
    every `layer_idx` attribute is renumbered 0..k-1 (KV caches are indexed by it).

    Returns:
        the student, in eval mode, same dtype and device as the teacher.
    Raises:
        UserError: empty, non-integer, out-of-range, repeated or unsorted layers; an
        architecture whose layers are not at model.model.layers / model.transformer.h.
    """
    parent, attr = _layer_stack(teacher)
    teacher_layers = getattr(parent, attr)
    num_layers_total = len(teacher_layers)
    layers = _validate_layers(layers, num_layers_total)
    if getattr(teacher.config, "scale_attn_by_inverse_layer_idx", False):
        # GPT-2 computes this scale from layer_idx at construction, so a saved student would
        # reload with different attention scales than the teacher layers it copies.
        raise UserError(
            "the teacher sets scale_attn_by_inverse_layer_idx=True: its attention scale depends "
            "on the layer position, so a depth-pruned copy would not reproduce its layers"
        )
    # Copy everything but the layer stack, then only the kept layers: peak memory is one
    # student, not a second teacher.
    setattr(parent, attr, torch.nn.ModuleList())
    try:
        student = copy.deepcopy(teacher)
    finally:
        setattr(parent, attr, teacher_layers)
    kept = torch.nn.ModuleList(copy.deepcopy(teacher_layers[i]) for i in layers)
    setattr(_layer_stack(student)[0], attr, kept)
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = student.config
    _slice_per_layer_config(config, layers, num_layers_total)
    config.num_hidden_layers = len(layers)
    # The student is the model being trained, even if the teacher was frozen.
    student.requires_grad_(True)
    student.eval()
    return student


def make_student_from_path(
    teacher: str | ModelSpec,
    out_dir: str | Path,
    *,
    layers: list[int] | None = None,
    num_layers: int | None = None,
    dtype: str = "float32",
) -> Path:
    """Load a teacher (Hub id, directory or .gguf), prune it, save the student to `out_dir`.

    Give exactly one of `layers` (teacher layer indices to keep) or `num_layers` (keep that
    many, evenly spaced, first and last included). `out_dir` gets the model and tokenizer in
    save_pretrained format (loadable with AutoModelForCausalLM.from_pretrained) plus
    `promptkd_student.json` recording the teacher source and the layers kept; it must not exist or
    be empty (checked, with the layers, before the teacher loads), and appears whole.

    The pruned student is not usable as it is (it writes gibberish): heal it with KD or SFT on
    the task before distilling, e.g. `promptkd train --config configs/kd.yaml --model.teacher
    TEACHER --model.student OUT_DIR`, and distil into that run's final/student.

    Returns:
        out_dir as a Path.
    """
    if (layers is None) == (num_layers is None):
        raise UserError(
            "give exactly one of layers (indices to keep) or num_layers (how many to keep)"
        )
    spec = teacher if isinstance(teacher, ModelSpec) else ModelSpec(path=str(teacher), dtype=dtype)
    if layers is not None:
        _validate_layers(layers, None)  # before minutes of loading
    out_dir = Path(out_dir).expanduser().resolve()  # "." and a symlink name the directory itself
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"out: {out_dir} already exists and is not an empty directory; choose another --out "
                        "(make-student never overwrites a model)")
    teacher_model, tokenizer = load_model_and_tokenizer(spec)
    parent, attr = _layer_stack(teacher_model)
    num_layers_total = len(getattr(parent, attr))
    if layers is None:
        layers = evenly_spaced_layers(num_layers_total, num_layers)
    student = make_student(teacher_model, layers)
    del teacher_model
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")  # renamed into place: whole or absent
    try:
        save_model(student, tokenizer, tmp)
        info = {
            "teacher": spec.path,
            "teacher_gguf_file": spec.gguf_file,
            "teacher_revision": spec.revision,
            "teacher_num_layers": num_layers_total,
            "layers": list(layers),
            "num_layers": len(layers),
            "dtype": spec.dtype,
        }
        (tmp / STUDENT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        tmp.replace(out_dir)  # onto a missing or empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
