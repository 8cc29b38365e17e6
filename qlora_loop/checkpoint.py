"""Writing the adapter: safetensors + adapter_config.json (+ tokenizer), loadable by plain peft."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def save_adapter(accelerator, model, tokenizer, directory: str | Path) -> None:
    """Write only the adapter (never base weights, never pickle) to `directory`, replacing any
    adapter there only once the new one is complete: a crash mid-save leaves the old one intact."""
    accelerator.wait_for_everyone()
    _write_adapter(accelerator, accelerator.unwrap_model(model), tokenizer, Path(directory))
    accelerator.wait_for_everyone()


def _write_adapter(accelerator, peft_model, tokenizer, directory: Path) -> None:
    @accelerator.on_main_process
    def write():
        tmp, old = directory.with_name(f".{directory.name}.tmp"), directory.with_name(f".{directory.name}.old")
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)

    write()
