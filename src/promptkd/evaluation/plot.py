"""`promptkd plot`: one PNG of a run's metrics.jsonl.

    promptkd plot runs/promptkd-x                  # writes runs/promptkd-x/metrics.png
    promptkd plot runs/promptkd-x --out drift.png

Panels over optimizer steps: the losses (every `*/loss` key and the eval losses), the learning
rates (`*/lr`), trained tokens per second and, for a PromptKD run, the two distances of the
prompted teacher: KL(p_TP || p_S) (`prompt/kl_to_student`, what L_kd drives down) and
KL(p_TP || p_T) (`prompt/drift`, away from the real teacher). Where the drift line crosses
above kl_to_student the prompted teacher imitates the student (docs/method.md, section 5).
That panel also marks the step at which the run warned of collapse (`promptkd.collapse_window`,
from the run's config.yaml). Its scale is logarithmic when the two distances are far apart.
"""

from __future__ import annotations

import json
from pathlib import Path

from promptkd.config import PlotConfig
from promptkd.errors import UserError, require_extra

DISTANCES = {"prompt/kl_to_student": "KL(p_TP || p_S)  kl_to_student", "prompt/drift": "KL(p_TP || p_T)  drift",
             # runs logged before the two names existed: the same quantities (reg only while lambda > 0)
             "prompt/kd": "KL(p_TP || p_S)  (prompt/kd)", "prompt/reg": "KL(p_TP || p_T)  (prompt/reg, lambda > 0 only)"}


DISTANCES_TITLE = "PromptKD: prompted teacher's distances"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl. Raises UserError for a missing, empty or bad file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: not a directory (give a promptkd run directory, train.output_dir)")
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl there (is it a promptkd run directory that has logged a step?)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    if not records:
        raise UserError(f"{path}: no step records in it (the run has not logged a step yet)")
    return records


def read_promptkd_settings(run_dir: str | Path) -> dict:
    """`collapse_window` of the PromptKD run in RUN_DIR (its config.yaml); {} when the file is
    missing, unreadable or of another method: the plot then has no collapse mark."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(cfg, dict) or cfg.get("method") != "promptkd" or not isinstance(cfg.get("promptkd"), dict):
        return {}
    window = cfg["promptkd"].get("collapse_window")
    return {} if window is None else {"collapse_window": window}


def distance_marks(records: list[dict], settings: dict) -> dict:
    """What the distances panel marks besides the two curves: `warned`, the step at which the run
    warned of collapse (the trainer's rule with the run's collapse_window; None if it did not)."""
    from promptkd.methods.promptkd import collapse_warning_step

    points = [(r["step"], r["prompt/kl_to_student"], r["prompt/drift"]) for r in records
              if isinstance(r.get("prompt/kl_to_student"), (int, float)) and isinstance(r.get("prompt/drift"), (int, float))]
    window = settings.get("collapse_window", 0)
    return {"warned": collapse_warning_step(points, window) if window else None}


def _wide_range(values: list[float], ratio: float = 20.0) -> bool:
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > ratio


def plot_metrics(records: list[dict], out: str | Path, settings: dict | None = None) -> Path:
    """Write the panels of `records` (metrics.jsonl rows) to the PNG `out`; returns its path.
    `settings`: the run's PromptKD collapse_window (read_promptkd_settings), for the distances
    panel's collapse mark."""
    matplotlib = require_extra("matplotlib", "plot", "promptkd plot")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))})
    panels = [
        ("losses", [k for k in keys if k.endswith("loss")], "loss"),
        ("learning rates", [k for k in keys if k.endswith("/lr")], "lr"),
        ("throughput", [k for k in ("trained_tokens_per_s",) if k in keys], "tokens / s"),
    ]
    distances = [k for k in ("prompt/kl_to_student", "prompt/drift") if k in keys] or [
        k for k in ("prompt/kd", "prompt/reg") if k in keys]
    if distances:
        panels.append((DISTANCES_TITLE, distances, "KL (nats / token)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, panel_keys, ylabel) in zip(axes[:, 0], panels, strict=True):
        for k in panel_keys:
            points = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=DISTANCES.get(k, k),
                    marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        values = [r[k] for k in panel_keys for r in records if isinstance(r.get(k), (int, float))]
        if ylabel == "lr" and _wide_range(values):
            ax.set_yscale("log")  # a student LR next to a much larger prompt LR
        if title == DISTANCES_TITLE:
            _mark_distances(ax, distance_marks(records, settings or {}), _wide_range(values))
        elif panel_keys:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def _mark_distances(ax, marks: dict, log_scale: bool) -> None:
    if log_scale:
        ax.set_yscale("log")  # a drift of 0.05 beside a KL to the student of 1.5
    if marks["warned"] is not None:
        ax.axvline(marks["warned"], color="red", linestyle="--", linewidth=1,
                   label=f"collapse warning (step {marks['warned']})")
    ax.legend(fontsize="x-small", loc="center right", bbox_to_anchor=(1.0, 0.62), ncol=2, framealpha=0.85)


def run_plot(cfg: PlotConfig) -> Path:
    """`promptkd plot`: RUN_DIR/metrics.jsonl -> cfg.out (default RUN_DIR/metrics.png)."""
    cfg.validate()
    records = read_metrics(cfg.run_dir)
    return plot_metrics(records, cfg.out or Path(cfg.run_dir) / "metrics.png", read_promptkd_settings(cfg.run_dir))
