"""Config fields that carry their help text and valid range, and the one validator for them.

Every config dataclass (the command configs in `promptkd.config`, and the sampler's
`promptkd.sampling.SamplingConfig`) declares its fields with `opt(...)`:

    top_p: float = opt(1.0, "Nucleus sampling mass; 1.0 = off.", min=0.0, max=1.0, min_exclusive=True)

`build` turns a mapping (a YAML file merged with command-line flags) into such a dataclass and
`field_problems` checks one built in Python. Both use the same type and range rules and report
every problem, each naming the dotted key, the value and what is allowed. `read_yaml` and
`merge_dicts` read a config file and lay overrides over it. `leaves` lists every
key of a config (recursively), which is what the command line, the config reference and the
tests walk. Only the standard library and `promptkd.errors` are imported here, so the lowest
layers (the sampler) can use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promptkd.errors import ConfigError, UserError


def opt(default, help: str, *, choices=None, min=None, max=None, min_exclusive=False, fix: str | None = None):
    """A config field with help text and validation metadata.

    choices: the allowed values; min / max: an inclusive range (min exclusive with
    `min_exclusive`); fix: what to do instead, appended to a range or choice error.
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive, "fix": fix}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- YAML files


def merge_dicts(base: dict, over: dict) -> dict:
    """`over` merged into `base`, recursively for nested mappings (neither is changed)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file; UserError naming the file (and line) when it is missing, not
    YAML, not UTF-8 or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"invalid YAML in {path}{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- types and ranges


def _split_list(text: str, item_type: Any) -> list:
    """'10,20' -> [10, 20] for list[int]; 'a,b' -> ['a', 'b'] for list[str] (the flag spelling)."""
    items = [p.strip() for p in text.split(",") if p.strip()]
    if item_type is str or item_type is Any:
        return items
    out = []
    for item in items:
        try:
            out.append(yaml.safe_load(item))
        except yaml.YAMLError:
            out.append(item)
    return out


def check_type(value: Any, tp: Any, *, lenient: bool = True) -> tuple[bool, Any]:
    """(ok, value) for a value against a field annotation.

    lenient (values read from YAML or flags): a string is accepted for a float (YAML 1.1 reads
    5e-5 as a string), a comma-separated string or a single item for a list. Python callers
    are checked strictly (lenient=False), apart from an int where a float is expected.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return True, None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                ok, coerced = check_type(value, arg, lenient=lenient)
                if ok:
                    return True, coerced
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if lenient and isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is dict:
        return isinstance(value, dict), value
    if tp is list or origin is list:
        item_type = (typing.get_args(tp) or (Any,))[0]
        if lenient and isinstance(value, str):
            value = _split_list(value, item_type)
        elif lenient and not isinstance(value, (list, tuple)) and value is not None:
            value = [value]
        if not isinstance(value, list) and not (lenient and isinstance(value, tuple)):
            return False, value
        items = []
        for item in value:
            ok, coerced = check_type(item, item_type, lenient=lenient) if item_type is not Any else (True, item)
            if not ok:
                return False, value
            items.append(coerced)
        return True, items
    return True, value


def type_name(tp: Any) -> str:
    """'int', 'float | None', 'list[int]': the annotation as the user reads it in a message."""
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def range_problems(f: dataclasses.Field, value: Any, name: str) -> list[str]:
    """Problems of a well-typed value against its field's choices / range metadata."""
    meta = f.metadata
    fix = f"; {meta['fix']}" if meta.get("fix") else ""
    if value is None:
        return []
    if isinstance(value, float) and not math.isfinite(value):
        return [f"'{name}' = {value!r}: must be a finite number"]
    out = []
    choices = meta.get("choices")
    if choices and value not in choices:
        out.append(f"'{name}' = {value!r}: must be one of {', '.join(map(str, choices))}{fix}")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        too_low = lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo))
        if too_low or (hi is not None and value > hi):
            out.append(f"'{name}' = {value!r}: must be {allowed(f)}{fix}")
    return out


def allowed(f: dataclasses.Field) -> str:
    """'>= 1', '> 0.0 and <= 1.0', 'a / b / c' or '' for a field's metadata."""
    m = f.metadata
    if m.get("choices"):
        return " / ".join(map(str, m["choices"]))
    lo, hi = m.get("min"), m.get("max")
    parts = []
    if lo is not None:
        parts.append(f"{'>' if m.get('min_exclusive') else '>='} {lo}")
    if hi is not None:
        parts.append(f"<= {hi}")
    return " and ".join(parts)


# --------------------------------------------------------------------------- walking a config


@dataclass(frozen=True)
class Leaf:
    """One settable key of a config: its dotted name, field, annotation and default value."""

    key: str
    field: dataclasses.Field
    type: Any
    default: Any

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def ordered_fields(cls) -> list[dataclasses.Field]:
    """The dataclass's fields, those it declares itself before those it inherits (a command's
    own keys come before shared ones such as the prompt settings)."""
    own = inspect.get_annotations(cls)
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaves(cls_or_obj, prefix: str = "") -> Iterator[Leaf]:
    """Every settable key, depth first: a config's own values, then each nested section's.

    Defaults come from a default instance, so a section whose default differs from its class's
    (e.g. the evaluation protocol's sampling settings) reports the command's default.
    """
    obj = cls_or_obj() if isinstance(cls_or_obj, type) else cls_or_obj
    hints = _hints(type(obj))
    fields = ordered_fields(type(obj))
    for f in fields:
        if not is_section(hints[f.name]):
            yield Leaf(prefix + f.name, f, hints[f.name], getattr(obj, f.name))
    for f in fields:
        if is_section(hints[f.name]):
            yield from leaves(getattr(obj, f.name), f"{prefix}{f.name}.")


