"""The config of `promptkd compare`: a YAML file of the study's arms, seeds and evaluation.

    name: my-study
    results: studies/my-study          # cells/, study.json, report.md, plots (small, committed)
    base: {model: {...}, data: {...}, train: {...}}   # a train config shared by every arm
    arms:
      - {name: PromptKD, method: promptkd}
      - {name: GKD, method: gkd, overrides: {gkd: {lmbda: 1.0}}}
    seeds: [1, 2, 3, 4, 5]
    baseline: GKD

A cell's train config is `base` with the arm's method and overrides laid over it, then the
cell's train.seed and train.output_dir (and a SeqKD cell's data.teacher_responses, which it
generates: compare.seqkd). `load_compare_config` reports every problem at once, as
`promptkd train` does, with the file's name; it validates each arm's train config, so a typo
fails before any training. Loading imports neither torch nor the models when `check_arms` is
False (`--report-only`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from promptkd.errors import ConfigError, UserError
from promptkd.options import ConfigBase, build, merge_dicts, opt, read_yaml

STUDY_KEYS = ("method", "train.seed", "train.output_dir", "data.teacher_responses")  # the study sets these
PREPARED = "prepare:"  # model path `prepare:NAME`: the final/student of prepare stage NAME
TEACHER_RESPONSES = "teacher_responses.jsonl"  # a SeqKD cell's training data, in its run directory (compare.seqkd)
RUNTIME_KEYS = ("results", "runs")  # where things go: not part of the config hash
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*(_[A-Za-z0-9.+-]+)*")  # no "__" (the cell id separator)


@dataclass
class Budget(ConfigBase):
    """An arm's budget in FLOPs rather than in steps (train.max_steps): each of its cells trains
    round(F_ref / f) steps, F_ref and f read from finished cells of the same seed."""

    flops_of: str | None = opt(None, "F_ref: the FLOPs of this arm's cell (its training plus any teacher generation).")
    per_step_from: str | None = opt(None, "f: the FLOPs per step of this arm's cell (same method, a steps budget): "
                                          "its FLOPs / its steps.")


@dataclass
class Arm(ConfigBase):
    """One arm of the study: a method and its settings, trained once per seed."""

    name: str = opt("", "The arm's name in the report and in its cells' file names.")
    method: str = opt("", "Distillation method, as `promptkd train`'s `method`.")
    overrides: dict = opt({}, "Train config keys of this arm, laid over `base` (e.g. {gkd: {lmbda: 1.0}}).")
    budget: Budget = field(default_factory=Budget)


@dataclass
class EvaluationSection(ConfigBase):
    """How every cell's final student is evaluated: `promptkd eval`, whose defaults are the protocol."""

    datasets: list = opt(["dolly", "selfinst", "vicuna"],
                         "Evaluation sets: names `promptkd eval` knows, or `name: path` pairs of JSONL files.")
    seeds: list[int] = opt([10, 20, 30, 40, 50], "Sampling seeds; a cell scores the mean over them (protocol: 10..50).")
    max_new_tokens: int = opt(256, "Response cap of the evaluation samples (protocol: 256).", min=1)
    limit: int = opt(0, "Only the first N prompts of each set (a recorded deviation); 0 = all.", min=0)
    batch_size: int = opt(16, "Prompts per generate call.", min=1)
    exposure_bias_prompts: int = opt(0, "ExAccErr of each cell's student against the teacher (`promptkd exposure-bias`) "
                                        "on the first N prompts of the first set, up to max_new_tokens; 0 = off.", min=0)
    exposure_bias_samples: int = opt(3, "Responses per prompt and model for ExAccErr.", min=1)

    def sets(self) -> dict[str, str]:
        """{set name: the dataset `promptkd eval` reads (a name or a path)}."""
        out = {}
        for item in self.datasets:
            out.update(item if isinstance(item, dict) else {item: item})
        return {str(k): str(v) for k, v in out.items()}


