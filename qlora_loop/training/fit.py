"""fit(): epochs of StepRunner calls, evaluation, early stopping, the best adapter, checkpoints.

fit never calls backward(): all gradient work is in step.StepRunner. Where the loop stands is one
LoopState, saved in every checkpoint, so a resumed run continues from exactly that position.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import select
import signal
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qlora_loop.config import TrainConfig
from qlora_loop.data.batches import steps_per_epoch
from qlora_loop.errors import CheckpointError, Interrupted, NonFiniteError
from qlora_loop.training.loss import default_loss, sample_units
from qlora_loop.training.memory import peak_memory_bytes


@dataclass
class Plan:
    """How fit() trains: `epochs` of optimizer steps of `grad_accum` micro-batches; evaluation at
    each epoch end and every `eval_every` steps; a checkpoint at each epoch end and every `save_every`
    steps; early stopping after `patience` evaluations in a row without improvement of `monitor` in
    `mode` (patience 0 never stops; `monitor` is val_loss, train_loss or a metric of Watch.metrics); up to `skip_nonfinite` non-finite steps in a row skipped; an
    evaluation whose drift is above `max_drift` never kept as the best. Plan.of(cfg.train, ...) is a
    run's."""
    epochs: int
    grad_accum: int = 1
    patience: int = 0
    monitor: str = "val_loss"  # val_loss | train_loss | a metric's name
    mode: str = "min"
    eval_every: int = 0
    save_every: int = 0
    skip_nonfinite: int = 0
    max_drift: float | None = None

    @classmethod
    def of(cls, train: TrainConfig, *, grad_accum: int) -> "Plan":
        """The plan of config.TrainConfig; `grad_accum` resolved by the launch (train.global_batch_size)."""
        return cls(train.epochs, grad_accum, patience=train.patience, monitor=train.monitor, mode=train.mode,
                   eval_every=train.eval_every, save_every=train.save_every, skip_nonfinite=train.skip_nonfinite,
                   max_drift=train.max_drift)

    def improves(self, value: float, best: float | None) -> bool:
        """Whether an evaluation's `value` beats `best` in `mode`; NaN never does."""
        return not math.isnan(value) and (best is None or (value < best if self.mode == "min" else value > best))


@dataclass
class Watch:
    """What fit measures and shows beside the loss, each optional: `drift()` (forgetting.drift.Drift)
    and `metrics()` ({name: score} of generated replies, eval.during.metrics_watch) at every
    evaluation, `sample(epoch)` (model.generate.sampler) before the first step (epoch 0) and after
    each epoch."""
    drift: Callable[[], float] | None = None
    metrics: Callable[[], dict[str, float]] | None = None
    sample: Callable[[int], None] | None = None


@dataclass
class Meter:
    """Token-weighted running means over a span of steps."""
    loss_sum: float = 0.0
    targets: int = 0  # loss-bearing tokens
    tokens: int = 0  # non-padding tokens
    positions: int = 0  # token slots, padding included
    steps: int = 0
    grad_norm_sum: float = 0.0
    seconds: float = 0.0
    lr: float = 0.0

    def add(self, result, seconds: float) -> None:
        self.loss_sum += result.loss * result.target_tokens
        self.targets += result.target_tokens
        self.tokens += result.tokens
        self.positions += result.positions
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

    @property
    def loss_tokens_per_second(self) -> float:
        return self.targets / max(self.seconds, 1e-9)

    @property
    def padding_share(self) -> float:
        return 1 - self.tokens / max(self.positions, 1)

    def rates(self) -> dict:
        return {"tokens_per_second": self.tokens_per_second, "loss_tokens_per_second": self.loss_tokens_per_second,
                "padding_share": self.padding_share}


@dataclass
class LoopState:
    """Where training continues from: `epoch` and the micro-batches of it already consumed."""
    epoch: int = 1
    batches_done: int = 0
    best_epoch: int | None = None
    best_step: int | None = None
    stopped: bool = False  # early stopping has decided; a resumed run ends at once
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    best: float | None = None  # the best monitored value so far
    bad_evals: int = 0  # evaluations in a row without improvement
    epoch_meter: Meter = field(default_factory=Meter)
    run_meter: Meter = field(default_factory=Meter)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopState":
        """The state a checkpoint saved (dataclasses.asdict of one); fields this code does not know,
        or lacks, are a CheckpointError naming them."""
        _check_fields(cls, d, "loop")
        meters = {k: _check_fields(Meter, d.get(k, {}), k) for k in ("epoch_meter", "run_meter")}
        return cls(**{**d, **{k: Meter(**v) for k, v in meters.items()}})


