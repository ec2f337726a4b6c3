"""The README's "Python API" example runs as written: tiny teacher and student passed as
objects, a datasets.Dataset in chat format, training and evaluation from Python."""

from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the Python API section should hold exactly one example"
    return blocks[0]


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(api_example(), str(README) + " (Python API example)", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert re.search(r"step 2: student loss \d+\.\d{3}, prompt L_kd \d+\.\d{3}", out), out
    run = tmp_path / "runs" / "api-example"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert (run / "final" / "student" / "config.json").is_file()
    assert (run / "final" / "prompt_adapter" / "adapter_config.json").is_file()
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert set(scores["scores"]) == {"eval"} and list(scores["scores"]["eval"]) == ["10"]
    assert "'average'" in out or "average" in out
