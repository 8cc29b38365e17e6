"""The output folder of a run: a run writes only into a folder that is new, empty or one of its
runs; it replaces an old run only once the new one has passed every check; one run at a time.

A run marks a folder it writes into as its own (MARK, a small JSON file); a folder with files but
no mark belongs to someone else and is never written into or cleared. The lock (LOCK, holding the
holder's pid) refuses a second run into a folder a live run holds; a lock left by a killed run is
taken over, so resuming after kill -9 works as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import yaml

from qlora_loop.config import ConfigError
from qlora_loop.observe.trackers import tensorboard_dir
from qlora_loop.training.disk import WRITE_ERRORS, DiskError, as_disk_error, is_disk_error

MARK = ".qlora_loop-run"
LOCK = ".qlora_loop.lock"
# What a run writes at the top of its output folder, and so what a fresh start clears.
RUN_FILES = ("steps.jsonl", "history.jsonl", "samples.jsonl", "summary.json", "curves.png", "best", "checkpoints",
             "config.yaml")


def check_output_dir(output_dir: str | Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse, before anything is loaded: a folder of someone else's (files, no mark), even with
    --overwrite; a finished run, or an unfinished one's checkpoints, unless asked."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir={output_dir} is a file; give a folder (new, empty, or a run of ours)")
    ours = (output_dir / MARK).is_file() or (output_dir / LOCK).is_file()  # a run's, or one starting now
    if output_dir.is_dir() and not ours and any(output_dir.iterdir()):
        found = sorted(p.name for p in output_dir.iterdir())
        raise ConfigError(f"output_dir={output_dir} holds files that no qlora_loop run wrote ({', '.join(found[:3])}"
                          f"{', ...' if len(found) > 3 else ''}); nothing there is touched, --overwrite included: "
                          "choose a new or empty folder with output_dir=...")
    if overwrite:
        return
    if (output_dir / "summary.json").exists():
        raise ConfigError(f"output_dir={output_dir} holds a finished run; pass --overwrite to replace it "
                          "or choose another folder with output_dir=...")
    if not resume and any((output_dir / "checkpoints").glob("step-*")):
        raise ConfigError(f"output_dir={output_dir} holds checkpoints of an unfinished run; continue it with "
                          "train.resume=auto, or pass --overwrite to start afresh")


@contextlib.contextmanager
def hold(accelerator, output_dir: str | Path):
    """The folder's lock, held by the main process for the duration (released on any exit); a live
    holder is an error naming its pid, a dead one's lock is taken over. Marks the folder as a run's;
    a folder it created is removed again if the run fails before writing anything into it."""
    path = Path(output_dir) / LOCK

    @accelerator.on_main_process
    def take():
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _holder(path)
                if holder is not None and _alive(holder):
                    raise ConfigError(f"output_dir={output_dir} is in use by another run (pid {holder}); wait for "
                                      "it to end, or choose another folder with output_dir=...") from None
                path.unlink(missing_ok=True)  # left by a run that was killed: take it over
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(str(os.getpid()))
                (path.parent / MARK).write_text(json.dumps({"written_by": "qlora_loop"}) + "\n", encoding="utf-8")
            except OSError:
                path.unlink(missing_ok=True)
                raise
            return

    @accelerator.on_main_process
    def release(failed: bool):
        if _holder(path) == os.getpid():
            path.unlink(missing_ok=True)
        if failed and created:  # a run that stopped before writing anything leaves no folder behind
            with contextlib.suppress(OSError):
                if {p.name for p in path.parent.iterdir()} <= {MARK}:
                    (path.parent / MARK).unlink(missing_ok=True)
                    path.parent.rmdir()

    created, failed = not path.parent.exists(), True
    try:
        take()
        accelerator.wait_for_everyone()
        yield
        failed = False
    except WRITE_ERRORS as e:  # a full or read-only disk, here or anywhere in the run: the path and the fix
        if not is_disk_error(e) or isinstance(e, DiskError):
            raise
        raise as_disk_error(e, path.parent) from None
    finally:
        release(failed)


def start_run(accelerator, output_dir: str | Path, config: dict, *, fresh: bool) -> None:
    """On the main process, once every check has passed: clear a previous run's files when starting
    afresh (only the files a run writes); write the resolved config."""
    output_dir = Path(output_dir)

    @accelerator.on_main_process
    def write():
        if fresh:
            for name in RUN_FILES:
                path = output_dir / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            # TensorBoard's event files only, not its folder: OUTPUT_DIR/qlora_loop may be something else
            # of the user's (output_dir=. in a checkout holds the package of that name)
            for events in tensorboard_dir(output_dir).glob("**/events.out.tfevents.*"):
                events.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                                                encoding="utf-8")

    write()
    accelerator.wait_for_everyone()


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