def section_keys(cls, prefix: str = "") -> list[str]:
    """Dotted names of the nested sections ('sampling', 'train', ...)."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if is_section(hints[f.name]):
            out.append(prefix + f.name)
            out += section_keys(hints[f.name], f"{prefix}{f.name}.")
    return out


def suggest(key: str, known: list[str]) -> str | None:
    """The known key the user probably meant: one with the same last part, else a close one."""
    last = key.rsplit(".", 1)[-1]
    same_last = [k for k in known if k.rsplit(".", 1)[-1] == last]
    if len(same_last) == 1:
        return same_last[0]
    close = difflib.get_close_matches(key, known, n=1)
    return close[0] if close else None


# --------------------------------------------------------------------------- building and checking


def build(cls, data: Any, problems: list[str], *, prefix: str = "", base: Any = None, known: list[str] | None = None):
    """A `cls` from a mapping of (nested) keys; every problem is appended to `problems`.

    Invalid values are left out (the default stays), so the result is always a valid object and
    every problem is collected. The keys the mapping gave are recorded on each built section
    (see `was_given`). base: the default instance to start from (a parent's default section).
    """
    base = cls() if base is None else base
    if known is None:
        known = [leaf.key for leaf in leaves(cls)] + section_keys(cls)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        where = f"'{prefix.rstrip('.')}'" if prefix else "the config"
        problems.append(f"{where}: expected a mapping of keys, got {data!r}")
        return base
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        name = f"{prefix}{key}"
        f = names.get(key)
        if f is None and key in getattr(cls, "REMOVED_KEYS", {}):
            problems.append(f"'{name}' was removed: {cls.REMOVED_KEYS[key]}")
            continue
        if f is None:
            guess = suggest(name, known)
            level = [f"{prefix}{g.name}" for g in ordered_fields(cls)]
            hint = f"; did you mean '{guess}'?" if guess else f"; valid keys: {', '.join(level)}"
            problems.append(f"unknown key '{name}'{hint}")
            continue
        tp = hints[key]
        if is_section(tp):
            kwargs[key] = build(tp, value, problems, prefix=f"{name}.", base=getattr(base, key), known=known)
            continue
        ok, coerced = check_type(value, tp)
        if not ok:
            problems.append(f"'{name}' = {value!r}: expected {type_name(tp)}")
            continue
        found = range_problems(f, coerced, name)
        if found:
            problems.extend(found)
            continue
        kwargs[key] = coerced
    try:
        obj = dataclasses.replace(base, **kwargs)
    except ConfigError as e:  # a section that validates itself (the values above were checked)
        problems.extend(e.problems)
        return base
    obj._keys_given = frozenset(str(k) for k in data if str(k) in names)
    return obj


def field_problems(obj: Any, prefix: str = "") -> list[str]:
    """Type and range problems of every field of a config built in Python, recursively."""
    out = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp, name = getattr(obj, f.name), hints[f.name], prefix + f.name
        if is_section(tp):
            if isinstance(value, tp):
                out.extend(field_problems(value, f"{name}."))
            else:
                out.append(f"'{name}' = {value!r}: expected a {tp.__name__}")
            continue
        ok, coerced = check_type(value, tp, lenient=False)
        if not ok:
            out.append(f"'{name}' = {value!r}: expected {type_name(tp)}")
            continue
        out.extend(range_problems(f, coerced, name))
    return out


def was_given(section: Any, name: str) -> bool:
    """Whether the user set `section.name`: the key was in the YAML file or on the command line
    (even with its default value), or its value differs from the field's default (a config
    built or changed in Python keeps no record of its keys)."""
    f = next(f for f in dataclasses.fields(section) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return name in getattr(section, "_keys_given", ()) or getattr(section, name) != default


class ConfigBase:
    """What every command config can do: be built from a mapping, validated, saved, listed.

    A subclass (a dataclass) adds `required_problems` (keys that must be set) and
    `cross_checks` (rules that involve several keys); both return messages that name the key,
    the value and the fix.
    """

    def required_problems(self) -> list[str]:
        return []

    def cross_checks(self) -> list[str]:
        return []

    def problems(self, *, check_required: bool = True) -> list[str]:
        """Every problem: types and ranges first; the cross-field rules once those hold."""
        out = field_problems(self)
        if not out:
            out = (self.required_problems() if check_required else []) + self.cross_checks()
        return out

    def validate(self, *, check_required: bool = True):
        """Raise ConfigError listing every problem; return self when there is none."""
        found = self.problems(check_required=check_required)
        if found:
            raise ConfigError(found)
        return self

    @classmethod
    def from_dict(cls, data: Mapping | None, *, check_required: bool = True):
        """A validated config from a mapping (YAML + flags); ConfigError lists every problem."""
        problems: list[str] = []
        cfg = build(cls, data, problems)
        if not problems:
            problems = (cfg.required_problems() if check_required else []) + cfg.cross_checks()
        if problems:
            raise ConfigError(problems)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def reference_markdown(cls) -> str:
    """The config reference of `cls` as a Markdown table: key, default, allowed, meaning."""
    lines = ["| key | default | allowed | meaning |\n|---|---|---|---|"]
    for leaf in leaves(cls):
        lines.append(f"| `{leaf.key}` | `{leaf.default!r}` | {allowed(leaf.field)} | {leaf.help} |")
    return "\n".join(lines) + "\n"
