"""`promptkd plot`: one PNG of a run's metrics.jsonl.

    promptkd plot runs/promptkd-x                  # writes runs/promptkd-x/metrics.png
    promptkd plot runs/promptkd-x --out drift.png

Panels over optimizer steps: the losses (every `*/loss` key and the eval losses), the learning
rates (`*/lr`), trained tokens per second and, for a PromptKD run, the two distances of the
prompted teacher: KL(p_TP || p_S) (`prompt/kl_to_student`, what L_kd drives down) and
KL(p_TP || p_T) (`prompt/drift`, away from the real teacher). Where the drift line crosses
above kl_to_student the prompted teacher imitates the student (docs/method.md, section 5).
"""

from __future__ import annotations

import json
from pathlib import Path

from promptkd.config import PlotConfig
from promptkd.errors import UserError

DISTANCES = {"prompt/kl_to_student": "KL(p_TP || p_S)  kl_to_student", "prompt/drift": "KL(p_TP || p_T)  drift",
             # runs logged before the two names existed: the same quantities (reg only while lambda > 0)
             "prompt/kd": "KL(p_TP || p_S)  (prompt/kd)", "prompt/reg": "KL(p_TP || p_T)  (prompt/reg, lambda > 0 only)"}


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


def plot_metrics(records: list[dict], out: str | Path) -> Path:
    """Write the panels of `records` (metrics.jsonl rows) to the PNG `out`; returns its path."""
    import matplotlib

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
        panels.append(("PromptKD: prompted teacher's distances", distances, "KL (nats / token)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, panel_keys, ylabel) in zip(axes[:, 0], panels, strict=True):
        for k in panel_keys:
            points = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=DISTANCES.get(k, k),
                    marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        values = [r[k] for k in panel_keys for r in records if isinstance(r.get(k), (int, float))]
        positive = [v for v in values if v > 0]
        if ylabel == "lr" and positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")  # a student LR next to a much larger prompt LR
        if panel_keys:
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


def run_plot(cfg: PlotConfig) -> Path:
    """`promptkd plot`: RUN_DIR/metrics.jsonl -> cfg.out (default RUN_DIR/metrics.png)."""
    cfg.validate()
    records = read_metrics(cfg.run_dir)
    return plot_metrics(records, cfg.out or Path(cfg.run_dir) / "metrics.png")
