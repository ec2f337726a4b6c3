"""How much of promptkd one PromptKD training step runs through: functions, files, lines, depth.

    python benchmarks/step_trace.py                  # the code on PYTHONPATH (or the installed one)
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/step_trace.py   # another revision

One `Trainer.train_step()` of PromptKD on tiny in-process models (promptkd.testing, no download)
runs under `sys.settrace` and `sys.setprofile`. Every call of a promptkd function is recorded (frames of other
packages are not, but the promptkd functions they call back are), and so is every promptkd line
that runs. Printed:

- functions: the distinct promptkd functions called during the step, and the files they are in.
  A comprehension or generator expression is part of the function it is written in (Python 3.11
  gives each a code object and a frame of its own; 3.12 inlines list, dict and set comprehensions);
- lines: the source lines of those functions, each line once (a function called many times, or
  a comprehension inside one, adds nothing), docstrings and comments included: what a reader
  opens;
- executed: the distinct promptkd source lines that ran during the step: what a reader follows;
- depth: the number of promptkd function frames (comprehensions not counted) on the stack from
  `Trainer.train_step` to the deepest call of the step that computes a KL divergence (`_kl` now,
  `_kl_rows` before the redesign);
- the functions grouped by file, with their lines.

Before 2026-12-07 evening the lines figure summed each code object's `inspect.getsourcelines`,
which counted a function again for every comprehension inside it (loss_terms' 29 lines 7 times);
figures from reports before then are not comparable with this one's.

The last stdout line is one JSON document with these figures.
"""

from __future__ import annotations

import collections
import inspect
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    import torch

    import promptkd
    from promptkd.config import config_from_dict
    from promptkd.testing import save_tiny_pair, write_tiny_jsonl
    from promptkd.training.loop import Trainer

    root = Path(promptkd.__file__).resolve().parent
    work = Path(tempfile.mkdtemp(prefix="step_trace_"))
    teacher, student = save_tiny_pair(work / "models")
    data = write_tiny_jsonl(work / "train.jsonl")
    cfg = config_from_dict({
        "method": "promptkd", "model": {"teacher": str(teacher), "student": str(student)},
        "data": {"train": str(data)}, "sampling": {"max_new_tokens": 8},
        "train": {"output_dir": str(work / "run"), "max_steps": 4, "batch_size": 2, "cpu": True,
                  "warmup_steps": 0, "mixed_precision": "no"},
    })
    tr = Trainer(cfg, show_progress=False).setup()
    torch.manual_seed(0)
    tr.train_step()  # first-call costs outside the trace

    calls: dict = {}  # function code object -> (file, qualified name, first line, last line)
    executed: set = set()  # (file, line) that ran
    stack: list = []  # promptkd function frames on the stack (comprehensions left out)
    deepest = {"depth": 0, "path": []}
    kl = {"_kl", "_kl_rows"}

    def is_comprehension(code) -> bool:
        return code.co_name in ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")

    def local_trace(frame, event, arg):
        if event == "line":
            executed.add((frame.f_code.co_filename, frame.f_lineno))
        return local_trace

    def trace(frame, event, arg):
        code = frame.f_code
        if not code.co_filename.startswith(str(root)):
            return None
        if not is_comprehension(code):
            stack.append(code)
            if code not in calls:
                try:
                    source, first = inspect.getsourcelines(code)
                except (OSError, TypeError):
                    source, first = [], code.co_firstlineno
                calls[code] = (str(Path(code.co_filename).relative_to(root.parent)), code.co_qualname,
                               first, first + max(len(source), 1) - 1)
            if code.co_name in kl and len(stack) > deepest["depth"]:
                deepest["depth"] = len(stack)
                deepest["path"] = [calls[c][1] for c in stack]
        return local_trace

    def profile(frame, event, arg):  # pops frames as they return (settrace sees no C returns)
        code = frame.f_code
        if event == "return" and stack and stack[-1] is code:
            stack.pop()

    torch.manual_seed(1)
    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        tr.train_step()
    finally:
        sys.settrace(None)
        sys.setprofile(None)

    by_file = collections.defaultdict(list)
    spans = collections.defaultdict(set)
    for file, name, first, last in calls.values():
        by_file[file].append((name, last - first + 1))
        spans[file].update(range(first, last + 1))
    total = sum(len(lines) for lines in spans.values())
    ran = len(executed)
    for file in sorted(by_file):
        funcs = sorted(by_file[file])
        print(f"{file}: {len(funcs)} functions, {len(spans[file])} lines")
        for name, lines in funcs:
            print(f"    {lines:4d}  {name}")
    print(f"\nfunctions: {len(calls)} in {len(by_file)} files, {total} lines ({ran} of them executed)")
    print(f"depth from Trainer.train_step to the KL: {deepest['depth']} promptkd frames")
    print("  " + " -> ".join(deepest["path"]))
    print(json.dumps({"functions": len(calls), "files": len(by_file), "lines": total, "executed_lines": ran,
                      "kl_depth": deepest["depth"], "kl_path": deepest["path"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
