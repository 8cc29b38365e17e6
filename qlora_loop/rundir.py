"""The output folder of a run: never lose a run by accident; start a fresh one cleanly."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from qlora_loop.config import ConfigError
from qlora_loop.trackers import tensorboard_dir

# What a run writes at the top of its output folder, and so what a fresh start clears.
RUN_FILES = ("steps.jsonl", "history.jsonl", "samples.jsonl", "summary.json", "curves.png", "best", "checkpoints")


def check_output_dir(output_dir: str | Path, *, resume: str | None, overwrite: bool) -> None:
    """A finished run, or an unfinished one's checkpoints, stay unless asked."""
    output_dir = Path(output_dir)
    if overwrite:
        return
    if (output_dir / "summary.json").exists():
        raise ConfigError(f"output_dir={output_dir} holds a finished run; pass --overwrite to replace it "
                          "or choose another folder with output_dir=...")
    if not resume and any((output_dir / "checkpoints").glob("step-*")):
        raise ConfigError(f"output_dir={output_dir} holds checkpoints of an unfinished run; continue it with "
                          "train.resume=auto, or pass --overwrite to start afresh")


def start_run(accelerator, output_dir: str | Path, config: dict, *, fresh: bool) -> None:
    """On the main process: clear a previous run's files when starting afresh; write the resolved config."""
    output_dir = Path(output_dir)

    @accelerator.on_main_process
    def write():
        if fresh:
            for name in RUN_FILES:
                path = output_dir / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            # TensorBoard's event files only, not its folder: OUTPUT_DIR/qlora_loop may be something else
            # of the user's (output_dir=. in a checkout holds the package of that name)
            for events in tensorboard_dir(output_dir).glob("**/events.out.tfevents.*"):
                events.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                                                encoding="utf-8")

    write()
    accelerator.wait_for_everyone()
