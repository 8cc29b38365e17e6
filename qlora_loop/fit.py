"""fit(): epochs of StepRunner calls, evaluation, early stopping, the best adapter kept.

fit never calls backward(): all gradient work is in step.StepRunner.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from qlora_loop.data import IGNORE, steps_per_epoch
from qlora_loop.log import peak_memory_bytes
from qlora_loop.step import causal_lm_loss


@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations in a row without improvement of the monitored value
    (patience 0 never stops). NaN never counts as an improvement."""
    patience: int
    mode: str = "min"
    best: float | None = None
    bad_evals: int = 0

    def update(self, value: float) -> bool:
        """Record one evaluation; True if it is the best so far."""
        improved = not math.isnan(value) and (
            self.best is None or (value < self.best if self.mode == "min" else value > self.best))
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience


@torch.no_grad()
def evaluate(model, dataloader, accelerator, loss_fn=causal_lm_loss) -> float | None:
    """Mean loss per target token over the whole validation set, on all processes together."""
    if dataloader is None:
        return None
    model.eval()
    loss_sum, n_targets = 0.0, 0
    for batch in dataloader:
        with accelerator.autocast():
            per_sample = loss_fn(model, batch).float()
        counts = (batch["labels"][:, 1:] != IGNORE).sum(dim=1)
        # gather_for_metrics drops the samples accelerate repeats to even out the last batch.
        per_sample, counts = accelerator.gather_for_metrics((per_sample, counts))
        loss_sum += per_sample.sum().item()
        n_targets += counts.sum().item()
    model.train()
    return loss_sum / max(n_targets, 1)


def windows(dataloader, size: int):
    """Group micro-batches into optimizer steps of `size`; the last one of an epoch may be shorter."""
    window = []
    for batch in dataloader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


class Meter:
    """Token-weighted running means over a span of steps."""

    def __init__(self):
        self.loss_sum = self.targets = self.tokens = self.steps = 0
        self.grad_norm_sum = self.seconds = 0.0
        self.lr = 0.0

    def add(self, result, seconds: float) -> None:
        self.loss_sum += result.loss * result.target_tokens
        self.targets += result.target_tokens
        self.tokens += result.tokens
        self.grad_norm_sum += result.grad_norm
        self.steps += 1
        self.seconds += seconds
        self.lr = result.lr

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.targets, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def fit(runner, train_dl, val_dl, log, save_best, *, epochs: int, grad_accum: int, stopper: EarlyStopping,
        monitor: str = "val_loss", eval_every: int = 0) -> dict:
    """Train for up to `epochs`; `save_best()` is called each time the monitored value improves."""
    accelerator, started = runner.accelerator, time.perf_counter()
    steps = steps_per_epoch(len(train_dl), grad_accum)
    run, best = Meter(), {"best_epoch": None, "best_step": None}
    stopped_early, epoch = False, 0

    def check(epoch: int, train_loss: float) -> tuple[float | None, bool]:
        """Evaluate, keep the adapter if it is the best yet; True when all ranks agree to stop."""
        val_loss = evaluate(runner.model, val_dl, accelerator, runner.loss_fn)
        if stopper.update(val_loss if monitor == "val_loss" else train_loss):
            best.update(best_epoch=epoch, best_step=runner.step)
            save_best()
        if stopper.should_stop:
            accelerator.set_trigger()
        return val_loss, accelerator.check_trigger()

    for epoch in range(1, epochs + 1):
        if hasattr(train_dl, "set_epoch"):
            train_dl.set_epoch(epoch)
        log.epoch_start(epoch, epochs, steps)
        meter, val_loss = Meter(), None
        # forward/backward/update: one StepRunner call per optimizer step
        for window in windows(train_dl, grad_accum):
            t0 = time.perf_counter()
            result = runner(window)
            seconds = time.perf_counter() - t0
            meter.add(result, seconds)
            run.add(result, seconds)
            log.step(runner.step, epoch, result, meter.tokens_per_second)
            if eval_every and runner.step % eval_every == 0 and runner.step % steps:  # mid-epoch only
                val_loss, stopped_early = check(epoch, meter.loss)
                if stopped_early:
                    break
        # evaluation, best adapter, logging
        if not stopped_early:
            val_loss, stopped_early = check(epoch, meter.loss)
        log.epoch_end({"epoch": epoch, "train_loss": meter.loss, "val_loss": val_loss, "lr": meter.lr,
                       "grad_norm": meter.grad_norm_sum / max(meter.steps, 1), "train_tokens": meter.tokens,
                       "seconds": meter.seconds, "tokens_per_second": meter.tokens_per_second,
                       "peak_memory_bytes": peak_memory_bytes(accelerator.device)})
        # termination
        if stopped_early:
            break

    return {**best, "best_metric": stopper.best, "monitor": monitor, "epochs_run": epoch,
            "stopped_early": runner.step < steps * epochs, "steps": runner.step,
            "train_loss": run.loss, "train_tokens": run.tokens, "train_target_tokens": run.targets,
            "train_seconds": time.perf_counter() - started, "step_seconds": run.seconds,
            "tokens_per_second": run.tokens_per_second, "peak_memory_bytes": peak_memory_bytes(accelerator.device)}