@dataclass
class CompareConfig(ConfigBase):
    """`promptkd compare`: arms x training seeds, evaluated and compared by paired tests."""

    name: str = opt("", "Study name: the report's title and the default runs directory's name.")
    results: str = opt("", "Directory of cells/, study.json, report.md and plots: small files, meant to be committed.")
    runs: str | None = opt(None, "Directory of the cells' run directories (weights, never committed); "
                                 "null = ~/.cache/promptkd/compare/NAME ($PROMPTKD_CACHE).")
    prepare: dict = opt({}, "Named train configs run once, in order, before any cell (a teacher fine-tune, a "
                            "student init); model.teacher or model.student `prepare:NAME` in base or an arm's "
                            "overrides is stage NAME's final/student.")
    base: dict = opt({}, "A train config (as configs/*.yaml) shared by every arm, without method, train.seed "
                         "and train.output_dir, which the study sets.")
    arms: list = opt([], "The arms: {name, method, overrides, budget}.")
    seeds: list[int] = opt([1, 2, 3, 4, 5], "Training seeds: every arm trains once per seed (train.seed).")
    baseline: str | None = opt(None, "Every other arm is compared with this one; or give `comparisons`.")
    comparisons: list | None = opt(None, "Pairs [arm, baseline] to compare, instead of `baseline`.")
    alpha: float = opt(0.05, "Level of every test and of the (1 - alpha) intervals.", min=0.0, max=1.0, min_exclusive=True)
    margin: float | None = opt(None, "Equivalence margin in ROUGE-L points (TOST); null = the report never calls "
                                     "arms equivalent.", min=0.0, min_exclusive=True)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    source: ClassVar[Path | None] = None  # the YAML file it was read from (set by load_compare_config)

    def arm_list(self) -> list[Arm]:
        problems: list[str] = []
        arms = [build(Arm, a, problems, prefix=f"arms[{i}].") for i, a in enumerate(self.arms)]
        if problems:
            raise ConfigError(problems, self.source)
        return arms

    def pairs(self) -> list[tuple[str, str]]:
        """(arm, baseline) comparisons in the report's order."""
        if self.comparisons is not None:
            return [(str(a), str(b)) for a, b in self.comparisons]
        return [(a.name, self.baseline) for a in self.arm_list() if a.name != self.baseline]

    def cell_config(self, arm: Arm, seed: int, output_dir: str | Path, max_steps: int | None = None) -> dict:
        """The train config of cell (arm, seed), as a mapping for promptkd.config; max_steps: the
        steps a FLOPs budget planned (runner.plan_steps)."""
        cfg = merge_dicts(merge_dicts(self.base, {"method": arm.method}), arm.overrides)
        cfg = merge_dicts(cfg, {"train": {"seed": seed, "output_dir": str(output_dir)}})
        if max_steps is not None:
            cfg = merge_dicts(cfg, {"train": {"max_steps": max_steps}})
        if arm.method == "seqkd":
            cfg = merge_dicts(cfg, {"data": {"teacher_responses": str(Path(output_dir) / TEACHER_RESPONSES)}})
        return cfg

    def order(self) -> list[str]:
        """Every cell id, seed-major; within a seed, FLOPs-budget arms after the arms they read."""
        arms = sorted(self.arm_list(), key=lambda a: a.budget.flops_of is not None)
        return [cell_id(a.name, s) for s in self.seeds for a in arms]

    def needs(self, arm: Arm, seed: int) -> list[str]:
        """The cells a FLOPs-budget cell plans its steps from (same seed); [] for a steps budget."""
        b = arm.budget
        return [cell_id(name, seed) for name in dict.fromkeys((b.flops_of, b.per_step_from))] if b.flops_of else []

    def stage_config(self, name: str, output_dir: str | Path) -> dict:
        """The train config of prepare stage `name`, as a mapping for promptkd.config."""
        return merge_dicts(self.prepare[name], {"train": {"output_dir": str(output_dir)}})

    def resolve(self, train_config: dict, runs: Path) -> dict:
        """`train_config` with model.teacher / model.student `prepare:NAME` replaced by the path of
        stage NAME's final/student under the runs directory `runs`."""
        model = dict(train_config.get("model", {}))
        for key in ("teacher", "student"):
            if str(model.get(key, "")).startswith(PREPARED):
                model[key] = str(runs / "prepare" / model[key][len(PREPARED):] / "final" / "student")
        return {**train_config, "model": model}

    def cell_hash(self, arm: Arm, seed: int) -> str:
        """A hash of the cell's train config as written (without output_dir and planned steps): a
        cell file whose hash differs was trained from another config than this one."""
        return _hash(self.cell_config(arm, seed, ""))

    def config_hash(self) -> str:
        """A hash of the whole study config, without where its files go (RUNTIME_KEYS)."""
        return _hash({k: v for k, v in asdict(self).items() if k not in RUNTIME_KEYS})

    def cross_checks(self) -> list[str]:
        problems = [f"'{key}' is not set: {fix}" for key, fix in
                    (("name", "name the study"), ("results", "give the results directory")) if not getattr(self, key)]
        if self.alpha >= 1:
            problems.append(f"'alpha' = {self.alpha}: must be < 1 (e.g. 0.05)")
        if self.name and not NAME.fullmatch(self.name):
            problems.append(f"'name' = {self.name!r}: use letters, digits and . + - _ (no '__')")
        arm_problems: list[str] = []
        arms = [build(Arm, a, arm_problems, prefix=f"arms[{i}].") for i, a in enumerate(self.arms)]
        problems += arm_problems
        names = [a.name for a in arms]
        if len(arms) < 2:
            problems.append(f"'arms' has {len(arms)} arm(s): a comparison needs at least two")
        for i, a in enumerate(arms):
            if not NAME.fullmatch(a.name):
                problems.append(f"'arms[{i}].name' = {a.name!r}: use letters, digits and . + - _ (no '__')")
            if names.count(a.name) > 1 and names.index(a.name) == i:
                problems.append(f"arm name {a.name!r} is used by {names.count(a.name)} arms: give each arm its own name")
            if not a.method:
                problems.append(f"'arms[{i}].method' is not set: name the method of arm {a.name!r}")
            if a.method == "seqkd":
                problems += self._seqkd_problems(a)
            problems += [f"'arms[{i}].overrides.{k}' is set by the study: remove it ({_study_key_fix(k)})"
                         for k in STUDY_KEYS if _has_key(a.overrides, k)]
        problems += [f"'base.{k}' is set by the study: remove it ({_study_key_fix(k)})"
                     for k in STUDY_KEYS if _has_key(self.base, k)]
        problems += self._budget_problems(arms)
        problems += self._prepare_problems(arms)
        if not self.seeds:
            problems.append("'seeds' is empty: give the training seeds, e.g. [1, 2, 3, 4, 5]")
        elif len(set(self.seeds)) != len(self.seeds):
            problems.append(f"'seeds' = {self.seeds} repeats a seed: give each seed once")
        problems += self._comparison_problems(names)
        problems += self._evaluation_problems()
        return problems

    def _prepare_problems(self, arms: list[Arm]) -> list[str]:
        problems = []
        for name, stage in self.prepare.items():
            key = f"prepare.{name}"
            if not NAME.fullmatch(str(name)) or not isinstance(stage, dict):
                problems.append(f"'{key}': give a train config under a name of letters, digits and . + - _")
                continue
            if _has_key(stage, "train.output_dir"):
                problems.append(f"'{key}.train.output_dir' is set by the study: remove it (stages train under "
                                "RUNS/prepare/NAME)")
            seed = _section(stage, "train").get("seed")
            if seed is None or seed in self.seeds:
                problems.append(f"'{key}.train.seed' = {seed}: give the stage a seed that is not in 'seeds' "
                                f"{self.seeds}; a cell with the stage's seed would read the stage's training data "
                                "in the same order")
            problems += [f"'{key}.model.{k}' = {v!r}: a stage cannot read another stage's output"
                         for k, v in _section(stage, "model").items() if str(v).startswith(PREPARED)]
        for where, model in [("base", _section(self.base, "model"))] + [
                (f"arms[{i}].overrides", _section(a.overrides, "model")) for i, a in enumerate(arms)]:
            for k, v in model.items():
                if str(v).startswith(PREPARED) and str(v)[len(PREPARED):] not in self.prepare:
                    problems.append(f"'{where}.model.{k}' = {v!r} names no prepare stage; stages: "
                                    f"{', '.join(self.prepare) or 'none'}")
        return problems

    def _budget_problems(self, arms: list[Arm]) -> list[str]:
        by_name = {a.name: a for a in arms}
        problems = []
        for i, a in enumerate(arms):
            b, key = a.budget, f"arms[{i}].budget"
            if (b.flops_of is None) != (b.per_step_from is None):
                problems.append(f"'{key}': give both flops_of (the arm whose FLOPs to match) and per_step_from (an "
                                f"arm of method {a.method!r} whose cells give the FLOPs per step)")
                continue
            if b.flops_of is None:
                continue
            if _has_key(a.overrides, "train.max_steps"):
                problems.append(f"'arms[{i}].overrides.train.max_steps' is set, but arm {a.name!r} has a FLOPs "
                                "budget, which plans its steps: remove it")
            for knob in ("flops_of", "per_step_from"):
                other = by_name.get(getattr(b, knob))
                if other is None or other.name == a.name:
                    problems.append(f"'{key}.{knob}' = {getattr(b, knob)!r} is not another arm; arms: "
                                    f"{', '.join(by_name)}")
                elif other.budget.flops_of is not None:
                    problems.append(f"'{key}.{knob}' = {other.name!r} has a FLOPs budget itself: name an arm "
                                    "that trains train.max_steps")
                elif knob == "per_step_from" and other.method != a.method:
                    problems.append(f"'{key}.per_step_from' = {other.name!r} is a {other.method} arm: the FLOPs "
                                    f"per step of arm {a.name!r} come from an arm of its own method, {a.method}")
        return problems

    def _seqkd_problems(self, arm: Arm) -> list[str]:
        """A SeqKD cell generates its teacher responses for exactly the prompts it reads (compare.seqkd)."""
        cfg = merge_dicts(self.base, arm.overrides)
        problems = []
        if not _section(cfg, "model").get("teacher"):
            problems.append(f"arm {arm.name!r}: method seqkd answers its prompts with the teacher: set model.teacher")
        if _section(cfg, "data").get("max_train_examples"):
            problems.append(f"arm {arm.name!r}: data.max_train_examples with method seqkd would cut its teacher "
                            "responses, which already are the prompts the cell reads: remove it")
        return problems

    def _comparison_problems(self, names: list[str]) -> list[str]:
        known = f"arms: {', '.join(names)}"
        if (self.baseline is None) == (self.comparisons is None):
            return ["give either 'baseline' (every other arm is compared with it) or 'comparisons' "
                    "(a list of [arm, baseline] pairs), not both or neither"]
        if self.baseline is not None:
            return [] if self.baseline in names else [f"'baseline' = {self.baseline!r} is not an arm; {known}"]
        problems = []
        for i, pair in enumerate(self.comparisons):
            if not (isinstance(pair, list) and len(pair) == 2):
                problems.append(f"'comparisons[{i}]' = {pair!r}: write a pair [arm, baseline]")
                continue
            problems += [f"'comparisons[{i}]' names {p!r}, which is not an arm; {known}" for p in pair if p not in names]
            if pair[0] == pair[1]:
                problems.append(f"'comparisons[{i}]' = {pair}: compares an arm with itself")
            if self.comparisons.index(pair) != i:
                problems.append(f"'comparisons[{i}]' = {pair}: listed twice")
        return problems

    def _evaluation_problems(self) -> list[str]:
        items = self.evaluation.datasets
        bad = [x for x in items if not (isinstance(x, str) or (isinstance(x, dict) and len(x) == 1))]
        if bad:
            return [f"'evaluation.datasets' item {bad[0]!r}: give a set name or one `name: path.jsonl` pair"]
        sets = [next(iter(x)) if isinstance(x, dict) else x for x in items]
        if not sets or len(set(sets)) != len(sets):
            return [f"'evaluation.datasets' = {items}: give at least one set, each name once"]
        return []

    def check_arms(self) -> list[str]:
        """Every arm's train config through promptkd's own validation (imports torch), and the
        student-init check; [] when all is well."""
        from promptkd.config import Config, EvalConfig

        problems = []
        for name in self.prepare:
            try:
                Config.from_dict(self.stage_config(name, "unused"))
            except ConfigError as e:
                problems += [f"prepare stage {name!r}: {p}" for p in e.problems]
        for arm in self.arm_list():
            try:
                Config.from_dict(self.cell_config(arm, self.seeds[0], "unused"))
            except ConfigError as e:
                problems += [f"arm {arm.name!r}: {p}" for p in e.problems]
        e = self.evaluation
        eval_cfg = EvalConfig(model="unused", out=str(self.results), datasets=list(e.sets().values()), seeds=e.seeds)
        problems += [f"evaluation: {p}" for p in eval_cfg.problems()]
        return problems or self._init_problems()

    def _init_problems(self) -> list[str]:
        """A student init that promptkd trained with one of `seeds` on the same data shares that
        seed's data order: a cell with that seed would re-read the init's examples in order."""
        student = Path(str(self.base.get("model", {}).get("student", ""))).expanduser()
        record = student.parent.parent / "config.yaml"  # RUN/final/student -> RUN/config.yaml
        if student.parent.name not in ("final", "best") or not record.is_file():
            return []
        init = read_yaml(record)
        seed = init.get("train", {}).get("seed")
        same_data = init.get("data", {}).get("train") == self.base.get("data", {}).get("train")
        if seed in self.seeds and same_data:
            return [f"'base.model.student' {student} was trained by promptkd with train.seed {seed} on the same "
                    f"data.train ({record}), and {seed} is in 'seeds' {self.seeds}: a cell with seed {seed} would "
                    "re-read the init's training examples in the same order. Drop that seed or retrain the init "
                    "with a seed outside the study's"]
        return []


