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
    p.add_argument("--workers", type=int, default=2, help="evaluation processes (one seed each)")
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

    cfg = yaml.safe_load((fp32_run / "config.yaml").read_text())
    cfg["train"]["mixed_precision"] = "bf16"
    bf16_run = fp32_run.with_name(fp32_run.name + "-bf16")
    stages = reproduce.Stages(cache)
    stages.run("train in bf16", bf16_run.name, (bf16_run / "final" / "student" / "config.json").is_file(),
               lambda: reproduce.train_stage(cfg, str(bf16_run)))

    from promptkd.evaluation.runner import EvalJob, summarize

    raw = json.loads(fp32_scores_file.read_text())
    seeds = sorted({int(s) for v in raw["scores"].values() for s in v})
    jobs = []
    for seed in seeds:
        job = EvalJob(model=str(bf16_run / "final" / "student"), out=str(bf16_run / "eval" / f"seed{seed}"),
                      datasets=reproduce.EVAL_SETS, data_dir=str(reproduce.REPO.parent / "shared" / "data"),
                      seeds=[seed], batch_size=16, max_new_tokens=fp32_meta.get("max_new_tokens", 48),
                      max_prompt_length=fp32_meta.get("max_prompt_length", 256), limit=0, show_progress=False)
        done = (Path(job.out) / "scores.json").is_file()
        jobs.append((f"eval bf16 seed {seed}", f"{bf16_run.name}-{seed}", done, reproduce.eval_stage, (job,)))
    stages.run_parallel("evaluation (bf16 run)", jobs, args.workers, 1)
    bf16_raw: dict[str, dict[int, float]] = {}
    for seed in seeds:
        part = json.loads((bf16_run / "eval" / f"seed{seed}" / "scores.json").read_text())["scores"]
        for k, v in part.items():
            bf16_raw.setdefault(k, {}).update({int(a): b for a, b in v.items()})
    rows = {"float32 (reproduction)": summarize({k: {int(a): b for a, b in v.items()} for k, v in raw["scores"].items()}),
            "bf16 autocast": summarize(bf16_raw)}

    def dev_loss(run: Path) -> float:
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return [r["dev/loss"] for r in recs if "dev/loss" in r][-1]

    def step_time(run: Path) -> float:
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        times = sorted(r["step_time"] for r in recs if "step_time" in r)
        return times[len(times) // 2]

    sets = reproduce.EVAL_SETS
    lines = [f"# bf16 autocast vs float32: a whole {args.label} run ({time.strftime('%Y-%m-%d')})", "",
             "Command: `python benchmarks/bf16_quality.py " + " ".join(sys.argv[1:]) + "`", "",
             f"Run: {fp32_run.name} (float32) retrained with train.mixed_precision bf16, all else equal; "
             f"evaluated with the reproduction's settings: seeds {seeds}, "
             f"{fp32_meta.get('max_new_tokens')} new tokens, full sets.", "",
             "| run | " + " | ".join(sets) + " | average | dev token loss | median s/step |",
             "|---" * (len(sets) + 4) + "|"]
    for (label, s), run in zip(rows.items(), (fp32_run, bf16_run), strict=True):
        cells = [f"{s[x]['mean']:.2f} ± {s[x]['std']:.2f}" for x in sets + ["average"]]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {dev_loss(run):.3f} | {step_time(run):.2f} |")
    gap = rows["bf16 autocast"]["average"]["mean"] - rows["float32 (reproduction)"]["average"]["mean"]
    spread = rows["bf16 autocast"]["average"]["std"] + rows["float32 (reproduction)"]["average"]["std"]
    lines += ["", f"bf16 - float32 average ROUGE-L: {gap:+.2f}; seed spread (sum of stds) {spread:.2f}: "
              + ("the difference exceeds the spread." if abs(gap) > spread else "within the spread."),
              "One training run per precision: once the students differ their samples differ, so this gap "
              "mixes the effect of bf16 with run-to-run variation of on-policy training, which one run "
              "cannot separate (several training seeds per precision would).",
              "Step times: the float32 run shared the two cores with another training process (reproduce.py "
              "runs two at once, one thread each); the bf16 run ran alone with torch's default threads. They "
              "are not a speed comparison (bench_step.py is).", "",
              f"Wall time of this command: {time.perf_counter() - t0:.0f} s (stages cached from an earlier "
              "invocation count 0 here; see the log)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
