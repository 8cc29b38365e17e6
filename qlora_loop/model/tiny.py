"""Tiny causal LMs built offline: the embedded default's model (builtin:tiny-*, see
qlora_loop.model.builtin), and the fixture of every test.

A tiny model is a real transformers checkpoint (config.json + safetensors + a byte-level BPE
tokenizer with a chat template) written to a folder, so it loads through the very
`from_pretrained` path a 7B model takes. Same arguments -> byte-identical folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from qlora_loop.config import ASSETS


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama-2-chat's format: the system prompt folded into the first [INST], answers closed by </s>,
# and, like Meta's template, an error when user and assistant turns do not alternate.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

ARCHS = {
    # arch: (config class, special tokens, eos, pad, chat template)
    "qwen2": (Qwen2Config, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>", CHATML),
    "llama": (LlamaConfig, ["<unk>", "<s>", "</s>"], "</s>", None, LLAMA2),
}

BUILD_VERSION = 3  # bump when the builder or the bundled texts change, so stale caches are not reused
LM_HEAD_STD = 0.1


def build_tiny_model(out_dir: str | Path, arch: str = "qwen2", *, hidden_size: int = 128, num_layers: int = 2,
                     vocab_size: int = 1024, seed: int = 0, chat_template: str | None = None) -> Path:
    """Write a random-weight `arch` model and a tokenizer trained on the bundled texts to `out_dir`.
    chat_template: None = the arch's own (ChatML / Llama-2), "" = none, else that Jinja string."""
    config_cls, specials, eos, pad, template = ARCHS[arch]
    out_dir = Path(out_dir)
    tokenizer = _train_tokenizer(specials, vocab_size)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=pad,
                                   bos_token="<s>" if arch == "llama" else None,
                                   unk_token="<unk>" if arch == "llama" else None)
    if chat_template != "":  # "" builds a tokenizer without a template
        fast.chat_template = template if chat_template is None else chat_template
    fast.save_pretrained(out_dir)

    config = config_cls(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # At transformers' init (std 0.02) a random lm_head behind RMSNorm keeps every logit within
    # about +-3, so no adapter can make the model sure of a token; a pretrained head is far wider.
    torch.nn.init.normal_(model.lm_head.weight, std=LM_HEAD_STD)
    model.save_pretrained(out_dir)
    return out_dir


def _train_tokenizer(specials: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def _corpus() -> list[str]:
    """The bundled texts plus chat-format words, so common pieces are single tokens."""
    texts = ["system user assistant [INST] [/INST] <<SYS>> <</SYS>> Human: Assistant:"]
    with open(ASSETS / "self_cognition.jsonl", encoding="utf-8") as f:
        for line in f:
            texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts
