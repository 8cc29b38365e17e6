# accelerate launch scripts/train.py [--config configs/FILE.yaml] [key.path=value ...] [--overwrite] [--dry-run]
"""Train a QLoRA adapter: config -> Accelerator -> build_* -> fit(). With no arguments, the
embedded default: a tiny model built offline and the bundled self-cognition set, on a CPU.

Exit status: 0 done; 2 bad config, data, model, launch, or a batch that does not fit in memory;
3 non-finite loss; 75 stopped by SIGTERM/SIGINT after writing a checkpoint (run the same command
with train.resume=auto to continue)."""

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

from qlora_loop.audit import check_label_masks
from qlora_loop.checkpoint import CheckpointError, Checkpoints, data_hash, save_adapter
from qlora_loop.config import ConfigError, load_config, to_dict
from qlora_loop.data import build_dataloaders, build_datasets, steps_per_epoch
from qlora_loop.distributed import LaunchError, check_engine_taken, check_launch, describe_launch, prepare_sharding
from qlora_loop.dryrun import dry_run_config, report
from qlora_loop.fit import EarlyStopping, Interrupted, LoopState, NonFiniteError, fit
from qlora_loop.generate import as_messages, sample_replies, validation_prompts
from qlora_loop.log import RunLog
from qlora_loop.manifest import build_manifest
from qlora_loop.memory import OutOfMemory, advice, longest_batch, probe_memory
from qlora_loop.model import (ModelError, add_adapter, check_packing, find_linear4bit_targets, load_base_model,
                              load_tokenizer, resolve_compute_dtype, trainable_parameters)
from qlora_loop.optim import build_optimizer, build_scheduler
from qlora_loop.plot import plot_run
from qlora_loop.rows import DataError
from qlora_loop.step import StepRunner, default_loss
from qlora_loop.tiny import resolve_model_path
from qlora_loop.trackers import check_trackers, start_trackers, tensorboard_dir

RUN_FILES = ("steps.jsonl", "history.jsonl", "samples.jsonl", "summary.json", "curves.png", "best", "checkpoints")


