"""Paged AdamW on the adapter's parameters, and a warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import bitsandbytes as bnb
from transformers import get_scheduler

OPTIMIZERS = {
    # Paged: optimizer state lives in unified memory and is paged to CPU RAM under GPU memory
    # pressure instead of failing with OOM. On a CPU, bitsandbytes runs them unpaged.
    "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
}


def build_optimizer(model, name: str = "paged_adamw_32bit", lr: float = 2e-4, weight_decay: float = 0.0, *,
                    loraplus_lr_ratio: float | None = None):
    """`name` over the adapter's parameters. loraplus_lr_ratio: LoRA+, peft's create_loraplus_optimizer:
    the B matrices (and 1-d parameters such as DoRA's magnitudes) in groups at lr x ratio, A at lr; the
    schedule scales every group alike, so the ratio holds through warmup and decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; was the adapter added?")
    if loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, OPTIMIZERS[name], lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                         loraplus_weight_decay=weight_decay)
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer, name: str, total_steps: int, warmup_ratio: float):
    """Linear warmup over ceil(warmup_ratio x total_steps) optimizer steps, then `name` decay.
    Stepped once per optimizer step by the StepRunner (never through accelerator.prepare, which
    would step it once per process)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    scheduler = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[name]
    return get_scheduler(scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
