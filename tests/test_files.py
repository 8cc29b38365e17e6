"""qlora_loop/files.py: a file's sha256, and writes that leave the old file or folder whole when they fail."""

from __future__ import annotations

import hashlib
import os

import pytest

from qlora_loop.files import replace_dir, sha256_file, write_atomic


def test_sha256_file_is_the_sha256_of_its_bytes(tmp_path):
    data = os.urandom(3 << 20)  # over several 1 MiB blocks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_write_atomic_replaces_the_whole_file_or_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "cache.json"
    write_atomic(path, "é")
    assert path.read_bytes() == "é".encode("utf-8")
    write_atomic(path, b"\x00new")
    assert path.read_bytes() == b"\x00new"

    def refused(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError):
        write_atomic(path, "lost")
    assert path.read_bytes() == b"\x00new" and os.listdir(path.parent) == ["cache.json"]  # no temporary left


def test_replace_dir_puts_the_new_folder_in_place_of_the_old(tmp_path):
    target, new = tmp_path / "best", tmp_path / ".best.tmp"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "weights").write_text(text)
    replace_dir(new, target)
    assert (target / "weights").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["best"]
    new.mkdir()
    replace_dir(new, tmp_path / "fresh")  # nothing there before
    assert sorted(os.listdir(tmp_path)) == ["best", "fresh"]
