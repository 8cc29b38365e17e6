"""The run manifest: what it records, and the warnings when an adapter is loaded on something else.

Run: python -m pytest tests/test_manifest.py -q
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch

from qlora_loop.config import Config, to_dict
from qlora_loop.manifest import FILE, build_manifest, check_manifest, config_hash, read_manifest, write_manifest
from qlora_loop.model.load import load_tokenizer
from qlora_loop.model.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def adapter_dir(tmp_path, tiny_qwen2, qwen2_tokenizer):
    """An adapter folder as a run on tiny_qwen2 would leave it: its manifest."""
    config = to_dict(Config())
    config["model"]["name_or_path"] = str(tiny_qwen2)
    folder = tmp_path / "best"
    folder.mkdir()
    write_manifest(folder, build_manifest(config, qwen2_tokenizer, str(tiny_qwen2),
                                          data_files=[config["data"]["train"]], device=torch.device("cpu")))
    return folder


def test_manifest_records_versions_hashes_base_and_commit(adapter_dir, tiny_qwen2, qwen2_tokenizer):
    manifest = json.loads((adapter_dir / FILE).read_text(encoding="utf-8"))
    assert manifest == read_manifest(adapter_dir)
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        assert manifest["packages"][package] == metadata.version(package)
    assert manifest["device"]["type"] == "cpu"
    train = Config().data.train
    assert manifest["data"] == {train: hashlib.sha256(Path(train).read_bytes()).hexdigest()[:16]}
    template = qwen2_tokenizer.chat_template
    assert manifest["chat_template_hash"] == hashlib.sha256(template.encode()).hexdigest()[:16]
    assert manifest["special_tokens"] == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    assert manifest["base"]["name"] == manifest["base"]["path"] == str(tiny_qwen2)
    assert manifest["base"]["model_type"] == "qwen2" and len(manifest["base"]["fingerprint"]) == 16
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert manifest["git"]["commit"] == head
    assert len(manifest["config_hash"]) == 16


def test_config_hash_ignores_run_control_but_not_training_settings():
    a = to_dict(Config())
    b = to_dict(Config())
    b["output_dir"], b["train"]["resume"], b["train"]["epochs"] = "elsewhere", "auto", a["train"]["epochs"] + 5
    b["eval"]["prompts"], b["eval"]["num_samples"] = ["Who are you?"], 0  # what is shown, not what is learned
    assert config_hash(a) == config_hash(b)
    b["train"]["lr"] = a["train"]["lr"] / 2
    assert config_hash(a) != config_hash(b)
    b["train"]["lr"], b["adapter"]["extra"] = a["train"]["lr"], {"use_dora": True}  # a dict-valued key counts
    assert config_hash(a) != config_hash(b)


def test_same_base_and_tokenizer_warn_nothing(adapter_dir, tiny_qwen2, qwen2_tokenizer):
    assert check_manifest(adapter_dir, qwen2_tokenizer, str(tiny_qwen2)) == []


def test_a_different_architecture_is_warned(adapter_dir, tiny_qwen2, tiny_llama):
    assert check_manifest(adapter_dir, base=str(tiny_llama)) == [
        f"the adapter in {adapter_dir} was trained on a qwen2 model ({tiny_qwen2}), but the base being loaded, "
        f"{tiny_llama}, is a llama model"]


def test_other_weights_of_the_same_architecture_are_warned(adapter_dir, tmp_path, qwen2_tokenizer):
    other = build_tiny_model(tmp_path / "other-qwen2", arch="qwen2", seed=1)  # same config, other weights
    warnings = check_manifest(adapter_dir, qwen2_tokenizer, str(other))
    assert len(warnings) == 1
    assert warnings[0].startswith(f"the base {other} is not the model the adapter in {adapter_dir} was trained on")


def test_a_different_chat_template_or_eos_is_warned(adapter_dir, tiny_qwen2):
    tokenizer = load_tokenizer(str(tiny_qwen2), chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    warnings = check_manifest(adapter_dir, tokenizer, str(tiny_qwen2))
    assert len(warnings) == 1 and warnings[0].startswith("the chat template differs from the one the adapter")
    tokenizer = load_tokenizer(str(tiny_qwen2))
    tokenizer.eos_token = "<|endoftext|>"
    assert check_manifest(adapter_dir, tokenizer) == [
        f"the tokenizer's eos_token is '<|endoftext|>', but the adapter in {adapter_dir} was trained with "
        "'<|im_end|>': it learned to stop on a different token"]


def test_an_adapter_without_manifest_is_warned_once(tmp_path, qwen2_tokenizer, tiny_qwen2):
    warnings = check_manifest(tmp_path, qwen2_tokenizer, str(tiny_qwen2))
    assert len(warnings) == 1 and f"{tmp_path} has no readable {FILE}" in warnings[0]
