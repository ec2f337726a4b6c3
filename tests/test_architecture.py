"""The layering in pyproject.toml ([tool.importlinter]) holds: `lint-imports` keeps every contract.

data -> models -> losses / sampling -> methods / config -> training -> evaluation -> CLI, and
methods never import the trainer, the config module, evaluation or the CLI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("lint-imports is not installed: install the test extras (bash scripts/install.sh)")
    done = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_private_name_is_imported_from_another_package():
    """A `_private` name is never imported across promptkd's packages (STYLE: a thing two layers
    use lives, public, in the lower one)."""
    import ast

    offenders = []
    for path in (ROOT / "src" / "promptkd").rglob("*.py"):
        package = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts[:2])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("promptkd"):
                source_package = ".".join(node.module.split(".")[:2])
                for alias in node.names:
                    if alias.name.startswith("_") and source_package != package:
                        offenders.append(f"{path.relative_to(ROOT)}: {alias.name} from {node.module}")
    assert offenders == []
