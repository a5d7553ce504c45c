"""The study driver: execute the notebooks in order with papermill, for one profile.

    python -m dpkd_lib.study --profile cpu [--force] [--only 01] [--results-root DIR]

The notebooks in ``notebooks/`` are the source (edit them in JupyterLab). Each has a
``parameters`` cell holding only what a user sets: ``profile``, ``results_root`` (default
``results/<profile>``) and ``force``; the driver injects exactly these three. Everything
else a notebook needs comes from one place, ``params/<profile>/NN_name.yaml``, which the
notebook reads itself (`notebook_setup`), so a notebook opened by hand and the batch run
read the same values. ``results_root`` is passed relative to the repo root, the notebooks
run with the repo root as their working directory, and warnings print without file paths:
executed copies carry no absolute path of the machine that ran them.

The executed copy is written to ``<results_root>/notebooks/NN_name.ipynb`` atomically:
papermill writes ``.NN_name.<pid>.running.ipynb`` and only a notebook that finished is
renamed into place. A failed one is kept as ``NN_name.failed.ipynb`` (with the traceback in
its cells) and the driver exits non-zero naming the notebook and the cell. A params file
holding only ``skip: <reason>`` leaves that notebook out of the profile.

One driver per results root: it holds ``<results_root>/.study.lock`` (an OS lock, as a run
folder's, rundir.py) while it runs; a second one exits 2 in one line naming the holder (pid,
host, since). Holding it, the driver removes the temporary notebooks of dead drivers.
SIGINT and SIGTERM end it alike: the signal is passed to the running kernel (a training run
there saves a checkpoint and stops), the notebook is recorded ``interrupted`` in
status.json, its temporary copy removed, and the driver exits 130 with one line (a second
signal stops it at once).

Reuse: ``<results_root>/notebooks/status.json`` records, per notebook, a fingerprint of its
code cells, its resolved params and its upstream notebooks' executions, the wall time and
when it finished, and the code fingerprint of dpkd_lib (rundir.code_fingerprint). A
notebook whose fingerprint is unchanged and whose executed copy exists is skipped unless
``--force``; when dpkd_lib changed since, one line says so and it is still reused
(``--strict-code`` refuses instead; the training runs inside say the same for their runs). A notebook's upstream is listed in its metadata
(``metadata.dpkd.upstream``; default: every earlier notebook), and each execution gets a
fresh token, so re-running 01 re-runs 04, which reads its results, but not 00.
``--force`` is also passed to the notebooks, which pass it on to the training runs.

Progress: the notebooks use ``tqdm.auto``. The driver sets ``DPKD_BATCH=1`` in the kernel's
environment; `notebook_setup` then switches ``tqdm.auto`` to the plain text bar, so
papermill's log shows text bars, while the same notebook in JupyterLab shows widgets.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, RunBusy, StudyError

REPO_ROOT = Path(__file__).resolve().parent.parent
OFFLINE_PROFILES = ("smoke", "cpu", "cpu_full")
INJECTED = ("profile", "results_root", "force")
STATUS_FILE = "status.json"
LOCK_FILE = ".study.lock"
#: a driver's temporary copy of a running notebook: .NN_name.<pid>.running.ipynb (older
#: drivers: .NN_name.running.ipynb)
_RUNNING = re.compile(r"^\.(?P<stem>.+?)\.(?:(?P<pid>\d+)\.)?running\.ipynb$")


# ----------------------------------------------------------------------------- notebook side

def find_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The repo root: `start` (default the working directory) or the first parent holding
    ``dpkd_lib`` (a notebook opened in JupyterLab runs in ``notebooks/``)."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dpkd_lib").is_dir() and (folder / "params").is_dir():
            return folder
    return REPO_ROOT


def _short_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line without the file's path (executed notebooks are committed)."""
    return f"{category.__name__}: {message}\n"


