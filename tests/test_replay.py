"""Replay: the base's own replies to general prompts, cached, trained beside the user's rows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import peft_model

from qlora_loop.config import ASSETS, ConfigError, DataConfig, load_config
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.forgetting.replay import base_replies, choose, read_prompts, replay_conversations
from qlora_loop.model.generate import generate_reply
from qlora_loop.run import general_prompts


def test_prompt_files_read_as_jsonl_or_lines_and_bad_rows_name_file_and_line(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("What is 2+2?\n\nName a colour.\n", encoding="utf-8")
    assert read_prompts(text, "data.replay_prompts") == ["What is 2+2?", "Name a colour."]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"p\.jsonl:2: expected a JSON object with a \"prompt\" string"):
        read_prompts(bad, "data.replay_prompts")
    with pytest.raises(ConfigError, match=r"data\.replay_prompts=.*missing\.jsonl: no such file"):
        read_prompts(tmp_path / "missing.jsonl", "data.replay_prompts")
    prompts = read_prompts(ASSETS / "replay_prompts.jsonl", "data.replay_prompts")
    assert choose(prompts, 5, 42) == choose(prompts, 5, 42) != choose(prompts, 5, 7)
    with pytest.raises(ConfigError, match="data.replay=316, but data.replay_prompts holds only 315 prompts"):
        choose(prompts, 316, 0)


def test_bundled_drift_and_replay_prompts_are_disjoint_and_overlap_is_an_error(tmp_path):
    replay, drift = general_prompts(load_config(None, ["data.replay=315", "eval.drift_samples=24"]))
    assert len(replay) == 315 and len(drift) == 24 and not set(replay) & set(drift)
    shared = tmp_path / "shared.txt"
    shared.write_text(drift[0] + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="share 1 prompt"):
        general_prompts(load_config(None, [f"data.replay_prompts={shared}", "data.replay=1"]))


def test_base_replies_are_the_base_greedy_replies_cached_once(tiny_qwen2, qwen2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = peft_model(tiny_qwen2, r=4)
    prompts = ["What is the capital of France?", "Name a colour."]
    with model.disable_adapter():
        got = base_replies(model, qwen2_tokenizer, prompts, base=str(tiny_qwen2), system=None, max_new_tokens=6)
        # batched greedy decoding: the numbers of each row are its own up to float rounding
        assert got == [generate_reply(model, qwen2_tokenizer, p, max_new_tokens=6).strip() for p in prompts]
    cached = list((tmp_path / "qlora_loop" / "replies").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text(encoding="utf-8")) == got
    with torch.no_grad():  # another model answers otherwise, but the cache answers for the same base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(1.0)
    assert base_replies(model, qwen2_tokenizer, prompts, base=str(tiny_qwen2), system=None, max_new_tokens=6) == got
    assert base_replies(model, qwen2_tokenizer, [], base=str(tiny_qwen2), system=None, max_new_tokens=6) == []


def test_replay_rows_are_trained_never_held_out_and_counted(qwen2_tokenizer):
    replay = replay_conversations(["Name a colour.", "Say hi."], ["Blue.", ""], None)  # an empty reply is left out
    assert [c.where for c in replay] == ["replay:1"]
    train, val, stats = build_datasets(qwen2_tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"),
                                                                   val_split=0.1,
                                                                   max_length=256), seed=42, replay=replay)
    assert stats["replay"].examples == 1 and train[-1]["where"] == "replay:1"
    assert [e["index"] for e in train] == list(range(len(train)))
    assert not any(e["where"].startswith("replay") for e in val)
    assert stats["train"].examples + 1 == len(train)


def test_a_tiny_run_with_replay_and_drift_logs_drift_and_shows_the_base_reply(tiny_qwen2, train_main, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    summary = train_main([f"model.name_or_path={tiny_qwen2}", f"output_dir={out}", "train.epochs=2",
                          "data.replay=4", "data.replay_max_new_tokens=8", "eval.drift_samples=2",
                          "eval.drift_max_new_tokens=8", "eval.num_samples=1", "eval.max_new_tokens=8"])
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == summary["epochs_run"] == 2 and all(row["drift"] > 0 for row in history)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    general = [s for s in samples if s["reference_from"] == "base"]
    assert [s["epoch"] for s in general] == [0, 1, 2]
    assert all(s["reference"] == general[0]["response"] for s in general)  # the base's reply, as sample(0) got it
    config = json.loads((out / "best" / "manifest.json").read_text())
    assert any(path.endswith("replay_prompts.jsonl") for path in config["data"])


def test_max_drift_keeps_no_adapter_that_moved_further(tiny_qwen2, train_main, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    summary = train_main([f"model.name_or_path={tiny_qwen2}", f"output_dir={out}", "train.epochs=2",
                          "train.patience=0", "eval.drift_samples=2", "eval.drift_max_new_tokens=8",
                          "eval.num_samples=0", "train.max_drift=0.0"])
    assert summary["best_epoch"] is None and not (out / "best").exists()
    with pytest.raises(ConfigError, match="train.max_drift needs the drift measured"):
        load_config(None, ["train.max_drift=0.5", "eval.drift_samples=0"])
