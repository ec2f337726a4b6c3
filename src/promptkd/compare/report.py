"""The report of a study: RESULTS/report.md and PNGs beside it, from RESULTS/cells/*.json alone.

No model, run directory or torch is needed (`promptkd compare --report-only` on a machine with
only the committed results), and the same cells give a byte-identical report.md.
"""

from __future__ import annotations

import collections
import json
import math
import os
from pathlib import Path

from promptkd.compare.config import CompareConfig, cell_id
from promptkd.compare.stats import compare, describe_interval, mean_interval
from promptkd.data.eval_sets import set_deviations
from promptkd.errors import UserError, require_extra

COMPUTE = [("generated tokens", "generated"), ("trained tokens", "trained_tokens"),
           ("student fwd tokens", "compute/student_forward_tokens"),
           ("student bwd tokens", "compute/student_backward_tokens"),
           ("teacher fwd tokens", "compute/teacher_forward_tokens"),
           ("teacher bwd tokens", "compute/teacher_backward_tokens"), ("FLOPs", "compute/flops")]
GENERATION = "compute/teacher_generation_"  # a SeqKD cell's generation of its training data (compare.seqkd)
ADDED = {"generated": "generated_tokens", "compute/teacher_forward_tokens": "forward_tokens",
         "compute/flops": "flops"}  # COMPUTE columns to which that generation's counts are added


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and os.replace: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_cells(results: Path) -> dict[str, dict]:
    """{cell id: cell record} of RESULTS/cells/*.json."""
    cells = {}
    for path in sorted((results / "cells").glob("*.json")):
        try:
            cells[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{path}: not a cell file ({e}); delete it to re-run the cell") from None
    return cells


def build_report(cfg: CompareConfig) -> Path:
    """Write RESULTS/report.md and its plots from the cell files; returns report.md's path."""
    results = Path(cfg.results)
    all_cells = read_cells(results)
    arms = cfg.arm_list()
    planned = [cell_id(a.name, s) for s in cfg.seeds for a in arms]
    cells = {k: all_cells[k] for k in planned if k in all_cells}
    by_arm = {a.name: [c for c in cells.values() if c["arm"] == a.name] for a in arms}
    scores = {arm: {c["seed"]: c["score"] for c in cs} for arm, cs in by_arm.items()}
    comparisons = compare(scores, cfg.pairs(), alpha=cfg.alpha, margin=cfg.margin)
    hashes = {cell_id(a.name, s): cfg.cell_hash(a, s) for a in arms for s in cfg.seeds}
    stale = [k for k, c in cells.items() if c.get("cell_hash") != hashes[k]]

    def mark(c: dict) -> str:
        key = cell_id(c["arm"], c["seed"])
        return ("†" if c.get("revision_mismatch") else "") + ("‡" if key in stale else "")

    study_file = results / "study.json"
    study = json.loads(study_file.read_text(encoding="utf-8")) if study_file.is_file() else {}
    lines = [f"# Study: {cfg.name}", ""]
    lines += _setup(cfg, study, cells, len(planned))
    lines += _arms(cfg, by_arm, mark)
    lines += _compute(cfg, by_arm)
    lines += _comparisons(cfg, comparisons)
    lines += _traces(by_arm)
    lines += _exposure(cfg, by_arm)
    lines += _plot_links(_plots(results, cfg, by_arm, comparisons))
    missing = [k for k in planned if k not in cells]
    lines += ["## Missing cells", "", ", ".join(missing) if missing else "None: every planned cell has its file.", ""]
    lines += _integrity(cfg, study, cells, stale, sorted(set(all_cells) - set(planned)))
    path = results / "report.md"
    write_text(path, "\n".join(lines).rstrip("\n") + "\n")
    return path


# ----------------------------------------------------------------------------- sections


def _setup(cfg: CompareConfig, study: dict, cells: dict, planned: int) -> list[str]:
    model, data = cfg.base.get("model", {}), cfg.base.get("data", {})
    shared = {k: v for k, v in flat(cfg.base).items() if not k.startswith(("model.", "data."))}
    e = cfg.evaluation
    # the sets from the config too: cells from before the sets were listed lack that line
    deviations = list(dict.fromkeys([*set_deviations(e.sets()),
                                     *(d for c in cells.values() for d in c.get("eval_deviations", []))]))
    versions = sorted({", ".join(f"{k} {v}" for k, v in c["versions"].items()) for c in cells.values()})
    machines = collections.Counter(c.get("machine", "not recorded") for c in cells.values())
    return [
        "## Setup", "",
        f"- Revision: {study.get('revision', 'not recorded yet')} (promptkd {study.get('promptkd', '?')}); "
        f"config hash {cfg.config_hash()}.",
    ] + ([f"- Note (study.json): {study['note']}"] if study.get("note") else []) + [
        f"- Teacher: `{model.get('teacher')}`; student init: `{model.get('student')}`; training data: "
        f"`{data.get('train')}`.",
        "- Shared training settings: " + (", ".join(f"`{k}` {v}" for k, v in shared.items()) or "the defaults") + ".",
        f"- Training seeds: {', '.join(map(str, cfg.seeds))}; {len(cells)} of {planned} cells done.",
        f"- Evaluation: {', '.join(e.sets())}; evaluation seeds {', '.join(map(str, e.seeds))}; up to "
        f"{e.max_new_tokens} new tokens; {e.limit or 'all'} prompts per set.",
        "- Deviations from the evaluation protocol: " + ("; ".join(deviations) if deviations else "none") + ".",
        "- Versions: " + ("; ".join(versions) if versions else "no cells yet") + ".",
    ] + ([] if set(machines) <= {"not recorded"} else [  # (cells from before machines were recorded)
        "- Machines: " + "; ".join(f"{m} ({n} cell{'s' * (n != 1)})" for m, n in machines.most_common())
        + (". Wall minutes compare only between cells of one machine." if len(machines) > 1 else "."),
    ]) + [_stage(cfg, name) for name in cfg.prepare] + [""]


def _stage(cfg: CompareConfig, name: str) -> str:
    """One prepare stage (`prepare:NAME`), from RESULTS/prepare/NAME.json."""
    settings = ", ".join(f"`{k}` {v}" for k, v in flat(cfg.prepare[name]).items())
    path = Path(cfg.results) / "prepare" / f"{name}.json"
    if not path.is_file():
        return f"- Prepare stage `{name}` ({settings}): not run yet."
    r = json.loads(path.read_text(encoding="utf-8"))
    return (f"- Prepare stage `{name}` ({settings}): revision {r['revision']}, {r['seconds'] / 60:.1f} min"
            + (f" on {r['machine']}" if r.get("machine") else "") + ", "
            f"{_big(r['compute'].get('compute/flops'))} FLOPs; output sha256 {r['sha256']}.")


def _arms(cfg: CompareConfig, by_arm: dict[str, list[dict]], mark) -> list[str]:
    sets = list(cfg.evaluation.sets())
    pct = f"{100 * (1 - cfg.alpha):g}%"
    lines = ["## Arms", "",
             f"| arm | method, overrides | n | score [{pct} CI] | " + " | ".join(sets) + " | train min | eval min |",
             "|---" * (6 + len(sets)) + "|"]
    for arm in cfg.arm_list():
        cs = by_arm[arm.name]
        settings = ", ".join([arm.method] + [f"{k} {v}" for k, v in flat(arm.overrides).items()]
                             + ([f"FLOPs of {arm.budget.flops_of}"] if arm.budget.flops_of else []))
        if cs:
            mean, low, high = mean_interval([c["score"] for c in cs], cfg.alpha)
            score = f"{mean:.2f} [{_num(low)}, {_num(high)}]"
        else:
            score = "no cells"
        per_set = [_num(_mean([c["sets"][s]["mean"] for c in cs])) for s in sets]
        minutes = [_num(_mean([m for c in cs if (m := _stage_minutes(c, k)) is not None]), 1)
                   for k in ("train", "eval")]
        lines.append(f"| {arm.name} | {settings} | {len(cs)} | {score} | " + " | ".join(per_set + minutes) + " |")
    lines += ["", "Score: ROUGE-L averaged over the sets, each set's mean over its prompts and evaluation seeds. "
              f"The interval is the {pct} Student t-interval of the mean over training seeds (n - 1 df), not "
              "adjusted for multiplicity. Set columns and minutes are means over the arm's cells (minutes: those "
              "that recorded them); a SeqKD "
              "arm's train minutes include its teacher generation.", "",
              "Score per training seed († another code revision, ‡ another training config: see Integrity):", "",
              "| arm | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " |", "|---" * (1 + len(cfg.seeds)) + "|"]
    for arm, cs in by_arm.items():
        got = {c["seed"]: f"{c['score']:.2f}{mark(c)}" for c in cs}
        lines.append(f"| {arm} | " + " | ".join(got.get(s, "–") for s in cfg.seeds) + " |")
    return lines + [""]


def _compute(cfg: CompareConfig, by_arm: dict[str, list[dict]]) -> list[str]:
    references = list(dict.fromkeys(a.budget.flops_of for a in cfg.arm_list() if a.budget.flops_of))
    lines = ["## Compute (mean per cell)", "",
             "| arm | steps | " + " | ".join([name for name, _ in COMPUTE] + [f"FLOPs / {r}" for r in references]) + " |",
             "|---" * (2 + len(COMPUTE) + len(references)) + "|"]
    for arm, cs in by_arm.items():
        values = [_big(_mean([v for c in cs if (v := _compute_value(c, key)) is not None])) for _, key in COMPUTE]
        for ref in references:
            ref_flops = {c["seed"]: cell_flops(c) for c in by_arm[ref]}
            ratios = [cell_flops(c) / ref_flops[c["seed"]] for c in cs
                      if cell_flops(c) is not None and ref_flops.get(c["seed"])]
            values.append(_num(_mean(ratios), 3))
        steps = _mean([c["train_config"]["train"]["max_steps"] for c in cs if "train_config" in c])
        lines.append(f"| {arm} | {_num(steps, 0)} | " + " | ".join(values) + " |")
    note = ("Token counts and FLOPs come from the runs' metrics.jsonl (trained tokens: summed over the logged steps; "
            "the rest: the run's totals); n/a where the runs did not log them. A SeqKD arm's teacher generation of its "
            "training responses is added in: its generated tokens, its teacher forward token-passes (prompt + "
            "generated) and their FLOPs (2 N_teacher per token-pass).")
    if references:
        note += (" FLOPs / REF: the mean over seeds of a cell's FLOPs over those of REF's cell of the same seed; an arm "
                 "with a FLOPs budget (" + ", ".join(f"{a.name}: FLOPs of {a.budget.flops_of}, per step from "
                 f"{a.budget.per_step_from}" for a in cfg.arm_list() if a.budget.flops_of) + ") trains round(F_REF / "
                 "f) steps, so its ratio is 1 up to that rounding and to how far its FLOPs per step differ from f.")
    return lines + ["", note, ""]


def _comparisons(cfg: CompareConfig, comparisons) -> list[str]:
    pct = f"{100 * (1 - cfg.alpha):g}%"
    tost = cfg.margin is not None
    lines = ["## Comparisons", "",
             f"| arm − baseline | n | per-seed differences | mean | {pct} CI | p | Holm p |"
             + (" TOST p (Holm) |" if tost else "") + " verdict |",
             "|---" * (8 + tost) + "|"]
    for c in comparisons:
        diffs = ", ".join(f"s{s} {d:+.2f}" for s, d in zip(c.seeds, c.differences, strict=True)) or "–"
        verdict = "unresolved (n < 2)" if len(c.seeds) < 2 else c.verdict
        lines.append(f"| {c.arm} − {c.baseline} | {len(c.seeds)} | {diffs} | {_num(c.mean, sign=True)} | "
                     f"[{_num(c.ci[0], sign=True)}, {_num(c.ci[1], sign=True)}] | {_p(c.p)} | {_p(c.p_holm)} |"
                     + (f" {_p(c.p_equivalence_holm)} |" if tost else "") + f" {verdict} |")
    ns = sorted({len(c.seeds) for c in comparisons if len(c.seeds) >= 2})
    lines += [""] + [f"CI: {describe_interval(cfg.alpha, n)}" + (f" (rows with n = {n})." if len(ns) > 1 else ".")
                     for n in ns]
    lines += ["", f"p: two-sided paired t-test over training seeds (scipy.stats.ttest_rel) of the cell scores; the "
              f"training seed is the replicated unit, and pairing by seed cancels what the arms share. Holm p: "
              f"adjusted (Holm) over the report's {sum(not math.isnan(c.p) for c in comparisons)} tested comparison(s) "
              f"(a row with n < 2 or with every difference 0 has no test). An arm is called better or "
              f"worse when its Holm p < {cfg.alpha:g}.", ""]
    if tost:
        lines.append(f"\"equivalent\": only from TOST (two one-sided t-tests) against the declared margin ±{cfg.margin:g} "
                     f"ROUGE-L points, Holm-adjusted over the report's equivalence tests, when that p < {cfg.alpha:g}.")
    else:
        lines.append("No equivalence margin is declared (margin: null), so no pair is called equivalent: "
                     "\"unresolved\" says the seeds do not tell the arms apart, not that the arms are equal.")
    return lines + [""]


def _traces(by_arm: dict[str, list[dict]]) -> list[str]:
    drift = [(c["arm"], c["seed"], c["traces"]) for cs in by_arm.values() for c in cs
             if "prompt/drift" in c.get("traces", {})]
    phi = [(c["arm"], c["seed"], c["traces"]) for cs in by_arm.values() for c in cs
           if "distillm/student_prob" in c.get("traces", {})]
    if not drift and not phi:
        return []
    lines = ["## Method traces", ""]
    if drift:
        lines += ["PromptKD: the prompted teacher's drift KL(p_TP ‖ p_T) and its distance to the student "
                  "KL(p_TP ‖ p_S), token means per step.", "",
                  "| arm | seed | drift, last step | drift, max | KL to student, last step |", "|---|---|---|---|---|"]
        for arm, seed, t in sorted(drift, key=lambda x: (x[0], x[1])):
            values = [v for _, v in t["prompt/drift"]]
            kl = t.get("prompt/kl_to_student")
            kl_last = f"{kl[-1][1]:.4g}" if kl else "n/a"
            lines.append(f"| {arm} | {seed} | {values[-1]:.4g} | {max(values):.4g} | {kl_last} |")
        lines.append("")
    if phi:
        lines += ["DistiLLM: the probability phi of a step on student-generated data, and how many logged steps "
                  "took each data source.", "", "| arm | seed | phi, last step | phi, max | steps per source |",
                  "|---|---|---|---|---|"]
        for arm, seed, t in sorted(phi, key=lambda x: (x[0], x[1])):
            values = [v for _, v in t["distillm/student_prob"]]
            steps = ", ".join(f"{k} {n}" for k, n in t.get("distillm/source_steps", {}).items())
            lines.append(f"| {arm} | {seed} | {values[-1]:.4g} | {max(values):.4g} | {steps or 'n/a'} |")
        lines.append("")
    return lines


def _exaccerr_curves(cells: list[dict]) -> list[list[float]]:
    """The finite ExAccErr curves of these cells (a curve with a non-finite point is left out)."""
    curves = [c["exposure_bias"]["exaccerr"] for c in cells if c.get("exposure_bias")]
    return [v for v in curves if all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)]


def _exposure(cfg: CompareConfig, by_arm: dict[str, list[dict]]) -> list[str]:
    rows = []
    for arm, cells in by_arm.items():
        curves = _exaccerr_curves(cells)
        if not curves:
            continue
        length = min(len(v) for v in curves)
        points = sorted({max(1, length // 4), max(1, length // 2), length})
        cols = []
        for n in points:
            mean, low, high = mean_interval([v[n - 1] for v in curves], cfg.alpha)
            cols.append(f"{mean:.1f} [{_num(low, 1)}, {_num(high, 1)}]")
        rows.append((arm, len(curves), points, cols))
    if not rows:
        return []
    e = cfg.evaluation
    points = rows[0][2]
    lines = ["## Exposure bias", "",
             f"ExAccErr(l) in percent of each cell's student against its teacher (`promptkd exposure-bias`): the first "
             f"{e.exposure_bias_prompts} prompts of the first evaluation set, {e.exposure_bias_samples} samples per "
             "prompt and model. Mean over training seeds with its "
             f"{100 * (1 - cfg.alpha):g}% t-interval (n - 1 df, not adjusted for multiplicity); lower is better.", "",
             "| arm | n | " + " | ".join(f"l = {n}" for n in points) + " |", "|---|---|" + "---|" * len(points)]
    lines += [f"| {arm} | {n} | " + " | ".join(cols) + " |" for arm, n, _, cols in rows]
    return lines + [""]


def _integrity(cfg: CompareConfig, study: dict, cells: dict, stale: list[str], other: list[str]) -> list[str]:
    moved = [f"{k} ({c.get('revision')})" for k, c in cells.items() if c.get("revision_mismatch")]
    lines = ["## Integrity", "",
             f"- Study revision: {study.get('revision', 'not recorded yet')} (results/study.json). Cells from "
             "another revision or with uncommitted changes (a sitting runs them only with --allow-revision), "
             "marked †: " + (", ".join(moved) if moved else "none") + ".",
             "- Cells whose training config differs from what the study config gives now, marked ‡: "
             + (", ".join(stale) if stale else "none") + "."]
    if study.get("config_hash") and study["config_hash"] != cfg.config_hash():
        lines.append(f"- The study config changed since the first cell (hash {study['config_hash']} then, "
                     f"{cfg.config_hash()} now).")
    if other:
        lines.append("- Cell files of arms or seeds not in the config (not reported): " + ", ".join(other) + ".")
    return lines + [""]


# ----------------------------------------------------------------------------- plots


def _plots(results: Path, cfg: CompareConfig, by_arm: dict[str, list[dict]], comparisons) -> dict[str, str] | str:
    """{title: file name} of the PNGs written, or the reason there are none."""
    if not any(by_arm.values()):
        return "no cells yet"
    try:
        matplotlib = require_extra("matplotlib", "plot", "the plots of promptkd compare")
    except UserError as e:
        return str(e)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    shown = [c for c in comparisons if c.seeds]
    if shown:
        fig, ax = plt.subplots(figsize=(9, 0.6 * len(shown) + 1.5))
        for y, c in enumerate(reversed(shown)):
            ax.plot(c.differences, [y] * len(c.differences), "o", color="tab:blue", alpha=0.7)
            if not math.isnan(c.ci[0]):
                ax.plot(c.ci, [y, y], "-", color="black", linewidth=2)
            ax.plot([c.mean], [y], "|", color="black", markersize=14)
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(shown)), [f"{c.arm} − {c.baseline}" for c in reversed(shown)])
        ax.set_xlabel(f"score difference per training seed (ROUGE-L); bar: {100 * (1 - cfg.alpha):g}% t-interval")
        out["Paired differences"] = _save(fig, results / "paired_differences.png")
    fig, ax = plt.subplots(figsize=(1.2 * len(by_arm) + 2, 4))
    for x, cs in enumerate(by_arm.values()):
        ax.plot([x] * len(cs), [c["score"] for c in cs], "o", alpha=0.7)
        for c in cs:
            ax.annotate(str(c["seed"]), (x, c["score"]), textcoords="offset points", xytext=(6, -3), fontsize="x-small")
    ax.set_xticks(range(len(by_arm)), list(by_arm), rotation=30, ha="right")
    ax.set_ylabel("score (ROUGE-L, mean over sets)")
    out["Scores by training seed"] = _save(fig, results / "scores.png")
    points = score_against_compute(by_arm, cfg.alpha)
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        arms = list(by_arm)
        for arm, flops, (mean, low, high), cells in points:
            color = f"C{arms.index(arm) % 10}"  # as in scores.png
            ax.plot([f for f, _ in cells], [s for _, s in cells], ".", color=color, alpha=0.4)
            error = None if math.isnan(low) else [[mean - low], [high - mean]]
            ax.errorbar([flops], [mean], yerr=error, fmt="o", color=color, capsize=3, label=f"{arm} (n = {len(cells)})")
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs per cell (training; SeqKD: with its teacher generation)")
        ax.set_ylabel(f"score (ROUGE-L); bar: {100 * (1 - cfg.alpha):g}% t-interval")
        ax.legend(fontsize="x-small")
        out["Score against compute"] = _save(fig, results / "score_vs_flops.png")
    curves = [(c["arm"], c["seed"], c["traces"]["prompt/drift"]) for cs in by_arm.values() for c in cs
              if "prompt/drift" in c.get("traces", {})]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        colors: dict[str, str] = {}  # one colour per arm, one line per seed
        for arm, _, points in curves:
            ax.plot([p[0] for p in points], [p[1] for p in points], color=colors.setdefault(arm, f"C{len(colors) % 10}"),
                    linewidth=1, alpha=0.7, label=None if arm in ax.get_legend_handles_labels()[1] else arm)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("drift KL(p_TP || p_T), one line per seed")
        ax.legend(fontsize="x-small")
        out["PromptKD drift"] = _save(fig, results / "drift.png")
    exposure = {arm: _exaccerr_curves(cs) for arm, cs in by_arm.items()}
    if any(exposure.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, curves in exposure.items():
            if not curves:
                continue
            length = min(len(v) for v in curves)
            bands = [mean_interval([v[i] for v in curves], cfg.alpha) for i in range(length)]
            steps = list(range(1, length + 1))
            line, = ax.plot(steps, [b[0] for b in bands], label=f"{arm} (n = {len(curves)})")
            if len(curves) > 1:
                ax.fill_between(steps, [b[1] for b in bands], [b[2] for b in bands], color=line.get_color(), alpha=0.2)
        ax.axhline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("response length l")
        ax.set_ylabel(f"ExAccErr(l) %; band: {100 * (1 - cfg.alpha):g}% t-interval over seeds")
        ax.legend(fontsize="x-small")
        out["Exposure bias"] = _save(fig, results / "exposure_bias.png")
    return out


def score_against_compute(by_arm: dict[str, list[dict]], alpha: float) -> list[tuple]:
    """[(arm, mean FLOPs per cell, (mean score, low, high), [(FLOPs, score) per cell])] over the cells
    that logged their FLOPs (the interval: Student t over those cells, NaN below 2); arms without any
    are left out."""
    points = []
    for arm, cs in by_arm.items():
        cells = [(flops, c["score"]) for c in cs if (flops := cell_flops(c)) is not None]
        if cells:
            points.append((arm, _mean([f for f, _ in cells]), mean_interval([s for _, s in cells], alpha), cells))
    return points


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path.name


def _plot_links(plots: dict[str, str] | str) -> list[str]:
    if isinstance(plots, str):
        return ["## Plots", "", f"None: {plots}.", ""]
    return ["## Plots", ""] + [f"![{title}]({name})" for title, name in plots.items()] + [""]


# ----------------------------------------------------------------------------- formatting


def flat(d: dict, prefix: str = "") -> dict:
    """A nested mapping as {dotted key: leaf}."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _compute_value(cell: dict, key: str):
    if key == "generated":
        value = cell["compute"].get("compute/generated_tokens", cell.get("generated_tokens"))
    else:
        value = cell.get(key) if key in cell else cell["compute"].get(key)
    added = cell["compute"].get(GENERATION + ADDED.get(key, ""))
    return value + added if value is not None and added is not None else value


def _stage_minutes(cell: dict, stage: str) -> float | None:
    """A SeqKD cell's generation of its training data counts as training; None when the stage's
    time was not recorded (two cpu2 cells lost their evaluation's)."""
    seconds = cell["seconds"]
    if stage not in seconds:
        return None
    return (seconds[stage] + (seconds.get("generation", 0.0) if stage == "train" else 0.0)) / 60


def cell_flops(cell: dict) -> float | None:
    """A cell's FLOPs: its training's, plus its teacher generation's (SeqKD); None when not logged."""
    return _compute_value(cell, "compute/flops")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _num(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _big(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}" if x < 1e9 else f"{x:.3g}"


def _p(p: float | None) -> str:
    return "n/a" if p is None or math.isnan(p) else f"{p:.3g}"
