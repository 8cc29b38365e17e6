"""The label-mask audit: passes the real masks of ChatML and Llama-2, catches broken ones.

Run: python -m pytest tests/test_audit.py -q
"""

from __future__ import annotations

import pytest
import torch

from qlora_loop.config import ASSETS
from qlora_loop.data.audit import LabelMaskError, audit_label_masks, check_label_masks
from qlora_loop.data.examples import IGNORE, build_examples
from qlora_loop.data.rows import Conversation, DataError, Rejects
from qlora_loop.data.sources import load_conversations
from qlora_loop.model.load import load_tokenizer

BUNDLED = str(ASSETS / "self_cognition.jsonl")
MULTI = [
    Conversation("multi.jsonl:1", [
        {"role": "system", "content": "You are Loopy."},
        {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Loopy."},
        {"role": "user", "content": "Where from?"}, {"role": "assistant", "content": "From the qlora_loop project."}]),
    Conversation("multi.jsonl:2", [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}]),
]
# A template that renders each question together with its answer, at the answer, and nothing for
# a trailing question: its masks pass examples.py's consistency checks but train every prompt.
PAIRS = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
         "{{ bos_token + '[INST] ' + messages[loop.index0 - 1]['content'] + ' [/INST] ' + m['content'] + ' ' "
         "+ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(params=["qwen2_tokenizer", "llama_tokenizer"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def bundled(tokenizer, max_length=512):
    conversations = load_conversations(BUNDLED) + MULTI
    # rows whose prompt alone fills max_length are dropped, as data.on_error=skip would
    examples, _ = build_examples(tokenizer, conversations, max_length, Rejects(strict=False))
    return examples, conversations


def test_real_masks_pass_for_chatml_and_llama2(tokenizer):
    examples, conversations = bundled(tokenizer)
    assert len(examples) == len(conversations)  # every row fits in 512 tokens: none dropped, all audited
    assert audit_label_masks(tokenizer, examples, conversations, sample=1000, max_length=512) == []
    # message lists in the examples' order work as well as Conversations
    assert audit_label_masks(tokenizer, examples, [c.messages for c in conversations], sample=10) == []


def test_truncated_rows_pass_when_max_length_is_given(tokenizer):
    examples, conversations = bundled(tokenizer, max_length=30)
    assert sum(len(e["input_ids"]) == 30 for e in examples) > 20
    assert audit_label_masks(tokenizer, examples, conversations, sample=1000, max_length=30) == []
    # Without max_length an answer cut just before its EOS looks like a broken mask, and is reported.
    unexcused = audit_label_masks(tokenizer, examples, conversations, sample=1000)
    assert unexcused and all("ends without a trained end-of-turn token" in p for p in unexcused)


def test_prompt_trained_is_caught_with_the_row(tokenizer):
    examples, conversations = bundled(tokenizer)
    broken = [{**e, "labels": list(e["input_ids"])} for e in examples]  # everything trained
    problems = audit_label_masks(tokenizer, broken, conversations, sample=1000)
    assert "multi.jsonl:1: system text ('You are Loopy.') is trained; only assistant turns and their " \
           "end-of-turn token may be" in problems
    assert "multi.jsonl:1: user text ('Where from?') is trained; only assistant turns and their " \
           "end-of-turn token may be" in problems
    assert all(p.split(": ")[0].rsplit(":", 1)[1].isdigit() for p in problems)  # each names file:line


def test_untrained_eos_is_caught(tokenizer):
    examples, conversations = bundled(tokenizer)
    eos = tokenizer.eos_token_id
    broken = [{**e, "labels": [IGNORE if label == eos else label for label in e["labels"]]} for e in examples]
    problems = audit_label_masks(tokenizer, broken, conversations, sample=1000)
    turns = sum(m["role"] == "assistant" for c in conversations for m in c.messages)
    assert turns > len(conversations)  # multi-turn rows: each turn is judged on its own
    assert len(problems) == turns
    assert all("ends without a trained end-of-turn token" in p for p in problems)
    assert any(p.startswith("multi.jsonl:1: assistant turn 2 ('From the qlora_loop project.') ends without")
               for p in problems)


