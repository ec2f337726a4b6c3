"""How long a study's cells take, and `promptkd compare --plan`: what the next sittings would run,
in order, and for about how long, without running anything.

A cell's estimate (`estimate_seconds`, which a sitting's --max-minutes uses too) is the mean wall
time of its arm's finished cells. Before its arm has one, it is rough: the seconds per training
step of its method, per SeqKD teacher prompt and per evaluation prompt and seed of ROUGH below,
scaled by the cell's settings, and by how long the study's finished cells took against their own
rough estimates (their mean ratio: the machine's speed). A FLOPs-budget arm is estimated to train
as long as its reference arm (equal FLOPs, about equal time). Sittings are packed as `run_study`
starts cells: in order, each on the first free worker once the cells it is planned from have
ended, none that would end past --max-minutes; the prepare stages first, one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from promptkd.compare.config import CompareConfig, parse_cell_id
from promptkd.compare.report import read_cells

# Rough seconds, measured in the cpu2 study on a 2-core CPU, two cells at a time with one torch
# thread each, bf16, batch 4, prompts <= 128 tokens, 48 new tokens. benchmarks/results/cpu2/cells/
# *.json `seconds`, medians over each method's 3 seeds: train / 160 steps per method; SeqKD's
# generation / 640 prompts (at batch 4); eval (median of the 40 trained cells that have it) /
# 1,246 prompts (Dolly 500, SelfInst 242, Vicuna 80, every 4th S-NI prompt: 424) at one seed.
# The 10-layer student of that study: a larger model's stage (a teacher fine-tune) takes longer.
ROUGH = {
    "step": {"sft": 1.38, "kd": 2.34, "seqkd": 2.56, "gkd": 3.98, "distillm": 2.53, "promptkd": 6.49,
             "minillm": 9.81},  # per step of 4 examples
    "generate": 1.50,  # per SeqKD teacher prompt, 48 new tokens
    "eval": 0.22,  # per evaluation prompt and seed, 48 new tokens
    # per ExAccErr prompt x sample (both models sample it, the teacher scores it), 48 new tokens: the
    # cells' exposure_bias seconds / 4 checkpoints, median of the 7 cells that kept that time (192.6 s for 20 x 3)
    "exposure_bias": 3.2,
}


@dataclass
class Item:
    """A prepare stage or a cell to run, with its estimated minutes."""

    name: str
    minutes: float
    measured: bool  # from finished cells of its arm, or rough
    needs: list[str] = field(default_factory=list)  # cells it is planned from (a FLOPs budget)
    stage: bool = False


def rough_seconds(cfg: CompareConfig, cell: str) -> float:
    """The rough (unscaled) estimate of a cell: training, SeqKD's generation, evaluation."""
    from promptkd.config import Config

    arms = {a.name: a for a in cfg.arm_list()}
    arm, seed = parse_cell_id(cell)
    arm = arms[arm]
    train = Config.from_dict(cfg.cell_config(arms[arm.budget.flops_of or arm.name], seed, "unused"))
    e = cfg.evaluation
    seconds = _train_seconds(train) + ROUGH["eval"] * _eval_prompts(cfg) * len(e.seeds) * _tokens(e.max_new_tokens)
    if e.exposure_bias_prompts and train.model.teacher:
        seconds += ROUGH["exposure_bias"] * e.exposure_bias_prompts * e.exposure_bias_samples * _tokens(e.max_new_tokens)
    if arm.method == "seqkd":
        seconds += ROUGH["generate"] * _examples(train) * _tokens(train.sampling.max_new_tokens)
    return seconds


def estimate_seconds(cfg: CompareConfig, cell: str, done: dict[str, dict]) -> tuple[float, bool]:
    """(a cell's expected wall seconds, whether measured): the mean of its arm's finished cells
    (`done`: the cell files), else rough_seconds x the mean ratio of the finished cells' wall
    seconds to their rough estimates (1 without any)."""
    arm = parse_cell_id(cell)[0]
    same = [_wall(c) for c in done.values() if c["arm"] == arm]
    if same:
        return sum(same) / len(same), True
    ratios = [_wall(c) / rough_seconds(cfg, key) for key, c in done.items() if key in cfg.order()]
    return rough_seconds(cfg, cell) * (sum(ratios) / len(ratios) if ratios else 1.0), False


