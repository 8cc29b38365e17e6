# python scripts/bench.py --tiny --generate 256 --seq 512 --batch-size 8 --epochs 3 --repeats 3 --threads 1
"""Benchmark our loop against the HF Trainer + PEFT baseline (and torchkeras' KerasModel, when installed).

Every peer trains the same 4-bit NF4 model with the same LoRA config, data (tokenized once by
qlora_loop.data, so labels train exactly the assistant tokens for all), epochs, optimizer
(bitsandbytes paged_adamw_32bit), lr, warmup + cosine schedule, batch size and max length. Runs
alternate (ours, hf, torchkeras, ours, ...), each in its own fresh process, so peak memory
(CPU: the process's ru_maxrss; GPU: torch.cuda.max_memory_allocated) belongs to that run alone.

Measured the same way for every peer:
  step time       wall time of forward + backward + optimizer step, summed over optimizer steps
                  (ours: fit's timer around the StepRunner; HF: on_step_begin -> on_step_end; torchkeras:
                  around its StepRunner call); data loading, evaluation and saving are outside it
  loop time       the whole training loop (per-epoch evaluation and saving included), model load excluded
  tokens/s        loss-bearing (target) tokens / step time, and non-padding tokens / step time
  padding share   padding positions / all positions of the training batches
  train loss      mean loss per target token over the last epoch's steps
  eval loss       mean loss per target token on the held-out rows, after training

Writes outputs/bench/bench_report.json (per run, per peer = median over repeats, ratios ours/peer) and prints a table.
--gpu-7b needs a CUDA GPU: a model of Qwen2.5-7B's shape with random weights (generated on the GPU,
written once to --workdir, no download) at seq 2048, r=16, batch 1, against the analytic memory floor
and the FLOP bound.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# hf_grouped: the HF baseline with its own length-grouped sampler (train_sampling_strategy=group_by_length),
# which tutorials rarely set; run on request, to see how much of our lead is batching alone.
PEERS = ("ours", "hf", "torchkeras", "hf_grouped")
DEFAULT_PEERS = "ours,hf,torchkeras"
# Every Linear4bit of a Qwen2/Llama block: what our target_modules=auto finds, given to every peer.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Keys our loop may or may not know yet (added by work in progress); passed only when load_config accepts them.
OPTIONAL_OURS = ("data.group_by_length=true", "eval.num_samples=0")
# Qwen2.5-7B's config.json shape (hub id Qwen/Qwen2.5-7B); the weights are random.
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
RATIO_METRICS = ("loss_tokens_per_second", "tokens_per_second", "step_seconds_mean", "loop_seconds",
                 "peak_memory_bytes", "padding_share", "final_train_loss", "eval_loss")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a local model folder (4-bit loadable by from_pretrained)")
    src.add_argument("--tiny", action="store_true", help="a tiny Qwen2-shaped model built on the fly (the default)")
    p.add_argument("--vocab", type=int, help="vocab_size of the tiny model (e.g. 152064); the tokenizer stays small")
    p.add_argument("--hidden", type=int, default=128, help="tiny model hidden size")
    p.add_argument("--layers", type=int, default=2, help="tiny model layers")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", help="a chat/alpaca JSON or JSONL file; --val-split of it is held out")
    data.add_argument("--generate", type=int, metavar="N",
                      help="generate N chat rows whose lengths vary ~20x (default 256)")
    p.add_argument("--val-split", type=float, default=0.1)
    p.add_argument("--seq", type=int, default=512, help="max_length in tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=3, help="runs per peer, alternating peers")
    p.add_argument("--peers",
                   help=f"comma-separated, from {','.join(PEERS)} (default: {DEFAULT_PEERS}; --quick: ours,hf)")
    p.add_argument("--seed", type=int, default=42, help="training seed: adapter init, data order, dropout")
    p.add_argument("--data-seed", type=int,
                   help="seed of the base model, the generated rows and the split (default: --seed)")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra key.path=value for our run, e.g. data.group_by_length=false (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads in every run (default: torch's own choice)")
    p.add_argument("--run-timeout", type=float, metavar="SECONDS",
                   help="kill a run that takes longer (it is reported as failed; the other runs go on)")
    p.add_argument("--quick", action="store_true",
                   help="a few steps of ours and hf on a tiny set (well under a minute)")
    p.add_argument("--gpu-7b", action="store_true",
                   help="Qwen2.5-7B-shaped random model on a CUDA GPU; sets seq 2048, r 16, batch 1, 1 epoch")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's peak dense bf16 TFLOP/s for the FLOP bound (H100/H200 SXM: 989; H100 PCIe: 756)")
    p.add_argument("--workdir", default="outputs/bench", help="model, data, per-run outputs and logs")
    p.add_argument("--report", default="outputs/bench/bench_report.json")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)  # internal: run one peer in this process
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.generate, args.seq, args.batch_size = args.generate or 24, min(args.seq, 128), min(args.batch_size, 4)
        args.epochs, args.repeats, args.val_split = 1, 1, 0.25
        args.peers = args.peers or "ours,hf"
    if args.gpu_7b:
        args.seq, args.batch_size, args.r = 2048, 1, 16
        args.generate = args.generate or 64
        args.epochs, args.repeats = min(args.epochs, 1), min(args.repeats, 1)
    if not args.data and not args.generate:
        args.generate = 256
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    args.peers = args.peers or DEFAULT_PEERS
    return args


# --- inputs: model and data ----------------------------------------------------------------------

def build_bench_model(out: Path, vocab: int | None, hidden: int, layers: int, seed: int) -> Path:
    """A tiny Qwen2 model (qlora_loop.tiny); with `vocab`, its embeddings and head are resized to
    that many rows while the tokenizer keeps its ~1k tokens: the memory of a 152k vocabulary
    without training a 152k tokenizer (ids above the tokenizer's are simply never used)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_loop.tiny import LM_HEAD_STD, build_tiny_model

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")  # renamed when complete, so a crash never leaves a wrong cache
    build_tiny_model(tmp, arch="qwen2", hidden_size=hidden, num_layers=layers, seed=seed)
    if vocab:
        config = AutoConfig.from_pretrained(tmp)
        config.vocab_size = vocab
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        torch.nn.init.normal_(model.lm_head.weight, std=LM_HEAD_STD)
        model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def write_random_checkpoint(out: Path, tokenizer_dir: Path, shape: dict, device: str, seed: int = 0) -> Path:
    """A bf16 checkpoint of `shape` with random weights generated on `device`, so every peer loads it
    through from_pretrained's real 4-bit path (ours via scripts/train.py). Shapes come from a meta-device
    model (no memory); weights N(0, 0.02), norms 1, biases 0. The tokenizer is the tiny one (~1k ids)."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {k: v.shape for k, v in meta.state_dict().items()}
    shards, current, size = [], {}, 0
    for name, s in shapes.items():
        if size > 4 << 30:
            shards.append(current)
            current, size = {}, 0
        current[name] = s
        size += math.prod(s) * 2
    shards.append(current)
    generator = torch.Generator(device).manual_seed(seed)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, s in shard.items():
            if name.endswith("norm.weight"):
                t = torch.ones(s, dtype=torch.bfloat16)
            elif name.endswith(".bias"):
                t = torch.zeros(s, dtype=torch.bfloat16)
            else:
                t = (torch.randn(s, generator=generator, device=device, dtype=torch.bfloat16) * 0.02).cpu()
            tensors[name] = t
            weight_map[name] = file
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def generate_chat_set(n: int, tokenizer, max_tokens: int, seed: int, spread: float = 20.0) -> list[dict]:
    """n copy-task conversations ("repeat these words" -> the words), learnable by a tiny model, whose
    token lengths are log-spaced from max_tokens/spread to max_tokens (both ends present), shuffled."""
    from qlora_loop.tiny import _corpus

    words = sorted({w for text in _corpus() for w in re.findall(r"[A-Za-z]{2,}", text)})
    rng = random.Random(seed)

    def row(k: int) -> dict:
        said = " ".join(rng.choice(words) for _ in range(k))
        return {"messages": [{"role": "user", "content": f"Repeat: {said}"},
                             {"role": "assistant", "content": said}]}

    def length(r: dict) -> int:
        text = tokenizer.apply_chat_template(r["messages"], tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    probe = [row(40) for _ in range(8)]  # tokens per word and the template's overhead
    base = statistics.mean(length(row(1)) for _ in range(8))
    per_word = (statistics.mean(map(length, probe)) - base) / 39
    rows = []
    for i in range(n):
        target = max_tokens / spread * spread ** (i / max(n - 1, 1))
        rows.append(row(max(1, int((target - base) / per_word))))
    rng.shuffle(rows)
    return rows


def prepare_data(args, workdir: Path, tokenizer) -> tuple[Path, Path]:
    """train.jsonl and val.jsonl in workdir, both as {"messages": [...]} rows."""
    from qlora_loop.data import split_validation
    from qlora_loop.rows import load_conversations

    if args.data:
        rows = [{"messages": c.messages} for c in load_conversations(args.data)]
    else:
        rows = generate_chat_set(args.generate, tokenizer, int(args.seq * 0.95), args.data_seed)
    train, val = split_validation(rows, args.val_split, args.data_seed, args.data or "generated set")
    paths = workdir / "train.jsonl", workdir / "val.jsonl"
    for path, part in zip(paths, (train, val)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    return paths


def load_examples(spec: dict):
    """(tokenizer, train examples, val examples): the same tokenized rows for every peer."""
    from qlora_loop.data import build_datasets
    from qlora_loop.model import load_tokenizer

    tokenizer = load_tokenizer(spec["model"])
    train, val, _ = build_datasets(tokenizer, spec["train"], spec["val"], 0.0, spec["seq"], seed=spec["seed"])
    return tokenizer, train, val


# --- measuring, shared by the workers -------------------------------------------------------------

def batch_counts(batch) -> tuple[int, int, int]:
    """(non-padding tokens, all positions, loss-bearing tokens) of one batch; targets as our loss counts them."""
    from qlora_loop.step import count_targets

    return int(batch["attention_mask"].sum()), batch["attention_mask"].numel(), count_targets(batch)


def peak_memory_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def last_epoch_loss(rows: list[dict]) -> float:
    """Mean loss per target token over the last epoch's steps; rows: {epoch, loss, target_tokens}."""
    last = [r for r in rows if r["epoch"] == max(r["epoch"] for r in rows)]
    return sum(r["loss"] * r["target_tokens"] for r in last) / max(sum(r["target_tokens"] for r in last), 1)


def heldout_loss(model, examples: list[dict], pad_id: int, batch_size: int, device: str) -> float:
    """Mean loss per target token on the held-out rows: our evaluate(), with our loss function and
    the training layout of the 4-bit weights, so every peer's number is computed by the same code."""
    import torch

    from qlora_loop.data import collate
    from qlora_loop.model import keep_training_layout
    from qlora_loop.step import default_loss

    keep_training_layout(model)  # same bitsandbytes CPU kernel as our evaluate (see model.keep_training_layout)
    model.eval()
    loss_fn, loss_sum, targets = default_loss(model), 0.0, 0
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            loss_sum += loss_fn(model, batch).float().sum().item()
            targets += batch_counts(batch)[2]
    return loss_sum / max(targets, 1)


def tutorial_model(spec: dict):
    """What a PEFT tutorial writes: 4-bit NF4 + double quant, prepare_model_for_kbit_training, LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_loop.model import keep_training_layout

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0 if spec["device"] == "cuda" else "cpu"})
    model.config.use_cache = False
    # Not in the tutorials, but needed on AVX512-BF16 CPUs (this one): bitsandbytes otherwise repacks the
    # 4-bit weights at the first evaluation and the next training step fails on Qwen2's q/k/v biases.
    keep_training_layout(model)
    model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def plain_rows(examples: list[dict]) -> list[dict]:
    return [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["labels"]}
            for e in examples]


# --- the peers: each runs in a fresh process (`--worker PEER`) and returns its raw measures ---------

def run_ours(spec: dict, out: Path) -> dict:
    """scripts/train.py as a user runs it, with the bench's settings as key.path=value overrides."""
    module_spec = importlib.util.spec_from_file_location("qlora_loop_train_script", ROOT / "scripts" / "train.py")
    train = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(train)
    train.main(spec["ours_overrides"] + [f"output_dir={out}", "--overwrite"])
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {"steps": len(steps), "tokens": sum(r["tokens"] for r in steps),
            "target_tokens": sum(r["target_tokens"] for r in steps), "positions": sum(r["positions"] for r in steps),
            "step_seconds": summary["step_seconds"], "loop_seconds": summary["train_seconds"],
            "final_train_loss": last_epoch_loss(steps), "eval_loss": history[-1]["val_loss"]}


def run_hf(spec: dict, out: Path, grouped: bool = False) -> dict:
    """HF Trainer + PEFT as the tutorials write it: DataCollatorForSeq2Seq padding to the longest row,
    gradient checkpointing, paged_adamw_32bit, cosine schedule with warmup, eval and save every epoch.
    grouped: Trainer's LengthGroupedSampler instead of its default random order."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    tokenizer, train, val = load_examples(spec)
    total = math.ceil(len(train) / spec["batch_size"]) * spec["epochs"]
    torch.manual_seed(spec["seed"])
    model = tutorial_model(spec)
    rows, stamps = [], {"step": 0.0, "t": 0.0}

    class Stamps(TrainerCallback):  # timing only; changes nothing
        def on_train_begin(self, args, state, control, **kw):
            stamps["begin"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            stamps["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            stamps["step"] += time.perf_counter() - stamps["t"]

        def on_train_end(self, args, state, control, **kw):
            stamps["end"] = time.perf_counter()

    class CountingTrainer(Trainer):  # records each step's batch counts and loss; the step itself is Trainer's
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            tokens, positions, targets = batch_counts(inputs)
            rows.append({"epoch": int(self.state.epoch or 0) + 1, "loss": loss.item(), "tokens": tokens,
                         "positions": positions, "target_tokens": targets})
            return loss

    gpu = spec["device"] == "cuda"
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=spec["batch_size"], num_train_epochs=spec["epochs"], learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=spec["warmup_steps"], optim="paged_adamw_32bit", weight_decay=0.0,
        max_grad_norm=1.0, gradient_checkpointing=True, bf16=gpu, use_cpu=not gpu, logging_steps=10,
        eval_strategy="epoch", save_strategy="epoch", prediction_loss_only=True, report_to="none",
        seed=spec["seed"], dataloader_num_workers=0, train_sampling_strategy="group_by_length" if grouped else "random")
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = CountingTrainer(model=model, args=args, train_dataset=plain_rows(train), eval_dataset=plain_rows(val),
                              data_collator=collator, callbacks=[Stamps()])
    trainer.train()
    if len(rows) != total:
        raise RuntimeError(f"HF ran {len(rows)} steps, expected {total}")
    return {**totals(rows), "step_seconds": stamps["step"], "loop_seconds": stamps["end"] - stamps["begin"],
            "peak_memory_bytes": peak_memory_bytes(spec["device"]), "final_train_loss": last_epoch_loss(rows),
            "eval_loss": heldout_loss(model, val, tokenizer.pad_token_id, spec["batch_size"], spec["device"])}


def run_torchkeras(spec: dict, out: Path) -> dict:
    """torchkeras as its LLM fine-tuning tutorials use it: KerasModel.fit over the PEFT model with the
    tutorial's plain StepRunner (loss = net(**batch).loss; backward; clip 1.0; step), set on a subclass
    rather than patched into KerasModel; the best adapter saved with save_pretrained."""
    import bitsandbytes as bnb
    import torch
    from torch.utils.data import DataLoader
    from torchkeras import KerasModel
    from transformers import DataCollatorForSeq2Seq, get_scheduler

    tokenizer, train, val = load_examples(spec)
    total = math.ceil(len(train) / spec["batch_size"]) * spec["epochs"]
    torch.manual_seed(spec["seed"])
    model = tutorial_model(spec)
    rows, epoch = [], {"n": 0}

    class TutorialStepRunner:  # the tutorials' StepRunner, plus timing and counting around it
        def __init__(self, net, loss_fn, accelerator=None, stage="train", metrics_dict=None, optimizer=None,
                     lr_scheduler=None, **kwargs):
            self.net, self.loss_fn, self.metrics_dict, self.stage = net, loss_fn, metrics_dict, stage
            self.optimizer, self.lr_scheduler, self.accelerator = optimizer, lr_scheduler, accelerator
            self.net.train() if stage == "train" else self.net.eval()
            epoch["n"] += stage == "train"

        def __call__(self, batch):
            t0 = time.perf_counter()
            with self.accelerator.autocast():
                loss = self.net(**batch).loss
            if self.optimizer is not None and self.stage == "train":
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(self.net.parameters(), 1.0)
                self.optimizer.step()
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad()
            all_loss = self.accelerator.gather(loss).sum()
            step_losses = {self.stage + "_loss": all_loss.item()}
            step_metrics = {}
            if self.stage == "train":
                step_metrics["lr"] = self.optimizer.state_dict()["param_groups"][0]["lr"] if self.optimizer else 0.0
                tokens, positions, targets = batch_counts(batch)
                rows.append({"epoch": epoch["n"], "loss": step_losses["train_loss"], "tokens": tokens,
                             "positions": positions, "target_tokens": targets, "seconds": time.perf_counter() - t0})
            return step_losses, step_metrics

    class TutorialKerasModel(KerasModel):
        StepRunner = TutorialStepRunner

        def save_ckpt(self, ckpt_path=None, accelerator=None):
            accelerator = accelerator if accelerator is not None else self.accelerator
            accelerator.unwrap_model(self.net).save_pretrained(ckpt_path)

        def load_ckpt(self, ckpt_path=None):
            pass  # every peer is measured on its last epoch's model

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    dl_train = DataLoader(plain_rows(train), batch_size=spec["batch_size"], shuffle=True, collate_fn=collator,
                          generator=torch.Generator().manual_seed(spec["seed"]))
    dl_val = DataLoader(plain_rows(val), batch_size=spec["batch_size"], shuffle=False, collate_fn=collator)
    optimizer = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=spec["lr"],
                                          weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=spec["warmup_steps"], num_training_steps=total)
    keras = TutorialKerasModel(model, loss_fn=None, optimizer=optimizer, lr_scheduler=scheduler)
    done = {}

    class AtFitEnd:  # torchkeras calls it after the last epoch, before fit moves the net to the CPU
        def on_fit_end(self, model):
            done["end"], done["peak"] = time.perf_counter(), peak_memory_bytes(spec["device"])
            done["eval_loss"] = heldout_loss(model.net, val, tokenizer.pad_token_id, spec["batch_size"], spec["device"])

    begin = time.perf_counter()
    keras.fit(dl_train, dl_val, epochs=spec["epochs"], ckpt_path=str(out / "best"), patience=spec["epochs"] + 1,
              monitor="val_loss", mode="min", callbacks=[AtFitEnd()], plot=False,
              mixed_precision="bf16" if spec["device"] == "cuda" else "no", cpu=spec["device"] != "cuda")
    return {**totals(rows), "step_seconds": sum(r["seconds"] for r in rows), "loop_seconds": done["end"] - begin,
            "peak_memory_bytes": done["peak"], "final_train_loss": last_epoch_loss(rows),
            "eval_loss": done["eval_loss"]}


def totals(rows: list[dict]) -> dict:
    return {"steps": len(rows), **{k: sum(r[k] for r in rows) for k in ("tokens", "target_tokens", "positions")}}


def worker(args) -> None:
    import torch

    spec = json.loads(Path(args.spec).read_text())
    out = Path(spec["workdir"]) / "runs" / Path(args.result).stem
    out.mkdir(parents=True, exist_ok=True)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    load_before = os.getloadavg()[0]
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run = {"ours": run_ours, "hf": run_hf, "torchkeras": run_torchkeras,
           "hf_grouped": lambda spec, out: run_hf(spec, out, grouped=True)}[args.worker]
    result = run(spec, out)
    # Taken when training ended, before the bench's own held-out evaluation (ours: train.py's whole run).
    result.setdefault("peak_memory_bytes", peak_memory_bytes(spec["device"]))
    # The machine's 1-minute load average before and after: other processes on the cores skew the timings.
    result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
    Path(args.result).write_text(json.dumps(result))


# --- orchestration and the report -----------------------------------------------------------------

def fail(message: str, code: int = 2):
    """One `error:` line and exit status 2 (bad arguments or machine), like scripts/train.py."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run_peer(peer: str, repeat: int, spec_path: Path, workdir: Path, timeout: float | None = None) -> dict:
    """One peer, once, in a fresh process; its raw measures plus the derived rates, or {"error": ...}."""
    name = f"{peer}-{repeat}"
    result, log = workdir / "results" / f"{name}.json", workdir / "logs" / f"{name}.log"
    result.parent.mkdir(exist_ok=True), log.parent.mkdir(exist_ok=True)
    result.unlink(missing_ok=True)
    threads = json.loads(spec_path.read_text())["threads"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log, "w") as f:
        try:
            code = subprocess.run([sys.executable, __file__, "--worker", peer, "--spec", str(spec_path),
                                   "--result", str(result)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:  # the worker is killed; the other peers still run
            code = None
    if code != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        how = f"killed after --run-timeout {timeout} s" if code is None else f"exit {code}"
        return {"peer": peer, "repeat": repeat, "error": f"{how}; its log {log} ends:\n{tail}"}
    r = json.loads(result.read_text())
    return {"peer": peer, "repeat": repeat, **r, **derived(r)}


def derived(r: dict) -> dict:
    return {"loss_tokens_per_second": r["target_tokens"] / r["step_seconds"],
            "tokens_per_second": r["tokens"] / r["step_seconds"],
            "loop_loss_tokens_per_second": r["target_tokens"] / r["loop_seconds"],
            "step_seconds_mean": r["step_seconds"] / r["steps"],
            "padding_share": 1 - r["tokens"] / r["positions"]}


def summarize(runs: list[dict]) -> tuple[dict, dict]:
    """Per peer: the median over its repeats of every number. Ratios: ours / peer of those medians."""
    peers = {}
    for peer in dict.fromkeys(r["peer"] for r in runs):
        mine = [r for r in runs if r["peer"] == peer]
        keys = [k for k, v in mine[0].items() if isinstance(v, (int, float)) and k != "repeat"]
        peers[peer] = {k: statistics.median(r[k] for r in mine) for k in keys}
    ratios = {peer: {k: peers["ours"][k] / peers[peer][k] for k in RATIO_METRICS if peers[peer][k]}
              for peer in peers if peer != "ours" and "ours" in peers}
    return peers, ratios


def targets(peers: dict, ratios: dict, vocab: int) -> list[dict]:
    """The issue's targets, evaluated on this report (informational; nothing asserts them)."""
    out = []
    for peer, ratio in ratios.items():
        out.append({"target": f"loss-bearing tokens/s >= 1.5x {peer}", "value": ratio["loss_tokens_per_second"],
                    "met": ratio["loss_tokens_per_second"] >= 1.5})
        for loss in ("final_train_loss", "eval_loss"):  # "no worse": within a 2% tolerance; strictly: <= 1
            out.append({"target": f"{loss} no worse than {peer} (ours/peer <= 1.02)", "value": ratio[loss],
                        "met": ratio[loss] <= 1.02, "strictly": ratio[loss] <= 1.0})
        if vocab >= 100_000:  # the large-vocabulary case, where the logits dominate memory
            out.append({"target": f"peak memory <= 0.6x {peer}", "value": ratio["peak_memory_bytes"],
                        "met": ratio["peak_memory_bytes"] <= 0.6})
    if "ours" in peers:
        out.append({"target": "padding share <= 5% (ours)", "value": peers["ours"]["padding_share"],
                    "met": peers["ours"]["padding_share"] <= 0.05})
    return out


def gpu_bounds(shape: dict, seq: int, batch: int, r: int, chunk: int = 1024) -> dict:
    """Analytic memory floor and FLOPs per token of QLoRA on a Qwen2-shaped model (bytes, FLOPs)."""
    H, I, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * H // shape["num_attention_heads"]  # width of k_proj / v_proj
    linear = L * (2 * H * H + 2 * H * kv + 3 * H * I)  # q,o: HxH; k,v: Hxkv; gate,up,down: HxI
    # NF4: 4 bits a weight; double quantisation keeps one 8-bit absmax per 64-weight block and one
    # fp32 absmax per 256 of those blocks.
    base = linear * (0.5 + 1 / 64 + 4 / (64 * 256))
    base += 2 * V * H * 2 + L * (H + 2 * kv) * 2 + (2 * L + 1) * H * 2  # bf16 embeddings, head, q/k/v biases, norms
    shapes = [(H, H), (H, kv), (H, kv), (H, H), (H, I), (H, I), (I, H)]  # (in, out) of q, k, v, o, gate, up, down
    tensors = [n for fan_in, fan_out in shapes for n in (r * fan_in, fan_out * r)]  # A (r x in), B (out x r)
    lora = L * sum(tensors)
    adapter = lora * (4 + 4 + 8)  # fp32 weights, their grads, AdamW's m and v
    # bitsandbytes' paged AdamW keeps the state of tensors of >= 1e5 elements in managed memory, which
    # torch.cuda.max_memory_allocated does not see: here gate/up B (I x r) and down A (r x I).
    paged = L * sum(n for n in tensors if n >= 100_000) * 8
    tokens = seq * batch

    def activations(width: int) -> int:  # bytes per hidden-state element: 2 (bf16) or 4 (fp32)
        checkpoints = L * tokens * H * width  # each layer's input, kept by (non-reentrant) checkpointing
        # One layer's recomputed activations while its backward runs: normed input, q/k/v, attention out,
        # o out, post-attention norm (5H + 2kv wide) and gate, up, act(gate), act*up (4I wide).
        recompute = tokens * (5 * H + 2 * kv + 4 * I) * width
        loss_chunk = min(chunk, tokens) * V * 4  # fp32 logits of one chunk of the chunked loss
        # The loss chunk is freed before the layers' backward starts, so only the larger of the two is alive.
        return checkpoints + max(recompute, loss_chunk)

    # The floor counts bf16 activations. With peft-style preparation the norms are float32, so
    # the residual stream after the first norm is float32 for every peer: that floor is reported too.
    # FLOPs per token: 2N forward + 2N recomputed forward + 2N backward to the inputs of the checkpointed
    # layers (frozen 4-bit weights get no weight gradient), and 2VH + 2VH for lm_head, outside the
    # checkpoints; N = the layers' matmul parameters. Ours applies the head only at trained positions.
    return {"floor_bytes": base + adapter + activations(2), "floor_fp32_stream_bytes": base + adapter + activations(4),
            "base_bytes": base, "adapter_optimizer_bytes": adapter, "paged_optimizer_bytes": paged,
            "activation_bytes": activations(2), "activation_fp32_stream_bytes": activations(4),
            "lora_parameters": lora, "n_active": linear + V * H, "flops_per_token": 6 * linear + 4 * V * H}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench: {report['settings']['model_desc']}, batch {report['settings']['batch_size']}, "
                        f"seq {report['settings']['seq']}, {report['settings']['epochs']} epoch(s), "
                        f"median of {report['settings']['repeats']}")
    columns = [("peer", None), ("target tok/s", "loss_tokens_per_second"), ("tok/s", "tokens_per_second"),
               ("step ms", "step_seconds_mean"), ("loop s", "loop_seconds"), ("peak MiB", "peak_memory_bytes"),
               ("padding", "padding_share"), ("train loss", "final_train_loss"), ("eval loss", "eval_loss")]
    for title, _ in columns:
        table.add_column(title, justify="right")

    def fmt(key, v):
        if key.endswith("loss"):
            return f"{v:.4f}"
        return {"step_seconds_mean": f"{v * 1e3:.1f}", "peak_memory_bytes": f"{v / 2**20:,.0f}",
                "padding_share": f"{v:.1%}"}.get(key, f"{v:,.0f}" if v >= 100 else f"{v:.1f}")

    for peer, values in report["peers"].items():
        table.add_row(peer, *(fmt(k, values[k]) for _, k in columns[1:]))
    for peer, ratio in report["ratios"].items():
        table.add_row(f"ours/{peer}", *(f"{ratio[k]:.2f}x" if k in ratio else "-" for _, k in columns[1:]),
                      style="bold")
    console = Console(width=None if sys.stdout.isatty() else 140)  # a log or pipe gets the whole table
    console.print(table)
    for t in report["targets"]:
        strictly = "" if t.get("strictly", True) else " (not strictly: ours is higher)"
        console.print(f"{'[green]met' if t['met'] else '[red]not met'}[/]  {t['target']}: {t['value']:.4g}{strictly}")
    if "gpu_7b" in report:
        console.print_json(json.dumps(report["gpu_7b"]))


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    if args.gpu_7b and not torch.cuda.is_available():
        fail("--gpu-7b needs a CUDA GPU (about 10 GB free for the 4-bit 7B run, and ~16 GB of disk for its "
             "random bf16 checkpoint) and this machine has none; on a CPU run `python scripts/bench.py --tiny` "
             "(add --vocab 152064 --seq 1024 for the large-vocabulary case)")
    peers = [p for p in args.peers.split(",") if p]
    if unknown := set(peers) - set(PEERS):
        fail(f"--peers {args.peers}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    skipped = {}
    if "torchkeras" in peers:
        try:
            importlib.import_module("torchkeras")
        except Exception as e:  # not installed, or its own imports (pandas, IPython) missing
            skipped["torchkeras"] = f"not importable ({e}); pip install torchkeras pandas ipython"
            peers.remove("torchkeras")
    from qlora_loop.config import ConfigError, load_config
    from qlora_loop.model import load_tokenizer

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        model, desc = Path(args.model).resolve(), args.model
    else:
        tiny = build_bench_model(workdir / f"tiny-h{args.hidden}-l{args.layers}-v{args.vocab or 0}", args.vocab,
                                 args.hidden, args.layers, args.data_seed)
        model = tiny
        desc = f"tiny Qwen2 (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab or 'tokenizer'})"
        if args.gpu_7b:
            model = write_random_checkpoint(workdir / "qwen2.5-7b-shape-random", tiny, QWEN25_7B, device,
                                            args.data_seed)
            desc = "Qwen2.5-7B shape, random weights"
    tokenizer = load_tokenizer(str(model))
    train_path, val_path = prepare_data(args, workdir, tokenizer)
    spec = {"model": str(model), "train": str(train_path), "val": str(val_path), "seq": args.seq,
            "batch_size": args.batch_size, "epochs": args.epochs, "lr": args.lr, "r": args.r, "alpha": args.alpha,
            "dropout": args.dropout, "seed": args.seed, "device": device, "workdir": str(workdir),
            "threads": args.threads}
    _, train, val = load_examples(spec)
    total = math.ceil(len(train) / args.batch_size) * args.epochs
    spec["warmup_steps"] = math.ceil(args.warmup_ratio * total)  # our build_scheduler's rule, given to the others
    overrides = [f"model.name_or_path={model}", f"data.train={train_path}", f"data.val={val_path}",
                 f"data.max_length={args.seq}", f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}",
                 f"train.lr={args.lr}", f"train.warmup_ratio={args.warmup_ratio}", "train.scheduler=cosine",
                 "train.optimizer=paged_adamw_32bit", "train.weight_decay=0.0", "train.max_grad_norm=1.0",
                 "train.grad_accum=1", f"adapter.r={args.r}", f"adapter.alpha={args.alpha}",
                 f"adapter.dropout={args.dropout}", f"adapter.target_modules=[{','.join(LORA_TARGETS)}]",
                 "train.patience=0", "train.log_every=1", f"train.seed={args.seed}",
                 "model.gradient_checkpointing=true"]
    rejected = []
    for item in OPTIONAL_OURS:
        try:
            load_config(None, overrides + [item])
            overrides.append(item)
        except ConfigError:
            rejected.append(item)
    try:
        load_config(None, overrides + args.ours_set)
    except ConfigError as e:
        fail(f"--ours-set: {e}")
    overrides += args.ours_set  # later overrides win
    spec["ours_overrides"] = overrides
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))

    lengths = [len(e["input_ids"]) for e in train]
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]

    def build_report(runs: list[dict], failed: list[dict]) -> dict:
        peer_values, ratios = summarize(runs)
        report = {
            "command": "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": device,
                        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                        "torch": torch.__version__, "cpu_threads": torch.get_num_threads()},
            "settings": {**{k: v for k, v in spec.items() if k not in ("ours_overrides", "workdir")},
                         "repeats": args.repeats, "model_desc": desc, "peers": peers, "skipped": skipped,
                         "ours_overrides": overrides, "ours_overrides_rejected": rejected, "vocab_size": vocab},
            "data": {"train_rows": len(train), "val_rows": len(val), "min_tokens": min(lengths),
                     "max_tokens": max(lengths), "length_ratio": max(lengths) / min(lengths),
                     "mean_tokens": statistics.mean(lengths), "steps_per_run": total},
            "runs": runs, "failed": failed, "peers": peer_values, "ratios": ratios,
            "targets": targets(peer_values, ratios, vocab),
        }
        if args.gpu_7b:
            bounds = gpu_bounds(QWEN25_7B, args.seq, args.batch_size, args.r)
            peak = args.peak_tflops * 1e12
            report["gpu_7b"] = {**bounds, "peak_tflops": args.peak_tflops,
                                "flop_bound_tokens_per_second": peak / bounds["flops_per_token"],
                                "per_peer": {p: {"peak_over_floor": v["peak_memory_bytes"] / bounds["floor_bytes"],
                                                 "peak_over_floor_fp32_stream":
                                                     v["peak_memory_bytes"] / bounds["floor_fp32_stream_bytes"],
                                                 "mfu": v["tokens_per_second"] * bounds["flops_per_token"] / peak}
                                             for p, v in peer_values.items()}}
        return report

    # The report is rewritten after every run, so a run that fails or hangs late loses nothing measured.
    runs, failed = [], []
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeats):
        for peer in peers:
            result = run_peer(peer, rep, spec_path, workdir, args.run_timeout)
            (failed if "error" in result else runs).append(result)
            report = build_report(runs, failed)
            Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    if runs:
        print_report(report)
    if failed:
        fail("; ".join(f"the {r['peer']} run {r['repeat']} failed ({r['error']})" for r in failed)
             + f"; the other runs are in {args.report}", code=1)
    return report


if __name__ == "__main__":
    main()
