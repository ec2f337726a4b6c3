"""How much of promptkd one PromptKD training step runs through: functions, files, lines, depth.

    python benchmarks/step_trace.py                  # the code on PYTHONPATH (or the installed one)
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/step_trace.py   # another revision

One `Trainer.train_step()` of PromptKD on tiny in-process models (promptkd.testing, no download)
runs under `sys.setprofile`. Every call of a promptkd function is recorded (frames of other
packages are not, but the promptkd functions they call back are). Printed:

- functions: the distinct promptkd functions called during the step, and the files they are in;
- lines: the sum of those functions' source lines (a function called many times counts once);
- depth: the number of promptkd frames on the stack from `Trainer.train_step` to the deepest call
  of the step that computes a KL divergence (`_kl` now, `_kl_rows` before the redesign);
- the functions grouped by file, with their lines.

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

    calls: dict = {}  # code object -> (file, qualified name, lines)
    stack: list = []  # promptkd frames on the stack
    deepest = {"depth": 0, "path": []}
    kl = {"_kl", "_kl_rows"}

    def profile(frame, event, arg):
        code = frame.f_code
        if not code.co_filename.startswith(str(root)):
            return
        if event == "call":
            stack.append(code)
            if code not in calls:
                try:
                    lines = len(inspect.getsourcelines(code)[0])
                except (OSError, TypeError):
                    lines = 0
                calls[code] = (str(Path(code.co_filename).relative_to(root.parent)), code.co_qualname, lines)
            if code.co_name in kl and len(stack) > deepest["depth"]:
                deepest["depth"] = len(stack)
                deepest["path"] = [calls[c][1] for c in stack]
        elif event == "return" and stack and stack[-1] is code:
            stack.pop()

    torch.manual_seed(1)
    sys.setprofile(profile)
    try:
        tr.train_step()
    finally:
        sys.setprofile(None)

    by_file = collections.defaultdict(list)
    for file, name, lines in calls.values():
        by_file[file].append((name, lines))
    total = sum(lines for _, _, lines in calls.values())
    for file in sorted(by_file):
        funcs = sorted(by_file[file])
        print(f"{file}: {len(funcs)} functions, {sum(n for _, n in funcs)} lines")
        for name, lines in funcs:
            print(f"    {lines:4d}  {name}")
    print(f"\nfunctions: {len(calls)} in {len(by_file)} files, {total} lines")
    print(f"depth from Trainer.train_step to the KL: {deepest['depth']} promptkd frames")
    print("  " + " -> ".join(deepest["path"]))
    print(json.dumps({"functions": len(calls), "files": len(by_file), "lines": total,
                      "kl_depth": deepest["depth"], "kl_path": deepest["path"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