def load_compare_config(path: str | Path, *, check_arms: bool = True) -> CompareConfig:
    """The validated study config in `path`. check_arms: also validate every arm's train config
    (imports torch; `--report-only` skips it). Raises ConfigError (naming the file) listing
    every problem, UserError for an unreadable file."""
    path = Path(path)
    problems: list[str] = []
    cfg = build(CompareConfig, read_yaml(path), problems)
    cfg.source = path
    if not problems:
        problems = cfg.cross_checks()
    if not problems and check_arms:
        problems = cfg.check_arms()
    if problems:
        raise ConfigError(problems, str(path))
    return cfg


def cell_id(arm: str, seed: int) -> str:
    return f"{arm}__seed{seed}"


def parse_cell_id(text: str) -> tuple[str, int]:
    arm, sep, seed = text.rpartition("__seed")
    if not sep or not seed.isdigit():
        raise UserError(f"cell {text!r}: write ARM__seedK, e.g. GKD__seed1")
    return arm, int(seed)


def _has_key(mapping: dict, dotted: str) -> bool:
    node = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _section(mapping: dict, key: str) -> dict:
    value = mapping.get(key)
    return value if isinstance(value, dict) else {}


def _study_key_fix(key: str) -> str:
    return {"method": "each arm names its method", "train.seed": "the training seeds are 'seeds'",
            "train.output_dir": "cells train under 'runs'",
            "data.teacher_responses": "a seqkd cell generates its own"}[key]


def _hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
