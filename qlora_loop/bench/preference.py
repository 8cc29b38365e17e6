"""The preference bench: our DPO against TRL's DPOTrainer + peft on the same 4-bit model and pairs,
and our SFT on the pairs' chosen answers as the memory baseline (scripts/bench_dpo.py).

Every peer trains SmolLM2-135M-Instruct (the builtin) in 4-bit NF4 with double quantisation, LoRA r 16
/ alpha 32 / dropout 0.05 on every linear layer but lm_head, paged_adamw_32bit, the same lr, warmup +
cosine, batch 4 and max length 512, on qlora_loop/assets/style_train.jsonl; DPO with the sigmoid loss,
beta 0.1, no NLL term (train.nll_weight=0), the reference the base with the adapter off. TRL casts the
LoRA weights to bfloat16 under a quantised base; they are cast back to float32, which made it faster
here. Runs alternate (ours, trl, sft, ours, ...), each in a fresh process, so its peak memory (the
process's peak resident set on a CPU, CUDA's max allocated on a GPU) is its own.

Measured the same way for every peer:
  pairs/s             pairs x epochs / the wall time from loading the model to the end of training:
                      our reference pass and TRL's reference forwards are both inside it
  peak memory         taken when training ended
  reward accuracy     on the 24 held-out pairs (style_heldout.jsonl): the share whose chosen answer gains
                      more log-prob over the base than the rejected one, computed by our code for both
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from qlora_loop.config import ASSETS, DataConfig
from qlora_loop.training.memory import peak_memory_bytes, reset_peak

# ours / sft: model.gradient_checkpointing=auto (off when the batch fits, as here); *_gc: on, as TRL has it by default;
# ours_split: train.pair_forward=split (pieces no larger than the chosen side), checkpointing auto
PEERS = ("ours", "ours_split", "ours_gc", "trl", "sft", "sft_gc")
PAIRS = ASSETS / "style_train.jsonl"
HELD_OUT = ASSETS / "style_heldout.jsonl"
SETTINGS = dict(lr=5e-4, batch_size=4, beta=0.1, r=16, alpha=32, dropout=0.05, max_length=512, warmup_ratio=0.05)


@torch.no_grad()
def heldout_reward_accuracy(model, tokenizer, beta: float = 0.1) -> float:
    """The share of held-out pairs whose chosen answer gains more log-prob over the base (the same
    model under disable_adapter) than the rejected one."""
    from qlora_loop.data.batches import collate_pairs
    from qlora_loop.data.preference import build_preference_datasets
    from qlora_loop.training.preference import sequence_logps
    from qlora_loop.training.reference import reference_logps

    pairs, _, _ = build_preference_datasets(tokenizer, DataConfig(train=str(HELD_OUT), val_split=0), objective="dpo")
    reference_logps(model, pairs, pad_id=tokenizer.pad_token_id, identity={}, adapter_on=False,
                    autocast=lambda: torch.autocast("cpu", enabled=False))
    model.eval()
    right = 0
    for start in range(0, len(pairs), 8):
        chunk = pairs[start:start + 8]
        batch = collate_pairs(chunk, tokenizer.pad_token_id)
        logps, n = sequence_logps(model, {k: v.to(model.device) for k, v in batch.items()})[0].cpu(), len(chunk)
        gain = logps - batch["ref_logps"]
        right += int((beta * gain[:n] > beta * gain[n:]).sum())
    return right / len(pairs)


def run_ours(out: Path, *, epochs: int, objective: str, checkpointing: bool, pair_forward: str = "auto") -> dict:
    from qlora_loop.config import load_config
    from qlora_loop.run import train
    from qlora_loop.use.inference import load_for_inference

    s = SETTINGS
    data = str(PAIRS)
    if objective == "sft":  # the chosen answers alone, as SFT rows
        rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
        data = str(out / "chosen.jsonl")
        Path(data).write_text("".join(json.dumps({"instruction": r["prompt"], "output": r["chosen"]}) + "\n"
                                      for r in rows), encoding="utf-8")
    cfg = load_config(None, [f"data.train={data}", f"train.objective={objective}", f"train.epochs={epochs}",
                             f"train.lr={s['lr']}", f"train.batch_size={s['batch_size']}", f"train.beta={s['beta']}",
                             "train.nll_weight=0", f"adapter.r={s['r']}", f"adapter.alpha={s['alpha']}",
                             f"adapter.dropout={s['dropout']}", f"data.max_length={s['max_length']}",
                             f"train.warmup_ratio={s['warmup_ratio']}", "data.val_split=0", "data.replay=0",
                             "train.monitor=train_loss", "eval.drift_samples=0", "eval.num_samples=0",
                             "data.cache=false", f"output_dir={out / 'run'}",
                             f"model.gradient_checkpointing={'true' if checkpointing else 'auto'}",
                             f"train.pair_forward={pair_forward}"])
    started = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - started
    peak = peak_memory_bytes(torch.device("cpu"))
    result = {"seconds": seconds, "pairs": len(PAIRS.read_text().splitlines()) * epochs, "peak_memory_bytes": peak,
              "step_pairs_per_second": summary["loss_tokens_per_second"] if objective != "sft" else None}
    if objective != "sft":
        model, tokenizer = load_for_inference(out / "run" / "best")
        result["reward_accuracy"] = heldout_reward_accuracy(model, tokenizer, SETTINGS["beta"])
    return result


def run_trl(out: Path, *, epochs: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from qlora_loop.cpu import resolve_compute_dtype
    from qlora_loop.model.builtin import resolve_model_path
    from qlora_loop.model.load import load_base_model, load_tokenizer

    s = SETTINGS
    started = time.perf_counter()
    path = resolve_model_path("builtin:smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    dtype, _ = resolve_compute_dtype("auto", torch.device("cpu"))
    model = load_base_model(path, torch.device("cpu"), dtype)  # the same 4-bit NF4 load as ours
    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    args = DPOConfig(output_dir=str(out / "trl"), num_train_epochs=epochs, per_device_train_batch_size=s["batch_size"],
                     learning_rate=s["lr"], lr_scheduler_type="cosine", warmup_steps=s["warmup_ratio"],  # a share, below 1
                     optim="paged_adamw_32bit", beta=s["beta"], loss_type="sigmoid", max_length=s["max_length"],
                     report_to="none", save_strategy="no", logging_steps=10, use_cpu=True, seed=42)
    lora = LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"], task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    for name, p in trainer.model.named_parameters():  # TRL casts LoRA to bfloat16 under a quantised base
        if p.requires_grad:
            p.data = p.data.float()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = peak_memory_bytes(torch.device("cpu"))
    return {"seconds": seconds, "pairs": len(rows) * epochs, "peak_memory_bytes": peak,
            "step_pairs_per_second": len(rows) * epochs / trainer.state.log_history[-1]["train_runtime"],
            "reward_accuracy": heldout_reward_accuracy(trainer.model, tokenizer, s["beta"])}


def work(peer: str, out: Path, epochs: int) -> dict:
    """One peer, once, in this process."""
    out.mkdir(parents=True, exist_ok=True)
    reset_peak(torch.device("cpu"))
    result = run_trl(out, epochs=epochs) if peer == "trl" else \
        run_ours(out, epochs=epochs, objective="sft" if peer.startswith("sft") else "dpo",
                 checkpointing=peer.endswith("_gc"), pair_forward="split" if peer == "ours_split" else "auto")
    result["pairs_per_second"] = result["pairs"] / result["seconds"]
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="runs per peer, alternating peers")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--workdir", default="bench-dpo")
    p.add_argument("--report", default="bench-dpo/report.json")
    args = p.parse_args(argv)
    peers = [x for x in args.peers.split(",") if x]
    runs = []
    for repeat in range(args.repeats):
        for peer in peers:
            out = Path(args.workdir) / f"{peer}-{repeat}"
            done = subprocess.run([sys.executable, "-m", "qlora_loop.bench.preference", "--worker", peer, str(out),
                                   str(args.epochs)], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{peer} run {repeat} failed:\n{done.stderr[-3000:]}")
            result = {"peer": peer, "repeat": repeat, **json.loads((out / "result.json").read_text())}
            runs.append(result)
            print(json.dumps(result), flush=True)
    medians = {peer: {k: statistics.median(r[k] for r in runs if r["peer"] == peer)
                      for k in ("pairs_per_second", "peak_memory_bytes", "reward_accuracy")
                      if all(r.get(k) is not None for r in runs if r["peer"] == peer)} for peer in peers}
    report = {"settings": {**SETTINGS, "epochs": args.epochs, "repeats": args.repeats}, "runs": runs,
              "medians": medians}
    if "ours" in medians and "trl" in medians:
        report["ours_over_trl_pairs_per_second"] = medians["ours"]["pairs_per_second"] / medians["trl"]["pairs_per_second"]
    for ours, sft in (("ours", "sft"), ("ours_split", "sft"), ("ours_gc", "sft_gc")):
        if ours in medians and sft in medians:
            report[f"{ours}_over_{sft}_peak_memory"] = medians[ours]["peak_memory_bytes"] / medians[sft]["peak_memory_bytes"]
    for ours in ("ours_split", "ours_gc"):
        if ours in medians and "trl" in medians:
            report[f"{ours}_over_trl_pairs_per_second"] = (medians[ours]["pairs_per_second"]
                                                           / medians["trl"]["pairs_per_second"])
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        peer, out, epochs = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
        result = work(peer, out, epochs)
        (out / "result.json").write_text(json.dumps(result))
    else:
        main()
