"""The output folder: nothing of the user's is touched, an old run is replaced only once the new one
has passed every check, and two runs never write into one folder at once."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_loop.config import ConfigError
from qlora_loop.data.rows import DataError
from qlora_loop.observe.rundir import LOCK, MARK
from qlora_loop.training.disk import DiskError, check_free_space

QUICK = ["train.epochs=1", "train.patience=0", "eval.num_samples=0"]


def test_a_folder_of_the_users_is_refused_even_with_overwrite_and_left_as_it_was(train_main, tmp_path):
    mine = tmp_path / "mine"
    (mine / "best").mkdir(parents=True)
    (mine / "best" / "photo.jpg").write_bytes(b"\xff\xd8 a photo")
    (mine / "samples.jsonl").write_text("my notes\n")
    before = sorted((p.relative_to(mine), p.read_bytes()) for p in mine.rglob("*") if p.is_file())
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"holds files that no qlora_loop run wrote \(best, samples\.jsonl\); "
                                              r"nothing there is touched"):
            train_main([f"output_dir={mine}", *QUICK], overwrite=overwrite)
    assert sorted((p.relative_to(mine), p.read_bytes()) for p in mine.rglob("*") if p.is_file()) == before


def test_overwrite_with_bad_data_leaves_the_finished_run_whole(train_main, tmp_path):
    out = tmp_path / "run"
    train_main([f"output_dir={out}", *QUICK])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert (out / MARK).is_file() and not (out / LOCK).exists()  # marked as a run's; the lock released
    with pytest.raises(DataError, match="missing.jsonl"):
        train_main([f"output_dir={out}", "data.train=missing.jsonl", *QUICK], overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    summary = train_main([f"output_dir={out}", *QUICK, "train.lr=1e-3"], overwrite=True)  # a good one replaces it
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 1e-3


def test_a_live_run_holds_its_folder_and_a_killed_runs_lock_is_taken_over(train_main, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(str(os.getpid()))  # a live holder: this very process
    with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {os.getpid()}\)"):
        train_main([f"output_dir={out}", *QUICK])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(gone.stdout.strip())  # a holder that has ended, as after kill -9
    summary = train_main([f"output_dir={out}", *QUICK])
    assert summary["steps"] > 0 and not (out / LOCK).exists()


# --- a full or read-only disk ---------------------------------------------------------------------

def test_a_folder_the_run_created_is_removed_when_the_run_stops_before_writing(train_main, tmp_path):
    out = tmp_path / "new"
    with pytest.raises(DataError, match="missing.jsonl"):
        train_main([f"output_dir={out}", "data.train=missing.jsonl", *QUICK])
    assert not out.exists()


def test_a_read_only_output_dir_is_one_error_naming_it(train_main, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    real_open = os.open

    def read_only(path, *args, **kwargs):  # the kernel's answer on a read-only mount
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(DiskError, match=rf"^cannot write {out / LOCK}: Read-only file system; free some space, "
                                        r"or choose a writable folder with output_dir=\.\.\.$"):
        train_main([f"output_dir={out}", *QUICK])
    assert not out.exists()  # the folder it made for the run is gone again


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"output_dir=.* has [\d.]+ \w+ free; this run writes about [\d.]+ \w+ "
                                          r"\(3 checkpoint\(s\) of .* at train\.keep_last=2"):
        check_free_space(tmp_path, adapter_bytes=2**60, keep_last=2)
    check_free_space(tmp_path, adapter_bytes=1000, keep_last=2)  # a small adapter fits


def test_disk_full_while_logging_stops_with_one_line_and_resume_continues(train_main, tmp_path, monkeypatch):
    out, lines = tmp_path / "run", [0]
    real_open = open

    def full_after_4_steps(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if Path(path).name == "steps.jsonl" and "a" in mode:
            lines[0] += 1
            if lines[0] > 4:  # a torn line, as a full disk leaves it
                f.write('{"step": 5, "ep')
                f.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    settings = [f"output_dir={out}", "train.epochs=2", "train.save_every=2", "eval.num_samples=0"]
    monkeypatch.setattr("qlora_loop.observe.log.open", full_after_4_steps, raising=False)
    with pytest.raises(DiskError, match=rf"^cannot write {out / 'steps.jsonl'}: No space left on device \(.* free "
                                        r"there\); free some space"):
        train_main(settings)
    assert not list(out.rglob("*.tmp")) and not (out / LOCK).exists()
    monkeypatch.undo()
    summary = train_main([*settings, "train.resume=auto"])
    steps = [json.loads(line)["step"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, summary["steps"] + 1))  # the torn line dropped, the steps after step 4 redone

