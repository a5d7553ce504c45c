"""Run folders: one writer at a time, ids from resolved params, manifests with a status,
checkpoints that survive a kill.

A run folder holds params.yaml (resolved), manifest.json (status, git commit, versions, data
hash, seed, device, wall time), metrics.jsonl, eval.jsonl, summary.json, model/ and
checkpoints/. Files are written atomically (io.py); ``status == "finished"`` in the manifest
is the only proof of a finished run. Statuses: running, interrupted, failed, finished.

Each checkpoint's size and sha256 are recorded when it is written (checkpoints/integrity.json):
only a file that differs from its record (or, unrecorded, fails to parse) is damage and moved
aside; running out of memory while loading a good one changes nothing. The manifest records
a fingerprint of the library's code (`code_fingerprint`): reusing a finished run made by other
code says so (refused under ``--strict-code``). A finished run on a read-only mount is reused
without the lock; the lock's holder removes the temporaries of writers that died.
docs/running.md says all this for users.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import gc
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml

from .config import diff_keys
from .errors import ConfigError, OutOfResources, RunBusy, allocation_size, human_bytes, is_disk_full, \
    is_out_of_memory
from .io import append_jsonl, read_json, read_jsonl, write_json, write_jsonl, write_yaml

log = logging.getLogger("dpkd_lib")
TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "peft", "bitsandbytes",
                    "rouge-score", "pandas", "papermill")
CHECKPOINTS = ("checkpoints/last.pt", "checkpoints/previous.pt")  # newest first
INTEGRITY = "checkpoints/integrity.json"  # size and sha256 of each checkpoint as written
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
#: set to 1 (``train --strict-code``, ``study --strict-code``): refuse to reuse a finished run
#: or notebook made by other code (another code fingerprint) instead of saying so and reusing
STRICT_CODE_ENV = "DPKD_STRICT_CODE"
#: set inside `other_code_said_once`: the names of the finished runs reused though made by other
#: code, by the fingerprint they recorded (one line for them all, not one per run)
_OTHER_CODE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("dpkd_other_code", default=None)
#: temporaries a writer leaves when it dies: <name>.tmp-<pid>, <name>.old-<pid> (models.save_model,
#: teacher caches), .<name>.<pid>.<random>.tmp (io.atomic_write_text)
_TEMPORARY = re.compile(r"^(?:.+\.(?:tmp|old)-(?P<pid>\d+)|\..+\.(?P<pid2>\d+)\.[^.]+\.tmp)$")


#: params that say where a run is, not what it is: left out of its id and of "same params"
WHERE_KEYS = ("output_dir", "cache_dir")


def run_id(params: dict, length: int = 10) -> str:
    """Short stable hash of resolved params (`WHERE_KEYS` excluded)."""
    content = {k: v for k, v in params.items() if k not in WHERE_KEYS}
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def param_changes(old: dict, params: dict) -> list[str]:
    """The keys whose values differ between a run's stored params and these (`WHERE_KEYS` aside)."""
    return [k for k in diff_keys(old, params) if k not in WHERE_KEYS]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_state(state) -> dict:
    """A training checkpoint's state (what `train.Trainer.save_checkpoint` writes), or ValueError."""
    missing = [k for k in ("step", "model", "optimizer", "rng") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"not a training checkpoint (missing {', '.join(missing)})")
    return state


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB pieces (a checkpoint is never held twice in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def code_fingerprint() -> str:
    """A short hash of the library's code (every dpkd_lib/**/*.py, by path and content): a
    run or a notebook records the code that made it, and reusing it under other code says so."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def strict_code() -> bool:
    return os.environ.get(STRICT_CODE_ENV) == "1"


def code_change(recorded: str | None, what: str) -> str | None:
    """None when `recorded` is this code's fingerprint; else one line saying so (a
    ConfigError under ``--strict-code``). A record without a fingerprint (made before they
    were recorded) is refused only under ``--strict-code``."""
    current = code_fingerprint()
    if recorded == current:
        return None
    if strict_code():
        raise ConfigError(f"{what} was made by other code (code fingerprint {recorded or 'not recorded'}, "
                          f"now {current}) and --strict-code refuses to reuse it; rerun with --force "
                          f"to recompute it, or without --strict-code to reuse it")
    if recorded is None:
        return None
    return _other_code_note(f"{what} was", recorded, "it is")


def _other_code_note(what_was: str, recorded: str, reused_as: str) -> str:
    return (f"note: {what_was} made by other code (code fingerprint {recorded}, now {code_fingerprint()}); "
            f"reused as {reused_as} (--force recomputes, --strict-code refuses)")


@contextlib.contextmanager
def other_code_said_once():
    """Inside, a finished run reused though made by other code is not said run by run
    (`RunDir.check_code`) but gathered; the ``say()`` it yields (called by `runs.run_grid` when
    a streak of reused runs ends) and leaving say them in one line per recorded fingerprint: a
    grid of 14 runs reused after a report-only change prints one note, not 14. Nested, the
    outermost says it (its inner ``say`` does nothing)."""
    if _OTHER_CODE.get() is not None:
        yield lambda: None
        return
    gathered: dict[str, list[str]] = {}

    def say() -> None:
        for recorded, names in gathered.items():
            log.warning("%s", _other_code_note(
                f"the finished run {names[0]} was" if len(names) == 1 else
                f"{len(names)} finished runs ({', '.join(names)}) were", recorded,
                "it is" if len(names) == 1 else "they are"))
        gathered.clear()

    token = _OTHER_CODE.set(gathered)
    try:
        yield say
    finally:
        _OTHER_CODE.reset(token)
        say()


def lock_file(path: Path, what: str, detail: bool = False) -> int:
    """Open and lock `path` (created if need be): the fd, held until closed, or a one-line
    RunBusy naming the holder (its pid; with ``detail`` also its host and since when). An OS
    lock (fcntl.flock): a process that dies releases it. On a file system without flock the
    pid in the file decides: a dead holder's lock is taken over."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"{what} is in use by another process ({_holder(fd)}); wait for it to finish "
                          f"or stop it, then rerun") from None
        except OSError:  # a file system without flock (some network or FUSE mounts)
            pid = _holder(fd).split(",")[0].removeprefix("pid ")
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                raise RunBusy(f"{what} is in use by another process ({_holder(fd)}); wait for it to "
                              f"finish or stop it, then rerun") from None
        record = str(os.getpid())
        if detail:
            record += f" {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _holder(fd: int) -> str:
    """"pid N" (and ", host H, since T" when the lock file records them)."""
    fields = os.pread(fd, 256, 0).decode(errors="replace").split()
    if not fields:
        return "pid ?"
    return ", ".join(f"{k} {v}" for k, v in zip(("pid", "host", "since"), fields))


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Remove the temporaries that dead writers left in `folder` (see _TEMPORARY); returns
    their names. A live process's temporaries are left alone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        found = _TEMPORARY.match(path.name)
        if not found:
            continue
        pid = int(found.group("pid") or found.group("pid2"))
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    return removed


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _free_bytes(folder: Path) -> float:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return float("inf")


