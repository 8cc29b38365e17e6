"""train(cfg): one run, config -> Accelerator -> build_* -> fit() -> summary, top to bottom.

Callable from a notebook or a test with a config object (`config.load_config(path, overrides)`);
main(argv) parses the arguments of `qlora-loop train` and scripts/train.py around it. The sections
below are the order of a run: setup (launch checked before anything is loaded or written), base
model, the base's own replies (replay rows against forgetting, drift prompts to measure it), data,
adapter, resume, train.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from qlora_loop.config import Config, ConfigError, load_config, objective_metrics, resolved_beta, to_dict
from qlora_loop.cpu import cpu_threads, local_processes, physical_cores, resolve_compute_dtype
from qlora_loop.data.audit import check_label_masks
from qlora_loop.data.batches import build_dataloaders, check_packing, collate_any, steps_per_epoch
from qlora_loop.data.cache import cache_root
from qlora_loop.data.mixtures import build_datasets, source_lines
from qlora_loop.data.preference import answer_rows, build_preference_datasets
from qlora_loop.data.sources import local_files
from qlora_loop.files import sha256_file
from qlora_loop.eval.during import metrics_watch
from qlora_loop.eval.metrics import check_metrics
from qlora_loop.eval.rewards import build_rewards, check_answers, reward_watch, scorer
from qlora_loop.forgetting.drift import Drift
from qlora_loop.forgetting.replay import base_replies, choose, read_prompts, replay_conversations
from qlora_loop.manifest import build_manifest, describe_base
from qlora_loop.model.adapter import (add_adapter, add_neftune, continue_adapter, describe_variants,
                                      find_linear4bit_targets, trainable_parameters)
from qlora_loop.model.builtin import resolve_model_path
from qlora_loop.model.generate import as_messages, sampler
from qlora_loop.model.init import eva_init
from qlora_loop.model.load import load_base_model, load_tokenizer, quantization_of, set_gradient_checkpointing
from qlora_loop.observe.log import RunLog
from qlora_loop.observe.plot import plot_run
from qlora_loop.observe.rundir import check_output_dir, hold, start_run
from qlora_loop.observe.trackers import check_trackers, start_trackers
from qlora_loop.training.checkpoint import Checkpoints, find_resume, resume_identity, save_adapter
from qlora_loop.training.disk import check_free_space
from qlora_loop.training.distributed import (LaunchError, check_engine_taken, check_launch, describe_launch,
                                             prepare_sharding)
from qlora_loop.training.dryrun import dry_run_config, report
from qlora_loop.training.grpo import Grpo, grpo_loss, grpo_split, probe_piece
from qlora_loop.training.fit import Interrupted, LoopState, NonFiniteError, Plan, Watch, fit, stop_on_signals
from qlora_loop.training.memory import check_memory, choose_pair_forward, longest_batch
from qlora_loop.training.optim import build_optimizer, build_scheduler
from qlora_loop.training.preference import Objective, preference_loss, preference_watch, split_pairs
from qlora_loop.training.reference import reference_logps
from qlora_loop.training.step import StepRunner


def train(cfg: Config, *, overwrite: bool = False, loss_fn=None) -> dict:
    """Train the adapter `cfg` describes; returns the summary (also written to OUTPUT_DIR/summary.json).
    overwrite: replace a finished or unfinished run in cfg.output_dir. loss_fn: (model, batch) ->
    per-sample loss sums (loss.py); None = loss.default_loss(model)."""
    t, d, m, a = cfg.train, cfg.data, cfg.model, cfg.adapter
    objective = None if t.objective in ("sft", "grpo") else Objective(
        t.objective, beta=resolved_beta(t), dpo_loss=t.dpo_loss, label_smoothing=t.label_smoothing,
        nll_weight=t.nll_weight if t.objective == "dpo" else 0.0)
    grpo = Grpo(num_generations=t.num_generations, max_new_tokens=t.max_new_tokens, temperature=t.temperature,
                beta=resolved_beta(t), loss=t.grpo_loss) if t.objective == "grpo" else None
    check_output_dir(cfg.output_dir, resume=t.resume, overwrite=overwrite)
    trackers = check_trackers(t.log_with)
    check_metrics(cfg.eval.metrics)
    rewards = build_rewards(t.rewards) if grpo else None  # a user's reward module imported now, before any loading

    # setup: the launch is checked before anything is loaded or written
    accelerator, dtype, dtype_why, threads_why = build_accelerator(cfg, trackers)
    check_engine_taken(accelerator)
    launch = describe_launch(accelerator)
    if grpo is not None and launch.shards_parameters:
        raise LaunchError(f"train.objective=grpo samples completions on each process, which cannot generate with "
                          f"its weights spread over all of them under {launch.shards_parameters}; launch with DDP "
                          "(configs/accelerate/ddp.yaml)")
    grad_accum = check_launch(launch, batch_size=t.batch_size, grad_accum=t.grad_accum,
                              global_batch_size=t.global_batch_size, quant_storage=m.quant_storage,
                              max_grad_norm=t.max_grad_norm, resume=t.resume, adapter_kind=a.kind)
    set_seed(t.seed)
    with hold(accelerator, cfg.output_dir):  # one run at a time in a folder; marks the folder as a run's
        log = RunLog(accelerator, cfg.output_dir, t.log_every,
                     metrics=[*objective_metrics(cfg), *cfg.eval.metrics])
        log.print(f"compute dtype {str(dtype).removeprefix('torch.')} ({dtype_why})", soft_wrap=True)
        if threads_why:
            log.print(f"CPU threads {torch.get_num_threads()} per process ({threads_why})", soft_wrap=True)
        with accelerator.main_process_first():  # the first process builds a builtin model, the others reuse it
            model_path = resolve_model_path(m.name_or_path, gguf_file=m.gguf_file)

        # base model: 4-bit NF4; its adapter comes once the data fixes the number of steps
        tokenizer = load_tokenizer(model_path, trust_remote_code=m.trust_remote_code, revision=m.revision,
                                   chat_template=d.chat_template)
        # gradient_checkpointing=auto: loaded without it; the memory probe turns it on if the batch needs it
        model = load_base_model(model_path, accelerator.device, dtype, config=m,
                                gradient_checkpointing=m.gradient_checkpointing is True,
                                autocast=accelerator.mixed_precision != "no")
        quantization = quantization_of(model)

        # the base's own greedy replies: replay rows (trained beside data.train) and drift prompts (never
        # trained); generated once, cached, on the main process first so the others read its cache
        replay_prompts, drift_prompts = general_prompts(cfg)
        if t.objective != "sft" and replay_prompts:  # a preference batch holds pairs, a GRPO batch prompts
            log.print(f"data.replay off for train.objective={t.objective}: replay rows are SFT rows; drift still "
                      "measures forgetting")
            replay_prompts = []
        with accelerator.main_process_first(), accelerator.autocast():
            replay_replies = base_replies(model, tokenizer, replay_prompts, base=model_path, system=d.system_prompt,
                                          max_new_tokens=d.replay_max_new_tokens, what="replay rows",
                                          console=log.console)
            drift_replies = base_replies(model, tokenizer, drift_prompts, base=model_path, system=d.system_prompt,
                                         max_new_tokens=cfg.eval.drift_max_new_tokens, what="drift prompts",
                                         console=log.console)

        # data
        if t.objective == "sft":
            train_rows, val_rows, stats = build_datasets(
                tokenizer, d, seed=t.seed, replay=replay_conversations(replay_prompts, replay_replies, d.system_prompt),
                cache=cache_root() if d.cache else None)
        else:
            train_rows, val_rows, stats = build_preference_datasets(tokenizer, d, objective=t.objective, seed=t.seed)
        log.data_report(stats)
        if grpo is not None:  # a reward that scores against the answer needs one on every row, known now
            check_answers(rewards, train_rows + val_rows, metrics=cfg.eval.metrics)
        for line in source_lines(stats):
            log.print(line, soft_wrap=True)
        if grpo is None:  # a GRPO row trains no tokens of its own: its completions are sampled
            audited = check_label_masks(tokenizer, answer_rows(train_rows), sample=d.audit_rows,
                                        max_length=d.max_length)
            log.print(f"label-mask audit: {audited} rows checked, no problem found" if audited else
                      "[yellow]label-mask audit off (data.audit_rows=0)")
        # GRPO has no validation loss: its validation prompts are completed greedily (reward_watch), not batched
        train_dl, val_dl = build_dataloaders(train_rows, [] if grpo else val_rows, d, batch_size=t.batch_size,
                                             pad_id=tokenizer.pad_token_id, seed=t.seed,
                                             processes=accelerator.num_processes)
        train_dl, val_dl = accelerator.prepare(train_dl, val_dl)
        total_steps = steps_per_epoch(len(train_dl), grad_accum) * t.epochs

        # adapter, optimizer
        if a.init_from:
            model = continue_adapter(model, a.init_from, dropout=a.dropout, shared_inputs=a.shared_inputs)
            targets = sorted(model.peft_config["default"].target_modules)
            log.print(f"continuing the adapter in {a.init_from} (its r, alpha and targets; adapter.dropout="
                      f"{a.dropout})", soft_wrap=True)
        else:
            targets = find_linear4bit_targets(model) if a.target_modules == "auto" else a.target_modules
            model = add_adapter(model, dataclasses.replace(a, target_modules=targets), total_steps=total_steps)
            if a.init == "eva":  # from the first training batches' answer tokens, the same on every process
                eva_init(model, eva_batches(train_rows, batch_size=t.batch_size, pad_id=tokenizer.pad_token_id,
                                            device=accelerator.device))
        log.model_report(targets, *trainable_parameters(model))
        for line in describe_variants(a, loraplus_lr_ratio=t.loraplus_lr_ratio, neftune_alpha=t.neftune_alpha,
                                      device_type=accelerator.device.type):
            log.print(line)
        if t.neftune_alpha:
            add_neftune(model, t.neftune_alpha)
        quant_storage = getattr(torch, m.quant_storage) if m.quant_storage else None
        model = prepare_sharding(accelerator, model, t.batch_size, quant_storage)
        optimizer = build_optimizer(model, t.optimizer, t.lr, t.weight_decay, loraplus_lr_ratio=t.loraplus_lr_ratio)
        scheduler = build_scheduler(optimizer, t.scheduler, total_steps, t.warmup_ratio)
        model, optimizer = accelerator.prepare(model, optimizer)
        if objective is not None:
            loss_fn = loss_fn or preference_loss(model, objective)
            if objective.needs_reference:  # once, before step 1; then each step is the policy alone
                with accelerator.main_process_first():  # the first process writes the cache the others read
                    compute_reference(accelerator, model, train_rows + val_rows, cfg, model_path=model_path,
                                      dtype=dtype, pad_id=tokenizer.pad_token_id, log=log)
        pairs = objective is not None and objective.name != "kto"
        split = split_pairs(objective) if pairs and t.pair_forward == "split" else None
        if grpo is not None:  # sampling and scoring in the runner's split, the policy gradient in its loss
            loss_fn, split = loss_fn or grpo_loss(grpo), grpo_split(grpo, examples=train_rows, tokenizer=tokenizer,
                                                                    score=scorer(rewards),
                                                                    unwrap=accelerator.unwrap_model)
            log.print(f"grpo: {grpo.num_generations} completions per prompt, at most {grpo.max_new_tokens} tokens, "
                      f"temperature {grpo.temperature}, loss {grpo.loss}, "
                      + (f"KL to the base x {grpo.beta} (adapter disabled)" if grpo.beta else "no reference pass (beta 0)")
                      + f"; rewards {', '.join(f'{r.name} x {r.weight:g}' for r in rewards)}", soft_wrap=True)
        runner = StepRunner(model, optimizer, scheduler, accelerator, loss_fn=loss_fn, max_grad_norm=t.max_grad_norm,
                            split=split)
        drift = None
        if drift_prompts and not launch.shards_parameters:  # the base's distributions, under disable_adapter, once
            asked = [as_messages(p, d.system_prompt) for p in drift_prompts]
            drift = Drift(accelerator.unwrap_model(model), tokenizer, asked, drift_replies,
                          autocast=accelerator.autocast)
        if d.packing:  # before any step: packed rows must not see each other
            with accelerator.autocast():
                share = check_packing(model, train_rows)
            if share is not None:
                log.print(f"packing check: packed rows stay apart (logit difference {share:.1%} of rows that mix)")

        # memory: the longest batch, forward and backward, before step 1; it decides gradient_checkpointing=auto
        if t.memory_probe:
            worst = probe_piece(train_rows, grpo, pad_id=tokenizer.pad_token_id) if grpo else \
                longest_batch(train_rows, batch_size=t.batch_size, pad_id=tokenizer.pad_token_id, packing=d.packing)
            if pairs and t.pair_forward == "auto":
                choose_pair_forward(runner, worst, split_pairs(objective), log=log, budget_gib=t.memory_budget_gib)
            check_memory(runner, worst, log=log, budget_gib=t.memory_budget_gib, batch_size=t.batch_size,
                         grad_accum=grad_accum, max_length=d.max_length, checkpointing=m.gradient_checkpointing)
        elif m.gradient_checkpointing == "auto":  # nothing shows the batch fits without it
            set_gradient_checkpointing(accelerator.unwrap_model(model), True)
            log.print("gradient checkpointing on (model.gradient_checkpointing=auto): train.memory_probe=false, so "
                      "nothing shows the longest batch fits without it")

        # the output folder: only now, with every check passed (room for the checkpoints included; the
        # adapter and its AdamW moments are float32), a previous run's files are replaced
        check_free_space(cfg.output_dir, adapter_bytes=4 * trainable_parameters(model)[0], keep_last=t.keep_last)
        start_run(accelerator, cfg.output_dir, to_dict(cfg), fresh=overwrite or not t.resume)
        start_trackers(accelerator, to_dict(cfg), run_name=log.output_dir.name)
        log.print(f"writing the run to {log.output_dir.resolve()}", soft_wrap=True)

        # resume
        manifest = build_manifest(to_dict(cfg), tokenizer, model_path, device=accelerator.device,
                                  quantization=quantization, data_files=[*local_files(d.train), *local_files(d.val),
                                              d.replay_prompts if d.replay else None])
        identity = resume_identity(cfg, grad_accum=grad_accum, world_size=accelerator.num_processes, manifest=manifest)
        checkpoints = Checkpoints(accelerator, cfg.output_dir, identity=identity, config=to_dict(cfg),
                                  keep_last=t.keep_last, manifest=manifest)
        if launch.shards_parameters or launch.deepspeed:  # each process holds only its share of the state
            log.print(f"[yellow]no resumable checkpoints under {launch.shards_parameters or 'DeepSpeed'}; "
                      "the best adapter is still saved whole")
            checkpoints = None
        state = None
        resume_from = find_resume(checkpoints, t.resume, warn=log.print) if checkpoints else None
        if resume_from is not None:
            state = LoopState.from_dict(checkpoints.restore(resume_from, runner, force=t.force_resume,
                                                            tokenizer=tokenizer, base=model_path))
            log.resume(runner.step, state.epoch)
            log.print(f"resumed from {resume_from}: step {runner.step}, epoch {state.epoch}")

        # train
        answered = [r for r in val_rows or train_rows if r["messages"][-1]["role"] == "assistant"]  # GRPO's may not be
        sample = sampler(runner, tokenizer, log, cfg.eval, rows=answered, system=d.system_prompt,
                         general=(drift_prompts[0], drift_replies[0]) if drift_prompts else None,
                         sharded_by=launch.shards_parameters)
        if grpo is not None:  # no validation loss: rewards and eval.metrics of greedy completions instead
            metrics = reward_watch(runner, tokenizer, rewards, rows=val_rows[:cfg.eval.metrics_rows or None],
                                   metrics=cfg.eval.metrics, max_new_tokens=grpo.max_new_tokens, log=log,
                                   num_samples=cfg.eval.num_samples) if val_rows else None
        else:
            metrics = both(metrics_watch(runner, tokenizer, cfg.eval, rows=val_rows, sharded_by=launch.shards_parameters),
                           preference_watch(runner, val_dl, objective, warn=log.print)
                           if objective is not None and val_dl is not None else None)
        try:
            with stop_on_signals(accelerator):
                summary = fit(runner, (train_dl, val_dl), Plan.of(t, grad_accum=grad_accum), log=log,
                              save_best=lambda: save_adapter(accelerator, model, tokenizer, log.output_dir / "best",
                                                             manifest=manifest),
                              checkpoints=checkpoints, state=state, watch=Watch(drift=drift, metrics=metrics, sample=sample))
        except NonFiniteError as e:
            rows = ", ".join(train_rows[i]["where"] for i in sorted(set(e.sample_ids)))
            raise NonFiniteError(f"{e}; the step's rows: {rows}", e.sample_ids) from None
        except Interrupted as e:
            raise Interrupted(f"{e}; checkpoint {checkpoints and checkpoints.latest()}; continue with the same "
                              "command and train.resume=auto") from None
        log.summary(summary)
        accelerator.on_main_process(plot_run)(log.output_dir)
        accelerator.end_training()
        return summary


def compute_reference(accelerator, model, examples: list[dict], cfg: Config, *, model_path: str, dtype, pad_id: int,
                      log) -> None:
    """The reference's log-probs of every answer (training/reference.py), with a progress bar, and a
    line saying what the reference is."""
    a = cfg.adapter
    identity = {"base": describe_base(model_path, cfg.model.name_or_path), "dtype": str(dtype),
                "init_from": sha256_file(Path(a.init_from) / "adapter_model.safetensors") if a.init_from else None}
    with Progress(TextColumn("reference log-probs"), BarColumn(), MofNCompleteColumn(), console=log.console,
                  transient=True, disable=not accelerator.is_main_process) as progress:
        task = progress.add_task("reference", total=len(examples))
        cached = reference_logps(accelerator.unwrap_model(model), examples, pad_id=pad_id, identity=identity,
                                 adapter_on=bool(a.init_from), autocast=accelerator.autocast,
                                 cache=cache_root() if cfg.data.cache else None,
                                 progress=lambda done, total: progress.update(task, completed=done))
    what = f"the 4-bit base + the starting adapter {a.init_from}, frozen as it was at step 0" if a.init_from else \
        "the 4-bit base with the adapter disabled"
    log.print(f"reference ({cfg.train.objective}): {what}; log-probs of {len(examples)} rows "
              f"{'read from the cache' if cached else 'computed and cached'}", soft_wrap=True)


def eva_batches(rows: list[dict], *, batch_size: int, pad_id: int, device, count: int = 16) -> list[dict]:
    """adapter.init=eva's batches: the first `count` batches of the training rows, in file order."""
    rows = rows[:count * batch_size]
    batches = [collate_any(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
    return [{k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")} for b in batches]


def both(*watches):
    """One `metrics()` from several (None skipped): their scores in one dict; None when none is given."""
    given = [w for w in watches if w is not None]
    return (lambda: {k: v for w in given for k, v in w().items()}) if given else None


def build_accelerator(cfg: Config, trackers: list[str]) -> tuple[Accelerator, torch.dtype, str, str | None]:
    """The run's Accelerator, compute dtype, why that dtype, and why its CPU threads (None on a GPU).
    train.mixed_precision=auto: autocast on a GPU in the compute dtype; on a CPU it only slows things
    down. On a CPU the threads are set first, so that the bfloat16 check times what the run will use."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, why = resolve_compute_dtype(cfg.model.compute_dtype, device) if device.type == "cuda" else (None, "")
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    try:
        accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu", log_with=trackers or None,
                                  project_dir=cfg.output_dir)
    except (RuntimeError, ValueError) as e:  # e.g. an FSDP or DeepSpeed launch on a machine without a GPU
        raise LaunchError(f"Accelerate cannot start this launch: {str(e).splitlines()[0]}; check the "
                          "--config_file given to accelerate launch (or `accelerate config`)") from None
    threads_why = use_cpu_threads(accelerator, cfg.train.cpu_threads)
    if dtype is None:
        dtype, why = resolve_compute_dtype(cfg.model.compute_dtype, device)
    return accelerator, dtype, why, threads_why


def use_cpu_threads(accelerator: Accelerator, setting: int | str) -> str | None:
    """On a CPU, set this process's threads by train.cpu_threads (qlora_loop.cpu.cpu_threads) and say
    why; None on a GPU, where the CPU only feeds it."""
    if accelerator.device.type != "cpu":
        return None
    threads, why = cpu_threads(setting, processes=local_processes(accelerator.num_processes, os.environ),
                               cores=physical_cores(), env=os.environ)
    torch.set_num_threads(threads)
    return why


def dry_run(cfg: Config) -> None:
    """Print the LoRA targets, trainable parameters and a memory estimate from the model's config alone."""
    report(dry_run_config(cfg, resolve_model_path(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file)))


def general_prompts(cfg: Config) -> tuple[list[str], list[str]]:
    """(replay prompts, drift prompts): data.replay of data.replay_prompts drawn by the seed, and the
    first eval.drift_samples of eval.drift_prompts; a prompt in both is an error, since drift would
    then measure what replay trains."""
    d, e = cfg.data, cfg.eval
    replay = choose(read_prompts(d.replay_prompts, "data.replay_prompts"), d.replay, cfg.train.seed) if d.replay else []
    drift = read_prompts(e.drift_prompts, "eval.drift_prompts")[:e.drift_samples] if e.drift_samples else []
    shared = sorted(set(replay) & set(drift))
    if shared:
        raise ConfigError(f"eval.drift_prompts and data.replay_prompts share {len(shared)} prompt(s), e.g. "
                          f"{shared[0]!r}: drift would measure what replay trains; keep the two files disjoint")
    return replay, drift


DESCRIPTION = """Train a QLoRA adapter (qlora_loop.run.train). With no arguments, the embedded default: a model
built offline and the bundled self-cognition set, on a CPU.

Exit status: 0 done; 2 bad config, data, model, launch, or a batch that does not fit in memory;
3 non-finite loss; 75 stopped by SIGTERM/SIGINT after writing a checkpoint (run the same command
with train.resume=auto to continue)."""


def main(argv: list[str] | None = None) -> dict:
    """`--config FILE [key.path=value ...] [--overwrite] [--dry-run]` -> load_config -> train (or the dry run)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file; keys override the defaults in qlora_loop/config/sections.py")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in output_dir and start afresh")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device: targets, trainable parameters, memory estimate")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        dry_run(cfg)
        return {}
    return train(cfg, overwrite=args.overwrite)
