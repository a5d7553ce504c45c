"""Run folders: one writer at a time, ids from resolved params, manifests with a status,
checkpoints that survive a kill.

A run folder holds params.yaml (resolved), manifest.json (status, git commit, versions, data
hash, seed, device, wall time), metrics.jsonl, eval.jsonl, summary.json, model/ and
checkpoints/. Files are written atomically (io.py); ``status == "finished"`` in the manifest
is the only proof of a finished run. Statuses: running, interrupted, failed, finished.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml

from .config import diff_keys
from .errors import ConfigError, RunBusy
from .io import append_jsonl, read_json, read_jsonl, write_json, write_jsonl, write_yaml

log = logging.getLogger("dpkd_lib")
TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "peft", "bitsandbytes",
                    "rouge-score", "pandas", "papermill")
CHECKPOINTS = ("checkpoints/last.pt", "checkpoints/previous.pt")  # newest first


def run_id(params: dict, length: int = 10) -> str:
    """Short stable hash of resolved params (output_dir and cache_dir excluded: they say
    where, not what)."""
    content = {k: v for k, v in params.items() if k not in ("output_dir", "cache_dir")}
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


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


class RunDir:
    """One run's folder. `prepare` enforces the no-clobber rule before any work starts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

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
        if old is not None:
            differ = [k for k in diff_keys(old, params) if k not in ("output_dir", "cache_dir")]
            if differ and not (force or self.no_progress()):
                raise ConfigError(
                    f"{self.path} holds a run with different params ({', '.join(differ[:8])}"
                    f"{' …' if len(differ) > 8 else ''}); use another output_dir or --force "
                    f"(FORCE=1) to replace it (the old files are moved aside)")
            if differ or force:
                self._move_aside()
                old = None
        if old is not None and self.is_finished():
            return "finished"
        self.path.mkdir(parents=True, exist_ok=True)
        status = "resume" if old is not None else "fresh"
        write_yaml(self.file("params.yaml"), params)
        return status

    def no_progress(self) -> bool:
        """A run that stopped (failed, interrupted) before its first checkpoint."""
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
        fd = os.open(self.file(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunBusy(f"{self.path} is in use by another process (pid {self._holder(fd)}); "
                              f"wait for it to finish or stop it, then rerun") from None
            except OSError:  # a file system without flock (some network or FUSE mounts)
                holder = self._holder(fd)
                if holder.isdigit() and int(holder) != os.getpid() and _alive(int(holder)):
                    raise RunBusy(f"{self.path} is in use by another process (pid {holder}); wait "
                                  f"for it to finish or stop it, then rerun") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _holder(fd: int) -> str:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder's lock for the block: a second process gets a one-line RunBusy
        naming the holder's pid. An OS lock (fcntl.flock), so a process that dies releases
        it and the next one takes over its stale .lock file. (On a file system without
        flock the pid in .lock decides: a dead holder's lock is taken over.)"""
        if self._lock_fd is not None:
            raise RuntimeError(f"{self.path}: this RunDir already holds its lock")
        self._lock_fd = self._acquire()
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
            platform=platform.platform(), machine=machine(), attempts=manifest.get("attempts", 0) + 1)

    def fail(self, error: str) -> None:
        self.write_manifest(status="failed", error=error)

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
        """Write the new checkpoint next to the last one, check that it reads back, then
        rotate: last → previous, new → last. A kill at any point leaves a readable one; a
        write that fails (a full disk) raises OSError and leaves the old ones as they were."""
        last, previous = (self.file(n) for n in CHECKPOINTS)
        last.parent.mkdir(parents=True, exist_ok=True)
        tmp = last.with_suffix(".tmp")
        try:
            torch.save(state, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            _check_state(torch.load(tmp, weights_only=False, map_location="cpu"))  # before it replaces anything
        except Exception as exc:  # noqa: BLE001 - a full disk, a failing device: one line, old ones kept
            tmp.unlink(missing_ok=True)
            raise OSError(f"checkpoint {tmp} could not be written and read back ({type(exc).__name__}: "
                          f"{str(exc)[:160]}); the previous checkpoints are kept") from None
        if last.exists():
            os.replace(last, previous)
        os.replace(tmp, last)

    def load_checkpoint(self) -> dict | None:
        """The newest checkpoint that reads back whole, or None. An unreadable one (a
        truncated file) is moved aside (``*.corrupt``) with a one-line warning, and the one
        before it is tried; with none left the run starts over."""
        found = [self.file(n) for n in CHECKPOINTS if self.file(n).exists()]
        for i, path in enumerate(found):
            try:
                return _check_state(torch.load(path, weights_only=False, map_location="cpu"))
            except Exception as exc:  # noqa: BLE001 - any damage: fall back, never a traceback
                os.replace(path, path.with_suffix(".corrupt"))
                then = (f"falling back to {found[i + 1].relative_to(self.path)}" if i + 1 < len(found)
                        else "starting over from step 0")
                log.warning("warning: checkpoint %s is unreadable (%s), moved aside to %s; %s",
                            path, type(exc).__name__, path.with_suffix(".corrupt").name, then)
        return None

    def checkpoint_note(self) -> str:
        found = [n for n in CHECKPOINTS if self.file(n).exists()]
        return (f"the last good checkpoint is kept in {self.file(found[0])}" if found else
                "no checkpoint was written yet (rerunning starts from step 0)")
