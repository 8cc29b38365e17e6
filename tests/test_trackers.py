"""Trackers: names checked at start; the TensorBoard path written for real and read back.

Run: python -m pytest tests/test_trackers.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate import utils as accelerate_utils
from conftest import peft_model, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from qlora_loop.config import ConfigError, DataConfig, key_paths, load_config, to_dict
from qlora_loop.data.batches import build_dataloaders
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.observe.trackers import (TRACKERS, check_trackers, epoch_metrics, hyperparameters, log_samples,
                                         start_trackers, step_metrics, tensorboard_dir)
from qlora_loop.training.optim import build_optimizer, build_scheduler
from qlora_loop.training.step import StepRunner


def test_unknown_tracker_names_the_closest():
    with pytest.raises(ConfigError, match=r"train.log_with: unknown tracker 'tensorbord'; did you mean tensorboard\?"):
        check_trackers(["tensorbord"])
    with pytest.raises(ConfigError, match="choose from tensorboard, wandb, swanlab, mlflow"):
        check_trackers(["neptune"])


def test_a_tracker_named_but_not_installed_is_an_error_naming_the_package():
    missing = [name for name, (available, _) in TRACKERS.items() if not getattr(accelerate_utils, available)()]
    if not missing:
        pytest.skip("every tracker Accelerate knows is installed here")
    name = missing[0]
    package = TRACKERS[name][1]
    with pytest.raises(ConfigError, match=rf"train.log_with: {name} is named but its package is not installed: "
                                          rf"pip install {package}"):
        check_trackers(["tensorboard", name])
    assert check_trackers(["tensorboard"]) == ["tensorboard"]
    assert check_trackers([]) == []


def test_config_becomes_flat_hyperparameters():
    cfg = load_config(None, ["train.lr=7e-4", "eval.prompts=['Who are you?']"])
    flat = hyperparameters(to_dict(cfg))
    assert flat["train.lr"] == 7e-4 and flat["adapter.kind"] == "lora" and flat["model.revision"] == "null"
    assert flat["adapter.extra"] == "{}" and flat["output_dir"] == cfg.output_dir
    assert flat["eval.prompts"] == "['Who are you?']" and flat["eval.num_samples"] == cfg.eval.num_samples
    assert set(flat) == set(key_paths())  # every key, each section opened, nothing else
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_tensorboard_events_are_written_and_read_back(tmp_path, tiny_qwen2, qwen2_tokenizer):
    out = tmp_path / "run"
    accelerator = Accelerator(log_with=check_trackers(["tensorboard"]), project_dir=out, mixed_precision="no")
    config = to_dict(tiny_config("train.lr=7e-4"))
    start_trackers(accelerator, config, run_name="run")
    train, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=config["data"]["train"], val_split=0.0,
                                                             max_length=512))
    loader, _ = build_dataloaders(train[:12], [], DataConfig(group_by_length=False), batch_size=4,
                                  pad_id=qwen2_tokenizer.pad_token_id)
    model = peft_model(tiny_qwen2, r=4)
    lr = config["train"]["lr"]
    optimizer = build_optimizer(model, "paged_adamw_32bit", lr)
    scheduler = build_scheduler(optimizer, "constant", 3, 0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    runner = StepRunner(model, optimizer, scheduler, accelerator)
    logged = []
    for batch in loader:  # three optimizer steps of one micro-batch
        result = runner([batch])
        metrics = step_metrics(result, tokens_per_second=100.0 * runner.step, peak_memory_bytes=2**30)
        accelerator.log(metrics, step=runner.step)
        logged.append(metrics)
    accelerator.log(epoch_metrics({"epoch": 1, "train_loss": 4.5, "val_loss": 3.25, "tokens_per_second": 250.0}),
                    step=runner.step)
    log_samples(accelerator, [("Who are you?", "I am Loopy.")], step=runner.step)
    accelerator.end_training()

    events = EventAccumulator(str(tensorboard_dir(out)), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "train/peak_memory_gib",
            "val/loss", "train/epoch_loss", "train/epoch_tokens_per_second"} <= scalars
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second"):
        read = events.Scalars(key)
        assert [e.step for e in read] == [1, 2, 3]
        assert [e.value for e in read] == pytest.approx([m[key] for m in logged], rel=1e-6)  # stored as float32
    assert [m["train/lr"] for m in logged] == [lr] * 3  # the constant schedule's lr, as stepped
    assert logged[0]["train/loss"] > 4  # a real loss of the random tiny model, not a placeholder
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(3, 3.25)]
    assert events.Scalars("train/peak_memory_gib")[0].value == 1.0
    (text,) = events.Tensors("samples/text_summary")
    assert text.step == 3 and text.tensor_proto.string_val[0].decode() == "**Who are you?**\n\nI am Loopy."

    # the config, as hyper-parameters (accelerate writes them into a sub-folder of the run)
    (hparams_dir,) = [p for p in tensorboard_dir(out).iterdir() if p.is_dir() and list(p.glob("events.*"))]
    hp_events = EventAccumulator(str(hparams_dir))
    hp_events.Reload()
    content = hp_events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert session.hparams["train.lr"].number_value == pytest.approx(7e-4)
    assert session.hparams["model.name_or_path"].string_value == "builtin:tiny-qwen2"
    assert torch.isfinite(torch.tensor([m["train/loss"] for m in logged])).all()


def test_a_run_with_log_with_tensorboard_sends_what_it_writes(tmp_path, tiny_qwen2, rows44, train_main):
    """scripts/train.py's wiring: every logged step, every epoch's validation loss and every round of
    sample replies reach TensorBoard, with the numbers the run wrote to its own files."""
    out = tmp_path / "run"
    train_main([f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", "train.epochs=2", "train.patience=0",
                "train.log_with=[tensorboard]", "eval.num_samples=1", f"output_dir={out}"])
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tensorboard_dir(out)), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == \
        [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in history]
    assert len(events.Tensors("samples/text_summary")) == len(history) + 1  # before training, then each epoch

    # --overwrite starts the curves afresh too: the old run's events do not mix into the new one's.
    # Only event files go: the folder may hold something else of the user's.
    (tensorboard_dir(out) / "notes.txt").write_text("mine")
    train_main([f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", "train.epochs=1", "train.patience=0",
                "train.log_with=[tensorboard]", "eval.num_samples=0", "train.lr=1e-3", f"output_dir={out}"],
               overwrite=True)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tensorboard_dir(out)), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert (tensorboard_dir(out) / "notes.txt").read_text() == "mine"
