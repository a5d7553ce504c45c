"""Command line: `python -m dpkd_lib train --params FILE [--set key=value ...] [--force]`
and `python -m dpkd_lib eval --model DIR --params FILE [--set ...]`.

User errors (bad params, missing files, mismatched tokenisers, no network) print one line
naming the problem and exit 2; a numerical fault during training exits 3.
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
    train.add_argument("--force", action="store_true", default=os.environ.get("FORCE") == "1",
                       help="replace a finished run with different params (old files moved aside)")
    train.add_argument("--no-progress", action="store_true")
    ev = sub.add_parser("eval", help="evaluate a saved model on the params' eval splits")
    ev.add_argument("--params", required=True)
    ev.add_argument("--model", required=True, help="folder of a saved model (a run's model/)")
    ev.add_argument("--out", required=True, help="folder for eval.jsonl and eval_summary.json")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .config import ConfigError, load_config
    from .errors import USER_ERRORS
    try:
        cfg = load_config(args.params, args.set)
        if args.command == "train":
            from .train import train
            summary = train(cfg, force=args.force, progress=not args.no_progress)
            print(f"finished: {cfg.output_dir}  " + "  ".join(
                f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float))[:600])
        else:
            from .evaluate import evaluate_saved
            summary = evaluate_saved(cfg, args.model, args.out, progress=not args.no_progress)
            print(f"evaluated {args.model}: " + "  ".join(
                f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float))[:600])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (*USER_ERRORS, ValueError, OSError) as err:
        if os.environ.get("DPKD_DEBUG") == "1":
            raise
        print(f"error: {err.__class__.__name__}: {err}  (DPKD_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - numerical faults get their own exit code
        from .train import TrainingFault
        if isinstance(err, TrainingFault):
            print(f"error: {err}", file=sys.stderr)
            return 3
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
