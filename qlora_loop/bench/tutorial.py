"""The tutorial peers: HF Trainer + PEFT, and torchkeras' KerasModel.fit, each as the tutorials
write them, over the same 4-bit PEFT model (tutorial_model). Their counts, timings and held-out loss
are taken by the bench's own code (bench.measure), the same for both.

torchkeras is optional; it is imported inside run_torchkeras only, so the other runs never load it
(its libraries would also count in their peak memory).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch.utils.data import DataLoader
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments, get_scheduler)

from qlora_loop.bench.inputs import load_examples
from qlora_loop.bench.measure import batch_counts, heldout_loss, last_epoch_loss, totals
from qlora_loop.bench.settings import LORA_TARGETS
from qlora_loop.model.load import keep_training_layout
from qlora_loop.training.memory import peak_memory_bytes


def tutorial_model(spec: dict):
    """What a PEFT tutorial writes: 4-bit NF4 + double quant, prepare_model_for_kbit_training, LoRA."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=config, dtype=torch.bfloat16,
                                                 device_map={"": 0 if spec["device"] == "cuda" else "cpu"})
    model.config.use_cache = False
    # Not in the tutorials, but needed on AVX512-BF16 CPUs: bitsandbytes otherwise repacks the 4-bit
    # weights at the first evaluation and the next training step fails on Qwen2's q/k/v biases.
    keep_training_layout(model)
    model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def plain_rows(examples: list[dict]) -> list[dict]:
    return [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["labels"]}
            for e in examples]


def run_hf(spec: dict, out: Path, *, grouped: bool = False) -> dict:
    """HF Trainer + PEFT as the tutorials write it: DataCollatorForSeq2Seq padding to the longest row,
    gradient checkpointing, paged_adamw_32bit, cosine schedule with warmup, eval and save every epoch.
    grouped: Trainer's LengthGroupedSampler instead of its default random order."""
    tokenizer, train_rows, val_rows = load_examples(spec)
    total = math.ceil(len(train_rows) / spec["batch_size"]) * spec["epochs"]
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
    trainer = CountingTrainer(model=model, args=args, train_dataset=plain_rows(train_rows),
                              eval_dataset=plain_rows(val_rows), data_collator=collator, callbacks=[Stamps()])
    trainer.train()
    if len(rows) != total:
        raise RuntimeError(f"HF ran {len(rows)} steps, expected {total}")
    peak = peak_memory_bytes(torch.device(spec["device"]))  # before the held-out evaluation below
    return {**totals(rows), "step_seconds": stamps["step"], "loop_seconds": stamps["end"] - stamps["begin"],
            "peak_memory_bytes": peak, "final_train_loss": last_epoch_loss(rows),
            "eval_loss": heldout_loss(model, val_rows, trainer.accelerator, pad_id=tokenizer.pad_token_id,
                                      batch_size=spec["batch_size"])}


def run_torchkeras(spec: dict, out: Path) -> dict:
    """torchkeras as its LLM fine-tuning tutorials use it: KerasModel.fit over the PEFT model with the
    tutorial's plain StepRunner (loss = net(**batch).loss; backward; clip 1.0; step), set on a subclass
    rather than patched into KerasModel; the best adapter saved with save_pretrained."""
    from torchkeras import KerasModel  # optional, and only in this run: see the module docstring

    tokenizer, train_rows, val_rows = load_examples(spec)
    total = math.ceil(len(train_rows) / spec["batch_size"]) * spec["epochs"]
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
    dl_train = DataLoader(plain_rows(train_rows), batch_size=spec["batch_size"], shuffle=True, collate_fn=collator,
                          generator=torch.Generator().manual_seed(spec["seed"]))
    dl_val = DataLoader(plain_rows(val_rows), batch_size=spec["batch_size"], shuffle=False, collate_fn=collator)
    optimizer = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=spec["lr"],
                                          weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=spec["warmup_steps"], num_training_steps=total)
    keras = TutorialKerasModel(model, loss_fn=None, optimizer=optimizer, lr_scheduler=scheduler)
    done = {}

    class AtFitEnd:  # torchkeras calls it after the last epoch, before fit moves the net to the CPU
        def on_fit_end(self, model):
            done["end"], done["peak"] = time.perf_counter(), peak_memory_bytes(torch.device(spec["device"]))
            done["eval_loss"] = heldout_loss(model.net, val_rows, model.accelerator, pad_id=tokenizer.pad_token_id,
                                             batch_size=spec["batch_size"])

    begin = time.perf_counter()
    keras.fit(dl_train, dl_val, epochs=spec["epochs"], ckpt_path=str(out / "best"), patience=spec["epochs"] + 1,
              monitor="val_loss", mode="min", callbacks=[AtFitEnd()], plot=False,
              mixed_precision="bf16" if spec["device"] == "cuda" else "no", cpu=spec["device"] != "cuda")
    return {**totals(rows), "step_seconds": sum(r["seconds"] for r in rows), "loop_seconds": done["end"] - begin,
            "peak_memory_bytes": done["peak"], "final_train_loss": last_epoch_loss(rows),
            "eval_loss": done["eval_loss"]}
