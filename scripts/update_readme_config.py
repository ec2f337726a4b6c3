"""Regenerate the README's config reference from the config dataclasses.

    python scripts/update_readme_config.py
"""

from pathlib import Path

from promptkd.config import config_reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text(encoding="utf-8")
head, rest = text.split(START, 1)
_, tail = rest.split(END, 1)
readme.write_text(head + START + "\n" + config_reference_markdown() + END + tail, encoding="utf-8")
print(f"updated {readme}")
