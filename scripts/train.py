# accelerate launch scripts/train.py [--config configs/FILE.yaml] [key.path=value ...] [--overwrite]
"""Train a QLoRA adapter: config -> Accelerator -> build_* -> fit(). With no arguments, the
embedded default: a tiny model built offline and the bundled self-cognition set, on a CPU."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qlora_loop.config import ConfigError, load_config, to_dict
from qlora_loop.data import DataError, build_dataloaders, build_datasets, steps_per_epoch
from qlora_loop.checkpoint import save_adapter
from qlora_loop.fit import EarlyStopping, fit
from qlora_loop.log import RunLog
from qlora_loop.model import (ModelError, add_adapter, find_linear4bit_targets, load_base_model, load_tokenizer,
                              resolve_compute_dtype, trainable_parameters)
from qlora_loop.optim import build_optimizer, build_scheduler
from qlora_loop.step import StepRunner
from qlora_loop.tiny import resolve_model_path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML file; keys override the defaults in qlora_loop/config.py")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    output_dir = Path(cfg.output_dir)
    if (output_dir / "summary.json").exists() and not args.overwrite:
        raise ConfigError(f"output_dir={output_dir} holds a finished run; pass --overwrite to replace it "
                          "or choose another folder with output_dir=...")

    # setup
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_compute_dtype(cfg.model.compute_dtype, torch.device(device_type))
    precision = cfg.train.mixed_precision
    if precision == "auto":  # autocast on a GPU in the compute dtype; on a CPU it only slows things down
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if device_type == "cuda" else "no"
    accelerator = Accelerator(mixed_precision=precision)
    set_seed(cfg.train.seed)
    log = RunLog(accelerator, output_dir, cfg.train.log_every)
    with accelerator.main_process_first():  # the first process builds a builtin model, the others reuse it
        model_path = resolve_model_path(cfg.model.name_or_path)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in ("steps.jsonl", "history.jsonl", "summary.json"):  # an unfinished earlier run's
            (output_dir / name).unlink(missing_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")

    # data
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.revision, cfg.data.chat_template)
    train_rows, val_rows, stats = build_datasets(tokenizer, cfg.data.train, cfg.data.val, cfg.data.val_split,
                                                 cfg.data.max_length, cfg.data.system_prompt, cfg.train.seed)
    log.data_report(stats)
    train_dl, val_dl = build_dataloaders(train_rows, val_rows, cfg.train.batch_size, tokenizer.pad_token_id,
                                         cfg.train.seed, cfg.data.num_workers)
    train_dl, val_dl = accelerator.prepare(train_dl, val_dl)
    total_steps = steps_per_epoch(len(train_dl), cfg.train.grad_accum) * cfg.train.epochs

    # model, adapter, optimizer
    model = load_base_model(model_path, accelerator.device, dtype, cfg.model.gradient_checkpointing,
                            cfg.model.trust_remote_code, cfg.model.revision, cfg.model.attn_implementation)
    targets = find_linear4bit_targets(model) if cfg.adapter.target_modules == "auto" else cfg.adapter.target_modules
    a = cfg.adapter
    model = add_adapter(model, a.kind, a.r, a.alpha, a.dropout, targets, total_steps, a.init_r, a.tinit, a.tfinal,
                        a.delta_t, a.orth_reg_weight, a.extra)
    log.model_report(targets, *trainable_parameters(model))
    optimizer = build_optimizer(model, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.train.scheduler, total_steps, cfg.train.warmup_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)

    # train
    runner = StepRunner(model, optimizer, scheduler, accelerator, max_grad_norm=cfg.train.max_grad_norm)
    summary = fit(runner, train_dl, val_dl, log, lambda: save_adapter(accelerator, model, tokenizer,
                                                                      output_dir / "best"),
                  epochs=cfg.train.epochs, grad_accum=cfg.train.grad_accum,
                  stopper=EarlyStopping(cfg.train.patience, cfg.train.mode), monitor=cfg.train.monitor,
                  eval_every=cfg.train.eval_every)
    log.summary(summary)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
