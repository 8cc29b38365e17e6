"""Our peer: qlora_loop.run.train as a user runs it, the bench's settings given as key.path=value
overrides; its counts and losses read back from the run's own records (steps.jsonl, history.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_loop.bench.measure import last_epoch_loss
from qlora_loop.bench.settings import LORA_TARGETS
from qlora_loop.config import load_config
from qlora_loop.run import train


def ours_overrides(spec: dict, *, warmup_ratio: float, extra: list[str]) -> list[str]:
    """Our run's key.path=value overrides: the spec's settings, length grouping (our default, said
    outright), gradient checkpointing as our default decides (auto: off when the batch fits), no sample
    replies, replay or drift (HF has none), all epochs (no early stop); then `extra` (--ours-set),
    which wins. Checked by load_config, whose ConfigError names a wrong key."""
    overrides = [f"model.name_or_path={spec['model']}", f"data.train={spec['train']}", f"data.val={spec['val']}",
                 f"data.max_length={spec['seq']}", f"train.batch_size={spec['batch_size']}",
                 f"train.epochs={spec['epochs']}", f"train.lr={spec['lr']}", f"train.warmup_ratio={warmup_ratio}",
                 "train.scheduler=cosine", "train.optimizer=paged_adamw_32bit", "train.weight_decay=0.0",
                 "train.max_grad_norm=1.0", "train.grad_accum=1", f"adapter.r={spec['r']}",
                 f"adapter.alpha={spec['alpha']}", f"adapter.dropout={spec['dropout']}",
                 f"adapter.target_modules=[{','.join(LORA_TARGETS)}]", "train.patience=0", "train.log_every=1",
                 f"train.seed={spec['seed']}", "data.group_by_length=true",
                 "eval.num_samples=0", "eval.drift_samples=0", "data.replay=0", *extra]
    load_config(None, overrides)
    return overrides


def run_ours(spec: dict, out: Path) -> dict:
    """Our run in `out`: totals, step and loop seconds, the last epoch's loss and the held-out loss."""
    summary = train(load_config(None, spec["ours_overrides"] + [f"output_dir={out}"]))
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {"steps": len(steps), "tokens": sum(r["tokens"] for r in steps),
            "target_tokens": sum(r["target_tokens"] for r in steps), "positions": sum(r["positions"] for r in steps),
            "step_seconds": summary["step_seconds"], "loop_seconds": summary["train_seconds"],
            "final_train_loss": last_epoch_loss(steps), "eval_loss": history[-1]["val_loss"]}