def main(argv: list[str] | None = None, loss_fn=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file; keys override the defaults in qlora_loop/config.py")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in output_dir and start afresh")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device: targets, trainable parameters, memory estimate")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        report(dry_run_config(cfg, resolve_model_path(cfg.model.name_or_path)))
        return {}
    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir, cfg.train.resume, args.overwrite)
    trackers = check_trackers(cfg.train.log_with)

    # setup: the launch is checked before anything is loaded or written
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_compute_dtype(cfg.model.compute_dtype, torch.device(device_type))
    precision = cfg.train.mixed_precision
    if precision == "auto":  # autocast on a GPU in the compute dtype; on a CPU it only slows things down
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if device_type == "cuda" else "no"
    try:
        accelerator = Accelerator(mixed_precision=precision, cpu=device_type == "cpu", log_with=trackers or None,
                                  project_dir=output_dir)
    except (RuntimeError, ValueError) as e:  # e.g. an FSDP or DeepSpeed launch on a machine without a GPU
        raise LaunchError(f"Accelerate cannot start this launch: {str(e).splitlines()[0]}; check the "
                          "--config_file given to accelerate launch (or `accelerate config`)") from None
    check_engine_taken(accelerator)
    launch = describe_launch(accelerator)
    t = cfg.train
    grad_accum = check_launch(launch, batch_size=t.batch_size, grad_accum=t.grad_accum,
                              global_batch_size=t.global_batch_size, quant_storage=cfg.model.quant_storage,
                              max_grad_norm=t.max_grad_norm, resume=t.resume, adapter_kind=cfg.adapter.kind)
    set_seed(t.seed)
    log = RunLog(accelerator, output_dir, t.log_every)
    with accelerator.main_process_first():  # the first process builds a builtin model, the others reuse it
        model_path = resolve_model_path(cfg.model.name_or_path)
    start_run(accelerator, output_dir, cfg, fresh=args.overwrite or not t.resume)
    start_trackers(accelerator, to_dict(cfg), run_name=output_dir.name)

    # data
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.revision, cfg.data.chat_template)
    d = cfg.data
    train_rows, val_rows, stats = build_datasets(tokenizer, d.train, d.val, d.val_split, d.max_length,
                                                 d.system_prompt, t.seed, d.on_error, d.max_skip_fraction)
    log.data_report(stats)
    audited = check_label_masks(tokenizer, train_rows, d.train, d.system_prompt, d.audit_rows, d.max_length)
    log.print(f"label-mask audit: {audited} rows checked, no problem found" if audited else
              "[yellow]label-mask audit off (data.audit_rows=0)")
    train_dl, val_dl = build_dataloaders(train_rows, val_rows, t.batch_size, tokenizer.pad_token_id, t.seed,
                                         d.num_workers, d.group_by_length, accelerator.num_processes, d.packing)
    train_dl, val_dl = accelerator.prepare(train_dl, val_dl)
    total_steps = steps_per_epoch(len(train_dl), grad_accum) * t.epochs

    # model, adapter, optimizer
    quant_storage = getattr(torch, cfg.model.quant_storage) if cfg.model.quant_storage else None
    model = load_base_model(model_path, accelerator.device, dtype, cfg.model.gradient_checkpointing,
                            cfg.model.trust_remote_code, cfg.model.revision, cfg.model.attn_implementation,
                            quant_storage, autocast=precision != "no")
    targets = find_linear4bit_targets(model) if cfg.adapter.target_modules == "auto" else cfg.adapter.target_modules
    a = cfg.adapter
    model = add_adapter(model, a.kind, a.r, a.alpha, a.dropout, targets, total_steps, a.init_r, a.tinit, a.tfinal,
                        a.delta_t, a.orth_reg_weight, a.extra)
    log.model_report(targets, *trainable_parameters(model))
    model = prepare_sharding(accelerator, model, t.batch_size, quant_storage)
    optimizer = build_optimizer(model, t.optimizer, t.lr, t.weight_decay)
    scheduler = build_scheduler(optimizer, t.scheduler, total_steps, t.warmup_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = loss_fn or default_loss(model)  # lm_head applied only at trained positions, in chunks
    runner = StepRunner(model, optimizer, scheduler, accelerator, loss_fn, t.max_grad_norm)
    if d.packing:  # before any step: packed rows must not see each other
        with accelerator.autocast():
            share = check_packing(model, train_rows)
        if share is not None:
            log.print(f"packing check: packed rows stay apart (logit difference {share:.1%} of rows that mix)")

    # memory: the longest batch, forward and backward, before step 1
    if t.memory_probe:
        worst = longest_batch(train_rows, t.batch_size, tokenizer.pad_token_id, d.packing)
        check_memory(runner, worst, t.memory_budget_gib, log,
                     (t.batch_size, grad_accum, d.max_length, cfg.model.gradient_checkpointing))

    # resume
    identity = {"batch_size": t.batch_size, "grad_accum": grad_accum, "max_length": d.max_length,
                "world_size": accelerator.num_processes, "data_hash": data_hash(d.train, d.val),
                "batching": "packed" if d.packing else "grouped" if d.group_by_length else "shuffled"}
    manifest = build_manifest(to_dict(cfg), tokenizer, model_path, [d.train, d.val], accelerator.device)
    checkpoints = Checkpoints(accelerator, output_dir, identity, to_dict(cfg), t.keep_last, manifest)
    if launch.shards_parameters or launch.deepspeed:  # each process holds only its share of the state
        log.print(f"[yellow]no resumable checkpoints under {launch.shards_parameters or 'DeepSpeed'}; "
                  "the best adapter is still saved whole")
        checkpoints = None
    state = None
    resume_from = find_resume(checkpoints, t.resume, log) if checkpoints else None
    if resume_from is not None:
        state = LoopState.from_dict(checkpoints.restore(resume_from, runner, t.force_resume, tokenizer, model_path))
        log.resume(runner.step, state.epoch)
        log.print(f"resumed from {resume_from}: step {runner.step}, epoch {state.epoch}")

    # train
    previous = stop_on_signals(accelerator)
    try:
        summary = fit(runner, train_dl, val_dl, log,
                      lambda: save_adapter(accelerator, model, tokenizer, output_dir / "best", manifest),
                      checkpoints, epochs=t.epochs, grad_accum=grad_accum,
                      stopper=EarlyStopping(t.patience, t.mode, t.monitor), eval_every=t.eval_every,
                      save_every=t.save_every, skip_nonfinite=t.skip_nonfinite, state=state,
                      sample=samples(cfg, runner, tokenizer, log, launch.shards_parameters))
    except NonFiniteError as e:
        rows = ", ".join(train_rows[i]["where"] for i in sorted(set(e.sample_ids)))
        raise NonFiniteError(f"{e}; the step's rows: {rows}", e.sample_ids) from None
    except Interrupted as e:
        raise Interrupted(f"{e}; checkpoint {checkpoints and checkpoints.latest()}; continue with the same "
                          "command and train.resume=auto") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.summary(summary)
    accelerator.on_main_process(plot_run)(output_dir)
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


def start_run(accelerator, output_dir: Path, cfg, fresh: bool) -> None:
    """On the main process: clear a previous run's files when starting afresh; write the resolved config."""
    @accelerator.on_main_process
    def write():
        if fresh:
            for name in RUN_FILES:
                path = output_dir / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            # TensorBoard's event files only, not its folder: OUTPUT_DIR/qlora_loop may be something else
            # of the user's (output_dir=. in a checkout holds the package of that name)
            for events in tensorboard_dir(output_dir).glob("**/events.out.tfevents.*"):
                events.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True),
                                                encoding="utf-8")

    write()
    accelerator.wait_for_everyone()


