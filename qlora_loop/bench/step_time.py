# OMP_WAIT_POLICY=PASSIVE python -m qlora_loop.bench.step_time --steps 6 --batch-size 8 --tokens 128
"""Seconds per optimizer step of our StepRunner on a real model, for each way of running the step
(peft's LoRA forward or ours with shared inputs, qlora_loop.model.fused_lora; activation checkpointing on or
off; dropout or none; the 4-bit matmuls in the dtype model.compute_dtype=auto resolves to on this CPU,
in float32 or in bfloat16; bfloat16 autocast or none), interleaved step by step so that a load from other
processes falls on every variant alike. The median and the fastest step are reported, with the CPU."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from accelerate import Accelerator

from qlora_loop.config import AdapterConfig
from qlora_loop.cpu import describe_cpu, resolve_compute_dtype
from qlora_loop.model.adapter import add_adapter
from qlora_loop.model.builtin import resolve_model_path
from qlora_loop.model.load import load_base_model, set_gradient_checkpointing
from qlora_loop.training.loss import default_loss
from qlora_loop.training.optim import build_optimizer, build_scheduler
from qlora_loop.training.step import StepRunner

# name: how its StepRunner is built. shared: qlora_loop.model.fused_lora (else peft's LoRA forward); base:
# the 4-bit matmuls' compute dtype (None: what model.compute_dtype=auto resolves to here); autocast:
# bfloat16 autocast around the step (then the shared path gives way to peft's, which casts).
VARIANTS = {
    "peft + checkpointing": dict(shared=False, checkpointing=True),
    "peft": dict(shared=False),
    "shared inputs": dict(shared=True),  # the default on a CPU
    "shared inputs, float32 base": dict(shared=True, base=torch.float32),
    "shared inputs, bfloat16 base": dict(shared=True, base=torch.bfloat16),
    "peft + bf16 autocast": dict(shared=False, autocast=True),
    "peft without dropout": dict(shared=False, dropout=False),
    "shared inputs without dropout": dict(shared=True, dropout=False),
}


def runner_for(path: str, accelerator: Accelerator, variant: dict, *, p: float, r: int) -> StepRunner:
    """A StepRunner on the 4-bit base at `path` with a LoRA of rank `r` and dropout `p`, as `variant`
    (one of VARIANTS: shared, checkpointing, dropout, autocast, base) says."""
    v = {"checkpointing": False, "dropout": True, "autocast": False, "base": None, **variant}
    base = v["base"] or resolve_compute_dtype("auto", torch.device("cpu"))[0]
    model = load_base_model(path, torch.device("cpu"), base, gradient_checkpointing=False, autocast=v["autocast"])
    model = add_adapter(model, AdapterConfig(r=r, alpha=2 * r, dropout=p if v["dropout"] else 0.0,
                                             shared_inputs=v["shared"]))
    checkpointing = v["checkpointing"]
    set_gradient_checkpointing(model, checkpointing)
    model.train()
    optimizer = build_optimizer(model, "paged_adamw_32bit", 1e-4)
    return StepRunner(model, optimizer, build_scheduler(optimizer, "constant", 10 ** 6, 0.0), accelerator,
                      loss_fn=default_loss(model))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--variants", help=f"names separated by ';' (default: all of {'; '.join(VARIANTS)})")
    args = parser.parse_args(argv)
    path = resolve_model_path(args.model)
    accelerator = Accelerator(mixed_precision="no", cpu=True)  # the bf16 variant's autocast is entered below
    names = args.variants.split(";") if args.variants else list(VARIANTS)
    runners = {name: runner_for(path, accelerator, VARIANTS[name], p=args.dropout, r=args.r) for name in names}
    vocab = next(iter(runners.values())).model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch_size, args.tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    seconds = {name: [] for name in runners}
    for step in range(args.steps + 1):  # step 0 warms up
        for name, runner in runners.items():
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if VARIANTS[name].get("autocast") \
                else contextlib.nullcontext()
            start = time.perf_counter()
            with autocast:
                runner([batch])
            if step:
                seconds[name].append(time.perf_counter() - start)
    tokens = args.batch_size * args.tokens
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    result = {name: {"median_step_s": round(m, 3), "tokens_per_s": round(tokens / m, 1),
                     "fastest_step_s": round(min(seconds[name]), 3)} for name, m in medians.items()}
    dtype, why = resolve_compute_dtype("auto", torch.device("cpu"))
    print(json.dumps({"args": vars(args), "cpu": describe_cpu(), "threads": torch.get_num_threads(),
                      "auto_compute_dtype": f"{str(dtype).removeprefix('torch.')} ({why})", "result": result},
                     indent=1))
    return result


if __name__ == "__main__":
    main()
