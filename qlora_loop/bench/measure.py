"""What the peers measure alike: a batch's token counts, the last epoch's loss, the held-out loss
(fit.evaluate with our loss, for every peer), and the rates derived from a run's raw measures."""

from __future__ import annotations

import functools

from torch.utils.data import DataLoader

from qlora_loop.data.batches import collate
from qlora_loop.model.load import keep_training_layout
from qlora_loop.training.fit import evaluate
from qlora_loop.training.loss import count_targets, default_loss


def batch_counts(batch) -> tuple[int, int, int]:
    """(non-padding tokens, all positions, loss-bearing tokens) of one batch; targets as our loss counts them."""
    return int(batch["attention_mask"].sum()), batch["attention_mask"].numel(), count_targets(batch)


def last_epoch_loss(rows: list[dict]) -> float:
    """Mean loss per target token over the last epoch's steps; rows: {epoch, loss, target_tokens}."""
    last = [r for r in rows if r["epoch"] == max(r["epoch"] for r in rows)]
    return sum(r["loss"] * r["target_tokens"] for r in last) / max(sum(r["target_tokens"] for r in last), 1)


def totals(rows: list[dict]) -> dict:
    """Steps, and the tokens, target tokens and positions summed over them."""
    return {"steps": len(rows), **{k: sum(r[k] for r in rows) for k in ("tokens", "target_tokens", "positions")}}


def heldout_loss(model, examples: list[dict], accelerator, *, pad_id: int, batch_size: int) -> float:
    """Mean loss per target token on the held-out rows: fit.evaluate with our default loss, under
    `accelerator`'s autocast, so every peer's number is computed by the code that computes ours."""
    keep_training_layout(model)  # same bitsandbytes CPU kernel as our evaluate (see model.keep_training_layout)
    # Prepared, as our run's validation loader is: evaluate's gather_for_metrics trims the last batch by
    # the remainder Accelerate's shared GradientState holds, which a peer's own evaluation leaves set.
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=functools.partial(collate, pad_id=pad_id))
    return evaluate(model, accelerator.prepare_data_loader(loader), accelerator, loss_fn=default_loss(model))


def derived(r: dict) -> dict:
    """The rates of one run's raw measures (totals, step and loop seconds)."""
    return {"loss_tokens_per_second": r["target_tokens"] / r["step_seconds"],
            "tokens_per_second": r["tokens"] / r["step_seconds"],
            "loop_loss_tokens_per_second": r["target_tokens"] / r["loop_seconds"],
            "loop_tokens_per_second": r["tokens"] / r["loop_seconds"],
            "step_seconds_mean": r["step_seconds"] / r["steps"],
            "padding_share": 1 - r["tokens"] / r["positions"]}
