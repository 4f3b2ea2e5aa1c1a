"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable


def write_atomic(path: str | os.PathLike, write: Callable[[str], object], suffix: str = ".tmp") -> str:
    """Calls ``write(tmp)`` on a temporary path in ``path``'s directory, then renames it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was. Returns ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> str:
    """Writes ``text`` (UTF-8) atomically and durably (fsync before the rename)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return write_atomic(path, write)


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> str:
    """One JSON object per line (UTF-8), written atomically; returns the path as a string."""
    lines = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise TypeError(f"records must hold dicts, got {type(record).__name__} at index {i}")
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return write_text(path, "".join(lines))
