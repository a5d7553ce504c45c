"""Files: atomic writes, strict JSON, JSON lines. Every file the library writes goes through
here.

* Atomic: written to a temp file in the same folder, fsynced, then renamed, so a kill never
  leaves a half file that looks complete.
* A failed write (a full disk) removes its temp file and raises; the old file stays.
* Strict JSON: a non-finite float (NaN, ±inf) is written as ``null``, so any JSON reader
  loads our files (Python's ``json`` would write the non-standard ``NaN``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import DataError


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    """Strict JSON text (non-finite floats become null; other objects through str)."""
    return json.dumps(finite(obj), allow_nan=False, default=str, **kw)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name lets a later process tell a dead writer's leftover from a live one's
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are read like any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable_dir(path, what: str) -> Path:
    """Prove that folder `path` can be written (or created), with a probe file in it or in
    its nearest existing parent, before costly work whose results go there; creates nothing.
    OSError with one line naming `what` if not (an empty name too: Path("") is the current folder)."""
    if not str(path).strip():
        raise OSError(f"{what} is empty (an unset shell variable?); name the folder to write to")
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file is in the way")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == path else f" (in {existing})"
        raise OSError(f"{what} {path} cannot be written{where}: {err.strerror or type(err).__name__}; "
                      f"choose a folder you can write to") from None
    return path


def write_json(path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path) -> Any:
    return json.loads(Path(path).read_text())


def write_yaml(path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_jsonl(path, rows: Iterable[dict]) -> None:
    """One strict-JSON object per line (UTF-8 kept as is), written atomically."""
    atomic_write_text(path, "".join(dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path, row: dict) -> None:
    """Append one line and flush: a kill may tear the last line (`read_jsonl(torn_ok=True)`)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(dumps(row) + "\n")
        handle.flush()


def read_jsonl(path, *, torn_ok: bool = False) -> list[dict]:
    """Objects of a JSON-lines file. Invalid UTF-8 bytes are kept as lone surrogates (a data
    record holding them is then dropped and counted, not fatal). A line that is not JSON
    raises DataError naming file and line; with ``torn_ok`` (an append log a kill may have
    cut) a bad *last* line is dropped instead."""
    return [value for _, value in numbered_jsonl(path, torn_ok=torn_ok)]


def numbered_jsonl(path, *, torn_ok: bool = False) -> list[tuple[int, Any]]:
    """(line number, JSON value) of every non-blank line, as `read_jsonl` reads them; the
    numbers let a reader name the line of a value that is not what it expects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            if torn_ok and lineno == len(lines):
                break
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return out
