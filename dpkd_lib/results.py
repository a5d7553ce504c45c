"""Run directories: atomic files, run ids from resolved params, manifests with a status.

A run dir holds params.yaml (resolved), manifest.json (status, git commit, versions, data
hash, seed, device, wall time), metrics.jsonl, eval.jsonl and summary.json. Every file is
written to a temp file in the same folder and renamed, so a kill never leaves a half file
that looks finished; `status == "finished"` in the manifest is the only proof of a run.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import yaml

from .config import ConfigError, diff_keys

TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "peft", "bitsandbytes",
                    "rouge-score", "pandas", "papermill")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path) -> Any:
    return json.loads(Path(path).read_text())


def write_yaml(path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_jsonl(path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_jsonl(path) -> list[dict]:
    """Read a jsonl file; a torn last line (kill during append) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def run_id(params: dict, length: int = 10) -> str:
    """Short stable hash of resolved params (output_dir excluded: it is where, not what)."""
    content = {k: v for k, v in params.items() if k != "output_dir"}
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


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


class RunDir:
    """One run's folder. `prepare` enforces the no-clobber rule before any work starts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

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
        """Decide what to do with this folder: 'fresh', 'resume' or 'finished'.

        A folder holding a run with different params is never overwritten silently: without
        `force` the error names the keys that differ. With `force` the old run's files are
        moved aside (never deleted) into `<dir>.replaced-<time>`.
        """
        old = self.stored_params()
        if old is not None:
            differ = [k for k in diff_keys(old, params) if k != "output_dir"]
            if differ and not force:
                raise ConfigError(
                    f"{self.path} holds a run with different params ({', '.join(differ[:8])}"
                    f"{' …' if len(differ) > 8 else ''}); use another output_dir or --force "
                    f"(FORCE=1) to replace it")
            if differ or force:
                aside = self.path.with_name(f"{self.path.name}.replaced-{int(time.time())}")
                self.path.rename(aside)
                old = None
        if old is not None and self.is_finished():
            return "finished"
        self.path.mkdir(parents=True, exist_ok=True)
        status = "resume" if old is not None else "fresh"
        write_yaml(self.file("params.yaml"), params)
        return status

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
            platform=platform.platform(), attempts=manifest.get("attempts", 0) + 1)

    def append_metrics(self, row: dict) -> None:
        """Append one line and flush: the last line may be torn by a kill (read_jsonl skips it)."""
        with open(self.file("metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
            handle.flush()

    def truncate_metrics(self, upto_step: int) -> None:
        """On resume, keep only metric rows up to the checkpoint's step."""
        path = self.file("metrics.jsonl")
        if path.exists():
            rows = [r for r in read_jsonl(path) if r.get("step", 0) <= upto_step]
            write_jsonl(path, rows)
