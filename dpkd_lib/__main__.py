"""Command line: `python -m dpkd_lib train --params FILE [--set key=value ...] [--unset key ...] [--force]`
and `python -m dpkd_lib eval --model DIR --params FILE --out DIR [--set ...] [--unset ...]`.

`--unset key` gives a key back its default, as if the params file never set it: how a
profile's setting is removed when a `--set` switches the data source, objective or loss
type that it belongs to (`--set data.source=jsonl --set data.path=F --unset data.n_train`).

User errors (bad params, missing or corrupt files, mismatched tokenisers, no network, a run
folder in use) print one line naming the problem and exit 2; a numerical fault during
training exits 3; an interrupt (Ctrl-C, SIGTERM) exits 130 saying how to resume.
"""
from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpkd_lib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume, or reuse) one run")
    train.add_argument("--params", required=True, help="YAML params file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param, dotted keys: --set train.lr=1e-4")
    train.add_argument("--unset", action="append", default=[], metavar="KEY",
                       help="give a param its default (drop it from the params file): --unset data.n_train")
    train.add_argument("--force", action="store_true", default=os.environ.get("FORCE") == "1",
                       help="replace a run with different params (old files moved aside)")
    train.add_argument("--strict-code", action="store_true",
                       help="refuse to reuse a finished run made by other dpkd_lib code (default: say so, reuse)")
    train.add_argument("--no-progress", action="store_true")
    ev = sub.add_parser("eval", help="evaluate a saved model on the params' eval splits")
    ev.add_argument("--params", required=True, help="params file (a run's params.yaml will do)")
    ev.add_argument("--model", required=True, help="folder of a saved model (a run's model/)")
    ev.add_argument("--out", required=True, help="folder for eval.jsonl and eval_summary.json")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--unset", action="append", default=[], metavar="KEY")
    ev.add_argument("--no-progress", action="store_true")
    return parser


def _numbers(summary: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float))[:600]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .config import load_config
    from .errors import USER_ERRORS, TrainingFault, out_of_resources
    if getattr(args, "strict_code", False):
        from .rundir import STRICT_CODE_ENV
        os.environ[STRICT_CODE_ENV] = "1"
    try:
        if args.command == "train":
            from .train import train
            cfg = load_config(args.params, args.set, unset=args.unset)
            summary = train(cfg, force=args.force, progress=not args.no_progress)
            print(f"finished: {cfg.output_dir}  {_numbers(summary)}")
        else:
            from .evaluate import evaluate_saved
            cfg = load_config(args.params, args.set, purpose="eval", unset=args.unset)
            summary = evaluate_saved(cfg, args.model, args.out, progress=not args.no_progress)
            print(f"evaluated {args.model}: {_numbers(summary)}")
    except TrainingFault as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as err:
        print(f"stopped: {err or 'interrupted'}", file=sys.stderr)
        return 130
    except (*USER_ERRORS, ValueError, OSError, MemoryError, RuntimeError) as err:
        if os.environ.get("DPKD_DEBUG") == "1":
            raise
        if isinstance(err, (MemoryError, RuntimeError)) and not isinstance(err, USER_ERRORS):
            err = out_of_resources(err, args.command, "nothing was changed", "rerun the same command")
            if err is None:  # not memory or disk: a bug, with its traceback
                raise
        if type(err).__name__ in ("ConfigError", "OutOfResources"):
            print(f"error: {err}", file=sys.stderr)
        else:
            print(f"error: {type(err).__name__}: {err}  (DPKD_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