def free_space(folder: Path) -> str:
    free = _free_bytes(folder)
    return human_bytes(free) if free != float("inf") else "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


VECTOR_FLAGS = ("sse4_2", "fma", "avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def machine() -> dict:
    """What a reader needs to compare wall times with theirs: the CPU model and its vector
    extensions (an avx2-only CPU ran the cpu study's teacher build 2.3x slower than one with
    avx512), cores, the GPU if any."""
    facts = {"cpu_model": platform.processor() or "", "cpu_count": os.cpu_count(), "vector_extensions": []}
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "")
        flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
        facts.update(cpu_model=model or facts["cpu_model"],
                     vector_extensions=[f for f in VECTOR_FLAGS if f in flags])
    except OSError:
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def numerics(facts: dict | None = None) -> tuple:
    """What of a machine (`machine`'s facts, this one's by default) decides a run's sums: CPU
    model, vector extensions, GPU; not the core count."""
    facts = machine() if facts is None else facts
    return facts.get("cpu_model", ""), tuple(facts.get("vector_extensions") or ()), facts.get("gpu")


#: a run folder rebuilt from its committed record (study.rundata.restore_runs): params,
#: summary, manifest and labels only, no weights and no training state
RESTORED = "restored.json"

class RunDir:
    """One run's folder. `prepare` enforces the no-clobber rule before any work starts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.read_only: str | bool = False  # why, set by lock(read_only_ok=True) on a folder it cannot write

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def manifest(self) -> dict:
        try:
            return read_json(self.file("manifest.json"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def is_finished(self) -> bool:
        return self.manifest.get("status") == "finished" and self.file("summary.json").exists()

    def reusable(self, params: dict, force: bool = False) -> bool:
        """True when `prepare` would reuse the run here as it is: finished, with the same
        params (where it is and its cache aside), and no ``force``."""
        old = self.stored_params()
        return (not force and old is not None and self.is_finished()
                and not param_changes(old, params))

    def stored_params(self) -> dict | None:
        try:
            return yaml.safe_load(self.file("params.yaml").read_text())
        except FileNotFoundError:
            return None

    def prepare(self, params: dict, force: bool = False) -> str:
        """Decide what to do with this folder: 'fresh', 'resume' or 'finished'. Call it
        holding the folder's lock (`lock()`), so that nothing is written while another
        process owns the folder (without it, the lock is taken for the move below only).

        A folder holding a run with different params is never overwritten silently. A run
        that stopped (failed or interrupted) before its first checkpoint holds no progress:
        the same command with corrected params replaces it. Any other needs ``force``. A
        replaced run's files are moved aside (never deleted) into ``<dir>.replaced-<time>``.
        """
        old = self.stored_params()
        if self.read_only:
            return self._prepare_read_only(old, params, force)
        if self._lock_fd is not None:
            self.clean()
        if old is not None:
            differ = param_changes(old, params)
            if differ and not (force or self.no_progress()):
                raise ConfigError(
                    f"{self.path} holds a run with different params ({', '.join(differ[:8])}"
                    f"{' …' if len(differ) > 8 else ''}); use another output_dir or --force "
                    f"(FORCE=1) to replace it (the old files are moved aside)")
            if differ or force:
                self._move_aside()
                old = None
        if old is not None and self.is_finished():
            self.check_code()
            return "finished"
        self.path.mkdir(parents=True, exist_ok=True)
        status = "resume" if old is not None else "fresh"
        write_yaml(self.file("params.yaml"), params)
        return status

    def _prepare_read_only(self, old: dict | None, params: dict, force: bool) -> str:
        """A folder this process cannot write (a read-only mount): a finished run with the
        same params is read from there; anything else would have to write."""
        same = old is not None and not param_changes(old, params)
        if same and self.is_finished() and not force:
            self.check_code()
            return "finished"
        why = ("--force would replace it" if same and self.is_finished() else
               "it holds a run with different params" if old is not None and not same else
               "its run is not finished")
        raise OSError(errno.EROFS, f"{self.path} cannot be written ({self.read_only}) and {why}; only a finished "
                                   f"run with the same params can be reused from a read-only folder: "
                                   f"use another output_dir")

    def check_code(self) -> None:
        """Say (one line) when the finished run here was made by other code; refuse under
        --strict-code (code_change)."""
        recorded = self.manifest.get("code")
        note = code_change(recorded, f"the finished run in {self.path}")
        gathered = _OTHER_CODE.get()
        if note and gathered is not None:
            gathered.setdefault(recorded, []).append(self.path.name)
        elif note:
            log.warning("%s", note)

    def clean(self) -> None:
        """Remove the temporaries of writers that died here (a kill during a model save, a
        full disk): called by `prepare` holding the lock, so nothing here is being written."""
        removed = remove_stale_temporaries(self.path)
        tmp = self.file("checkpoints/last.tmp")  # only the lock holder writes checkpoints
        if tmp.exists():
            tmp.unlink()
            removed.append("checkpoints/last.tmp")
        removed += [f"checkpoints/{n}" for n in remove_stale_temporaries(self.file("checkpoints"))]
        if removed:
            log.info("removed temporaries of an earlier process in %s: %s", self.path, ", ".join(removed))

    def no_progress(self) -> bool:
        """A run that stopped (failed, interrupted) before its first checkpoint, or a folder
        rebuilt from a committed record (`RESTORED`: a copy, nothing trained here)."""
        if self.file(RESTORED).exists():
            return True
        return self.manifest.get("status") in ("failed", "interrupted") and not self.has_checkpoint()

    def _move_aside(self) -> None:
        aside = self.path.with_name(f"{self.path.name}.replaced-{int(time.time())}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.replaced-{int(time.time())}-{n}")
            n += 1
        if self._lock_fd is None:  # never move a folder another process is writing
            with self.lock():
                self.path.rename(aside)
            return
        # We hold the lock: the old .lock travels with the folder. Lock the new folder before
        # letting go of the old lock, so that no other process can slip in between.
        self.path.rename(aside)
        old_fd = self._lock_fd
        self._lock_fd = self._acquire()
        os.close(old_fd)

    def _acquire(self) -> int:
        """Open and lock the folder's .lock (created if need be; nothing else is written
        when the lock is taken: RunBusy names the holder's pid)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return lock_file(self.file(".lock"), str(self.path))

    @contextlib.contextmanager
    def lock(self, read_only_ok: bool = False):
        """Hold the folder's lock for the block: a second process gets a one-line RunBusy
        naming the holder's pid. An OS lock (fcntl.flock), so a process that dies releases
        it and the next one takes over its stale .lock file. (On a file system without
        flock the pid in .lock decides: a dead holder's lock is taken over.)

        With ``read_only_ok`` a folder that cannot be written (a read-only mount: EROFS,
        EACCES, EPERM on the lock file) is entered without a lock and ``read_only`` set:
        `prepare` then only reuses a finished run."""
        if self._lock_fd is not None:
            raise RuntimeError(f"{self.path}: this RunDir already holds its lock")
        try:
            self._lock_fd = self._acquire()
        except OSError as err:
            if not (read_only_ok and err.errno in READ_ONLY and self.path.is_dir()):
                raise
            self.read_only = err.strerror or "read-only"
            try:
                yield self
            finally:
                self.read_only = False
            return
        try:
            yield self
        finally:
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None

    # -- manifest and logs
    def write_manifest(self, **fields) -> None:
        manifest = self.manifest
        manifest.update(fields)
        write_json(self.file("manifest.json"), manifest)

    def start_manifest(self, params: dict, *, seed: int, device: str, data_hash: str) -> None:
        manifest = self.manifest
        self.write_manifest(
            status="running", run_id=run_id(params), git_commit=git_commit(),
            packages=package_versions(), seed=seed, device=device, data_hash=data_hash,
            started=manifest.get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
            platform=platform.platform(), machine=machine(), attempts=manifest.get("attempts", 0) + 1,
            code=code_fingerprint())

    def fail(self, error: str) -> bool:
        """Record the failure; False when even that cannot be written (a full disk): the
        manifest then keeps its last status, the run stays resumable, and the caller's
        error is not masked by a second one."""
        try:
            self.write_manifest(status="failed", error=error)
        except OSError:
            return False
        return True

    def write_jsonl(self, name: str, rows) -> None:
        write_jsonl(self.file(name), rows)

    def append_metrics(self, row: dict) -> None:
        append_jsonl(self.file("metrics.jsonl"), row)

    def truncate_metrics(self, upto_step: int) -> None:
        """On resume, keep only metric rows up to the checkpoint's step."""
        path = self.file("metrics.jsonl")
        if path.exists():
            write_jsonl(path, [r for r in read_jsonl(path, torn_ok=True) if r.get("step", 0) <= upto_step])

    # -- checkpoints
    def has_checkpoint(self) -> bool:
        return any(self.file(name).exists() for name in CHECKPOINTS)

    def save_checkpoint(self, state: dict) -> None:
        """Write the new checkpoint next to the last one, check that it reads back, record
        its size and sha256 (checkpoints/integrity.json), then rotate: last → previous,
        new → last. A kill at any point leaves a readable one; a write that fails raises a
        one-line OSError (a full disk: OutOfResources with the size needed) and leaves the
        old ones as they were, with no temporary file."""
        last, previous = (self.file(n) for n in CHECKPOINTS)
        last.parent.mkdir(parents=True, exist_ok=True)
        tmp = last.with_suffix(".tmp")
        free = _free_bytes(last.parent)  # before: a failed writer may still hold its blocks
        try:
            torch.save(state, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            _check_state(torch.load(tmp, weights_only=False, map_location="cpu"))  # before it replaces anything
            self._record(tmp, state["step"])
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if not isinstance(exc, Exception):
                raise
            error = self._save_error(exc, state, free)
        else:
            error = None
        if error is not None:
            # raised here, not inside the except block: the failed writer's frames (and its
            # open file, whose blocks a full disk needs back to record the failure) go now
            gc.collect()
            raise error
        if last.exists():
            os.replace(last, previous)
        os.replace(tmp, last)

    def _save_error(self, exc: Exception, state: dict, free: float) -> OSError | OutOfResources:
        """One line for a checkpoint that could not be written (what, and the room it needs)."""
        last = self.file(CHECKPOINTS[0])
        if is_disk_full(exc) or free < _tensor_bytes(state):  # torch.save's own words vary
            kept = "the previous checkpoints are kept" if self.has_checkpoint() else "no earlier checkpoint"
            return OutOfResources(
                f"checkpoint {last} could not be written: no space left on the disk (it needs about "
                f"{human_bytes(_tensor_bytes(state))}, {human_bytes(free) if free != float('inf') else 'unknown'}"
                f" were free); {kept}: free space, then rerun the same command to resume")
        if is_out_of_memory(exc):
            return OutOfResources(f"not enough memory to write checkpoint {last}{allocation_size(exc)}; the "
                                  f"previous checkpoints are kept: free memory, then rerun the same command "
                                  f"to resume")
        return OSError(f"checkpoint {last.with_suffix('.tmp')} could not be written and read back "
                       f"({type(exc).__name__}: {str(exc)[:160]}); the previous checkpoints are kept")

    def _integrity(self) -> list[dict] | None:
        """The recorded checkpoints ({size, sha256, step}), None when none were recorded (a
        run folder written before integrity records)."""
        try:
            return list(read_json(self.file(INTEGRITY))["files"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def _record(self, path: Path, step: int) -> None:
        """Add `path`'s size and hash to the record (keyed by content, so a kill between the
        two renames of a rotation never makes a good file look damaged)."""
        entry = {"size": path.stat().st_size, "sha256": file_sha256(path), "step": step}
        files = [f for f in self._integrity() or [] if f["sha256"] != entry["sha256"]]
        write_json(self.file(INTEGRITY), {"files": (files + [entry])[-4:]})

    def _verify(self, path: Path, records: list[dict] | None) -> str | None:
        """None: the file is what was written (or nothing was recorded); else what differs.
        An error while reading it (EIO) is raised: that is not damage to the file."""
        if records is None:
            return None
        size = path.stat().st_size
        if not any(r["size"] == size for r in records):
            return f"{size} bytes, not the {' or '.join(str(r['size']) for r in records)} written"
        if not any(r["sha256"] == file_sha256(path) for r in records):
            return "its sha256 differs from the one recorded when it was written"
        return None

    def load_checkpoint(self) -> dict | None:
        """The newest checkpoint that reads back whole, or None.

        Only damage moves a checkpoint aside (``*.corrupt``, one warning line; the one
        before it is then tried, with none left the run starts over): a size or sha256 that
        differs from the ones recorded when it was written, or, for a file written before
        such records, a failed parse. Running out of memory while loading (MemoryError, the
        allocator's RuntimeError) or an I/O error is not damage: it raises a one-line error
        (OutOfResources, OSError) and nothing is changed, so the same command resumes once
        there is memory."""
        found = [self.file(n) for n in CHECKPOINTS if self.file(n).exists()]
        records = self._integrity()
        for i, path in enumerate(found):
            try:
                damage = self._verify(path, records)
            except OSError as exc:
                raise OSError(f"checkpoint {path} could not be read ({exc.strerror or exc}); nothing was "
                              f"changed: check the disk, then rerun the same command to resume") from None
            if damage is None:
                try:
                    state = _check_state(torch.load(path, weights_only=False, map_location="cpu"))
                except Exception as exc:  # noqa: BLE001 - classified below: damage, or not
                    self._not_damage(path, exc, verified=records is not None)
                    damage = f"{type(exc).__name__}"
                else:
                    if records is None:  # written before integrity records: record it now it has parsed
                        with contextlib.suppress(OSError):
                            self._record(path, state["step"])
                    return state
            os.replace(path, path.with_suffix(".corrupt"))
            then = (f"falling back to {found[i + 1].relative_to(self.path)}" if i + 1 < len(found)
                    else "starting over from step 0")
            log.warning("warning: checkpoint %s is unreadable (%s), moved aside to %s; %s",
                        path, damage, path.with_suffix(".corrupt").name, then)
        return None

    @staticmethod
    def _not_damage(path: Path, exc: Exception, verified: bool) -> None:
        """Raise a one-line error when `exc`, raised loading `path`, is not damage to the file:
        memory, an I/O error, or any error on a file whose size and hash match the record."""
        size = human_bytes(path.stat().st_size)
        if is_out_of_memory(exc):
            raise OutOfResources(
                f"not enough memory to load the checkpoint {path} ({size} on disk){allocation_size(exc)}; "
                f"nothing was changed: free memory (or raise the limit), then rerun the same command "
                f"to resume") from None
        if isinstance(exc, OSError) or verified:
            raise OSError(f"checkpoint {path} ({size}) matches its record but could not be loaded "
                          f"({type(exc).__name__}: {str(exc)[:160]}); nothing was changed"
                          if verified else
                          f"checkpoint {path} could not be read ({type(exc).__name__}: {str(exc)[:160]}); "
                          f"nothing was changed") from None

    def checkpoint_note(self) -> str:
        found = [n for n in CHECKPOINTS if self.file(n).exists()]
        return (f"the last good checkpoint is kept in {self.file(found[0])}" if found else
                "no checkpoint was written yet (rerunning starts from step 0)")
