"""Faults during training: non-finite steps, a full disk while saving, damaged checkpoints, signals."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file

from qlora_loop.config import ASSETS, DataConfig
from qlora_loop.data.batches import collate
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.training.checkpoint import CheckpointError, Checkpoints, save_adapter
from qlora_loop.training.fit import NonFiniteError, stop_on_signals
from qlora_loop.training.loss import chunked_lm_loss
from qlora_loop.training.optim import build_optimizer, build_scheduler
from qlora_loop.training.step import StepRunner

# 40 train rows, batch 4, grad_accum 1: loss call 1 is the memory probe, calls 2..11 are the 10 optimizer
# steps of epoch 1
SETTINGS = ["train.epochs=1", "train.batch_size=4", "train.save_every=2", "train.keep_last=0", "adapter.r=4"]


def nan_on_calls(*calls):
    """The default loss, made NaN on the given calls: a fault injected at an exact step."""
    seen = [0]

    def loss(model, batch):
        seen[0] += 1
        value = chunked_lm_loss(model, batch)
        return value * math.nan if seen[0] in calls else value
    return loss


def all_checkpoint_weights_finite(out: Path) -> bool:
    return all(torch.isfinite(t).all() for p in out.glob("checkpoints/step-*/adapter.safetensors")
               for t in load_file(p).values())


def test_nonfinite_step_stops_with_step_rows_and_last_checkpoint(tiny_qwen2, rows44, train_main, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as caught:
        train_main([f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", f"output_dir={out}", *SETTINGS],
                   loss_fn=nan_on_calls(4))
    message = str(caught.value)
    assert "non-finite loss (nan)" in message and "at step 3" in message
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in message
    rows = message.split("the step's rows: ")[1].split(", ")
    assert len(rows) == 4 and all(r.startswith(f"{rows44}:") for r in rows)
    assert len(caught.value.sample_ids) == 4
    assert all_checkpoint_weights_finite(out) and not (out / "summary.json").exists()


def test_skip_nonfinite_skips_steps_and_stops_after_too_many_in_a_row(tiny_qwen2, rows44, train_main, tmp_path):
    args = [f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", *SETTINGS, "train.skip_nonfinite=1"]
    summary = train_main(args + [f"output_dir={tmp_path / 'a'}"], loss_fn=nan_on_calls(4))
    assert summary["skipped_steps"] == 1 and summary["steps"] == 9  # the schedule did not advance on it
    steps = [json.loads(line) for line in (tmp_path / "a" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 10)) and all(math.isfinite(r["loss"]) for r in steps)
    assert all_checkpoint_weights_finite(tmp_path / "a")
    with pytest.raises(NonFiniteError, match=r"at step 3, 2 in a row \(train.skip_nonfinite=1\)"):
        train_main(args + [f"output_dir={tmp_path / 'b'}"], loss_fn=nan_on_calls(4, 5))


# --- a full disk while saving -------------------------------------------------------------------

@pytest.fixture
def runner(tiny_qwen2, qwen2_tokenizer):
    accelerator = Accelerator(mixed_precision="no")
    model = peft_model(tiny_qwen2, r=4)
    optimizer = build_optimizer(model, lr=1e-3)
    runner = StepRunner(model, optimizer, build_scheduler(optimizer, "cosine", 10, 0.1), accelerator)
    train, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"), val_split=0.0,
                                                             max_length=128))
    runner.batch = collate(train[:2], qwen2_tokenizer.pad_token_id)
    return runner


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_disk_full_at_any_stage_of_a_save_keeps_the_previous_checkpoint(runner, monkeypatch, tmp_path):
    checkpoints = Checkpoints(runner.accelerator, tmp_path, identity={"batch_size": 2}, config={}, keep_last=1)
    runner([runner.batch])
    first = checkpoints.save(runner, {"epoch": 1})
    before = snapshot(first)
    runner([runner.batch])

    real_fsync, calls = os.fsync, [0]
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.__setitem__(0, calls[0] + 1), real_fsync(fd)))
    Checkpoints(runner.accelerator, tmp_path / "dry", identity={}, config={}).save(runner, {"epoch": 1})  # counts one save's fsyncs
    stages = calls[0]
    assert stages >= 11  # 8 files, the folder, the marker, the parent folder
    for stage in range(1, stages + 1):
        count = [0]

        def full_disk(fd, stage=stage):
            count[0] += 1
            if count[0] == stage:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", full_disk)
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step-000002: No space left on device"
                                                  r".*previous checkpoint .*step-000001.*untouched"):
            checkpoints.save(runner, {"epoch": 1})
        assert checkpoints.latest() == first and snapshot(first) == before, f"stage {stage}"
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert checkpoints.save(runner, {"epoch": 1}) == checkpoints.latest() == tmp_path / "checkpoints" / "step-000002"
    assert not first.exists()  # keep_last=1 prunes only once the new one is complete


def test_a_full_disk_as_safetensors_reports_it_is_one_error_and_leaves_no_temp(runner, monkeypatch, tmp_path):
    checkpoints = Checkpoints(runner.accelerator, tmp_path, identity={}, config={})
    runner([runner.batch])
    first = checkpoints.save(runner, {"epoch": 1})
    runner([runner.batch])

    def full(tensors, path):  # what safetensors raises on a full disk: its own error, not an OSError
        Path(path).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("qlora_loop.training.checkpoint.save_file", full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step-000002: No space left on device "
                                              r"\([\d.]+ \w+ free there\); the previous checkpoint .*step-000001"):
        checkpoints.save(runner, {"epoch": 1})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [first.name]


def test_disk_full_while_saving_the_best_adapter_keeps_the_old_one(runner, qwen2_tokenizer, monkeypatch, tmp_path):
    save_adapter(runner.accelerator, runner.model, qwen2_tokenizer, tmp_path / "best")
    before = snapshot(tmp_path / "best")
    runner([runner.batch])
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError, match="cannot write the best adapter to .*best: No space left on device"):
        save_adapter(runner.accelerator, runner.model, qwen2_tokenizer, tmp_path / "best")
    assert snapshot(tmp_path / "best") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


@pytest.mark.parametrize("damage, says", [
    (lambda c: (c / "optimizer.safetensors").unlink(), r"optimizer\.safetensors is missing"),
    (lambda c: (c / "adapter.safetensors").write_bytes(b"\0" * 10), r"adapter\.safetensors is corrupt"),
    (lambda c: (c / "rng-rank0.json").write_text("{not json"), r"rng-rank0\.json is corrupt"),
    (lambda c: (c / "scheduler.json").write_text('{"__tensor__": "t99"}'), r"scheduler\.json is corrupt"),
])
def test_missing_or_corrupt_checkpoint_file_is_an_error_naming_it(runner, tmp_path, damage, says):
    checkpoints = Checkpoints(runner.accelerator, tmp_path, identity={}, config={})
    runner([runner.batch])
    saved = checkpoints.save(runner, {"epoch": 1})
    damage(saved)
    with pytest.raises(CheckpointError, match=says + ".*cannot be resumed"):
        checkpoints.restore(saved, runner)


def test_checkpoints_hold_no_pickle_only_safetensors_and_json(runner, tmp_path):
    checkpoints = Checkpoints(runner.accelerator, tmp_path, identity={}, config={})
    runner([runner.batch])
    saved = checkpoints.save(runner, {"epoch": 1})
    names = sorted(p.name for p in saved.iterdir())
    assert names == ["COMPLETE", "adapter.safetensors", "optimizer.json", "optimizer.safetensors", "rng-rank0.json",
                     "rng-rank0.safetensors", "scheduler.json", "scheduler.safetensors", "state.json"]
    before = {n: p.detach().clone() for n, p in runner.model.named_parameters() if p.requires_grad}
    optimizer_state = runner.optimizer.state_dict()
    runner([runner.batch])  # move on, then come back
    checkpoints.restore(saved, runner)
    assert all(torch.equal(before[n], p) for n, p in runner.model.named_parameters() if p.requires_grad)
    restored = runner.optimizer.state_dict()
    assert restored["param_groups"] == optimizer_state["param_groups"]
    assert runner.step == 1


# --- signals ------------------------------------------------------------------------------------

def wait_for_steps(proc, out: Path, n: int, timeout: float = 240) -> None:
    """Until the run in `out` has logged n steps (or its process ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        steps = out / "steps.jsonl"
        if steps.exists() and len(steps.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_75(tiny_qwen2, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "scripts/train.py", f"model.name_or_path={tiny_qwen2}",
                             f"output_dir={out}", "train.epochs=100", "train.batch_size=2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    last = json.loads((out / "steps.jsonl").read_text().splitlines()[-1])["step"]
    checkpoint = out / "checkpoints" / f"step-{last:06d}"
    assert f"interrupted: stopped by a signal after step {last}; checkpoint {checkpoint}" in stderr
    assert json.loads((checkpoint / "COMPLETE").read_text()) == {"step": last}
    assert "Traceback" not in stderr


@pytest.mark.parametrize("signal_to_launcher, launcher_status", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_signal_to_accelerate_launch_checkpoints_the_trainer_and_leaves_no_orphan(signal_to_launcher, launcher_status,
                                                                                   tiny_qwen2, tmp_path):
    """SIGTERM: the launcher passes it on (accelerate >= 1.16). SIGKILL, or an older launcher that exits
    on SIGTERM alone: the trainer gets SIGHUP from the kernel as its launcher dies (stop_on_signals)."""
    out = tmp_path / "out"
    launcher = psutil.Popen([sys.executable, "-m", "accelerate.commands.launch", "scripts/train.py",
                             f"model.name_or_path={tiny_qwen2}", f"output_dir={out}", "train.epochs=100",
                             "train.batch_size=2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_steps(launcher, out, 3)
    trainer, = launcher.children()
    launcher.send_signal(signal_to_launcher)
    assert launcher.wait(timeout=60) == launcher_status
    psutil.wait_procs([trainer], timeout=60)
    assert not trainer.is_running()
    last = json.loads((out / "steps.jsonl").read_text().splitlines()[-1])["step"]
    checkpoint = out / "checkpoints" / f"step-{last:06d}"
    assert json.loads((checkpoint / "COMPLETE").read_text()) == {"step": last}  # the step it was in, checkpointed
    assert not (out / ".qlora_loop.lock").exists()


def test_the_first_signal_asks_to_stop_and_the_callers_handlers_come_back():
    accelerator = Accelerator(mixed_precision="no")
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals(accelerator):
        signal.raise_signal(signal.SIGINT)  # only asks to stop after the step
        assert accelerator.check_trigger()
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == before


SECOND_SIGNAL = """
import signal
from accelerate import Accelerator
from qlora_loop.training.fit import stop_on_signals

accelerator = Accelerator(mixed_precision="no")
with stop_on_signals(accelerator):
    for sig in (signal.{first}, signal.{second}):
        signal.raise_signal(sig)
        print("asked to stop" if accelerator.check_trigger() else "running", flush=True)
"""


@pytest.mark.parametrize("first, second", [("SIGINT", "SIGINT"), ("SIGTERM", "SIGINT"), ("SIGTERM", "SIGTERM")])
def test_a_second_signal_ends_the_process_at_once(first, second):
    """Ctrl-C twice, or a scheduler's SIGTERM followed by another: the first asks to stop after the step;
    the second ends the process by that signal, without waiting for the step or the checkpoint."""
    done = subprocess.run([sys.executable, "-c", SECOND_SIGNAL.format(first=first, second=second)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -getattr(signal, second), done.stderr[-2000:]
    assert done.stdout == "asked to stop\n"  # printed after the first; nothing after the second


@pytest.mark.parametrize("quiet", [False, True])
def test_under_accelerate_launch_a_bad_input_is_our_one_line_and_a_failed_launch(quiet):
    """What is ours under the launcher: the trainer's one `error:` line with no traceback of ours before
    it, and a launch that fails; with --quiet that line is the last. What accelerate prints after it, and
    its own exit status, are accelerate's (the trainer's 2 is pinned on a plain run in test_run)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *(["--quiet"] if quiet else [])]
    done = subprocess.run([*launcher, "scripts/train.py", "train.seed=-1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    ours = "error: train.seed=-1 must be in [0, 2**32), as numpy's and torch's seeds are"
    assert done.returncode != 0 and lines.count(ours) == 1
    assert "Traceback" not in done.stderr.split(ours)[0]
    if quiet:
        assert lines[-1] == ours
