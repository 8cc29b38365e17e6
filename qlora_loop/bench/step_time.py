# OMP_WAIT_POLICY=PASSIVE python -m qlora_loop.bench.step_time --steps 8 --batch-size 4 --tokens 64
"""Seconds per optimizer step of our StepRunner on a real model, for each way of running the step
(LoRA dropout drawn by peft's nn.Dropout or by gaps; activation checkpointing on or off), interleaved
step by step so that a load from other processes falls on every variant alike. The median is reported."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from accelerate import Accelerator

from qlora_loop.builtin import resolve_model_path
from qlora_loop.loss import default_loss
from qlora_loop.model import add_adapter, load_base_model, set_gradient_checkpointing
from qlora_loop.optim import build_optimizer, build_scheduler
from qlora_loop.step import StepRunner

VARIANTS = {  # name: (gap_dropout, gradient_checkpointing)
    "peft dropout, checkpointing": (False, True),
    "peft dropout": (False, False),
    "gap dropout": (True, False),
    "no dropout": (False, False),  # the bound: what dropout costs at all
}


def runner_for(path: str, *, gap_dropout: bool, checkpointing: bool, dropout: float, r: int) -> StepRunner:
    model = load_base_model(path, torch.device("cpu"), gradient_checkpointing=False)
    model = add_adapter(model, "lora", r=r, alpha=2 * r, dropout=dropout, gap_dropout=gap_dropout)
    set_gradient_checkpointing(model, checkpointing)
    model.train()
    optimizer = build_optimizer(model, "paged_adamw_32bit", 1e-4)
    return StepRunner(model, optimizer, build_scheduler(optimizer, "constant", 10 ** 6, 0.0),
                      Accelerator(mixed_precision="no", cpu=True), loss_fn=default_loss(model))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args(argv)
    path = resolve_model_path(args.model)
    runners = {name: runner_for(path, gap_dropout=gap, checkpointing=ckpt, r=args.r,
                                dropout=0.0 if name == "no dropout" else args.dropout)
               for name, (gap, ckpt) in VARIANTS.items()}
    vocab = runners["gap dropout"].model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch_size, args.tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    seconds = {name: [] for name in runners}
    for step in range(args.steps + 1):  # step 0 warms up
        for name, runner in runners.items():
            start = time.perf_counter()
            runner([batch])
            if step:
                seconds[name].append(time.perf_counter() - start)
    tokens = args.batch_size * args.tokens
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    result = {name: {"median_step_s": round(m, 3), "tokens_per_s": round(tokens / m, 1)} for name, m in medians.items()}
    print(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "result": result}, indent=1))
    return result


if __name__ == "__main__":
    main()
