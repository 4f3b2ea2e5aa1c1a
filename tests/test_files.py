"""Atomic, durable writes (promptkd.files): the data reaches the disk before the rename that publishes
it, the rename itself is synced, a failed write leaves the old file, and modes follow the umask."""

from __future__ import annotations

import os
import stat

import pytest

from promptkd import files


@pytest.fixture
def journal(monkeypatch):
    """Records ("fsync", path) and ("replace", src, dst) in the order they happen."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_file_is_synced_before_and_published_after(tmp_path, journal):
    path = tmp_path / "config.yaml"
    files.write_text(path, "a: 1\n")
    assert path.read_text() == "a: 1\n"
    (rename,) = [e for e in journal if e[0] == "replace"]
    tmp = rename[1]
    order = [e[:2] for e in journal]
    assert order.index(("fsync", tmp)) < order.index(("replace", tmp)) < order.index(("fsync", str(tmp_path)))
    assert not [n for n in os.listdir(tmp_path) if n != "config.yaml"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        files.write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode) == mode


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_published_directory_is_synced_whole(tmp_path, journal):
    tmp, final = tmp_path / ".tmp-ckpt", tmp_path / "ckpt"
    os.makedirs(final)
    (final / "old.bin").write_text("old")
    os.makedirs(tmp / "model")
    (tmp / "model" / "weights.bin").write_text("new")
    (tmp / "state.json").write_text("{}")
    files.publish_dir(str(tmp), str(final))
    assert sorted(os.listdir(final)) == ["model", "state.json"] and not os.path.exists(str(final) + ".old")
    order = [e[:2] for e in journal]
    publish = order.index(("replace", str(tmp)))
    for synced in (tmp / "model" / "weights.bin", tmp / "state.json", tmp / "model", tmp):
        assert order.index(("fsync", str(synced))) < publish, synced
    assert order.index(("fsync", str(tmp_path)), publish) > publish
