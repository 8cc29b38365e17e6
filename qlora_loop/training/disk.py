"""Writing to disk: what a failed write tells a user (the path, why, the free space there), and
the space a run needs before it starts.

safetensors reports a full disk as its own SafetensorError ("... I/O error: No space left on device
(os error 28)"), not as an OSError; both are write failures here.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError

from qlora_loop.errors import ConfigError, DiskError
from qlora_loop.files import GIB

WRITE_ERRORS = (OSError, SafetensorError)
# errors of the place written to, not of the run: each gets one line and exit 2 (cli.py)
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
DISK_ERRNOS = FULL_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM}


def error_number(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"os error (\d+)", str(e))
    return int(found.group(1)) if found else None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system of `path`, or of its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def describe(e: BaseException, path: str | Path) -> str:
    """`No space left on device (1.2 MiB free on /data)`, from an OSError or a SafetensorError."""
    number = error_number(e)
    why = os.strerror(number) if number is not None else str(e).splitlines()[0]
    free = free_bytes(path) if number in FULL_ERRNOS else None
    return why if free is None else f"{why} ({human(free)} free there)"


def is_disk_error(e: BaseException) -> bool:
    return error_number(e) in DISK_ERRNOS


def as_disk_error(e: BaseException, path: str | Path | None = None) -> DiskError:
    """The error as one line; `path` names the place when the error itself names none."""
    path = getattr(e, "filename", None) or path or "the disk"
    return DiskError(f"cannot write {path}: {describe(e, path)}; free some space, or choose a writable folder "
                     "with output_dir=...")


def check_free_space(output_dir: str | Path, *, adapter_bytes: int, keep_last: int) -> None:
    """Refuse to start when the output folder's disk cannot hold what the run writes: up to
    keep_last + 1 checkpoints (the newest is written before the oldest goes), each the adapter and
    its two AdamW moments, and two copies of the best adapter while it is replaced."""
    checkpoints = (keep_last + 1) if keep_last > 0 else 1
    needed = adapter_bytes * (3 * checkpoints + 2) + 16 * 2**20  # + logs, tokenizer copies, curves
    free = free_bytes(output_dir)
    if free is not None and free < needed:
        raise ConfigError(f"output_dir={output_dir} has {human(free)} free; this run writes about {human(needed)} "
                          f"({checkpoints} checkpoint(s) of {human(3 * adapter_bytes)} at train.keep_last={keep_last}, "
                          "and the best adapter): free some space, lower train.keep_last, or choose another "
                          "output_dir=...")


def human(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
