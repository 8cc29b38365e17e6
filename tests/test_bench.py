"""scripts/bench.py end to end in --quick mode: our loop and the HF Trainer baseline, each in its own
process, on the tiny 4-bit model; the report's numbers are checked against the runs' own records.
Then the parts of qlora_loop.bench: the presets, the held-out loss, the GPU floor against the dry run.

Run: python -m pytest tests/test_bench.py -q   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, peft_model
from torch.utils.data import DataLoader
from transformers import Qwen2Config

from qlora_loop.config import AdapterConfig, Config, DataConfig, TrainConfig
from qlora_loop.bench.bounds import QWEN25_7B, gpu_bounds, model_flops_per_token
from qlora_loop.bench.inputs import generate_chat_set
from qlora_loop.bench.measure import heldout_loss
from qlora_loop.bench.peak import matmul_gflops
from qlora_loop.bench.report import flop_shares, targets
from qlora_loop.bench.settings import LORA_TARGETS, REAL_MODEL, BenchError, Settings
from qlora_loop.data.batches import collate
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.training.dryrun import activation_bytes, dry_run
from qlora_loop.training.loss import count_targets, default_loss

FIELDS = ("loss_tokens_per_second", "tokens_per_second", "step_seconds_mean", "step_seconds", "loop_seconds",
          "peak_memory_bytes", "padding_share", "final_train_loss", "eval_loss", "steps", "tokens",
          "target_tokens", "positions")


def test_quick_bench_reports_every_field_for_ours_and_hf(tmp_path, tiny_qwen2):
    report_path = tmp_path / "bench_report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--model", str(tiny_qwen2),
                           "--threads", "1", "--workdir", str(tmp_path / "work"), "--report", str(report_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ours/hf" in proc.stdout  # the table's ratio row was printed
    report = json.loads(report_path.read_text())

    assert [r["peer"] for r in report["runs"]] == ["ours", "hf"]  # one run each, ours first
    peers, ratio = report["peers"], report["ratios"]["hf"]
    steps = math.ceil(report["data"]["train_rows"] / report["settings"]["batch_size"]) * report["settings"]["epochs"]
    for name in ("ours", "hf"):
        values = peers[name]
        assert all(math.isfinite(values[k]) and values[k] > 0 for k in FIELDS if k != "padding_share"), values
        assert 0 <= values["padding_share"] < 1
        assert values["steps"] == steps
        assert values["target_tokens"] < values["tokens"] <= values["positions"]
        assert values["padding_share"] == 1 - values["tokens"] / values["positions"]
        assert values["loss_tokens_per_second"] == values["target_tokens"] / values["step_seconds"]
        assert values["eval_loss"] < 6.9  # below a uniform guess over the ~1k-token vocabulary: it trained
    # Same rows for both: every epoch passes each training token once, whatever the order or batching.
    assert peers["ours"]["tokens"] == peers["hf"]["tokens"]
    assert peers["ours"]["target_tokens"] == peers["hf"]["target_tokens"]
    assert abs(peers["ours"]["eval_loss"] / peers["hf"]["eval_loss"] - 1) < 0.02  # 1.006 here
    for key, value in ratio.items():
        assert value == peers["ours"][key] / peers["hf"][key], key
    assert {"loss_tokens_per_second", "peak_memory_bytes", "padding_share", "final_train_loss"} <= set(ratio)

    # Our padding share is the one our own steps.jsonl records.
    steps_jsonl = tmp_path / "work" / "runs" / "ours-0" / "steps.jsonl"
    rows = [json.loads(line) for line in steps_jsonl.read_text().splitlines()]
    assert len(rows) == steps
    assert peers["ours"]["padding_share"] == 1 - sum(r["tokens"] for r in rows) / sum(r["positions"] for r in rows)
    assert peers["ours"]["target_tokens"] == sum(r["target_tokens"] for r in rows)
    names = {t["target"] for t in report["targets"]}
    assert {"loss-bearing tokens/s >= 1.5x hf", "padding share <= 5% (ours)"} <= names
    # the machine's measured matmul peak, and each peer's share of it, from its own tokens/s
    peaks = report["machine"]["matmul_peak_gflops"]
    assert set(peaks) == {"float32", "bfloat16"} and all(v > 0 for v in peaks.values())
    flops = report["flops"]
    assert flops["model_flops_per_token"] == report["settings"]["model_flops_per_token"] > 0
    for name in ("ours", "hf"):
        gflops = peers[name]["tokens_per_second"] * flops["model_flops_per_token"] / 1e9
        assert flops["per_peer"][name]["gflops"] == pytest.approx(gflops)
        assert flops["per_peer"][name]["share_of_peak"]["float32"] == pytest.approx(gflops / peaks["float32"])


def test_a_failed_run_is_recorded_and_the_others_still_report(tmp_path, tiny_qwen2):
    """An unattended bench (the first GPU run) must keep what it measured when one peer fails: here
    ours stops at its memory probe and is recorded as failed; hf runs and is in the report."""
    report_path = tmp_path / "bench_report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--model", str(tiny_qwen2),
                           "--threads", "1", "--workdir", str(tmp_path / "work"), "--report", str(report_path),
                           "--ours-set", "train.memory_budget_gib=0.001"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith(f"the other runs are in {report_path}")
    report = json.loads(report_path.read_text())
    assert [r["peer"] for r in report["runs"]] == ["hf"] and report["peers"]["hf"]["steps"] > 0
    assert [r["peer"] for r in report["failed"]] == ["ours"] and "memory" in report["failed"][0]["error"]
    assert report["ratios"] == {}


def test_a_run_past_the_time_limit_is_killed_and_recorded(tmp_path, tiny_qwen2):
    report_path = tmp_path / "bench_report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--model", str(tiny_qwen2),
                           "--peers", "ours", "--run-timeout", "0.5", "--workdir", str(tmp_path / "work"),
                           "--report", str(report_path)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1 and "killed after --run-timeout 0.5 s" in proc.stderr
    report = json.loads(report_path.read_text())
    assert report["runs"] == [] and [r["peer"] for r in report["failed"]] == ["ours"]
    assert report["failed"][0]["error"].startswith("killed after --run-timeout 0.5 s")


def test_gpu_7b_floor_and_flop_bound_come_from_the_qwen25_7b_shape():
    b = gpu_bounds(QWEN25_7B, seq=2048, batch=1, r=16)
    assert 5.5e9 < b["base_bytes"] < 5.6e9  # 4-bit NF4 linear layers + bf16 embeddings and head
    assert b["lora_parameters"] == 40_370_176  # r=16 on q,k,v,o,gate,up,down of 28 layers
    assert 0.64e9 < b["adapter_optimizer_bytes"] < 0.65e9
    # 28 checkpointed bf16 layer inputs + the larger of one layer's recompute and 1024 tokens of fp32 logits
    inputs, layer, logits = 28 * 2048 * 3584 * 2, 2048 * (8 * 3584 + 2 * 512 + 5 * 18944) * 2, 1024 * 152064 * 4
    assert layer < logits and b["activation_bytes"] == inputs + logits  # 1.03 GB
    assert 7.1e9 < b["floor_bytes"] < 7.4e9  # the floor with bf16 activations
    # float32 hidden states (norms up-cast): the layer inputs and the recompute double, and the recompute wins
    assert b["activation_fp32_stream_bytes"] == 2 * inputs + 2 * layer  # 1.84 GB
    assert 8.0e9 < b["floor_fp32_stream_bytes"] < 8.1e9
    assert b["paged_optimizer_bytes"] == 28 * 3 * 18944 * 16 * 8  # gate/up B and down A: >= 1e5 elements
    head = 152064 * 3584
    assert b["n_active"] - head == 28 * (2 * 3584 ** 2 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    assert b["flops_per_token"] == 6 * (b["n_active"] - head) + 4 * head  # the head is not recomputed


def test_gpu_floor_counts_what_the_dry_run_counts(tmp_path):
    """The floor from the shape and the dry run from its config.json: the same parameters, bytes per
    parameter and activation model (dryrun.activation_bytes); they differ only in how the loss's
    logits are added (see bench.bounds)."""
    Qwen2Config(**QWEN25_7B).save_pretrained(tmp_path)
    lora = AdapterConfig(kind="lora", r=16, alpha=32, dropout=0.05, target_modules=LORA_TARGETS)
    dry = dry_run(str(tmp_path), Config(adapter=lora, train=TrainConfig(batch_size=1),
                                        data=DataConfig(max_length=2048)))
    b = gpu_bounds(QWEN25_7B, seq=2048, batch=1, r=16)
    assert dry.trainable == b["lora_parameters"]
    assert dry.memory["adapter_and_optimizer"] == b["adapter_optimizer_bytes"]
    base = dry.memory["base_4bit"] + dry.memory["embeddings_and_head"] + dry.memory["norms_and_biases"]
    assert base == pytest.approx(b["base_bytes"], abs=1)  # the dry run rounds the NF4 bytes down
    held, layer = activation_bytes(2048, hidden=3584, intermediate=18944, kv_width=512, layers=28, stream_bytes=2)
    assert dry.memory["activations"] == held + layer
    assert b["activation_bytes"] == held + max(layer, 1024 * 152064 * 4)


def test_heldout_loss_ignores_the_state_a_peer_left_in_accelerate(tiny_qwen2, qwen2_tokenizer, rows44, accelerator):
    """HF's Trainer leaves Accelerate's shared GradientState inside a loader, at its last batch with
    a remainder; evaluate over unprepared batches then trimmed every batch to that remainder."""
    model = peft_model(tiny_qwen2, r=4)
    rows, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(rows44), val_split=0.0, max_length=128))
    rows = rows[:5]
    loader = iter(accelerator.prepare_data_loader(DataLoader(list(range(6)), batch_size=4)))
    next(loader), next(loader)  # at the last batch, never finished: what Trainer leaves
    assert accelerator.gradient_state.end_of_dataloader and accelerator.gradient_state.remainder == 2

    try:
        loss = heldout_loss(model, rows, accelerator, pad_id=qwen2_tokenizer.pad_token_id, batch_size=4)
    finally:
        list(loader)  # finished: the state is clean again for the tests that follow
    model.eval()
    with torch.no_grad():
        batches = [collate(rows[:4], qwen2_tokenizer.pad_token_id), collate(rows[4:], qwen2_tokenizer.pad_token_id)]
        expected = sum(default_loss(model)(model, b).sum().item() for b in batches) / sum(map(count_targets, batches))
    assert loss == pytest.approx(expected, rel=1e-6)


def test_quick_and_gpu_7b_presets():
    quick = Settings(quick=True).resolved()
    assert (quick.generate, quick.seq, quick.batch_size, quick.epochs, quick.repeats, quick.val_split) == \
        (24, 128, 4, 1, 1, 0.25)
    assert quick.peer_list() == ["ours", "hf"] and quick.data_seed == quick.seed == 42
    gpu = Settings(gpu_7b=True, epochs=3, repeats=3, batch_size=8, data_seed=7).resolved()
    assert (gpu.seq, gpu.batch_size, gpu.r, gpu.generate, gpu.epochs, gpu.repeats) == (2048, 1, 16, 64, 1, 1)
    assert gpu.peer_list() == ["ours", "hf", "torchkeras"] and gpu.data_seed == 7
    assert Settings().resolved().generate == 256 and Settings(data="rows.jsonl").resolved().generate is None
    with pytest.raises(BenchError, match="--peers ours,trl: unknown trl; choose from ours, hf"):
        Settings(peers="ours,trl").peer_list()


def test_real_preset_is_smollm2_at_batch_8_one_epoch_against_every_peer():
    real = Settings(real=True).resolved()
    assert (real.model, real.batch_size, real.seq, real.epochs, real.repeats, real.generate) == \
        (REAL_MODEL, 8, 384, 1, 1, 72)
    assert real.peer_list() == ["ours", "hf", "hf_grouped", "torchkeras"]
    assert Settings(real=True, repeats=2, model="my-model").resolved().repeats == 2
    assert Settings().resolved().repeats == 3


def test_real_targets_read_the_whole_loop_tokens_per_second():
    ratios = {"hf": {"loop_tokens_per_second": 2.5, "final_train_loss": 1.0, "eval_loss": 1.0},
              "hf_grouped": {"loop_tokens_per_second": 1.2, "final_train_loss": 1.0, "eval_loss": 1.0}}
    met = {t["target"]: t["met"] for t in targets({"ours": {"padding_share": 0.01}}, ratios, vocab=49152, real=True)}
    assert met["whole-loop tokens/s >= 2.0x hf"] is True and met["whole-loop tokens/s >= 1.3x hf_grouped"] is False
    assert not any(name.startswith("loss-bearing") for name in met)


def test_model_flops_per_token_counts_six_times_the_projections_and_the_head():
    smollm2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, head_dim=64, vocab_size=49152)
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536  # q, o; k, v (3 heads of 64); gate, up, down
    assert model_flops_per_token(smollm2) == 6 * (30 * layer + 49152 * 576)  # 807 M
    shares = flop_shares({"ours": {"tokens_per_second": 100.0}}, flops_per_token=10 ** 9,
                         peaks={"float32": 200.0, "bfloat16": 800.0})
    assert shares["per_peer"]["ours"] == {"gflops": 100.0, "share_of_peak": {"float32": 0.5, "bfloat16": 0.125}}
    assert flop_shares({}, flops_per_token=None, peaks={}) == {}
    assert 0 < matmul_gflops(torch.device("cpu"), torch.float32, size=128, seconds=0.05) < 1e5


def test_generated_rows_can_start_with_a_system_turn(qwen2_tokenizer):
    rows = generate_chat_set(6, qwen2_tokenizer, max_tokens=200, seed=0, system="")
    assert all(r["messages"][0] == {"role": "system", "content": ""} for r in rows)
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only guard")
def test_gpu_7b_on_a_cpu_only_machine_is_an_error_that_says_what_to_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--gpu-7b", "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--gpu-7b needs a CUDA GPU" in proc.stderr and "--tiny" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was built
