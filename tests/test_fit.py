"""fit(): early stopping on a scripted monitor, best-adapter saves, history rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator

from qlora_loop.observe.log import HISTORY_COLUMNS, RunLog
from qlora_loop.training.fit import Plan, fit, windows
from qlora_loop.training.step import StepResult


class ScriptedRunner:
    """Stands in for StepRunner (not under test here): each step reports its epoch's scripted loss."""

    def __init__(self, accelerator, losses_by_epoch, steps_per_epoch):
        self.accelerator, self.losses, self.per_epoch = accelerator, losses_by_epoch, steps_per_epoch
        self.model, self.loss_fn, self.step = torch.nn.Linear(1, 1), None, 0

    def __call__(self, window):
        loss = self.losses[self.step // self.per_epoch]
        self.step += 1
        return StepResult(loss=loss, grad_norm=1.0, lr=1e-3, tokens=10 * len(window), target_tokens=5 * len(window))


def run_fit(tmp_path, losses, patience, mode="min", epochs=None):
    accelerator = Accelerator(mixed_precision="no")
    batches = [{"labels": torch.zeros(1, 2)}] * 4  # 4 micro-batches, grad_accum 2 -> 2 steps per epoch
    runner = ScriptedRunner(accelerator, losses, steps_per_epoch=2)
    saved_at = []
    plan = Plan(epochs or len(losses), grad_accum=2, patience=patience, monitor="train_loss", mode=mode)
    summary = fit(runner, (batches, None), plan, log=RunLog(accelerator, tmp_path),
                  save_best=lambda: saved_at.append(runner.step))
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    return summary, saved_at, history


def test_stops_after_patience_evaluations_without_improvement(tmp_path):
    # best at epoch 3; epochs 4, 5, 6 do not improve -> stop after epoch 6 with patience 3
    summary, saved_at, history = run_fit(tmp_path, [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 2.0, 1.0], patience=3)
    assert summary["epochs_run"] == 6 and summary["stopped_early"] is True
    assert summary["best_epoch"] == 3 and summary["best_metric"] == 3.0 and summary["best_step"] == 6
    assert saved_at == [2, 4, 6]  # the best adapter is saved each time the monitor improves, only then
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5, 6]
    assert [row["train_loss"] for row in history] == [5.0, 4.0, 3.0, 3.5, 3.2, 3.1]
    assert all(set(row) == set(HISTORY_COLUMNS) for row in history)
    assert all(row["val_loss"] is None and row["train_tokens"] == 40 for row in history)


def test_mode_max_and_improvement_resets_patience(tmp_path):
    summary, saved_at, _ = run_fit(tmp_path, [0.1, 0.3, 0.2, 0.4, 0.3, 0.3, 0.9], patience=2, mode="max")
    assert summary["epochs_run"] == 6 and summary["best_epoch"] == 4 and summary["best_metric"] == 0.4
    assert saved_at == [2, 4, 8]


def test_runs_all_epochs_when_patience_is_zero_or_never_exhausted(tmp_path):
    summary, saved_at, _ = run_fit(tmp_path, [3.0, 3.0, 3.0, 3.0], patience=0)
    assert summary["epochs_run"] == 4 and summary["stopped_early"] is False and saved_at == [2]
    summary, _, _ = run_fit(tmp_path / "b", [3.0, 2.0, 1.0], patience=1)
    assert summary["epochs_run"] == 3 and summary["stopped_early"] is False and summary["best_epoch"] == 3


def test_nan_never_counts_as_improvement(tmp_path):
    assert not Plan(1).improves(math.nan, None) and not Plan(1, mode="max").improves(math.nan, 1.0)
    summary, saved_at, _ = run_fit(tmp_path, [1.0, math.nan, math.nan, 0.5], patience=2)
    assert summary["stopped_early"] and summary["epochs_run"] == 3 and summary["best_metric"] == 1.0
    assert saved_at == [2]


def test_windows_group_micro_batches_with_a_short_last_window():
    assert [len(w) for w in windows(range(7), 3)] == [3, 3, 1]
    assert [w for w in windows(range(4), 2)] == [[0, 1], [2, 3]]


@pytest.fixture(autouse=True)
def _out(tmp_path):
    (tmp_path / "b").mkdir()
