# accelerate launch scripts/train.py [--config configs/FILE.yaml] [key.path=value ...] [--overwrite]
"""Train a QLoRA adapter: config -> Accelerator -> build_* -> fit(). With no arguments, the
embedded default: a tiny model built offline and the bundled self-cognition set, on a CPU.

Exit status: 0 done; 2 bad config, data or model; 3 non-finite loss; 75 stopped by SIGTERM/SIGINT
after writing a checkpoint (run the same command with train.resume=auto to continue)."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qlora_loop.checkpoint import CheckpointError, Checkpoints, data_hash, save_adapter
from qlora_loop.config import ConfigError, load_config, to_dict
from qlora_loop.data import build_dataloaders, build_datasets, steps_per_epoch
from qlora_loop.fit import EarlyStopping, Interrupted, LoopState, NonFiniteError, fit
from qlora_loop.log import RunLog
from qlora_loop.model import (ModelError, add_adapter, find_linear4bit_targets, load_base_model, load_tokenizer,
                              resolve_compute_dtype, trainable_parameters)
from qlora_loop.optim import build_optimizer, build_scheduler
from qlora_loop.rows import DataError
from qlora_loop.step import StepRunner, causal_lm_loss
from qlora_loop.tiny import resolve_model_path

RUN_FILES = ("steps.jsonl", "history.jsonl", "summary.json", "best", "checkpoints")


def main(argv: list[str] | None = None, loss_fn=causal_lm_loss) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file; keys override the defaults in qlora_loop/config.py")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in output_dir and start afresh")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir, cfg.train.resume, args.overwrite)

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
        if args.overwrite or not cfg.train.resume:
            for name in RUN_FILES:
                shutil.rmtree(output_dir / name, ignore_errors=True) if name in ("best", "checkpoints") else \
                    (output_dir / name).unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")

    # data
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.revision, cfg.data.chat_template)
    d = cfg.data
    train_rows, val_rows, stats = build_datasets(tokenizer, d.train, d.val, d.val_split, d.max_length,
                                                 d.system_prompt, cfg.train.seed, d.on_error, d.max_skip_fraction)
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
    runner = StepRunner(model, optimizer, scheduler, accelerator, loss_fn, cfg.train.max_grad_norm)

    # resume
    identity = {"batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                "max_length": cfg.data.max_length, "world_size": accelerator.num_processes,
                "data_hash": data_hash(cfg.data.train, cfg.data.val)}
    checkpoints = Checkpoints(accelerator, output_dir, identity, to_dict(cfg), cfg.train.keep_last)
    state = None
    resume_from = find_resume(checkpoints, cfg.train.resume, log)
    if resume_from is not None:
        state = LoopState.from_dict(checkpoints.restore(resume_from, runner, cfg.train.force_resume))
        log.resume(runner.step, state.epoch)
        log.print(f"resumed from {resume_from}: step {runner.step}, epoch {state.epoch}")

    # train
    previous = stop_on_signals(accelerator)
    try:
        summary = fit(runner, train_dl, val_dl, log, lambda: save_adapter(accelerator, model, tokenizer,
                                                                          output_dir / "best"),
                      checkpoints, epochs=cfg.train.epochs, grad_accum=cfg.train.grad_accum,
                      stopper=EarlyStopping(cfg.train.patience, cfg.train.mode, cfg.train.monitor),
                      eval_every=cfg.train.eval_every, save_every=cfg.train.save_every,
                      skip_nonfinite=cfg.train.skip_nonfinite, state=state)
    except NonFiniteError as e:
        samples = ", ".join(train_rows[i]["where"] for i in sorted(set(e.sample_ids)))
        raise NonFiniteError(f"{e}; the step's rows: {samples}", e.sample_ids) from None
    except Interrupted as e:
        raise Interrupted(f"{e}; checkpoint {checkpoints.latest()}; continue with the same command and "
                          "train.resume=auto") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.summary(summary)
    accelerator.end_training()
    return summary


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Never lose a run by accident: a finished run or an unfinished one's checkpoints stay unless asked."""
    if overwrite:
        return
    if (output_dir / "summary.json").exists():
        raise ConfigError(f"output_dir={output_dir} holds a finished run; pass --overwrite to replace it "
                          "or choose another folder with output_dir=...")
    if not resume and any((output_dir / "checkpoints").glob("step-*")):
        raise ConfigError(f"output_dir={output_dir} holds checkpoints of an unfinished run; continue it with "
                          "train.resume=auto, or pass --overwrite to start afresh")


def find_resume(checkpoints: Checkpoints, resume: str | None, log) -> Path | None:
    """train.resume: None -> start afresh; auto -> the newest complete checkpoint, if any; else a path."""
    for partial in checkpoints.incomplete():
        log.print(f"[yellow]ignoring {partial}: incomplete (the run stopped while writing it)")
    if resume is None:
        return None
    if resume == "auto":
        return checkpoints.latest()
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint folder")
    return path


def stop_on_signals(accelerator) -> dict:
    """First SIGTERM/SIGINT: finish the current step, write a checkpoint, stop (fit checks the
    trigger on every rank). A second one gets the default action: the process ends at once."""
    def handler(signum, frame):
        accelerator.set_trigger()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, ModelError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(75)
