"""Atomic, durable file and directory writes: a reader (or a resumed run) never sees a half-written file.

A file is written to a temporary name in its directory, flushed to disk (``fsync``), given the
mode a plain ``open`` would give it (0666 less the umask; ``mkstemp`` alone leaves 0600), renamed
into place, and the directory is synced so that the rename itself survives a power loss. A
directory (a checkpoint) is filled under a temporary name, every file in it synced, then renamed
the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that the names created, renamed or removed in it are on disk."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: str | os.PathLike) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str | os.PathLike) -> None:
    """fsync every file and directory under ``path`` (deepest first), then ``path`` itself."""
    for folder, _, names in os.walk(os.fspath(path), topdown=False):
        for name in names:
            sync_file(os.path.join(folder, name))
        sync_dir(folder)


def write_atomic(path: str | os.PathLike, write: Callable[[str], object], suffix: str = ".tmp") -> str:
    """Calls ``write(tmp)`` on a temporary path in ``path``'s directory, syncs it, renames it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was. Returns ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        sync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    sync_dir(folder)
    return path


def write_text(path: str | os.PathLike, text: str) -> str:
    """Writes ``text`` (UTF-8) atomically and durably."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_atomic(path, write)


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> str:
    """One JSON object per line (UTF-8), written atomically; returns the path as a string."""
    lines = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise TypeError(f"records must hold dicts, got {type(record).__name__} at index {i}")
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return write_text(path, "".join(lines))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Appends one line and syncs it (a log a crash may cut only at its last line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line if line.endswith("\n") else line + "\n")
        f.flush()
        os.fsync(f.fileno())


def remove_entries(folder: str, names) -> None:
    """Removes the named files and directories of ``folder`` (a symlink is removed, not followed)."""
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def publish_dir(tmp: str, final: str) -> None:
    """Puts the finished directory ``tmp`` at ``final``, durably: its files are synced, then it is renamed.

    An existing ``final`` is moved aside first and removed after, so at every moment either the old or
    the new directory is complete at ``final`` or at ``final + ".old"``.
    """
    sync_tree(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    old = None
    if os.path.exists(final):
        old = final.rstrip(os.sep) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    sync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)
