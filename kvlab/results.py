"""Crash-safe result files: atomic JSON writes, config hashes, resume (per unit, and per window
through ``PartialLog``)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TextIO


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write(path: str | os.PathLike, write: Callable[[TextIO], Any]) -> None:
    """Write through ``write`` to a temporary file, fsync it and rename it over ``path``: a reader
    sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON atomically."""
    _atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=False, default=str))


def read_json(path: str | os.PathLike) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_finished(path: str | os.PathLike, chash: str) -> Any | None:
    """The stored result at ``path`` if it was computed with the same config hash."""
    data = read_json(path)
    if isinstance(data, dict) and data.get("config_hash") == chash:
        return data
    return None


def partial_path(unit_path: str | os.PathLike) -> Path:
    """Where the finished windows of the unit stored at ``unit_path`` live until it completes."""
    path = Path(unit_path)
    return path.with_name(path.stem + ".partial.jsonl")


class PartialLog:
    """Finished pieces of an unfinished unit: one JSON line each, appended and fsynced as each finishes.

    Every line carries the unit's config hash. On open, lines of another config, duplicates (by
    ``key``) and a torn last line (a crash mid-write) are dropped, and the file is rewritten
    atomically if anything was dropped, so later appends start on a clean line.
    """

    def __init__(self, path: str | os.PathLike, chash: str, key: str = "start"):
        self.path, self.chash, self.key = Path(path), chash, key
        self.records: dict[Any, dict] = {}
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError):
            text = ""
        lines = text.splitlines()
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.pop("config_hash", None) == chash and key in rec:
                self.records.setdefault(rec[key], rec)
        if len(self.records) != len(lines) or (text and not text.endswith("\n")):
            self._rewrite()

    def _line(self, record: dict) -> str:
        return json.dumps({"config_hash": self.chash, **record}, default=str) + "\n"

    def _rewrite(self) -> None:
        if not self.records:
            self.remove()
            return
        _atomic_write(self.path, lambda f: f.writelines(self._line(r) for r in self.records.values()))

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(self._line(record))
            f.flush()
            os.fsync(f.fileno())
        self.records[record[self.key]] = record

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