def _check_fields(cls, saved: dict, what: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise CheckpointError(f"the checkpoint's {what} state has fields this qlora_loop does not know ({unknown}); "
                              "resume with the qlora_loop that wrote it, or start afresh with --overwrite")
    return saved


@torch.no_grad()
def evaluate(model, dataloader, accelerator, loss_fn=None) -> float | None:
    """Mean loss per target token (per sample of a preference batch) over the whole validation set, on all processes together.
    loss_fn: as the StepRunner's; None = loss.default_loss(model)."""
    if dataloader is None:
        return None
    loss_fn = loss_fn or default_loss(model)
    model.eval()
    loss_sum, n_targets = 0.0, 0
    for batch in dataloader:
        with accelerator.autocast():
            per_sample = loss_fn(model, batch).float()
        counts = sample_units(batch)
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


def epoch_batches(dataloader, epoch: int, skip: int, accelerator):
    """The dataloader in `epoch`'s order (see data.EpochSampler), past its first `skip` micro-batches."""
    if skip:
        dataloader = accelerator.skip_first_batches(dataloader, skip)
    for target in (dataloader, getattr(dataloader, "sampler", None)):
        if hasattr(target, "set_epoch"):
            target.set_epoch(epoch)
            break
    return dataloader


def fit(runner, loaders, plan: Plan, *, log, save_best, checkpoints=None, state: LoopState | None = None,
        watch: Watch | None = None) -> dict:
    """Train `loaders` = (train_dl, val_dl or None) by `plan` from `state` (a fresh run without one).
    `save_best()` runs each time the monitored value improves; `checkpoints`
    (checkpoint.Checkpoints) is saved every plan.save_every steps and at each epoch end."""
    accelerator, started = runner.accelerator, time.perf_counter()
    train_dl, val_dl = loaders
    state, watch = state or LoopState(), watch or Watch()
    steps = steps_per_epoch(len(train_dl), plan.grad_accum)

    def check(epoch: int) -> tuple[float | None, float | None, dict[str, float]]:
        """Evaluate (loss, drift, metrics); keep the adapter if it is the best yet; decide whether to stop."""
        val_loss = evaluate(runner.model, val_dl, accelerator, runner.loss_fn)
        moved = watch.drift() if watch.drift is not None else None
        scores = watch.metrics() if watch.metrics is not None else {}
        value = {"val_loss": val_loss, "train_loss": state.epoch_meter.loss, **scores}.get(plan.monitor)
        if value is None:
            raise ValueError(f"monitor {plan.monitor!r} is not measured here: neither a loss nor a metric of "
                             f"Watch.metrics ({sorted(scores)})")
        if plan.max_drift is not None and moved is not None and moved > plan.max_drift:
            value = math.nan  # too far from the base to be kept; counts as no improvement
        if plan.improves(value, state.best):
            state.best, state.bad_evals = value, 0
            state.best_epoch, state.best_step = epoch, runner.step
            save_best()
        else:
            state.bad_evals += 1
        state.stopped = plan.patience > 0 and state.bad_evals >= plan.patience
        return val_loss, moved, scores

    def checkpoint():
        if checkpoints is not None:
            checkpoints.save(runner, dataclasses.asdict(state))

    if watch.sample is not None and runner.step == 0 and state.batches_done == 0 and state.epoch == 1:
        watch.sample(0)  # what the base answers, before any training
    for epoch in range(state.epoch, plan.epochs + 1):
        if state.stopped:
            break
        log.epoch_start(epoch, plan.epochs, steps, done=math.ceil(state.batches_done / plan.grad_accum))
        val_loss = moved = None
        scores = {}
        # forward/backward/update: one StepRunner call per optimizer step
        for window in windows(epoch_batches(train_dl, epoch, state.batches_done, accelerator), plan.grad_accum):
            t0 = time.perf_counter()
            result = runner(window)
            state.batches_done += len(window)
            if not result.finite:
                _skip_nonfinite(state, result, runner, log, plan.skip_nonfinite, checkpoints)
                continue
            state.nonfinite_in_row = 0
            state.epoch_meter.add(result, time.perf_counter() - t0)
            state.run_meter.add(result, time.perf_counter() - t0)
            log.step(runner.step, epoch, result, state.epoch_meter.tokens_per_second)
            # termination on a signal: every rank agrees through the trigger, saves, then stops
            if accelerator.check_trigger():
                checkpoint()
                raise Interrupted(f"stopped by a signal after step {runner.step}")
            mid_epoch = state.batches_done < len(train_dl)
            if plan.eval_every and runner.step % plan.eval_every == 0 and mid_epoch:
                val_loss, moved, scores = check(epoch)
            if state.stopped:
                break
            if plan.save_every and runner.step % plan.save_every == 0 and mid_epoch:
                checkpoint()
        # end of epoch: evaluate, keep the best, log, checkpoint the position of the next epoch
        if not state.stopped:
            val_loss, moved, scores = check(epoch)
        meter = state.epoch_meter
        log.epoch_end({"epoch": epoch, "step": runner.step, "train_loss": meter.loss, "val_loss": val_loss,
                       "drift": moved, "metrics": scores,
                       "lr": meter.lr, "grad_norm": meter.grad_norm_sum / max(meter.steps, 1),
                       "train_tokens": meter.tokens, "seconds": meter.seconds, **meter.rates(),
                       "peak_memory_bytes": peak_memory_bytes(accelerator.device)})
        if watch.sample is not None:
            watch.sample(epoch)
        state.epoch, state.batches_done, state.epoch_meter = epoch + 1, 0, Meter()
        checkpoint()

    run = state.run_meter
    return {"best_epoch": state.best_epoch, "best_step": state.best_step, "best_metric": state.best,
            "monitor": plan.monitor, "epochs_run": min(state.epoch - 1, plan.epochs),
            "stopped_early": state.stopped, "steps": runner.step, "skipped_steps": state.skipped_steps,
            "train_loss": run.loss, "train_tokens": run.tokens, "train_target_tokens": run.targets,
            "train_seconds": time.perf_counter() - started, "step_seconds": run.seconds, **run.rates(),
            "peak_memory_bytes": peak_memory_bytes(accelerator.device)}


def _skip_nonfinite(state: LoopState, result, runner, log, limit: int, checkpoints) -> None:
    """Count a skipped step; past `limit` in a row, stop with what a user needs to find the cause."""
    state.nonfinite_in_row += 1
    state.skipped_steps += 1
    what = f"non-finite loss ({result.loss}) or gradient norm ({result.grad_norm}) at step {runner.step + 1}"
    if state.nonfinite_in_row > limit:
        last = checkpoints.latest() if checkpoints is not None else None
        raise NonFiniteError(f"{what}, {state.nonfinite_in_row} in a row (train.skip_nonfinite={limit}); the "
                             f"last good checkpoint is {last or 'none yet'}", result.sample_ids)
    log.print(f"[yellow]skipped: {what} ({state.nonfinite_in_row} in a row, {state.skipped_steps} in all)")


@contextlib.contextmanager
def stop_on_signals(accelerator):
    """While training: the first SIGTERM/SIGINT sets Accelerate's trigger, so every rank finishes the
    current step, writes a checkpoint and stops (fit checks the trigger after each step). A second
    one gets the default action: the process ends at once. The previous handlers come back on exit.

    Under a launcher (accelerate launch, torchrun) the launcher's death comes as SIGHUP and stops the
    run the same way: a launcher that is killed, or one that exits on SIGTERM without passing it on
    (accelerate before 1.16), never leaves a trainer running on its own. The kernel may send it more
    than once (once per thread of the dying launcher), so repeats are harmless. Run directly (`nohup
    python scripts/train.py &`), a trainer outlives its shell as any program does."""
    def stop(signum, frame):
        accelerator.set_trigger()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)

    def orphaned(signum, frame):
        _detach_dead_pipes()  # the launcher read our stdout/stderr; printing must not fail before the checkpoint
        accelerator.set_trigger()

    handlers = {signal.SIGTERM: stop, signal.SIGINT: stop}
    launched = any(k in os.environ for k in LAUNCHER_ENV)
    if launched:
        handlers[signal.SIGHUP] = orphaned
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    if launched:
        parent = os.getppid()
        _parent_death_signal(signal.SIGHUP)
        if os.getppid() != parent:  # it died before the request took effect
            orphaned(signal.SIGHUP, None)
    try:
        yield
    finally:
        if launched:
            _parent_death_signal(0)
        for sig, old in previous.items():
            signal.signal(sig, old)


# set in the training process by accelerate launch's single-process path and by torchrun
LAUNCHER_ENV = ("ACCELERATE_USE_CPU", "TORCHELASTIC_RUN_ID")


def _parent_death_signal(sig: int) -> None:
    """Linux's PR_SET_PDEATHSIG: the kernel sends `sig` when the parent ends (0 turns it off). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def _detach_dead_pipes() -> None:
    """Point stdout/stderr at /dev/null where they are pipes with no reader left (poll says POLLERR),
    so that a broken pipe cannot end the process before its checkpoint is written."""
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                if any(events & select.POLLERR for _, events in poller.poll(0)):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