def test_untrained_assistant_turn_and_shifted_labels_are_caught(qwen2_tokenizer):
    examples, conversations = bundled(qwen2_tokenizer)
    example = next(e for e in examples if e["where"] == "multi.jsonl:1")
    first_answer = qwen2_tokenizer("I am Loopy.<|im_end|>", add_special_tokens=False)["input_ids"]
    labels = list(example["labels"])
    start = next(k for k in range(len(labels)) if labels[k:k + len(first_answer)] == first_answer)
    labels[start:start + len(first_answer)] = [IGNORE] * len(first_answer)
    problems = audit_label_masks(qwen2_tokenizer, [{**example, "labels": labels}], conversations)
    assert problems == ["multi.jsonl:1: assistant turn 1 ('I am Loopy.') has no trained tokens"]

    second_answer = qwen2_tokenizer("From the qlora_loop", add_special_tokens=False)["input_ids"]
    labels = list(example["labels"])
    start = next(k for k in range(len(labels)) if labels[k:k + len(second_answer)] == second_answer)
    labels[start:start + len(second_answer)] = [IGNORE] * len(second_answer)  # " project.<|im_end|>" still trained
    problems = audit_label_masks(qwen2_tokenizer, [{**example, "labels": labels}], conversations)
    assert problems == ["multi.jsonl:1: assistant turn 2 ('From the qlora_loop project.') is only partly trained"]

    shifted = example["labels"][1:] + [IGNORE]  # labels shifted by hand, then again by the loss
    problems = audit_label_masks(qwen2_tokenizer, [{**example, "labels": shifted}], conversations)
    assert len(problems) == 1 and problems[0].startswith("multi.jsonl:1: ") and "differ from their token" in problems[0]


def test_broken_template_that_trains_the_prompt_is_caught(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama), chat_template=PAIRS)
    examples, _ = build_examples(tokenizer, MULTI, 512)  # examples.py accepts it: no error
    problems = audit_label_masks(tokenizer, examples, MULTI)
    assert "multi.jsonl:1: user text ('Who are you?') is trained; only assistant turns and their end-of-turn " \
           "token may be" in problems
    assert "multi.jsonl:2: user text ('你好') is trained; only assistant turns and their end-of-turn " \
           "token may be" in problems


def test_collate_that_masks_pad_ids_drops_the_trained_eos(llama_tokenizer):
    assert llama_tokenizer.pad_token_id == llama_tokenizer.eos_token_id  # Llama: pad = EOS
    examples, conversations = bundled(llama_tokenizer)

    def collate_masking_pad_ids(batch, pad_id):  # the common bug: labels[input_ids == pad] = -100
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in batch])
        labels = torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in batch])
        labels[ids == pad_id] = IGNORE
        return {"input_ids": ids, "labels": labels}

    problems = audit_label_masks(llama_tokenizer, examples, conversations, sample=1000,
                                 collate_fn=collate_masking_pad_ids)
    assert len(problems) == len(examples)  # every example loses the EOS that ends its last answer
    assert all("collate drops the trained EOS" in p for p in problems)
    assert audit_label_masks(llama_tokenizer, examples, conversations, sample=1000) == []  # the real collate


def test_check_label_masks_stops_with_the_rows_unless_disabled(qwen2_tokenizer):
    examples, _ = bundled(qwen2_tokenizer)
    examples = [e for e in examples if e["where"].startswith(BUNDLED)]
    assert check_label_masks(qwen2_tokenizer, examples, sample=8, max_length=512) == 8
    broken = [{**e, "labels": list(e["input_ids"])} for e in examples]
    with pytest.raises(LabelMaskError, match=r"(?s)label-mask audit found \d+ problem.*self_cognition.jsonl:\d+: "
                                             r"user text .* is trained.*data.audit_rows=0") as caught:
        check_label_masks(qwen2_tokenizer, broken, sample=8, max_length=512)
    assert isinstance(caught.value, DataError)  # scripts/train.py exits 2 with one error: line
    assert check_label_masks(qwen2_tokenizer, broken, sample=0, max_length=512) == 0


def test_a_run_whose_masks_train_the_prompt_stops_before_training(tiny_llama, train_main, tmp_path):
    """scripts/train.py audits before step 1: a template the masking code gets wrong stops the run."""
    template = tmp_path / "pairs.jinja"
    template.write_text(PAIRS, encoding="utf-8")
    args = [f"model.name_or_path={tiny_llama}", f"data.chat_template={template}", "train.epochs=1",
            "train.patience=0", "eval.num_samples=0"]
    with pytest.raises(LabelMaskError, match=r"(?s)label-mask audit found \d+ problem.*user text .* is trained"):
        train_main(args + [f"output_dir={tmp_path / 'a'}"])
    assert not (tmp_path / "a" / "steps.jsonl").exists()
    summary = train_main(args + [f"output_dir={tmp_path / 'b'}", "data.audit_rows=0"])  # turned off: it trains
    assert summary["steps"] > 0
