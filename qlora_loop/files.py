"""Files and sizes: GIB, a file's sha256, and writes that never leave half a file or half a folder
(written beside the target, then renamed over it: a rename within one file system is atomic)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

GIB = 1024 ** 3


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path`: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Move the finished folder `new` to `target` (both on one file system). What was at `target` is set
    aside first (.NAME.old beside it) and deleted only once `new` is in its place: a crash never leaves
    half a folder at `target`."""
    new, target = Path(new), Path(target)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
