"""Two processes on CPU (gloo), started by torchrun, running scripts/train.py as a user would: they
split the data, hold identical adapters, take the same optimizer steps as one process with the
same global batch, and write one set of outputs. Then the launch checks of qlora_loop.training.distributed,
the FSDP-QLoRA load (4-bit weights stored as bfloat16), and the shipped accelerate configs.

`accelerate launch --cpu` starts a single process (several CPU ranks need mpirun), so torchrun
starts the two ranks; `python -m torch.distributed.run` is torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from qlora_loop.config import ASSETS, ModelConfig, TrainConfig
from qlora_loop.model.load import load_base_model
from qlora_loop.training.distributed import (Launch, LaunchError, check_engine_taken, check_launch, describe_launch,
                                             resolve_grad_accum)

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
OUTPUTS = {"best", "checkpoints", "steps.jsonl", "history.jsonl", "samples.jsonl", "summary.json", "curves.png",
           "config.yaml", ".qlora_loop-run"}
METRICS = ("exact_match", "rouge_l", "chrf", "bleu")
TRAIN_ROWS, VAL_ROWS = 8, 4  # 2 ranks x batch 2 = 1 process x batch 4: no rank is padded with repeated rows


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, tiny_qwen2) -> list[str]:
    """A short run every launch below shares. float32 compute, so that batches padded to different
    widths (4 rows in one process, 2 per rank) give the same sums; dropout 0, so that no random
    mask depends on how the batch is split. train.mode=max counts epoch 2's falling val loss as no
    improvement, so patience=1 stops after 2 of 3 epochs: on every rank, or the others would hang."""
    data = tmp_path_factory.mktemp("data")
    lines = (ASSETS / "self_cognition.jsonl").read_text(encoding="utf-8").splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:TRAIN_ROWS]) + "\n", encoding="utf-8")
    (data / "val.jsonl").write_text("\n".join(lines[TRAIN_ROWS:TRAIN_ROWS + VAL_ROWS]) + "\n", encoding="utf-8")
    return ["--config", "configs/tiny-demo.yaml", f"model.name_or_path={tiny_qwen2}", "model.compute_dtype=float32",
            f"data.train={data / 'train.jsonl'}",
            f"data.val={data / 'val.jsonl'}", "data.max_length=64", "adapter.dropout=0", "train.epochs=3",
            "train.patience=1", "train.mode=max", f"eval.metrics=[{','.join(METRICS)}]", "eval.metrics_max_new_tokens=16"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    # The timeout turns ranks that wait for each other forever into a failure.
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, overrides) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    run([sys.executable, "scripts/train.py", *overrides, "train.batch_size=4", f"output_dir={out}"])
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, overrides) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("two") / "out"
    done = run([*TORCHRUN, "scripts/train.py", *overrides, "train.batch_size=2", f"output_dir={out}"])
    return out, done.stdout


def test_two_processes_take_the_steps_of_one_process_with_the_same_global_batch(one_process, two_processes):
    one, two = rows(one_process / "steps.jsonl"), rows(two_processes[0] / "steps.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # 8 rows / global batch 4 x 2 epochs, each step once
    for a, b in zip(one, two, strict=True):
        # Same global batches: the ranks' token counts add up to the single process's.
        assert (b["epoch"], b["tokens"], b["target_tokens"], b["lr"]) == (a["epoch"], a["tokens"], a["target_tokens"],
                                                                            a["lr"])
        # The loss is normalised by the target tokens of all ranks, and logged as their mean, not sum.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)  # equal to the last digit when pinned
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert two[0]["loss"] > 7.0 and two[-1]["loss"] < two[0]["loss"] - 1  # 7.19 -> 5.25 when pinned: it learns
    one_val = [r["val_loss"] for r in rows(one_process / "history.jsonl")]
    assert [r["val_loss"] for r in rows(two_processes[0] / "history.jsonl")] == pytest.approx(one_val, rel=1e-6)
    # eval.metrics: each rank answers its half of the validation rows; gathered, they score as one process's
    one_scores = [r[m] for r in rows(one_process / "history.jsonl") for m in METRICS]
    assert [r[m] for r in rows(two_processes[0] / "history.jsonl") for m in METRICS] == pytest.approx(one_scores)
    assert any(one_scores)
    # The saved adapters are the same update, whichever way the batch was split.
    a, b = (load_file(out / "best" / "adapter_model.safetensors") for out in (one_process, two_processes[0]))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_packed_batches_split_over_two_processes_as_over_one(tmp_path, overrides):
    """data.packing under DDP: each rank packs its own half of the global batch into one row."""
    one, two = tmp_path / "one", tmp_path / "two"
    packed = [*overrides, "data.packing=true"]
    run([sys.executable, "scripts/train.py", *packed, "train.batch_size=4", f"output_dir={one}"])
    run([*TORCHRUN, "scripts/train.py", *packed, "train.batch_size=2", f"output_dir={two}"])
    a, b = rows(one / "steps.jsonl"), rows(two / "steps.jsonl")
    assert len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert (y["tokens"], y["target_tokens"], y["lr"]) == (x["tokens"], x["target_tokens"], x["lr"])
        assert y["positions"] == y["tokens"]  # no padding on either rank
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


def test_two_processes_stop_early_together_and_write_one_set_of_outputs(one_process, two_processes):
    out, stdout = two_processes
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (summary["stopped_early"], summary["epochs_run"], summary["steps"], summary["best_epoch"]) == (True, 2, 4, 1)
    assert {p.name for p in out.iterdir()} == OUTPUTS  # no .best.tmp / .best.old left by a second writer
    assert {p.name for p in (out / "best").iterdir()} == {p.name for p in (one_process / "best").iterdir()}
    assert len(rows(out / "history.jsonl")) == 2
    assert summary["train_target_tokens"] == sum(r["target_tokens"] for r in rows(out / "steps.jsonl"))
    # One checkpoint per epoch end; each rank adds only its own RNG state to it.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    ours, theirs = (out / "checkpoints" / "step-000004", one_process / "checkpoints" / "step-000004")
    assert {p.name for p in ours.iterdir()} == {p.name for p in theirs.iterdir()} | {"rng-rank1.safetensors",
                                                                                     "rng-rank1.json"}
    assert stdout.count("trainable parameters:") == 1 and stdout.count("best_metric") == 1  # printed by one rank


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, overrides) -> tuple[list[dict], Path]:
    """tests/ddp_worker.py: scripts/train.py's main() on 2 ranks, each recording what it trained on
    and holds. Two micro-batches of 1 per step, so gradients are all-reduced only on the second
    (no_sync). Rank 0 alone gets a NaN loss in its first step; rank 1 alone receives SIGTERM before
    its third. Both are decisions every rank must take together, or one would wait forever."""
    record = tmp_path_factory.mktemp("ranks")
    out = record / "out"
    run([*TORCHRUN, "tests/ddp_worker.py", str(record), "--nan", "0:1", "--sigterm", "1:3", *overrides,
         "train.batch_size=1", "train.grad_accum=2", "train.skip_nonfinite=1", f"output_dir={out}"])
    return [{**json.loads((record / f"rank{r}.json").read_text(encoding="utf-8")),
             "weights": load_file(record / f"rank{r}.safetensors")} for r in (0, 1)], out


def test_each_rank_trains_on_its_own_half_of_every_global_batch(ranks):
    (first, second), _ = ranks
    assert [(r["rank"], r["num_processes"]) for r in (first, second)] == [(0, 2), (1, 2)]
    assert len(first["seen"]) == len(second["seen"]) == 3  # epoch 1's 2 steps, and the step rank 1 was signalled in
    for mine, theirs in zip(first["seen"], second["seen"]):
        assert len(mine) == len(theirs) == 2 and not set(mine) & set(theirs)
    epoch_1 = [i for step in first["seen"][:2] + second["seen"][:2] for i in step]
    assert sorted(epoch_1) == list(range(TRAIN_ROWS))  # every training row once, on one rank or the other


def test_a_nan_on_one_rank_and_a_signal_to_another_stop_both_at_the_same_step(ranks):
    (first, second), out = ranks
    for r in (first, second):  # the NaN step is skipped everywhere; the signal stops everyone after step 2
        assert (r["skipped"], r["steps"]) == (1, 2)
        assert r["outcome"].startswith("Interrupted: stopped by a signal after step 2; checkpoint ")
    assert [r["step"] for r in rows(out / "steps.jsonl")] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").is_file() and not (out / "summary.json").exists()


def test_ranks_hold_identical_adapters_after_training(ranks):
    (first, second), out = ranks
    a, b = first["weights"], second["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".lora_B." in k and a[k].abs().max() > 0 for k in a)  # lora_B starts at zero: it was trained


# --- bad launches, refused before any model is loaded ----------------------------------------------

def test_global_batch_sets_grad_accum_for_the_number_of_processes():
    assert resolve_grad_accum(None, batch_size=4, grad_accum=3, num_processes=8) == 3  # not fixed: as configured
    assert resolve_grad_accum(16, batch_size=2, grad_accum=1, num_processes=1) == 8
    assert resolve_grad_accum(16, batch_size=2, grad_accum=1, num_processes=4) == 2
    assert resolve_grad_accum(16, batch_size=2, grad_accum=2, num_processes=4) == 2


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused():
    with pytest.raises(LaunchError, match=r"train.global_batch_size=8 cannot be split into micro-batches of 3 "
                                          r"processes x train.batch_size=2 = 6 .*--num_processes in \[1, 2, 4\]"):
        check_launch(Launch(num_processes=3), batch_size=2, grad_accum=1, global_batch_size=8)
    with pytest.raises(LaunchError, match=r"train.grad_accum=3 contradicts .* means grad_accum=2; set only one"):
        check_launch(Launch(num_processes=2), batch_size=2, grad_accum=3, global_batch_size=8)


def test_resuming_under_fsdp_or_deepspeed_is_refused():
    for launch in (Launch(2, shards_parameters="FSDP"), Launch(2, deepspeed=True, deepspeed_clipping=1.0)):
        with pytest.raises(LaunchError, match=r"train.resume=auto: under (FSDP|DeepSpeed) each process holds only "
                                              r"its share .* resume under DDP or one process"):
            check_launch(launch, batch_size=1, grad_accum=1, quant_storage="bfloat16", resume="auto")


def test_adalora_under_fsdp_or_deepspeed_is_refused():
    for launch in (Launch(2, shards_parameters="FSDP"), Launch(2, deepspeed=True, deepspeed_clipping=1.0)):
        with pytest.raises(LaunchError, match=r"adapter.kind=adalora under (FSDP|DeepSpeed): .* launch with DDP"):
            check_launch(launch, batch_size=1, grad_accum=1, quant_storage="bfloat16", adapter_kind="adalora")
    assert check_launch(Launch(2), batch_size=1, grad_accum=2, adapter_kind="adalora") == 2


def test_an_fsdp_config_that_accelerate_runs_without_fsdp_is_one_error_line(tmp_path, overrides):
    """On this CPU machine Accelerate drops an FSDP config without sync_module_states and runs plain
    processes; the run must say so rather than train as something it was not launched as."""
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_SYNC_MODULE_STATES": "false"}
    done = subprocess.run([sys.executable, "scripts/train.py", *overrides, f"output_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: the accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true), but Accelerate runs this launch as "
        "NO: FSDP needs several processes on GPUs; launch it so, or give accelerate launch a config without it "
        "(e.g. --config_file configs/accelerate/ddp.yaml)")
    assert not out.exists()


def test_an_engine_asked_for_must_be_the_one_accelerate_runs():
    from types import SimpleNamespace
    runs_as = {kind: SimpleNamespace(distributed_type=kind) for kind in DistributedType}
    fsdp, deepspeed = {"ACCELERATE_USE_FSDP": "true"}, {"ACCELERATE_USE_DEEPSPEED": "true"}
    check_engine_taken(runs_as[DistributedType.FSDP], fsdp)
    check_engine_taken(runs_as[DistributedType.DEEPSPEED], deepspeed)
    check_engine_taken(runs_as[DistributedType.MULTI_GPU], {"ACCELERATE_USE_FSDP": "false"})
    with pytest.raises(LaunchError, match="runs this launch as MULTI_GPU: FSDP needs several processes on GPUs"):
        check_engine_taken(runs_as[DistributedType.MULTI_GPU], fsdp)
    with pytest.raises(LaunchError, match="asks for DeepSpeed .* runs this launch as NO: DeepSpeed needs a GPU"):
        check_engine_taken(runs_as[DistributedType.NO], deepspeed)


def test_the_script_refuses_a_misfit_launch_before_loading_or_writing(tmp_path, overrides):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "scripts/train.py", *overrides, "train.batch_size=3",
                           "train.global_batch_size=8", f"output_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "error: train.global_batch_size=8 cannot be split" in done.stderr
    assert not out.exists() and "Loading weights" not in done.stdout + done.stderr


@pytest.mark.parametrize("sharded_by", ["FSDP", "DeepSpeed ZeRO-3"])
@pytest.mark.parametrize("storage", [None, "uint8"])
def test_sharding_a_base_stored_in_bytes_is_refused(sharded_by, storage):
    with pytest.raises(LaunchError, match=rf"{sharded_by} shards only floating-point tensors, but "
                                          r"model.quant_storage=uint8 .* set model.quant_storage=bfloat16"):
        check_launch(Launch(2, shards_parameters=sharded_by, deepspeed=sharded_by != "FSDP", deepspeed_clipping=1.0),
                     batch_size=1, grad_accum=1, quant_storage=storage)


def test_fsdp_with_a_float_storage_and_ddp_with_any_storage_pass():
    assert check_launch(Launch(2, shards_parameters="FSDP"), batch_size=1, grad_accum=4, quant_storage="bfloat16") == 4
    assert check_launch(Launch(2), batch_size=1, grad_accum=4, quant_storage=None) == 4


def test_deepspeed_needs_one_micro_batch_per_step_and_its_own_clipping_to_match():
    launch = Launch(2, deepspeed=True, deepspeed_clipping=1.0)
    assert check_launch(launch, batch_size=4, grad_accum=1, max_grad_norm=1.0) == 1
    with pytest.raises(LaunchError, match=r"train.grad_accum=8 would take 8 small steps .* set train.grad_accum=1"):
        check_launch(launch, batch_size=1, grad_accum=8, max_grad_norm=1.0)
    with pytest.raises(LaunchError, match=r"gradient_clipping=1 .* but train.max_grad_norm=0.3"):
        check_launch(launch, batch_size=4, grad_accum=1, max_grad_norm=0.3)


def test_a_single_cpu_process_is_described_as_such():
    assert describe_launch(Accelerator(mixed_precision="no")) == Launch(num_processes=1)


# --- FSDP-QLoRA: the model it loads, the configs we ship -----------------------------------------

def test_bfloat16_quant_storage_gives_one_dtype_and_the_same_4bit_weights(tiny_qwen2):
    """FSDP can flatten a unit only if all its parameters share one dtype: 4-bit weights packed in
    bfloat16, and norms / embeddings kept in bfloat16 (not up-cast to float32) beside them."""
    stored = load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.bfloat16,
                             config=ModelConfig(quant_storage='bfloat16'))
    default = load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}
    assert torch.float32 in {p.dtype for p in default.parameters()}  # the uint8 path up-casts norms
    assert not any(p.requires_grad for p in stored.parameters()) and stored.is_gradient_checkpointing
    pairs = [(m, n) for m, n in zip(stored.modules(), default.modules()) if isinstance(m, bnb.nn.Linear4bit)]
    assert len(pairs) == 14 and pairs[0][0].weight.quant_state.nested
    for m, n in pairs:  # the same NF4 numbers, only packed into 2-byte instead of 1-byte words
        assert m.weight.dtype == torch.bfloat16 and n.weight.dtype == torch.uint8
        assert torch.equal(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state),
                           bnb.functional.dequantize_4bit(n.weight.data, n.weight.quant_state))
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    with torch.no_grad():  # 0.035 apart when pinned: bfloat16 instead of float32 norms and head
        assert torch.allclose(stored(input_ids=ids).logits.float(), default(input_ids=ids).logits.float(), atol=0.1)


CONFIGS = {  # file -> the accelerate settings it must carry
    "ddp.yaml": {"distributed_type": "MULTI_GPU"},
    "fsdp-qlora.yaml": {"distributed_type": "FSDP", "fsdp_config": {
        "fsdp_version": 1, "fsdp_use_orig_params": False, "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_sync_module_states": True, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}},
    "deepspeed-zero2.yaml": {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "zero_stage": 2, "gradient_accumulation_steps": 1, "gradient_clipping": TrainConfig().max_grad_norm}},
    "deepspeed-zero3.yaml": {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "zero_stage": 3, "gradient_accumulation_steps": 1, "gradient_clipping": TrainConfig().max_grad_norm,
        "zero3_init_flag": True, "zero3_save_16bit_model": True}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_configs_load_and_carry_the_settings_that_matter(name):
    path = ROOT / "configs" / "accelerate" / name
    command = path.read_text(encoding="utf-8").splitlines()[0]
    assert command.startswith(f"# accelerate launch --config_file configs/accelerate/{name} scripts/train.py --config ")
    loaded = load_config_from_file(str(path))  # accelerate's own reader: unknown keys are an error
    assert loaded.distributed_type.value == CONFIGS[name]["distributed_type"] and loaded.use_cpu is False
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section in ("fsdp_config", "deepspeed_config"):
        assert CONFIGS[name].get(section, {}).items() <= raw.get(section, {}).items()
    shards = name == "fsdp-qlora.yaml" or name == "deepspeed-zero3.yaml"
    assert ("model.quant_storage=bfloat16" in command) == shards  # what check_launch asks of a sharded base
    assert ("train.grad_accum=1" in command) == name.startswith("deepspeed")


def test_an_fsdp_launch_on_a_machine_without_a_gpu_is_one_clear_line(tmp_path, overrides):
    """What accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml sets, on this CPU-only machine."""
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SYNC_MODULE_STATES": "true",
           "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_USE_ORIG_PARAMS": "false"}
    done = subprocess.run([*TORCHRUN, "scripts/train.py", *overrides, "model.quant_storage=bfloat16",
                           f"output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode != 0  # torchrun reports the ranks' exit status 2 with a traceback of its own
    # accelerate's own reason varies by version ("There are currently no available devices"; 1.16: "FSDP
    # parameter initialization with `sync_module_states=True` is not supported on cpu."). One line from each
    # rank that gets to report: torchrun stops the other rank as soon as one fails, sometimes before it prints
    assert 1 <= done.stderr.count("error: Accelerate cannot start this launch: ") <= 2
    assert "RuntimeError:" not in done.stderr and "ValueError:" not in done.stderr  # no rank's raw traceback
    assert not (tmp_path / "out").exists()
