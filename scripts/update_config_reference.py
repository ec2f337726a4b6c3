"""Regenerate docs/configuration.md's config reference tables from the config dataclasses.

    python scripts/update_config_reference.py

Each command's table sits between `<!-- config-reference:COMMAND:start -->` and
`<!-- config-reference:COMMAND:end -->`; everything outside the markers is left as written.
tests/test_config.py fails when a table is out of date.
"""

from pathlib import Path

from promptkd.config import COMMANDS, config_reference_markdown

page = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
text = page.read_text(encoding="utf-8")
for command in COMMANDS:
    start, end = f"<!-- config-reference:{command}:start -->", f"<!-- config-reference:{command}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{page}: no markers for '{command}' ({start} ... {end}); add them where its table goes")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    text = head + start + "\n" + config_reference_markdown(command) + end + tail
page.write_text(text, encoding="utf-8")
print(f"updated {page}")
