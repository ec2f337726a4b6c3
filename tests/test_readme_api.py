"""The Python API examples stay true.

docs/python_api.md's example runs as written on tiny models: objects in, training and evaluation
from Python. The README's example is the same code on Hugging Face model ids: the two may differ
only in the lines that build the tokenizer and the models, so a change to one that is not made to
the other fails here.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
API_DOC = ROOT / "docs" / "python_api.md"

# What the README may do differently from the docs example: build these names, and import what
# builds them.
MODEL_NAMES = {"tokenizer", "teacher", "student"}
MODEL_MODULES = {"transformers", "promptkd.testing"}


def python_blocks(path: Path, heading: str) -> list[str]:
    """The ```python blocks of the section of `path` that starts with `heading`."""
    text = path.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def docs_blocks() -> tuple[str, str]:
    blocks = python_blocks(API_DOC, "## A complete example on tiny models")
    assert len(blocks) == 2, "docs/python_api.md's example is two blocks: the data files, then the run"
    return blocks[0], blocks[1]


def readme_example() -> str:
    blocks = python_blocks(README, "## Python API")
    assert len(blocks) == 1, "the README's Python API section should hold exactly one example"
    return blocks[0]


def is_model_line(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.module in MODEL_MODULES
    if isinstance(node, ast.Import):
        return all(alias.name in MODEL_MODULES for alias in node.names)
    if isinstance(node, ast.Assign):
        return all(isinstance(t, ast.Name) and t.id in MODEL_NAMES for t in node.targets)
    return False


def split(code: str) -> tuple[list[ast.stmt], list[ast.stmt]]:
    """(model lines, the rest) of a module, in order."""
    body = ast.parse(code).body
    return [n for n in body if is_model_line(n)], [n for n in body if not is_model_line(n)]


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files, run = docs_blocks()
    scope = {"__name__": "__docs__"}
    exec(compile(files, f"{API_DOC} (data files)", "exec"), scope)
    exec(compile(run, f"{API_DOC} (example)", "exec"), scope)
    out = capsys.readouterr().out
    assert "'my_test'" in out and "'average'" in out, out
    run_dir = tmp_path / "runs" / "api-example"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all("student/loss" in r and "prompt/kl_to_student" in r for r in records)
    assert (run_dir / "final" / "student" / "config.json").is_file()
    assert (run_dir / "final" / "prompt_adapter" / "adapter_config.json").is_file()
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())
    assert set(scores["scores"]) == {"my_test"} and list(scores["scores"]["my_test"]) == ["10", "20", "30", "40", "50"]


def test_readme_example_is_the_docs_example_on_hub_models():
    readme_models, readme_rest = split(readme_example())
    docs_models, docs_rest = split(docs_blocks()[1])
    assert [ast.dump(n) for n in readme_rest] == [ast.dump(n) for n in docs_rest], (
        "README.md's Python API example and docs/python_api.md's may differ only in the lines that "
        "build tokenizer / teacher / student: make the same change in both"
    )
    assert {t.id for n in docs_models if isinstance(n, ast.Assign) for t in n.targets} == MODEL_NAMES

    # the README builds each model from a Hub id with transformers' Auto classes
    built = {}
    for node in readme_models:
        if isinstance(node, ast.Assign):
            call = node.value
            assert isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute), ast.unparse(node)
            assert call.func.attr == "from_pretrained", ast.unparse(node)
            assert isinstance(call.func.value, ast.Name), ast.unparse(node)
            assert call.func.value.id in {"AutoTokenizer", "AutoModelForCausalLM"}, ast.unparse(node)
            (arg,) = call.args
            assert isinstance(arg, ast.Constant) and re.fullmatch(r"[\w.-]+/[\w.-]+", arg.value), ast.unparse(node)
            built[node.targets[0].id] = (call.func.value.id, arg.value)
    assert set(built) == MODEL_NAMES
    assert built["tokenizer"][0] == "AutoTokenizer"
    assert built["teacher"][0] == built["student"][0] == "AutoModelForCausalLM"
    assert built["teacher"][1] != built["student"][1], "the student should be a smaller model than the teacher"
    assert built["tokenizer"][1] in {built["teacher"][1], built["student"][1]}


def test_readme_gives_the_fresh_machine_commands_that_ci_runs():
    readme = README.read_text(encoding="utf-8")
    setup = "python3 -m venv .venv && . .venv/bin/activate && bash scripts/install.sh && "
    for command in (setup + "promptkd demo", setup + "python -m pytest -q"):
        assert f"\n{command}\n" in readme, f"README.md should give the command: {command}"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"\n{setup}python -m pytest -q\n" in ci, ".ci/run should run the README's test command"
    assert "pip install -e ." in readme


def test_readmes_custom_method_trains(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """The README's own-method example, registered and trained for two steps through the Trainer."""
    (block,) = python_blocks(README, "## Your own method")
    assert len(block.strip().splitlines()) <= 25
    scope = {"__name__": "__readme__"}
    exec(compile(block, f"{README} (own method)", "exec"), scope)
    import promptkd

    teacher, student = tiny_pair_dirs
    config = promptkd.Config(
        method="tvd", model=promptkd.ModelConfig(teacher=str(teacher), student=str(student)),
        data=promptkd.DataConfig(train=str(tiny_jsonl)),
        train=promptkd.TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, warmup_steps=0, cpu=True),
        sampling=promptkd.SamplingConfig(max_new_tokens=6))
    trainer = promptkd.Trainer(config, show_progress=False)
    before = [p.detach().clone() for p in trainer.setup().unwrapped_student.parameters()]
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(0 < r["student/loss"] <= 1 for r in records)  # a TV distance
    assert all(r["generated_tokens"] > 0 for r in records)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.unwrapped_student.parameters(), strict=True))
