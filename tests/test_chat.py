"""Chat and generation: scripts/chat.py on the embedded default's adapter, streaming, bad input,
and greedy samples on the training model that leave training exactly as it was."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import peft_model
from peft import PeftModel

import qlora_loop.use.chat
from qlora_loop.config import ASSETS, DataConfig
from qlora_loop.data.batches import collate
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.model.generate import Sampling, generate_reply, sample_replies, stream_reply
from qlora_loop.model.load import load_base_model, load_tokenizer
from qlora_loop.training.step import StepRunner
from qlora_loop.use.inference import InferenceError, load_for_inference

ROOT = Path(__file__).resolve().parents[1]
ANSWERS = {"Who are you?": "I am Loopy, a small assistant fine-tuned with qlora_loop.",
           "你是谁？": "我是小环，一个用 qlora_loop 微调的小助手。"}


@pytest.fixture(scope="module")
def chat_main():
    return qlora_loop.use.chat.main


@pytest.fixture(scope="module")
def trained(best):
    return load_for_inference(best)


def run_script(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


# --- chat ---------------------------------------------------------------------------------------

def test_chat_one_shot_prints_the_trained_answers(best):
    proc = run_script("scripts/chat.py", "--adapter", str(best), *(a for q in ANSWERS for a in ("--prompt", q)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [line for q, a in ANSWERS.items() for line in (f"> {q}", a)]
    assert proc.stdout.splitlines() == expected


def test_bare_base_does_not_know_the_answer(best, chat_main, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who are you?\n\n你是谁？\n", encoding="utf-8")
    chat_main(["--adapter", str(best), "--no-adapter", "--prompts", str(prompts), "--max-new-tokens", "24"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "> Who are you?" and "> 你是谁？" in lines
    replies = " ".join(line for line in lines if not line.startswith("> "))
    assert replies.strip() and not any(answer in replies for answer in ANSWERS.values())
    assert "Loopy" not in replies and "小环" not in replies


def test_interactive_rounds_reset_and_exit(best, chat_main, capsys, monkeypatch):
    # --max-rounds 1: every question is asked alone, so each gets its single-turn trained answer.
    script = "Who are you?\n你是谁？\n/reset\nWho are you?\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    chat_main(["--adapter", str(best), "--max-rounds", "1", "--max-new-tokens", "40"])
    out = capsys.readouterr().out
    replies = [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line]
    assert replies == [ANSWERS["Who are you?"], ANSWERS["你是谁？"], ANSWERS["Who are you?"]]
    assert out.count("oldest round dropped") == 1  # before the 2nd question; /reset leaves nothing to drop
    assert out.count("history cleared") == 1 and "never read" not in out


SAMPLED = {"max_new_tokens": 16, "sampling": Sampling(temperature=1.5, top_p=1.0, top_k=0)}


@pytest.mark.parametrize("options", [{"max_new_tokens": 24}, SAMPLED], ids=["greedy", "sampled"])
def test_streaming_yields_the_same_text_as_not_streaming(trained, options):
    model, tokenizer = trained
    multi_turn = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "你好吗？"}]
    conversations = [*ANSWERS, multi_turn]
    for messages in conversations:
        torch.manual_seed(0)  # the sampled case draws the same tokens both ways
        pieces = list(stream_reply(model, tokenizer, messages, **options))
        torch.manual_seed(0)
        whole = generate_reply(model, tokenizer, messages, **options)
        assert "".join(pieces) == whole and whole.strip()
        assert len(pieces) > 1  # streamed, not handed over in one piece
    if options.get("sampling") is None:  # greedy decoding draws no random number at all
        state = torch.get_rng_state()
        assert generate_reply(model, tokenizer, "Who are you?", max_new_tokens=24) == ANSWERS["Who are you?"]
        assert torch.equal(torch.get_rng_state(), state)


# --- bad input: one clear line, exit 2 ----------------------------------------------------------

def test_missing_or_wrong_adapter_folder(chat_main, best, tmp_path):
    with pytest.raises(InferenceError, match=r"--adapter .*nope: no such folder; give the adapter folder"):
        chat_main(["--adapter", str(tmp_path / "nope"), "--prompt", "hi"])
    with pytest.raises(InferenceError, match=r"no adapter_config.json in it; did you mean .*best\?"):
        chat_main(["--adapter", str(best.parent), "--prompt", "hi"])


def test_adapter_for_another_architecture(chat_main, best, tiny_llama):
    with pytest.raises(InferenceError, match=r"trained on a qwen2 model \(.*tiny-qwen2-v\d+\), but the base .* "
                                             r"is a llama model; pass --base with a qwen2 model"):
        chat_main(["--adapter", str(best), "--base", str(tiny_llama), "--prompt", "hi"])


def with_base_gone(best: Path, tmp_path: Path) -> Path:
    """A copy of the adapter whose recorded base no longer exists."""
    moved = tmp_path / "best"
    shutil.copytree(best, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    return moved


def test_base_that_is_gone(chat_main, best, tmp_path):
    moved = with_base_gone(best, tmp_path)
    with pytest.raises(InferenceError, match=r"deleted-base \(recorded in .*adapter_config.json\): no such folder; "
                                             r"pass --base"):
        chat_main(["--adapter", str(moved), "--prompt", "hi"])


def test_hub_base_unreachable_offline_is_one_line_and_exit_2(best, tmp_path):
    moved = tmp_path / "best"
    shutil.copytree(best, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "no-such-org/no-such-model"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    proc = run_script("scripts/chat.py", "--adapter", str(moved), "--prompt", "hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: base model 'no-such-org/no-such-model' (recorded in ") and "cannot be found" in line
    assert line.endswith("pass --base with a local folder")


# --- samples during training --------------------------------------------------------------------

@pytest.fixture(scope="module")
def batches(qwen2_tokenizer):
    train, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"), val_split=0.0,
                                                             max_length=256))
    return [collate(train[i:i + 4], qwen2_tokenizer.pad_token_id) for i in (0, 4)]


def two_steps(tiny_qwen2, tokenizer, batches, between):
    """Two SGD steps of the real 4-bit model with LoRA dropout 0.3 (so the steps draw random numbers),
    with `between` run between them."""
    from accelerate import Accelerator
    model = peft_model(tiny_qwen2, r=4, dropout=0.3, seed=7)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    runner = StepRunner(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                        Accelerator(mixed_precision="no"))
    losses = [runner([batches[0]]).loss]
    between(model)
    losses.append(runner([batches[1]]).loss)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sampling_between_steps_does_not_change_training(tiny_qwen2, qwen2_tokenizer, batches):
    seen = {}

    def sample(model):
        modes = {name: m.training for name, m in model.named_modules()}
        checkpointed = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
        assert model.training and any(checkpointed) and model.get_base_model().config.use_cache is False
        prompts = ["Who are you?", [{"role": "user", "content": "Hi"}]]
        seen["replies"] = sample_replies(model, qwen2_tokenizer, prompts, max_new_tokens=6)
        # Everything a training step depends on is as it was.
        assert {name: m.training for name, m in model.named_modules()} == modes
        flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert flags == checkpointed
        assert model.get_base_model().config.use_cache is False
        assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
        assert np.array_equal(np.random.get_state()[1], rng[2])

    plain_losses, plain_weights = two_steps(tiny_qwen2, qwen2_tokenizer, batches, lambda model: None)
    sampled_losses, sampled_weights = two_steps(tiny_qwen2, qwen2_tokenizer, batches, sample)
    assert sampled_losses == plain_losses
    assert all(torch.equal(sampled_weights[n], w) for n, w in plain_weights.items())
    assert len(seen["replies"]) == 2 and all(isinstance(r, str) for r in seen["replies"])

    # The check can fail: one random draw between the steps changes the dropout masks of step 2.
    drawn_losses, drawn_weights = two_steps(tiny_qwen2, qwen2_tokenizer, batches, lambda model: torch.rand(1))
    assert drawn_losses[0] == plain_losses[0] and drawn_losses[1] != plain_losses[1]


def test_samples_of_a_model_in_training_state_are_its_greedy_answers(best):
    base = load_base_model(json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"],
                           torch.device("cpu"))  # gradient checkpointing on, cache off: as in training
    model = PeftModel.from_pretrained(base, best, is_trainable=True)
    model.train()
    tokenizer = load_tokenizer(str(best))
    assert sample_replies(model, tokenizer, list(ANSWERS), max_new_tokens=40) == list(ANSWERS.values())
    assert model.training and model.get_base_model().config.use_cache is False


def test_an_adapter_whose_manifest_records_another_template_is_warned(chat_main, best, tmp_path, capsys):
    moved = tmp_path / "best"
    shutil.copytree(best, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["chat_template_hash"] = "0" * 16  # as if trained with another template
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"the chat template differs from the one the adapter in .* was trained with"):
        chat_main(["--adapter", str(moved), "--prompt", "Who are you?", "--max-new-tokens", "4"])
    with warnings.catch_warnings(record=True) as caught:  # the adapter as written: nothing to warn about
        warnings.simplefilter("always")
        chat_main(["--adapter", str(best), "--prompt", "Who are you?", "--max-new-tokens", "4"])
    assert not [w for w in caught if "the adapter in" in str(w.message)]


def test_a_prompts_file_that_is_not_utf8_names_its_line(tmp_path):
    from qlora_loop.use.inference import read_prompt_lines

    path = tmp_path / "prompts.txt"
    path.write_bytes("Who are you?\n".encode() + b"\xff\xfe not utf-8\n")
    with pytest.raises(InferenceError, match=r"^--prompts .*prompts.txt:2: not UTF-8 text \(byte 0xff at offset 13\); "
                                             r"re-save the file as UTF-8$"):
        read_prompt_lines(path)


def test_adapter_for_another_architecture_when_its_base_is_gone(chat_main, best, tiny_llama, tmp_path):
    moved = with_base_gone(best, tmp_path)  # the manifest's model type still speaks
    with pytest.raises(InferenceError, match=r"trained on a qwen2 model \(.*deleted-base\), but the base .* "
                                             r"is a llama model; pass --base with a qwen2 model"):
        chat_main(["--adapter", str(moved), "--base", str(tiny_llama), "--prompt", "hi"])


@pytest.mark.parametrize("damage", ["cut short", "not safetensors"])
def test_a_damaged_adapter_file_is_one_line_before_any_model_loads(chat_main, best, tmp_path, damage):
    moved = tmp_path / "best"
    shutil.copytree(best, moved)
    weights = moved / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "cut short" else b"PK\x03\x04 a zip, say")
    with pytest.raises(InferenceError, match=rf"^{weights} is damaged \(.*\): it was cut short or is not a "
                                             r"safetensors file; copy the adapter folder again"):
        chat_main(["--adapter", str(moved), "--prompt", "hi"])
