"""The output folder: nothing of the user's is touched, an old run is replaced only once the new one
has passed every check, and two runs never write into one folder at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from qlora_loop.config import ConfigError
from qlora_loop.rows import DataError
from qlora_loop.rundir import LOCK, MARK

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