def check_memory(runner, batch: dict, budget_gib: float | None, log, settings: tuple) -> None:
    """Probe the heaviest micro-step; every rank stops if any rank would run out of memory."""
    accelerator = runner.accelerator
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    probe = probe_memory(runner.model, batch, runner.loss_fn, accelerator, budget_gib)
    log.memory_report(probe)
    misfits = accelerator.reduce(torch.tensor(int(not probe.fits), device=accelerator.device), "sum")
    if misfits:
        raise OutOfMemory(advice(probe, *settings))


def samples(cfg, runner, tokenizer, log, sharded_by: str | None):
    """fit's `sample(epoch)`: greedy replies to eval.prompts, or to the first eval.num_samples
    validation rows, generated on the main process; None when there is nothing to ask."""
    if cfg.eval.prompts:
        prompts, references = [as_messages(p, cfg.data.system_prompt) for p in cfg.eval.prompts], \
            [None] * len(cfg.eval.prompts)
    else:
        found = validation_prompts(to_dict(cfg), cfg.eval.num_samples) if cfg.eval.num_samples else None
        prompts, references = (found[0], found[1]) if found else ([], [])
    if not prompts:
        return None
    if sharded_by:  # one process cannot run a model whose weights are spread over all of them
        log.print(f"[yellow]no sample replies under {sharded_by}: generation would need every process")
        return None
    accelerator = runner.accelerator

    @accelerator.on_main_process
    def sample(epoch: int) -> None:
        # generate() runs the unwrapped model, outside the autocast Accelerate wraps its forward in;
        # under float16 its float32 norms would otherwise meet a float16 head
        with accelerator.autocast():
            replies = sample_replies(accelerator.unwrap_model(runner.model), tokenizer, prompts,
                                     cfg.eval.max_new_tokens)
        log.samples(epoch, runner.step, [p[-1]["content"] for p in prompts], replies, references)

    return sample


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
    except (ConfigError, DataError, ModelError, CheckpointError, LaunchError, OutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(75)
