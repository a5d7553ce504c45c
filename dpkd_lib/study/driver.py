"""The study driver: execute the notebooks in order with papermill, for one profile.

    python -m dpkd_lib.study --profile cpu [--force] [--only 01] [--resume] [--results-root DIR]

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
environment; `notebook_setup` then silences every bar (each run prints one line instead), so
an executed copy holds no progress walls, while the same notebook in JupyterLab shows a live
bar.
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

from ..errors import ConfigError, RunBusy, StudyError
from ..signals import routed

REPO_ROOT = Path(__file__).resolve().parents[2]
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


class NotebookConfig:
    """What a notebook runs with, read by name: ``cfg.pair``, ``cfg.arms``, ``cfg.results_root``.
    The keys of ``params/<profile>/<stem>.yaml`` (``extends`` merged) are its attributes; a
    name the file lacks is a one-line AttributeError naming the file and the names it has.
    ``batch`` is true under the study driver (papermill): runs print one line each and no
    progress bar; ``progress`` is its opposite (a live bar in JupyterLab)."""

    def __init__(self, profile: str, stem: str, params: dict, results_root: str, batch: bool):
        self.profile, self.stem, self.params = profile, stem, params
        self.results_root, self.batch, self.progress = results_root, batch, not batch
        self.params_file = f"params/{profile}/{stem}.yaml"

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "params":
            raise AttributeError(name)
        try:
            return self.params[name]
        except KeyError:
            raise AttributeError(f"{self.params_file} has no {name!r} (it has: "
                                 f"{', '.join(sorted(self.params))})") from None

    def get(self, name: str, default=None):
        return self.params.get(name, default)

    def __getitem__(self, name: str):      # cfg["arms"] reads like cfg.arms
        return self.params[name] if name in self.params else getattr(self, name)

    def keys(self):
        return [*self.params, "results_root"]

    def __repr__(self) -> str:
        return f"NotebookConfig({self.params_file}, results in {self.results_root})"

    def runs_here(self) -> str:
        """One sentence: which pair on which data this notebook runs in this profile."""
        return runs_here(self.profile, self.stem, Path("params"))


def notebook_setup(profile: str, stem: str, results_root: str | None = None) -> NotebookConfig:
    """First call of every notebook: cwd = the repo root, quiet under papermill (no progress
    bars, library deprecation warnings off, warnings without file paths), and the notebook's
    params from ``params/<profile>/<stem>.yaml`` (with its ``extends`` chain), returned as a
    `NotebookConfig` (``results_root`` defaults to ``results/<profile>``, relative to the repo
    root). Prints one line: the profile, what this notebook runs there, where results go."""
    root = find_repo_root()
    os.chdir(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    batch = os.environ.get("DPKD_BATCH") == "1"
    _quiet_libraries(batch)
    _path_check_switches()
    params = load_params(Path("params"), profile, stem)
    if "skip" in params:
        raise SystemExit(f"profile {profile!r} skips this notebook: {params['skip']}")
    if "primary" in params:   # the declaration is checked before any run, not after two hours
        from .runs import check_pilot, check_primary, check_readouts
        check_primary(params["primary"])
        check_pilot(params.get("pilot") or {}, params.get("arms"))
        if params.get("arms") and params.get("base_params"):
            check_readouts(params["primary"], params["arms"], params["base_params"], params.get("pair"))
    cfg = NotebookConfig(profile, stem, params, results_root or f"results/{profile}", batch)
    print(f"profile {profile!r}: params/{profile}/{stem}.yaml, results in {cfg.results_root}. "
          f"{cfg.runs_here()}")
    return cfg


class _SilentBar:
    """Stands in for tqdm under papermill: nobody watches a bar there, and every refresh is
    an output line in the executed copy. Takes what tqdm takes, shows nothing."""

    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable, self.n = iterable, kwargs.get("initial", 0)

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):           # update, set_postfix, close, refresh, ...
        return lambda *a, **k: None

    @classmethod
    def write(cls, s, *args, **kwargs):
        print(s)


def _quiet_libraries(batch: bool) -> None:
    """Warnings as one line without a path; deprecation notices from the libraries (e.g.
    transformers' FutureWarnings) off: they are addressed to this code's maintainers, not to
    a reader. Hub and transformers bars off everywhere; under papermill every tqdm.auto bar
    (ours and the libraries') becomes `_SilentBar`, bound before any module imports it."""
    import warnings
    warnings.formatwarning = _short_warning
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging
    disable_progress_bars()            # weight loading / shard writing bars: noise in a notebook
    hf_logging.disable_progress_bar()
    if batch:
        hf_logging.set_verbosity_error()
        import tqdm
        import tqdm.auto
        tqdm.auto.tqdm = tqdm.tqdm = _SilentBar


MODEL_NAMES = {"smollm2": ("SmolLM2-135M-Instruct", 30)}


def describe_model(section: dict | None) -> str:
    """A model section of the params in a few words (for the notebooks' setup lines)."""
    from ..config import ModelConfig
    m = {k: v for k, v in ModelConfig().__dict__.items()} | dict(section or {})
    source = m["source"]
    if source == "tiny":
        text = f"a tiny random model ({m.get('n_layer', '?')} layers, width {m.get('n_embd', '?')})"
    elif source in MODEL_NAMES:
        name, layers = MODEL_NAMES[source]
        text = name + (f" cut to its first {m['prune_to']} of {layers} layers" if m.get("prune_to") else "")
    else:
        text = str(m.get("name_or_path", source))
    if m.get("prune_to") and source == "tiny":
        text += f", pruned to {m['prune_to']}"
    if m.get("lora"):
        text += f" + LoRA r{m['lora_r']}"
    if m.get("quantization") not in (None, "", "none"):
        text += f" ({m['quantization']})"
    return text


def _describe_role(how: dict) -> str:
    if "model" in how:
        return describe_model(how["model"])
    build = how.get("build", {})
    steps = build.get("train.max_steps")
    where = build.get("data.train_slice")
    return (describe_model(build.get("student")) + ", trained with SFT"
            + (f" for {steps} steps" if steps else "") + (f" on train[{where})" if where else ""))


def describe_data(base: dict) -> str:
    d = base.get("data", {}) or {}
    source = d.get("source", "synthetic")
    if source == "synthetic":
        sizes = ", ".join(f"{d[k]} {k[2:]}" for k in ("n_train", "n_test", "n_heldout") if k in d)
        return f"synthetic Dolly-format instructions ({sizes}; heldout: unseen templates)"
    if source == "dolly_hub":
        return "databricks-dolly-15k (MiniLLM's processing)"
    return f"{source} records ({d.get('path', '')})"


def describe_setup(profile: str, stem: str, params_dir: str | os.PathLike = "params") -> dict:
    """{teacher, student, data} of a notebook in a profile, in words, from its params (and
    notebook 01's pair where it reuses it); {} for a notebook that trains nothing."""
    from ..config import load_yaml
    params_dir = Path(params_dir)
    params = load_params(params_dir, profile, stem)
    if "skip" in params or "base_params" not in params:
        return {}
    base = load_yaml(params_dir.parent / params["base_params"])
    pair = params.get("pair")
    if pair is None and params.get("use_built_pair"):
        pair = load_params(params_dir, profile, "01_gpt2_120m").get("pair")
    if pair is None:
        roles = {role: dict(base.get(role) or {}) for role in ("teacher", "student")}
        for key, value in (params.get("common") or {}).items():   # e.g. 02's teacher.quantization
            role, _, field = key.partition(".")
            if role in roles and "." not in field:
                roles[role][field] = value
        pair = {role: {"model": section} for role, section in roles.items()}
    return {"teacher": _describe_role(pair["teacher"]), "student": _describe_role(pair["student"]),
            "data": describe_data(base)}


def runs_here(profile: str, stem: str, params_dir: str | os.PathLike = "params") -> str:
    """The sentence each notebook's title cell and setup line carry, generated from the
    params: '01_gpt2_120m runs in the cpu profile: teacher SmolLM2-135M-Instruct + ...'."""
    params = load_params(Path(params_dir), profile, stem)
    if "skip" in params:
        return f"{stem} is skipped in the {profile} profile ({params['skip']})."
    setup = describe_setup(profile, stem, params_dir)
    if not setup:
        if "steps" in params:
            return f"{stem} needs no model: toy distributions, the same in every profile (only the number of steps differs)."
        return f"{stem} reads only results/{profile}/ (the runs of 01-03) and needs no model."
    reuse = " (notebook 01's pair)" if params.get("use_built_pair") else ""
    return (f"{stem} runs in the {profile} profile{reuse}: teacher {setup['teacher']}; "
            f"student {setup['student']}; data: {setup['data']}.")


def setup_table(cfg: NotebookConfig):
    """The setup of a notebook as a short two-column table: the pair, the data, the budget of
    each arm or grid, and what is declared before any run."""
    import pandas as pd
    from ..config import load_yaml
    from .runs import DISPLAY, as_list, family_size

    rows = list(describe_setup(cfg.profile, cfg.stem, "params").items())
    base = load_yaml(cfg.base_params) if "base_params" in cfg.params else {}
    from ..config import TrainConfig
    base_train = TrainConfig().__dict__ | (base.get("train", {}) or {})

    def budget(common: dict, own_rates: bool = False) -> str:
        steps = common.get("train.max_steps", base_train.get("max_steps"))
        lr = common.get("train.lr", base_train.get("lr"))
        batch = common.get("train.batch_size", base_train.get("batch_size"))
        rate = f"lr {float(lr):g}{' unless given' if own_rates else ''}" if lr else ""
        return ", ".join(x for x in (f"{steps} steps" if steps else "", rate, f"batch {batch}" if batch else "") if x)

    def line(spec: dict, common: dict) -> str:
        # a method that trains at its own rate (arm (b): each objective at the rate its grid chose) says so
        arm_lr = float(common.get("train.lr", base_train.get("lr")))
        own = {k: float(lr) for k, m in spec.items()
               if (lr := (m.get("overrides") or {}).get("train.lr")) is not None and float(lr) != arm_lr}
        listed = ", ".join(f"{m.get('label') or DISPLAY.get(k, k)} ×{len(m.get('seeds', [1]))}"
                           + (f" (lr {own[k]:g})" if k in own else "") for k, m in spec.items())
        return f"{listed} (× seeds); {budget(common, own_rates=bool(own))} each"

    for name, arm in (cfg.get("arms") or {}).items():
        rows.append((f"arm: {arm.get('label', name)}", line(arm["methods"], arm.get("common") or {})))
    if cfg.get("methods"):
        rows.append(("runs", line(cfg.methods, cfg.get("common") or {})))
    if cfg.get("ablations"):
        rows.append(("ablations", f"{len(cfg.ablations)} variants, one change each from notebook 01's "
                     f"{', '.join(cfg.reference_runs.values())}; "
                     f"{sum(len((spec or {}).get('seeds') or [1]) for spec in cfg.ablations.values())} runs"))
    primary = cfg.get("primary")
    if primary:
        tests = family_size(primary)
        rows.append(("declared", f"{' and '.join(as_list(primary['metric']))} ({primary['decoding']} decoding for the scores) on "
                     f"{', '.join(primary['splits'])}: "
                     + ", ".join(f"{DISPLAY.get(a, a)} vs {DISPLAY.get(b, b)}" for a, b in primary["comparisons"])
                     + f"; α {primary['alpha']}, Holm over {tests} tests"))
    return pd.DataFrame(rows, columns=["setup", "in this run"])


def _path_check_switches() -> None:
    """Two environment switches for checking a GPU profile's notebooks on a CPU with no
    network (tests/test_notebooks.py): ``DPKD_STANDINS="depth,width"`` builds every hub id as
    a random stand-in of its architecture scaled down by those factors (dpkd_lib/gpu/standins.py),
    and ``DPKD_CHECK_OVERRIDES`` shrinks every run (runs.py). Both are announced."""
    from .runs import CHECK_OVERRIDES_ENV, check_overrides
    scale = os.environ.get("DPKD_STANDINS")
    if scale:
        from .. import hub
        from ..gpu import standins
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
    from ..config import load_yaml
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
    """Digest of every cell's type and source (outputs and metadata ignored: they are what
    execution writes) and the declared upstream. Text cells count too: the executed copy is
    what a reader opens, so an edited sentence makes it stale like an edited line of code."""
    nb = json.loads(Path(path).read_text())
    cells = [(c.get("cell_type"), "".join(c.get("source", ""))) for c in nb.get("cells", [])]
    upstream = nb.get("metadata", {}).get("dpkd", {}).get("upstream")
    return _digest(cells), upstream


def read_status(folder: Path) -> dict:
    try:
        return json.loads((folder / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(folder: Path, status: dict) -> None:
    from ..io import write_json
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
    from ..rundir import _alive
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

    with routed(handler):
        yield asked


def recorded_wall(stem: str, status: dict, out_dir: Path) -> float | None:
    """How long notebook `stem` took when it last ran here: the driver's status, else the
    duration papermill wrote into the executed copy (committed with the results)."""
    wall = (status.get("notebooks", {}).get(stem) or {}).get("wall_s")
    if wall:
        return float(wall)
    try:
        meta = json.loads((out_dir / f"{stem}.ipynb").read_text())["metadata"].get("papermill", {})
        return float(meta["duration"]) if meta.get("duration") else None
    except (OSError, ValueError, KeyError):
        return None


def _time_left(stems: list[str], status: dict, out_dir: Path, results_root: Path | None = None) -> str:
    """'it took 12 min last time; about 40 min left for the 3 notebook(s) to run' from the
    recorded times of the notebooks still to run (`recorded_wall`), saying which ones have
    none, plus the runs recorded in ``results_root``'s data/ that are not trained here
    (`rundata.runs_to_train`): on a fresh clone a notebook's last execution may have reused
    every run (its duration: seconds), while the runs it will train took hours when recorded."""
    from .rundata import duration_text, runs_to_train
    walls = {s: recorded_wall(s, status, out_dir) for s in stems}
    known = [w for w in walls.values() if w is not None]
    mine = walls[stems[0]]
    text = f"it took {duration_text(mine)} last time" if mine is not None else "no recorded time for it"
    todo = runs_to_train(results_root) if results_root is not None else {}
    if known or todo:
        unknown = [s for s, w in walls.items() if w is None]
        text += f"; about {duration_text(sum(known) + sum(todo.values()))} left for the {len(stems)} notebook(s) to run"
        if todo:
            text += (f" ({len(todo)} run{'s' if len(todo) != 1 else ''} recorded in data/ but not trained here: "
                     f"{duration_text(sum(todo.values()))} at their recorded times)")
        if unknown:
            text += f" ({', '.join(unknown)} not counted: never run here)"
    return text


def run_study(profile: str, *, force: bool = False, only: str | None = None,
              results_root: str | os.PathLike | None = None,
              notebooks_dir: str | os.PathLike | None = None,
              params_dir: str | os.PathLike | None = None,
              kernel: str = "python3", log_output: bool = True, resume: bool = False) -> dict:
    """Execute the study's notebooks for `profile`; returns the status dict. ``resume``:
    continue from the committed record (`rundata.restore_runs`: the runs in data/ are
    reused, the pair is built again and checked against its record).

    Raises StudyError naming the notebook and cell when one fails, RunBusy when another
    driver holds the results root, KeyboardInterrupt (one line) on SIGINT / SIGTERM.
    `params_dir` is read for the checks before anything runs (the notebooks read
    ``params/`` of the repo).
    """
    from ..rundir import lock_file

    if resume and force:
        raise ConfigError("--resume reuses the committed runs and --force recomputes them: give one")
    root = Path(results_root or REPO_ROOT / "results" / profile).resolve()
    root.mkdir(parents=True, exist_ok=True)
    shown_root = str(root.relative_to(REPO_ROOT)) if root.is_relative_to(REPO_ROOT) else str(root)
    fd = lock_file(root / LOCK_FILE, f"results root {shown_root} (a study driver)", detail=True)
    try:
        with _stop_requests() as asked:
            if resume:
                from .rundata import restore_runs
                restored = restore_runs(root)
                print(f"[study] continuing from {shown_root}/data: {len(restored)} finished run"
                      f"{'s' if len(restored) != 1 else ''} restored (reused, not trained again); the pair "
                      f"is built again and checked against its record", flush=True)
            return _run_study(profile, force=force, only=only, root=root, notebooks_dir=notebooks_dir,
                              params_dir=params_dir, kernel=kernel, log_output=log_output, asked=asked)
    finally:
        os.close(fd)  # releases the lock


def _run_study(profile: str, *, force: bool, only: str | None, root: Path, notebooks_dir, params_dir,
               kernel: str, log_output: bool, asked: dict) -> dict:
    import papermill as pm

    from ..rundir import code_change, code_fingerprint
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

    from ..rundir import machine
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
            ahead = [p.stem for p in chosen[chosen.index(nb_path):] if "skip" not in params[p.stem]]
            print(f"[study] {stem} ({len(timings) + 1} of {len(chosen)}): executing with "
                  f"{params_dir / profile / (stem + '.yaml')}; {_time_left(ahead, status, out_dir, root)}", flush=True)
            started = time.time()
            entry = {"status": "running", "fingerprint": fingerprint, "upstream": upstream,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code_fingerprint(),
                     "params_file": str(params_dir / profile / f"{stem}.yaml")}
            status["notebooks"][stem] = entry
            write_status(out_dir, status)
            try:
                # log_output streams the cells' printed lines (the runs' one-line progress) to the
                # terminal; papermill's own logging of them would add an "Executing Cell N" line
                # per cell and repeat every line as a log record
                stream = {"stdout_file": sys.stdout, "stderr_file": sys.stderr} if log_output else {}
                pm.execute_notebook(str(nb_path), str(running), parameters=nb_params,
                                    kernel_name=kernel, cwd=str(repo), log_output=False,
                                    progress_bar=False, request_save_on_cell_execute=True, **stream)
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
    parser.add_argument("--resume", action="store_true",
                        help="continue a study from its committed record (results/<profile>/data): its "
                             "finished runs are reused, not trained again; the pair is rebuilt and checked")
    parser.add_argument("--results-root", default=None, help="default results/<profile>")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3 = this venv)")
    parser.add_argument("--quiet", action="store_true", help="do not stream cell outputs")
    parser.add_argument("--strict-code", action="store_true",
                        help="refuse to reuse notebooks and runs made by other dpkd_lib code "
                             "(default: say so and reuse)")
    args = parser.parse_args(argv)
    if args.strict_code:  # read by rundir.code_change, here and in the kernels (inherited)
        from ..rundir import STRICT_CODE_ENV
        os.environ[STRICT_CODE_ENV] = "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("papermill", "traitlets", "asyncio"):   # our [study] lines say what runs
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run_study(args.profile, force=args.force, only=args.only, results_root=args.results_root,
                  kernel=args.kernel, log_output=not args.quiet, resume=args.resume)
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
