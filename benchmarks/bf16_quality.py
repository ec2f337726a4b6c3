"""Quality effect of bf16 autocast on a whole PromptKD run (issue 4, point 2).

Retrains the CPU reproduction's PromptKD run (benchmarks/reproduce.py --scale cpu) with
train.mixed_precision bf16 and nothing else changed (same init, data order, seed, steps), then
evaluates it with the reproduction's protocol settings and prints both rows side by side:

    python benchmarks/reproduce.py --scale cpu        # first: the float32 run and its scores
    python benchmarks/bf16_quality.py --out benchmarks/results/bf16_quality_<yyyymmdd>.md

The float32 row is read from the reproduction's cache (its evaluation of the same run); the
bf16 run and its evaluation are cached next to it. Sampling differs between the two runs as
soon as the students differ, so the comparison is of end results, not of step-by-step losses
(bench_step.py --bf16-check does that).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import reproduce  # noqa: E402  (sibling script: stage helpers and the eval settings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=str(Path("~/.cache/promptkd/reproduce/cpu").expanduser()))
    p.add_argument("--label", default="PromptKD", help="which reproduction row to retrain in bf16")
    p.add_argument("--workers", type=int, default=2, help="evaluation processes (one eval seed of one run each)")
    p.add_argument("--train-seeds", default=None,
                   help="training seeds to compare at, comma-separated (default: the reproduction's); each other "
                        "seed trains a float32 and a bf16 run")
    p.add_argument("--out", default=None, help="also write the report here (Markdown)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cache = Path(args.cache_dir)
    slug = args.label.lower().replace(" ", "").replace("(", "-").replace(")", "").replace(".", "")
    runs = sorted(d for d in (cache / "runs").glob(f"{slug}-*")
                  if re.fullmatch(rf"{re.escape(slug)}-[0-9a-f]{{10}}", d.name) and (d / "final" / "student").is_dir())
    if not runs:
        raise SystemExit(f"bf16_quality: no finished run {slug}-* under {cache / 'runs'}; run reproduce.py first")
    fp32_run = runs[0]
    evals = sorted((cache / "eval").glob(f"{fp32_run.name}-*/scores.json"))
    if not evals:
        raise SystemExit(f"bf16_quality: no evaluation of {fp32_run.name} under {cache / 'eval'}")
    fp32_scores_file = evals[0]
    fp32_meta = json.loads(next(fp32_scores_file.parent.glob("predictions_*.meta.json")).read_text())

    import yaml

    from promptkd.evaluation.runner import summarize

    base_cfg = yaml.safe_load((fp32_run / "config.yaml").read_text())
    orig_seed = int(base_cfg["train"]["seed"])
    train_seeds = [int(x) for x in args.train_seeds.split(",")] if args.train_seeds else [orig_seed]
    raw = json.loads(fp32_scores_file.read_text())
    eval_seeds = sorted({int(s) for v in raw["scores"].values() for s in v})
    stages = reproduce.Stages(cache)

    # (precision, training seed) -> run directory; the reproduction's own run is reused as is
    runs_by_key: dict[tuple[str, int], Path] = {}
    train_jobs = []
    for seed in train_seeds:
        for precision in ("no", "bf16"):
            if seed == orig_seed and precision == "no":
                runs_by_key[(precision, seed)] = fp32_run
                continue
            name = fp32_run.name + ("-bf16" if seed == orig_seed else f"-seed{seed}-{precision}")
            run_dir = fp32_run.with_name(name)
            cfg = json.loads(json.dumps(base_cfg))
            cfg["train"]["mixed_precision"] = precision
            cfg["train"]["seed"] = seed
            train_jobs.append((f"train {precision}, seed {seed}", name,
                               (run_dir / "final" / "student" / "config.json").is_file(),
                               reproduce.train_stage, (cfg, str(run_dir))))
            runs_by_key[(precision, seed)] = run_dir
    # worker processes: accelerate allows one mixed-precision setting per process
    stages.run_parallel("training", train_jobs, max(2, args.workers), 1)

    jobs = []
    for (precision, seed), run_dir in runs_by_key.items():
        if run_dir == fp32_run:
            continue
        for eseed in eval_seeds:
            job = reproduce.eval_config(str(run_dir / "final" / "student"), str(run_dir / "eval" / f"seed{eseed}"), dict(
                datasets=reproduce.EVAL_SETS, data_dir=str(reproduce.REPO.parent / "shared" / "data"), seeds=[eseed],
                batch_size=16, max_new_tokens=fp32_meta.get("sampling", fp32_meta).get("max_new_tokens", 48),
                max_prompt_length=fp32_meta.get("max_prompt_length", 256), limit=None))
            done = (Path(job.out) / "scores.json").is_file()
            jobs.append((f"eval {precision} train seed {seed}, eval seed {eseed}", f"{run_dir.name}-{eseed}", done,
                         reproduce.eval_stage, (job,)))
    stages.run_parallel("evaluation", jobs, args.workers, 1)

    def scores_of(run_dir: Path) -> dict[str, dict[int, float]]:
        if run_dir == fp32_run:
            return {k: {int(a): b for a, b in v.items()} for k, v in raw["scores"].items()}
        out: dict[str, dict[int, float]] = {}
        for eseed in eval_seeds:
            part = json.loads((run_dir / "eval" / f"seed{eseed}" / "scores.json").read_text())["scores"]
            for k, v in part.items():
                out.setdefault(k, {}).update({int(a): b for a, b in v.items()})
        return out

    def metric_records(run: Path) -> list[dict]:
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]

    def dev_loss(run: Path) -> float:
        return [r["dev/loss"] for r in metric_records(run) if "dev/loss" in r][-1]

    def step_time(run: Path) -> float:
        times = sorted(r["step_time"] for r in metric_records(run) if "step_time" in r)
        return times[len(times) // 2]

    sets = reproduce.EVAL_SETS
    lines = [f"# bf16 autocast vs float32: whole {args.label} runs ({time.strftime('%Y-%m-%d')})", "",
             "Command: `python benchmarks/bf16_quality.py " + " ".join(sys.argv[1:]) + "`", "",
             f"Runs: the reproduction's {fp32_run.name} config, trained with train.mixed_precision no / bf16 and "
             f"training seeds {train_seeds} (the seed sets the data order and the on-policy samples), all else "
             f"equal; evaluated with the reproduction's settings: eval seeds {eval_seeds}, "
             f"{fp32_meta.get('max_new_tokens')} new tokens, full sets.", "",
             "| precision | train seed | " + " | ".join(sets) + " | average | dev token loss | median s/step |",
             "|---" * (len(sets) + 5) + "|"]
    averages: dict[str, list[float]] = {"no": [], "bf16": []}
    for (precision, seed), run_dir in sorted(runs_by_key.items(), key=lambda kv: (kv[0][1], kv[0][0] != "no")):
        summ = summarize(scores_of(run_dir))
        averages[precision].append(summ["average"]["mean"])
        cells = [f"{summ[x]['mean']:.2f} ± {summ[x]['std']:.2f}" for x in sets + ["average"]]
        label = "float32" if precision == "no" else "bf16"
        lines.append(f"| {label} | {seed} | " + " | ".join(cells)
                     + f" | {dev_loss(run_dir):.3f} | {step_time(run_dir):.2f} |")
    lines.append("")
    for seed in train_seeds:
        a = [summarize(scores_of(runs_by_key[(p, seed)]))["average"]["mean"] for p in ("no", "bf16")]
        lines.append(f"- train seed {seed}: bf16 - float32 = {a[1] - a[0]:+.2f} average ROUGE-L")
    if len(train_seeds) > 1:
        spread = {p: max(v) - min(v) for p, v in averages.items()}
        lines.append(f"- between training seeds, same precision: float32 averages differ by {spread['no']:.2f}, "
                     f"bf16 by {spread['bf16']:.2f} (run-to-run variation of on-policy training)")
    lines += ["",
              "Step times are not a speed comparison (bench_step.py is): the reproduction's float32 run shared "
              "the two cores with another training process (one thread each); the runs made here ran alone "
              "with torch's default threads.", "",
              f"Wall time of this command: {time.perf_counter() - t0:.0f} s (stages cached from an earlier "
              "invocation count 0 here; see the log)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
