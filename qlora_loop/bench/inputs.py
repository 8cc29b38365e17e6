"""What every peer trains on: the model (a tiny Qwen2, or a Qwen2.5-7B-shaped one with random
weights) and the rows (generated or read), tokenized once by qlora_loop.data for all of them."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import statistics
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from qlora_loop.config import DataConfig
from qlora_loop.data.mixtures import build_datasets, split_validation
from qlora_loop.data.sources import load_conversations
from qlora_loop.model.load import load_tokenizer
from qlora_loop.model.tiny import LM_HEAD_STD, _corpus, build_tiny_model

SHARD_BYTES = 4 << 30  # safetensors shards of the random checkpoint, as from_pretrained writes them


def build_bench_model(out: Path, *, vocab: int | None, hidden: int, layers: int, seed: int) -> Path:
    """A tiny Qwen2 model (qlora_loop.model.tiny); with `vocab`, its embeddings and head are resized to
    that many rows while the tokenizer keeps its ~1k tokens: the memory of a 152k vocabulary
    without training a 152k tokenizer (ids above the tokenizer's are simply never used)."""
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


def write_random_checkpoint(out: Path, tokenizer_dir: Path, *, shape: dict, device: str, seed: int = 0) -> Path:
    """A bf16 checkpoint of `shape` with random weights generated on `device`, so every peer loads it
    through from_pretrained's real 4-bit path. Shapes come from a meta-device model (no memory);
    weights N(0, 0.02), norms 1, biases 0. The tokenizer is the tiny one (~1k ids)."""
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
        if size > SHARD_BYTES:
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


def generate_chat_set(n: int, tokenizer, *, max_tokens: int, seed: int, spread: float = 20.0,
                      system: str | None = None) -> list[dict]:
    """n copy-task conversations ("repeat these words" -> the words), learnable by a tiny model, whose
    token lengths are log-spaced from max_tokens/spread to max_tokens (both ends present), shuffled.
    system: a system turn to start each with; "" keeps a template's default system prompt (SmolLM2's
    is 16 tokens) from setting the shortest length."""
    words = sorted({w for text in _corpus() for w in re.findall(r"[A-Za-z]{2,}", text)})
    rng = random.Random(seed)

    def row(k: int) -> dict:
        said = " ".join(rng.choice(words) for _ in range(k))
        return {"messages": [*([] if system is None else [{"role": "system", "content": system}]),
                             {"role": "user", "content": f"Repeat: {said}"}, {"role": "assistant", "content": said}]}

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


def write_data(workdir: Path, tokenizer, *, data: str | None, generate: int | None, seq: int, val_split: float,
               seed: int, system: str | None = None) -> tuple[Path, Path]:
    """train.jsonl and val.jsonl in workdir, both as {"messages": [...]} rows: `data`'s rows, or
    `generate` generated ones up to 95% of `seq` tokens (each starting with `system`, if given); a
    seeded `val_split` share held out."""
    if data:
        rows = [{"messages": c.messages} for c in load_conversations(data)]
    else:
        rows = generate_chat_set(generate, tokenizer, max_tokens=int(seq * 0.95), seed=seed, system=system)
    train, val = split_validation(rows, val_split, seed=seed, where=data or "generated set")
    paths = workdir / "train.jsonl", workdir / "val.jsonl"
    for path, part in zip(paths, (train, val)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    return paths


def load_examples(spec: dict):
    """(tokenizer, train examples, val examples): the same tokenized rows for every peer."""
    tokenizer = load_tokenizer(spec["model"])
    train, val, _ = build_datasets(tokenizer, DataConfig(train=spec["train"], val=spec["val"], val_split=0.0,
                                                         max_length=spec["seq"]), seed=spec["seed"])
    return tokenizer, train, val
