"""Experiment trackers through Accelerate's tracking API (train.log_with: [tensorboard, wandb, ...]).

Accelerate quietly skips a tracker whose package is missing, so a run would train for hours and
log nothing; check_trackers makes that an error before anything loads. What is sent:
  start      the resolved config, flattened to `section.key` hyper-parameters
  each step  train/loss, train/lr, train/grad_norm, train/tokens_per_second, train/peak_memory_gib
  each epoch val/loss, val/drift, val/METRIC (eval.metrics), train/epoch_loss, train/epoch_tokens_per_second
  samples    prompt and reply texts: TensorBoard text, a W&B table, SwanLab text
Accelerate opens trackers and logs to them on the main process only.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from accelerate import utils as accelerate_utils

from qlora_loop.config import ConfigError, flat_config
from qlora_loop.files import GIB

PROJECT = "qlora_loop"  # the W&B / SwanLab / MLflow project; TensorBoard writes OUTPUT_DIR/qlora_loop/
# name in train.log_with -> (accelerate's availability check, what to pip install)
TRACKERS = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "comet_ml": ("is_comet_ml_available", "comet_ml"),
    "aim": ("is_aim_available", "'aim<4'"),
    "clearml": ("is_clearml_available", "clearml"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "trackio": ("is_trackio_available", "trackio"),
}


def check_trackers(names: list[str]) -> list[str]:
    """The tracker names, checked: each is one Accelerate knows and its package is installed.
    Raises ConfigError naming the key, the tracker and the package to install."""
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"train.log_with: unknown tracker {name!r}; {hint}choose from {', '.join(TRACKERS)}")
        available, package = TRACKERS[name]
        if not getattr(accelerate_utils, available)():
            raise ConfigError(f"train.log_with: {name} is named but its package is not installed: "
                              f"pip install {package} (or remove {name} from train.log_with)")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.log_with={names} names a tracker twice")
    return list(names)


def start_trackers(accelerator, config: dict, run_name: str) -> None:
    """Open the trackers the Accelerator was created with (log_with=..., project_dir=output_dir)
    and record the config as hyper-parameters. `run_name` names the run where the tracker allows."""
    if not accelerator.log_with:
        return
    accelerator.init_trackers(PROJECT, config=hyperparameters(config),
                              init_kwargs={"wandb": {"name": run_name}, "swanlab": {"experiment_name": run_name},
                                           "mlflow": {"run_name": run_name}})


def hyperparameters(config: dict) -> dict:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}, each value one every tracker takes: None becomes
    'null', and lists and mappings their text, as TensorBoard's hparams rejects anything else."""
    def plain(value):
        if value is None:
            return "null"
        return value if isinstance(value, (bool, int, float, str)) else str(value)

    return {key: plain(value) for key, value in flat_config(config).items()}


def step_metrics(result, tokens_per_second: float, peak_memory_bytes: int) -> dict:
    """One optimizer step's numbers (result: step.StepResult)."""
    return {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm,
            "train/tokens_per_second": tokens_per_second, "train/peak_memory_gib": peak_memory_bytes / GIB,
            **{f"train/{k}": v for k, v in result.stats.items()}}


def epoch_metrics(row: dict) -> dict:
    """One epoch's numbers (row: what fit passes to RunLog.epoch_end)."""
    metrics = {"train/epoch_loss": row["train_loss"], "train/epoch_tokens_per_second": row["tokens_per_second"],
               "epoch": row["epoch"]}
    if row.get("val_loss") is not None:
        metrics["val/loss"] = row["val_loss"]
    if row.get("drift") is not None:
        metrics["val/drift"] = row["drift"]
    metrics.update({f"val/{name}": value for name, value in row.get("metrics", {}).items()})
    return metrics


def log_samples(accelerator, samples: list[tuple[str, str]], step: int) -> None:
    """Prompt/reply texts, to each tracker that shows text; the others are skipped. Trackers exist
    on the main process only (init_trackers runs there), so elsewhere this does nothing."""
    if not samples:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            text = "\n\n".join(f"**{prompt}**\n\n{reply}" for prompt, reply in samples)
            tracker.log({"samples": text}, step=step)
        elif tracker.name == "wandb":
            tracker.log_table("samples", columns=["prompt", "reply"], data=[list(s) for s in samples], step=step)
        elif tracker.name == "swanlab":
            import swanlab

            tracker.log({"samples": [swanlab.Text(f"{prompt}\n---\n{reply}") for prompt, reply in samples]}, step=step)


def tensorboard_dir(output_dir: str | Path) -> Path:
    """Where TensorBoard's event files go: `tensorboard --logdir OUTPUT_DIR/qlora_loop`."""
    return Path(output_dir) / PROJECT
