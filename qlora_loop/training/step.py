"""StepRunner: one optimizer step over its micro-batches (the loss functions are in loss.py).

The runner never reads the config, never saves and never prints; `fit` calls it once per
optimizer step with that step's micro-batches (`grad_accum` of them, fewer at an epoch's end).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from qlora_loop.model.adapter import adalora_of, adalora_orth_reg
from qlora_loop.training.loss import count_targets, default_loss


@dataclass
class StepResult:
    loss: float  # the step's summed per-sample losses / its units (SFT: cross-entropy per target token), all processes
    grad_norm: float  # before clipping
    lr: float  # the learning rate this step used
    tokens: int  # non-padding tokens through forward, all processes
    target_tokens: int  # the units the loss is divided by: loss-bearing tokens, or pairs, or GRPO's (loss.sample_units)
    positions: int = 0  # token slots through forward, padding included, all processes
    finite: bool = True  # False: loss or grad norm was inf/NaN and the update was not applied
    sample_ids: list[int] | None = None  # the step's example indices on all processes, when not finite
    stats: dict[str, float] = field(default_factory=dict)  # the split's and loss's numbers (GRPO: rewards, lengths)


class StepRunner:
    def __init__(self, model, optimizer, scheduler, accelerator, *, loss_fn=None, max_grad_norm: float = 1.0,
                 step: int = 0, split=None):
        """loss_fn: (model, batch) -> per-sample loss sums (see loss.py); None = loss.default_loss(model).
        split: (model, micro-batch) -> the pieces that go through forward/backward one at a time, each with
        the units it counts ("units", else its target tokens) and optional "stats" (training/preference.split_pairs:
        the same losses as the micro-batch's; training/grpo.grpo_split: its sampled groups); None = the
        micro-batch whole."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accelerator, self.max_grad_norm = accelerator, max_grad_norm
        self.loss_fn = loss_fn or default_loss(model)
        self.split = split
        self.step = step  # optimizer steps taken so far
        self.adalora = adalora_of(accelerator.unwrap_model(model))

    def __call__(self, micro_batches: list[dict]) -> StepResult:
        accelerator, model = self.accelerator, self.model
        model.train()
        pieces = micro_batches
        if self.split is not None:  # its passes without gradients (and GRPO's sampling) under the step's autocast
            with accelerator.autocast():
                pieces = [piece for batch in micro_batches for piece in self.split(model, batch)]
        # Normalise by the target tokens (or the samples of a preference or GRPO step) of the whole step on
        # all processes, so a step is the mean over them whatever the split into micro-batches and ranks.
        # DDP averages gradients over ranks, hence the x num_processes.
        local = torch.tensor([count_targets(b) for b in pieces], device=accelerator.device).sum()
        n_targets = int(accelerator.reduce(local, "sum"))
        scale = accelerator.num_processes / max(n_targets, 1)  # max(): a step with no targets is a no-op, not NaN
        loss_sum = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(pieces):
            # Gradients are all-reduced once per step, on the last piece only.
            last = i == len(pieces) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    per_sample = self.loss_fn(model, batch)
                    loss = per_sample.sum() * scale
                    if self.adalora is not None:  # spread over the window: added once per step
                        weight = self.adalora.peft_config[self.adalora.trainable_adapter_name].orth_reg_weight
                        loss = loss + weight * adalora_orth_reg(self.adalora) / len(pieces)
                accelerator.backward(loss)
            loss_sum += per_sample.detach().sum().float()

        # Clip (or, with max_grad_norm 0, only measure) the norm; accelerate unscales fp16 first.
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm or math.inf))
        loss = (accelerator.reduce(loss_sum, "sum") / max(n_targets, 1)).item()  # a CPU-GPU sync point
        tokens = int(accelerator.reduce(sum(b["attention_mask"].sum() for b in pieces), "sum"))
        positions = int(accelerator.reduce(torch.tensor(sum(b["attention_mask"].numel() for b in pieces),
                                                        device=accelerator.device), "sum"))
        stats = step_stats(pieces, accelerator)
        lr = self.scheduler.get_last_lr()[0]
        # Loss and norm are reduced over processes, so every rank takes the same branch. Under fp16
        # an inf norm is the grad scaler's business (it skips the step and lowers the scale).
        finite = math.isfinite(loss) and (math.isfinite(grad_norm) or accelerator.scaler is not None)
        if not finite:  # leave weights, optimizer, schedule and AdaLoRA budget as they were
            self.optimizer.zero_grad(set_to_none=True)
            ids = accelerator.gather(torch.cat([b["index"] for b in micro_batches]))
            return StepResult(loss, grad_norm, lr, tokens, n_targets, positions, finite=False, sample_ids=ids.tolist(),
                              stats=stats)
        self.optimizer.step()
        self.scheduler.step()
        if self.adalora is not None:  # needs this step's gradients, so before zero_grad
            self.adalora.update_and_allocate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(loss, grad_norm, lr, tokens, n_targets, positions, stats=stats)


def step_stats(pieces: list[dict], accelerator) -> dict[str, float]:
    """The means over pieces, then over processes, of what the split and the loss put in the pieces'
    "stats" dicts (GRPO's rewards, lengths, KL); {} for a step without any."""
    seen: dict[str, list[float]] = {}
    for piece in pieces:
        for key, value in piece.get("stats", {}).items():
            seen.setdefault(key, []).append(value)
    if not seen:
        return {}
    means = torch.tensor([sum(v) / len(v) for v in seen.values()], device=accelerator.device, dtype=torch.float64)
    return dict(zip(seen, accelerator.reduce(means, "mean").tolist()))