def plan_items(cfg: CompareConfig) -> tuple[list[Item], int]:
    """(what a sitting would run next, in order, with estimates; the number of cells done)."""
    from promptkd.config import Config

    results = Path(cfg.results)
    done = read_cells(results)
    items = [Item(f"prepare {name}", _train_seconds(Config.from_dict(cfg.stage_config(name, "unused"))) / 60,
                  False, stage=True)
             for name in cfg.prepare if not (results / "prepare" / f"{name}.json").is_file()]
    arms = {a.name: a for a in cfg.arm_list()}
    for cell in cfg.order():
        if cell not in done:
            seconds, measured = estimate_seconds(cfg, cell, done)
            arm, seed = parse_cell_id(cell)
            items.append(Item(cell, seconds / 60, measured, cfg.needs(arms[arm], seed)))
    return items, len([c for c in cfg.order() if c in done])


def sittings(items: list[Item], max_minutes: float | None, workers: int = 1) -> list[list[tuple[Item, float]]]:
    """The items split into sittings: lists of (item, start minute)."""
    out: list[list[tuple[Item, float]]] = [[]]
    free, ends = [0.0] * workers, {}
    for item in items:
        while True:
            worker = min(range(workers), key=free.__getitem__)
            start = max(free) if item.stage else max([free[worker]] + [ends[n] for n in item.needs if n in ends])
            if item.stage or max_minutes is None or not out[-1] or start + item.minutes <= max_minutes:
                break
            out.append([])
            free, ends = [0.0] * workers, {}
        end = start + item.minutes
        if item.stage:
            free = [end] * workers
        free[worker] = end
        ends[item.name] = end
        out[-1].append((item, start))
    return [s for s in out if s]


def plan_text(cfg: CompareConfig, max_minutes: float | None, workers: int = 1) -> str:
    """The plan, as `promptkd compare --plan` prints it."""
    items, num_done = plan_items(cfg)
    limit = f"sittings of at most {max_minutes:g} min" if max_minutes else "one sitting (no --max-minutes)"
    lines = [f"{cfg.name}: {len(items)} to run ({sum(not i.stage for i in items)} cells, "
             f"{sum(i.stage for i in items)} prepare stages), {num_done} cells done; {workers} worker(s), {limit}."]
    named = [name for name, dataset in cfg.evaluation.sets().items() if not Path(dataset).expanduser().is_file()]
    if named:
        lines.append(f"Rough estimates leave out the evaluation of {', '.join(named)}: not a local file.")
    total = 0.0
    for k, sitting in enumerate(sittings(items, max_minutes, workers), start=1):
        length = max(start + item.minutes for item, start in sitting)
        total += length
        lines += ["", f"sitting {k}: about {length:.0f} min"]
        for item, start in sitting:
            note = "" if max_minutes is None or item.minutes <= max_minutes else "  longer than a sitting: never starts"
            lines.append(f"  +{start:5.0f} min  {item.name:<32} {item.minutes:6.1f} min "
                         f"{'(measured)' if item.measured else '(rough)'}{note}")
    work = sum(i.minutes for i in items)
    lines += ["", f"total: {work / 60:.1f} h of cell and stage time; {total / 60:.1f} h of sittings.",
              "measured: the mean of the arm's finished cells; rough: seconds per step, SeqKD prompt and evaluation "
              "prompt measured in the cpu2 study (promptkd.compare.plan.ROUGH), scaled by the finished cells' "
              "measured / rough ratio."]
    return "\n".join(lines)


def _wall(cell: dict) -> float:
    return sum(cell["seconds"].values())


def _examples(train) -> int:
    t = train.train
    return t.max_steps * t.batch_size * t.gradient_accumulation_steps


def _train_seconds(train) -> float:
    per_step = ROUGH["step"].get(train.method, ROUGH["step"]["promptkd"])  # a registered method: PromptKD's
    return per_step * _examples(train) / 4


def _tokens(max_new_tokens: int) -> float:
    return max_new_tokens / 48


def _eval_prompts(cfg: CompareConfig) -> int:
    """Prompts per evaluation seed over the sets that are local files (a named set counts 0)."""
    total = 0
    for dataset in cfg.evaluation.sets().values():
        path = Path(dataset).expanduser()
        n = sum(1 for line in path.open(encoding="utf-8") if line.strip()) if path.is_file() else 0
        total += min(n, cfg.evaluation.limit) if cfg.evaluation.limit else n
    return total
