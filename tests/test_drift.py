"""Drift: mean per-token KL(base || adapted) on the base's own replies, from one model."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from conftest import peft_model

from qlora_loop.forgetting.drift import Drift
from qlora_loop.model.generate import encode_chat, generate_reply

PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "你好"}]]


def replies(model, tokenizer) -> list[str]:
    with model.disable_adapter():
        return [generate_reply(model, tokenizer, p, max_new_tokens=12) for p in PROMPTS]


def test_drift_is_zero_before_training_and_the_kl_from_the_base_after(tiny_qwen2, qwen2_tokenizer):
    model = peft_model(tiny_qwen2, r=4, dropout=0.0)
    answers = replies(model, qwen2_tokenizer)
    drift = Drift(model, qwen2_tokenizer, PROMPTS, answers, autocast=contextlib.nullcontext)
    assert drift() == 0.0  # LoRA's B starts at zero: the adapted model is the base
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    model.train()
    moved = drift()
    assert model.training  # measured in eval mode, handed back in training mode
    # the same KL, computed by hand: base (adapter disabled) against adapted, at the reply tokens
    kl_sum, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for messages, reply in zip(PROMPTS, answers):
            prompt = encode_chat(qwen2_tokenizer, messages)[0]
            ids = torch.cat([prompt, qwen2_tokenizer(reply, add_special_tokens=False, return_tensors="pt")["input_ids"][0]])
            with model.disable_adapter():
                base = F.log_softmax(model(input_ids=ids[None]).logits[0, len(prompt) - 1:-1].float(), -1)
            adapted = F.log_softmax(model(input_ids=ids[None]).logits[0, len(prompt) - 1:-1].float(), -1)
            kl_sum += float((base.exp() * (base - adapted)).sum())
            tokens += len(ids) - len(prompt)
    assert moved > 0.01 and abs(moved - kl_sum / tokens) < 1e-5