def notebook_setup(profile: str, stem: str, results_root: str | None = None) -> dict:
    """First call of every notebook: cwd = the repo root, text progress bars under papermill,
    warnings without file paths, and the notebook's params from
    ``params/<profile>/<stem>.yaml`` (with its ``extends`` chain). Returns the params, plus
    ``results_root`` (default ``results/<profile>``, relative to the repo root)."""
    import warnings
    root = find_repo_root()
    os.chdir(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    warnings.formatwarning = _short_warning
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging
    disable_progress_bars()            # weight loading / shard writing bars: noise in a notebook
    hf_logging.disable_progress_bar()
    if os.environ.get("DPKD_BATCH") == "1":
        # tqdm.auto picks the widget bar inside any kernel; under papermill nobody sees
        # widgets, so bind the text bar before any dpkd_lib module imports tqdm.auto.
        import tqdm.auto
        import tqdm.std
        tqdm.auto.tqdm = tqdm.std.tqdm
    _path_check_switches()
    params = load_params(Path("params"), profile, stem)
    if "skip" in params:
        raise SystemExit(f"profile {profile!r} skips this notebook: {params['skip']}")
    params["results_root"] = results_root or f"results/{profile}"
    print(f"profile {profile!r}: params/{profile}/{stem}.yaml, results in {params['results_root']}")
    return params


def _path_check_switches() -> None:
    """Two environment switches for checking a GPU profile's notebooks on a CPU with no
    network (tests/test_notebooks.py): ``DPKD_STANDINS="depth,width"`` builds every hub id as
    a random stand-in of its architecture scaled down by those factors (dpkd_lib/standins.py),
    and ``DPKD_CHECK_OVERRIDES`` shrinks every run (runs.py). Both are announced."""
    from .runs import CHECK_OVERRIDES_ENV, check_overrides
    scale = os.environ.get("DPKD_STANDINS")
    if scale:
        from . import hub, standins
        try:
            depth, width = (int(x) for x in scale.split(","))
        except ValueError:
            raise StudyError(f"DPKD_STANDINS={scale!r}: give two integers, depth,width (e.g. 24,64)") from None
        hub.set_substitute(standins.StandIns(depth, width, device="cpu"))
        print(f"DPKD_STANDINS={scale}: hub ids are random stand-ins (depth / {depth}, width / {width})")
    shrink = check_overrides()
    if shrink:
        print(f"{CHECK_OVERRIDES_ENV}: every run also gets {' '.join(shrink)}")


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
    """A notebook's params (``extends`` merged). A missing file or a YAML error is a one-line
    ConfigError naming the file (and the line)."""
    from .config import load_yaml
    path = Path(params_dir) / profile / f"{stem}.yaml"
    if not path.exists():
        have = sorted(p.name for p in (Path(params_dir) / profile).glob("*.yaml")) \
            if (Path(params_dir) / profile).is_dir() else []
        raise ConfigError(
            f"no params file {path} for notebook {stem} in profile '{profile}' "
            f"(every notebook needs params/<profile>/<notebook>.yaml; "
            f"{'found: ' + ', '.join(have) if have else 'that profile folder has no yaml files'})")
    data = load_yaml(path)
    clash = [k for k in data if k in INJECTED]
    if clash:
        raise ConfigError(f"{path}: {', '.join(clash)} are set by the driver, remove them")
    if "skip" in data and (set(data) != {"skip"} or not isinstance(data["skip"], str)
                           or not data["skip"].strip()):
        raise ConfigError(f"{path}: 'skip' takes the reason as a string and stands alone "
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


def _relative_paths(path: Path, repo: Path, final: Path) -> None:
    """Papermill records the input and output paths in the notebook's metadata: store them
    relative to the repo root (an executed copy is committed; it names no machine's paths)."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if meta.get(key):
            p = Path(meta[key]).resolve()
            if key == "output_path":   # the final name, not the temporary one
                p = final.resolve()
            meta[key] = str(p.relative_to(repo)) if p.is_relative_to(repo) else p.name
    nbformat.write(nb, path)


def remove_stale_running(out_dir: Path) -> list[str]:
    """Temporary notebooks of drivers that died (called holding the results root's lock:
    a name without a pid is an older driver's)."""
    from .rundir import _alive
    removed = []
    for path in Path(out_dir).glob(".*running.ipynb"):
        found = _RUNNING.match(path.name)
        if found and (found.group("pid") is None or
                      (int(found.group("pid")) != os.getpid() and not _alive(int(found.group("pid"))))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _kernels() -> list[int]:
    """Our child processes (the kernel papermill started; it runs in its own session, so a
    Ctrl-C in the terminal does not reach it). Read from /proc: elsewhere none are found and
    a signal stops the driver at once."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            children.append(int(stat.parent.name))
    return children


@contextlib.contextmanager
def _stop_requests():
    """SIGINT and SIGTERM alike: the first is passed on to the kernel as SIGINT (its cell
    stops as after a Ctrl-C in JupyterLab: a training run saves a checkpoint and records
    `interrupted`) and papermill ends with that cell's error; without a kernel, or on a
    second signal, KeyboardInterrupt at once. Yields {"signal": name or None}."""
    asked: dict = {"signal": None}

    def handler(signum, frame):
        first = asked["signal"] is None
        asked["signal"] = signal.Signals(signum).name
        kernels = _kernels() if first else []
        for pid in kernels:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGINT)
        if not kernels:
            raise KeyboardInterrupt(asked["signal"])

    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield asked
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_study(profile: str, *, force: bool = False, only: str | None = None,
              results_root: str | os.PathLike | None = None,
              notebooks_dir: str | os.PathLike | None = None,
              params_dir: str | os.PathLike | None = None,
              kernel: str = "python3", log_output: bool = True) -> dict:
    """Execute the study's notebooks for `profile`; returns the status dict.

    Raises StudyError naming the notebook and cell when one fails, RunBusy when another
    driver holds the results root, KeyboardInterrupt (one line) on SIGINT / SIGTERM.
    `params_dir` is read for the checks before anything runs (the notebooks read
    ``params/`` of the repo).
    """
    from .rundir import lock_file

    root = Path(results_root or REPO_ROOT / "results" / profile).resolve()
    root.mkdir(parents=True, exist_ok=True)
    shown_root = str(root.relative_to(REPO_ROOT)) if root.is_relative_to(REPO_ROOT) else str(root)
    fd = lock_file(root / LOCK_FILE, f"results root {shown_root} (a study driver)", detail=True)
    try:
        with _stop_requests() as asked:
            return _run_study(profile, force=force, only=only, root=root, notebooks_dir=notebooks_dir,
                              params_dir=params_dir, kernel=kernel, log_output=log_output, asked=asked)
    finally:
        os.close(fd)  # releases the lock


def _run_study(profile: str, *, force: bool, only: str | None, root: Path, notebooks_dir, params_dir,
               kernel: str, log_output: bool, asked: dict) -> dict:
    import papermill as pm

    from .rundir import code_change, code_fingerprint
    repo = REPO_ROOT
    notebooks_dir = Path(notebooks_dir or repo / "notebooks")
    params_dir = Path(params_dir or repo / "params")
    # relative to the repo root when inside it: executed copies carry no machine's paths
    shown_root = str(root.relative_to(repo)) if root.is_relative_to(repo) else str(root)
    out_dir = root / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_running(out_dir)
    if stale:
        print(f"[study] removed temporary notebooks of a driver that died: {', '.join(stale)}", flush=True)

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

    from .rundir import machine
    status = read_status(out_dir)
    status.setdefault("notebooks", {})
    status["profile"] = profile
    status["machine"] = machine()
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
            nb_params = {"profile": profile, "results_root": shown_root, "force": bool(force)}
            fingerprint = _digest({"source": source_digest, "params": params[stem],
                                   "results_root": str(root),
                                   "upstream": {u: executed.get(u) for u in upstream}})
            final = out_dir / f"{stem}.ipynb"
            failed = out_dir / f"{stem}.failed.ipynb"
            entry = status["notebooks"].get(stem, {})
            if (not force and entry.get("status") == "finished"
                    and entry.get("fingerprint") == fingerprint and final.exists()):
                note = code_change(entry.get("code"), f"notebook {stem}")  # ConfigError under --strict-code
                print(f"[study] {stem}: unchanged, reused ({entry.get('wall_s', 0):.0f} s when run)",
                      flush=True)
                if note:
                    print(f"[study] {note}", flush=True)
                timings.append((stem, entry.get("wall_s", 0.0), "reused"))
                continue
            running = out_dir / f".{stem}.{os.getpid()}.running.ipynb"  # this driver's own
            print(f"[study] {stem}: executing with {params_dir / profile / (stem + '.yaml')}",
                  flush=True)
            started = time.time()
            entry = {"status": "running", "fingerprint": fingerprint, "upstream": upstream,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code_fingerprint(),
                     "params_file": str(params_dir / profile / f"{stem}.yaml")}
            status["notebooks"][stem] = entry
            write_status(out_dir, status)
            try:
                pm.execute_notebook(str(nb_path), str(running), parameters=nb_params,
                                    kernel_name=kernel, cwd=str(repo), log_output=log_output,
                                    progress_bar=False, request_save_on_cell_execute=True)
            except BaseException as err:  # noqa: BLE001 - keep the failed copy, then re-raise
                wall = time.time() - started
                if isinstance(err, KeyboardInterrupt) or asked["signal"]:
                    running.unlink(missing_ok=True)  # only this driver's temporary copy
                    entry.update(status="interrupted", wall_s=round(wall, 1),
                                 interrupted=time.strftime("%Y-%m-%dT%H:%M:%S"))
                    with contextlib.suppress(OSError):  # a full disk: the interrupt's line comes first
                        write_status(out_dir, status)
                    raise KeyboardInterrupt(f"interrupted ({asked['signal'] or 'SIGINT'}) in notebook {stem}; "
                                            f"rerun the same command to go on (finished notebooks are "
                                            f"reused, training runs resume)") from None
                if running.exists():
                    os.replace(running, failed)
                entry.update(status="failed", wall_s=wall, error=_failed_cell(err))
                write_status(out_dir, status)
                raise StudyError(f"notebook {stem} failed in {_failed_cell(err)}\n"
                                 f"  executed copy with the traceback: {failed}") from err
            _relative_paths(running, repo, final)
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
    parser.add_argument("--profile", default="cpu", help="params/<profile>/ (smoke, cpu, paper, colab)")
    parser.add_argument("--force", action="store_true",
                        help="re-execute every notebook and recompute every run")
    parser.add_argument("--only", default=None, help="one notebook: stem or prefix, e.g. 03")
    parser.add_argument("--results-root", default=None, help="default results/<profile>")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3 = this venv)")
    parser.add_argument("--quiet", action="store_true", help="do not stream cell outputs")
    parser.add_argument("--strict-code", action="store_true",
                        help="refuse to reuse notebooks and runs made by other dpkd_lib code "
                             "(default: say so and reuse)")
    args = parser.parse_args(argv)
    if args.strict_code:  # read by rundir.code_change, here and in the kernels (inherited)
        from .rundir import STRICT_CODE_ENV
        os.environ[STRICT_CODE_ENV] = "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("papermill.translators", "traitlets", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run_study(args.profile, force=args.force, only=args.only, results_root=args.results_root,
                  kernel=args.kernel, log_output=not args.quiet)
    except (ConfigError, RunBusy) as err:  # a params error (the file and the line), a busy root
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StudyError as err:  # a notebook failed: its copy with the traceback is kept
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a read-only or full results root: one line
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        message = str(err) if str(err).startswith("interrupted") else \
            f"interrupted ({err or 'SIGINT'}); rerun the same command to go on (finished notebooks are reused)"
        print(f"stopped: {message}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
