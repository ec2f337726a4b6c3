"""The size of the core, for one or more checkouts side by side: loss code, loop.py, the step
context and the config surface.

    python benchmarks/core_size.py                              # this checkout
    python benchmarks/core_size.py --checkout /path/to/old --checkout .   # before and after

Printed per checkout (a markdown table, then one JSON line per checkout):

- loss code: losses.py plus the LM-head module (head_losses.py before the loss redesign,
  models/head.py after it), in lines and in code lines (no blank lines, comments or docstrings);
- loop.py: training/loop.py's lines;
- step context: the operations (methods) and attributes of the `StepContext` protocol in
  methods/base.py that a method is given;
- config keys: the leaves of each command's config dataclass (nested sections expanded), for the
  train command and summed over train, eval, exposure-bias, generate, make-student, plot and
  demo (compare's config is a list of arms, not counted).

Nothing runs but the parsing of source files and, in a subprocess with the checkout's src on
PYTHONPATH, the construction of its config classes' defaults.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import subprocess
import sys
import tokenize
from pathlib import Path

LOSS_FILES = ("losses.py", "head_losses.py", "models/head.py")
COMMANDS = ("Config", "EvalConfig", "ExposureBiasConfig", "GenerateConfig", "MakeStudentConfig", "PlotConfig",
            "DemoConfig")

_KEYS = """
import dataclasses, json
from promptkd import config as C

def leaves(obj):
    out = 0
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out += leaves(value) if dataclasses.is_dataclass(value) else 1
    return out

print(json.dumps({name: leaves(getattr(C, name)()) for name in NAMES if hasattr(C, name)}))
"""


def lines(path: Path) -> tuple[int, int]:
    """(all lines, code lines): code lines leave out blank lines, comments and docstrings."""
    source = path.read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docstrings.update(range(node.lineno, node.end_lineno + 1))
    code: set[int] = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            code.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(source.splitlines()), len(code)


def step_context(base: Path) -> tuple[int, int]:
    """(operations, attributes) of the StepContext protocol."""
    for node in ast.parse(base.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "StepContext":
            ops = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body)
            attrs = sum(isinstance(n, ast.AnnAssign) for n in node.body)
            return ops, attrs
    raise SystemExit(f"{base}: no class StepContext")


def config_keys(src: Path) -> dict[str, int]:
    code = _KEYS.replace("NAMES", repr(COMMANDS))
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(checkout: Path) -> dict:
    src = checkout / "src"
    pkg = src / "promptkd"
    revision = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "?"
    loss = {name: lines(pkg / name) for name in LOSS_FILES if (pkg / name).exists()}
    ops, attrs = step_context(pkg / "methods" / "base.py")
    keys = config_keys(src)
    return {
        "checkout": str(checkout), "revision": revision,
        "loss_files": {name: {"lines": a, "code_lines": b} for name, (a, b) in loss.items()},
        "loss_lines": sum(a for a, _ in loss.values()), "loss_code_lines": sum(b for _, b in loss.values()),
        "loop_lines": lines(pkg / "training" / "loop.py")[0],
        "context_operations": ops, "context_attributes": attrs,
        "train_keys": keys["Config"], "all_keys": sum(keys.values()), "keys_by_command": keys,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", type=Path,
                        help="a checkout of promptkd (repeat for several); default: this one")
    args = parser.parse_args()
    checkouts = args.checkout or [Path(__file__).resolve().parents[1]]
    rows = [measure(c.resolve()) for c in checkouts]
    print("| revision | loss code lines (code only) | files | loop.py | context operations (attributes) "
          "| train keys | all keys |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        files = ", ".join(f"{n} {v['lines']} ({v['code_lines']})" for n, v in r["loss_files"].items())
        print(f"| {r['revision']} | {r['loss_lines']} ({r['loss_code_lines']}) | {files} | {r['loop_lines']} "
              f"| {r['context_operations']} ({r['context_attributes']}) | {r['train_keys']} | {r['all_keys']} |")
    first = rows[0]
    for r in rows[1:]:
        print(f"\n{r['revision']} / {first['revision']}: loss code {r['loss_lines'] / first['loss_lines']:.0%} "
              f"({r['loss_code_lines'] / first['loss_code_lines']:.0%} of code lines), loop.py "
              f"{r['loop_lines'] / first['loop_lines']:.0%}")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
