"""The dry run: built on the meta device from config.json alone, it counts what the real 4-bit build counts.

Run: python -m pytest tests/test_dryrun.py -q
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from transformers import Qwen2Config

from qlora_loop.config import AdapterConfig, Config, DataConfig, ModelConfig, TrainConfig, load_config
from qlora_loop.cpu import resolve_compute_dtype
from qlora_loop.model.adapter import add_adapter, find_linear4bit_targets, trainable_parameters
from qlora_loop.model.load import load_base_model
from qlora_loop.training.dryrun import dry_run, dry_run_config, report
from qlora_loop.training.loss import chunk_tokens

ADAPTERS = {
    "lora": AdapterConfig(kind="lora", r=8, alpha=16, dropout=0.05),
    "lora-qv-dora": AdapterConfig(kind="lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                  extra={"use_dora": True}),
    "adalora": AdapterConfig(kind="adalora", r=4, alpha=8, dropout=0.0, init_r=6),
}


def config(adapter: AdapterConfig, *, batch_size: int, max_length: int, attn_implementation: str | None = None,
           packing: bool = False) -> Config:
    return Config(model=ModelConfig(attn_implementation=attn_implementation), adapter=adapter,
                  train=TrainConfig(batch_size=batch_size), data=DataConfig(max_length=max_length, packing=packing))


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_dry_run_counts_what_the_real_build_counts(request, fixture, name):
    path = str(request.getfixturevalue(fixture))
    adapter = ADAPTERS[name]
    dry = dry_run(path, config(adapter, batch_size=4, max_length=256))

    base = load_base_model(path, torch.device("cpu"), torch.bfloat16)
    targets = find_linear4bit_targets(base) if adapter.target_modules == "auto" else adapter.target_modules
    real = add_adapter(base, dataclasses.replace(adapter, target_modules=targets), total_steps=100)
    assert dry.targets == targets
    assert (dry.trainable, dry.total) == trainable_parameters(real)
    assert dry.trainable > 0


def test_no_weights_are_read(tmp_path):
    """Qwen2.5-7B's shape from a config.json alone (no weight files exist): peft's well-known count."""
    Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    lora = AdapterConfig(kind="lora", r=8, alpha=32, dropout=0.1)
    run = dry_run(str(tmp_path), config(lora, batch_size=1, max_length=1024))
    assert run.trainable == 20_185_088 and run.total == 7_635_801_600
    assert run.targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    gib = {k: v / 2**30 for k, v in run.memory.items()}
    assert 3.0 < gib["base_4bit"] < 3.3  # 6.5e9 quantised parameters at ~0.52 bytes
    assert gib["embeddings_and_head"] == pytest.approx(2 * 152064 * 3584 * 2 / 2**30)  # bf16 under autocast
    # 57 RMSNorms and the q/k/v biases of 28 layers, in bf16 under autocast
    assert gib["norms_and_biases"] == pytest.approx((57 * 3584 + 28 * (3584 + 512 + 512)) * 2 / 2**30)
    assert gib["adapter_and_optimizer"] == pytest.approx(20_185_088 * 16 / 2**30)
    assert run.memory["total"] == sum(v for k, v in run.memory.items() if k != "total")
    assert 6.5 < gib["total"] < 7.5  # 7.02 when pinned: under an 8 GB card at seq 1024
    # The memory grows with the batch; the parameter counts do not. With the loss computing all
    # logits at once (logits_chunk=None) they grow with it too; with train.py's chunked loss
    # (qwen2 qualifies: "auto") only one chunk of chunk_tokens(vocab) tokens is held at a time.
    whole = dry_run(str(tmp_path), config(lora, batch_size=1, max_length=1024), logits_chunk=None)
    bigger = dry_run(str(tmp_path), config(lora, batch_size=4, max_length=1024), logits_chunk=None)
    assert bigger.trainable == run.trainable
    assert bigger.memory["activations"] == 4 * run.memory["activations"]
    assert bigger.memory["logits"] == 4 * whole.memory["logits"] == 4 * 1024 * 152064 * (2 + 12)
    chunked = dry_run(str(tmp_path), config(lora, batch_size=4, max_length=1024))
    assert chunked.memory["logits"] == chunk_tokens(152064) * 152064 * (2 + 12) < bigger.memory["logits"]
    assert chunk_tokens(152064) == 441
    # eager attention keeps T x T scores per head; packed (data.packing), T is the whole batch's row
    eager = dry_run(str(tmp_path), config(lora, batch_size=4, max_length=1024, attn_implementation="eager"))
    packed = dry_run(str(tmp_path), config(lora, batch_size=4, max_length=1024, attn_implementation="eager",
                                           packing=True))
    scores = 2 * 28 * 1024 ** 2 * 2  # scores and probabilities, 28 heads, bf16, per 1024-token row
    assert eager.memory["activations"] - chunked.memory["activations"] == 4 * scores
    assert packed.memory["activations"] - chunked.memory["activations"] == 4 ** 2 * scores
    assert packed.memory["packed_mask"] == (4 * 1024) ** 2 * (1 + 2) and "packed_mask" not in eager.memory
    flash = dry_run(str(tmp_path), config(lora, batch_size=4, max_length=1024, attn_implementation="flash_attention_2",
                    packing=True))
    assert "packed_mask" not in flash.memory and flash.memory["activations"] == chunked.memory["activations"]


def test_dry_run_from_a_config_and_its_report(tiny_qwen2):
    cfg = load_config(None, ["adapter.r=4", "train.batch_size=2", "data.max_length=128"])
    run = dry_run_config(cfg, str(tiny_qwen2))
    lines = []
    report(run, lines.append)
    assert lines[1] == "LoRA targets: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    assert lines[2] == f"trainable parameters: {run.trainable:,} of {run.total:,} " \
                       f"({100 * run.trainable / run.total:.3f}%)"
    assert run.trainable == 2 * 4 * (4 * (128 + 128) - (128 - 64) * 2 + 2 * (128 + 384) + (384 + 128))
    assert lines[3] == f"compute dtype {run.compute_dtype} ({run.dtype_why})"
    assert run.compute_dtype == str(resolve_compute_dtype("auto", torch.device("cpu"))[0]).removeprefix("torch.")
    assert "estimated peak memory on this CPU for batch_size=2 x max_length=128" in lines[4]
    assert lines[-1].startswith("on a GPU under bfloat16 autocast: ")


def test_train_script_dry_run_prints_the_estimate_and_writes_nothing(tiny_qwen2, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "scripts/train.py", "--dry-run", f"model.name_or_path={tiny_qwen2}",
                           "adapter.r=4", f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == f"dry run: {tiny_qwen2} (qwen2), no weights loaded"
    assert lines[1] == "LoRA targets: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    assert any(line.startswith("estimated peak memory on this CPU for batch_size=4 x max_length=512: ") for line in lines)
    assert not out.exists()
