"""The study driver: execute the notebooks in order with papermill, one params file each.

    python -m dpkd_lib.study --profile cpu [--force] [--only 01] [--results-root DIR]

For every notebook ``notebooks/NN_name.ipynb`` (in name order) the parameters come from
``params/<profile>/NN_name.yaml``, plus five the driver always injects: ``profile``,
``results_root`` (default ``results/<profile>``), ``repo_root``, ``force`` and
``from_driver`` (True; a notebook run by hand with another profile than cpu loads its
params file itself). The executed
copy is written to ``<results_root>/notebooks/NN_name.ipynb`` atomically: papermill writes
``.NN_name.running.ipynb`` and only a notebook that finished is renamed into place. A
failed one is kept as ``NN_name.failed.ipynb`` (with the traceback in its cells) and the
driver exits non-zero naming the notebook and the cell.

A params file holding only ``skip: <reason>`` leaves that notebook out of the profile (the
driver says so and records it as skipped).

Reuse: ``<results_root>/notebooks/status.json`` records, per notebook, a fingerprint of
its source, its parameters and its upstream notebooks' executions, the wall time and when
it finished. A notebook whose fingerprint is unchanged and whose executed copy exists is
skipped unless ``--force``. A notebook's upstream is listed in its metadata
(``metadata.dpkd.upstream``; default: every earlier notebook), and each execution gets a
fresh token, so re-running 01 re-runs 04, which reads its results, but not 00.
``--force`` is also passed to the notebooks, which pass it on to the training runs.

Progress: the notebooks use ``tqdm.auto``. The driver sets ``DPKD_BATCH=1`` in the kernel's
environment; ``setup_notebook()`` (the first call in every notebook) then switches
``tqdm.auto`` to the plain text bar, so papermill's log shows text bars, while the same
notebook opened in JupyterLab shows widgets.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from .errors import StudyError

REPO_ROOT = Path(__file__).resolve().parent.parent
OFFLINE_PROFILES = ("smoke", "cpu", "cpu_long")
INJECTED = ("profile", "results_root", "repo_root", "force", "from_driver")
STATUS_FILE = "status.json"


# ----------------------------------------------------------------------------- notebook side

def setup_notebook(repo_root: str | os.PathLike | None = None, threads: int | None = None) -> Path:
    """First call of every notebook: cwd = repo root, text progress bars under papermill.

    Returns the repo root as an absolute path. Safe to call twice.
    """
    root = Path(repo_root or REPO_ROOT).resolve()
    os.chdir(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if os.environ.get("DPKD_BATCH") == "1":
        # tqdm.auto picks the widget bar inside any kernel; under papermill nobody sees
        # widgets, so bind the text bar before any dpkd_lib module imports tqdm.auto.
        import tqdm.auto
        import tqdm.std
        tqdm.auto.tqdm = tqdm.std.tqdm
    if threads:
        import torch
        torch.set_num_threads(int(threads))
    return root


def in_colab_or_kaggle() -> str | None:
    """'colab', 'kaggle' or None (the notebooks' first cell has its own copy of this test,
    because it runs before the repo is installed)."""
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return "colab"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "kaggle"
    return None


# ----------------------------------------------------------------------------- driver side

def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def list_notebooks(notebooks_dir: Path) -> list[Path]:
    found = sorted(p for p in Path(notebooks_dir).glob("*.ipynb")
                   if not p.name.startswith(".") and ".failed" not in p.name)
    if not found:
        raise StudyError(f"no notebooks in {notebooks_dir}")
    return found


def select(notebooks: list[Path], only: str | None) -> list[Path]:
    """Notebooks matching `only` (a stem, a file name or a prefix like '01')."""
    if not only:
        return notebooks
    wanted = [p for p in notebooks if only in (p.stem, p.name) or p.stem.startswith(only)]
    if not wanted:
        raise StudyError(f"--only {only!r} matches no notebook; have: "
                         f"{', '.join(p.stem for p in notebooks)}")
    return wanted


def load_params(params_dir: Path, profile: str, stem: str) -> dict:
    path = Path(params_dir) / profile / f"{stem}.yaml"
    if not path.exists():
        have = sorted(p.name for p in (Path(params_dir) / profile).glob("*.yaml")) \
            if (Path(params_dir) / profile).is_dir() else []
        raise StudyError(
            f"no params file {path} for notebook {stem} in profile '{profile}' "
            f"(every notebook needs params/<profile>/<notebook>.yaml; "
            f"{'found: ' + ', '.join(have) if have else 'that profile folder has no yaml files'})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise StudyError(f"{path}: expected a mapping of notebook parameters")
    clash = [k for k in data if k in INJECTED]
    if clash:
        raise StudyError(f"{path}: {', '.join(clash)} are set by the driver, remove them")
    if "skip" in data and (set(data) != {"skip"} or not isinstance(data["skip"], str)
                           or not data["skip"].strip()):
        raise StudyError(f"{path}: 'skip' takes the reason as a string and stands alone "
                         f"(a profile that skips a notebook gives it no parameters)")
    return data


def notebook_source_digest(path: Path) -> tuple[str, list[str] | None]:
    """Digest of the code cells (outputs and metadata ignored) and the declared upstream."""
    nb = json.loads(Path(path).read_text())
    code = ["".join(c.get("source", "")) for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    upstream = nb.get("metadata", {}).get("dpkd", {}).get("upstream")
    return _digest(code), upstream


def read_status(folder: Path) -> dict:
    try:
        return json.loads((folder / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(folder: Path, status: dict) -> None:
    from .io import write_json
    write_json(folder / STATUS_FILE, status)


def _failed_cell(err: Exception) -> str:
    index = getattr(err, "cell_index", None)
    count = getattr(err, "exec_count", None)
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    where = f"cell {index}" if index is not None else "an unknown cell"
    if count is not None:
        where += f" (execution count {count})"
    return f"{where}: {ename}: {str(evalue)[:500]}"


def run_study(profile: str, *, force: bool = False, only: str | None = None,
              results_root: str | os.PathLike | None = None,
              notebooks_dir: str | os.PathLike | None = None,
              params_dir: str | os.PathLike | None = None,
              kernel: str = "python3", log_output: bool = True,
              extra_params: dict | None = None) -> dict:
    """Execute the study's notebooks for `profile`; returns the status dict.

    Raises StudyError naming the notebook and cell when one fails.
    """
    import papermill as pm

    repo = REPO_ROOT
    notebooks_dir = Path(notebooks_dir or repo / "notebooks")
    params_dir = Path(params_dir or repo / "params")
    root = Path(results_root or repo / "results" / profile).resolve()
    out_dir = root / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)

    all_nbs = list_notebooks(notebooks_dir)
    chosen = select(all_nbs, only)
    # Check every params file before running anything: a typo costs a second, not an hour.
    params = {p.stem: load_params(params_dir, profile, p.stem) for p in chosen}

    env_before = dict(os.environ)
    os.environ["DPKD_BATCH"] = "1"
    os.environ.setdefault("TQDM_MININTERVAL", "10")  # read by tqdm at import: a line per 10 s
    # idle OpenMP threads sleep instead of spinning (a shared 2-core machine; see the Makefile)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if profile in OFFLINE_PROFILES:
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ[key] = "1"

    status = read_status(out_dir)
    status.setdefault("notebooks", {})
    status["profile"] = profile
    executed = {name: entry.get("token") for name, entry in status["notebooks"].items()}
    order = [p.stem for p in all_nbs]
    timings = []
    try:
        for nb_path in chosen:
            stem = nb_path.stem
            source_digest, upstream = notebook_source_digest(nb_path)
            if upstream is None:
                upstream = order[: order.index(stem)]
            if "skip" in params[stem]:  # e.g. a profile that studies one question only
                print(f"[study] {stem}: skipped in profile '{profile}' ({params[stem]['skip']})", flush=True)
                status["notebooks"][stem] = {"status": "skipped", "reason": params[stem]["skip"]}
                executed.pop(stem, None)
                timings.append((stem, 0.0, "skipped"))
                continue
            nb_params = dict(params[stem], **(extra_params or {}))
            nb_params.update(profile=profile, results_root=str(root), repo_root=str(repo),
                             force=bool(force), from_driver=True)
            fingerprint = _digest({"source": source_digest, "params": params[stem],
                                   "extra": extra_params or {}, "results_root": str(root),
                                   "upstream": {u: executed.get(u) for u in upstream}})
            final = out_dir / f"{stem}.ipynb"
            failed = out_dir / f"{stem}.failed.ipynb"
            entry = status["notebooks"].get(stem, {})
            if (not force and entry.get("status") == "finished"
                    and entry.get("fingerprint") == fingerprint and final.exists()):
                print(f"[study] {stem}: unchanged, reused ({entry.get('wall_s', 0):.0f} s when run)",
                      flush=True)
                timings.append((stem, entry.get("wall_s", 0.0), "reused"))
                continue
            running = out_dir / f".{stem}.running.ipynb"
            print(f"[study] {stem}: executing with {params_dir / profile / (stem + '.yaml')}",
                  flush=True)
            started = time.time()
            entry = {"status": "running", "fingerprint": fingerprint, "upstream": upstream,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "params_file": str(params_dir / profile / f"{stem}.yaml")}
            status["notebooks"][stem] = entry
            write_status(out_dir, status)
            try:
                pm.execute_notebook(str(nb_path), str(running), parameters=nb_params,
                                    kernel_name=kernel, cwd=str(repo), log_output=log_output,
                                    progress_bar=False, request_save_on_cell_execute=True)
            except BaseException as err:  # noqa: BLE001 - keep the failed copy, then re-raise
                wall = time.time() - started
                if running.exists():
                    os.replace(running, failed)
                entry.update(status="failed", wall_s=wall, error=_failed_cell(err))
                write_status(out_dir, status)
                if isinstance(err, KeyboardInterrupt):
                    raise
                raise StudyError(f"notebook {stem} failed in {_failed_cell(err)}\n"
                                 f"  executed copy with the traceback: {failed}") from err
            os.replace(running, final)
            if failed.exists():
                failed.unlink()
            wall = time.time() - started
            token = uuid.uuid4().hex[:12]
            executed[stem] = token
            entry.update(status="finished", wall_s=round(wall, 1), token=token,
                         finished=time.strftime("%Y-%m-%dT%H:%M:%S"), output=str(final))
            write_status(out_dir, status)
            timings.append((stem, wall, "executed"))
            print(f"[study] {stem}: finished in {wall:.0f} s -> {final}", flush=True)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    status["last_invocation"] = {"timings_s": {s: round(w, 1) for s, w, _ in timings},
                                 "executed": [s for s, _, how in timings if how == "executed"],
                                 "total_s": round(sum(w for s, w, how in timings if how == "executed"), 1)}
    write_status(out_dir, status)
    print("[study] wall time per notebook:")
    for stem, wall, how in timings:
        print(f"  {stem:<40} {wall:8.0f} s  {how}")
    print(f"  {'total (executed now)':<40} {status['last_invocation']['total_s']:8.0f} s", flush=True)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpkd_lib.study",
                                     description="Execute the study's notebooks with papermill.")
    parser.add_argument("--profile", default="cpu", help="params/<profile>/ (smoke, cpu, cpu_long, paper, colab)")
    parser.add_argument("--force", action="store_true",
                        help="re-execute every notebook and recompute every run")
    parser.add_argument("--only", default=None, help="one notebook: stem or prefix, e.g. 03")
    parser.add_argument("--results-root", default=None, help="default results/<profile>")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3 = this venv)")
    parser.add_argument("--quiet", action="store_true", help="do not stream cell outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("papermill.translators", "traitlets", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run_study(args.profile, force=args.force, only=args.only, results_root=args.results_root,
                  kernel=args.kernel, log_output=not args.quiet)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
