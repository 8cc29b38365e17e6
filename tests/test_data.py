"""qlora_loop.data: rows on disk -> messages -> label masks under real chat templates -> padded batches.

Run: python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import codecs
import json
import re

import pytest
import torch

from qlora_loop.config import DataConfig
from qlora_loop.data.batches import (EpochSampler, build_dataloaders, collate, collate_packed, model_inputs,
                                     steps_per_epoch)
from qlora_loop.data.examples import (IGNORE, build_examples, render_with_spans, tokenize_by_pieces,
                                      tokenize_conversation, tokenize_rows)
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.data.rows import DataError, Rejects, read_rows
from qlora_loop.data.sources import load_conversations
from qlora_loop.model.load import load_tokenizer

# --- helpers ------------------------------------------------------------------------------------


def chat(*turns: str, system: str | None = None) -> list[dict]:
    """Messages from alternating user/assistant texts."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]


def runs(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """The token sequence cut into maximal runs of trained / untrained tokens, each decoded."""
    assert len(ids) == len(labels)
    assert all(label in (IGNORE, tok) for tok, label in zip(ids, labels)), "a trained label is not its token"
    out: list[tuple[bool, list[int]]] = []
    for tok, label in zip(ids, labels):
        trained = label != IGNORE
        if out and out[-1][0] == trained:
            out[-1][1].append(tok)
        else:
            out.append((trained, [tok]))
    return [(trained, tokenizer.decode(toks)) for trained, toks in out]


def trained_text(tokenizer, example: dict) -> list[str]:
    return [text for trained, text in runs(tokenizer, example["input_ids"], example["labels"]) if trained]


def data_error(where, *says: str):
    """pytest.raises for a DataError whose message starts with `where: ` and holds each of `says` in order."""
    return pytest.raises(DataError, match="^" + re.escape(f"{where}: ") + ".*".join(map(re.escape, ("",) + says)))


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --- label masks under the two real templates ---------------------------------------------------

CHINESE = chat("你好", "你好！有什么可以帮你？", "What is 2+2?", "4", system="你是一个助手。")

CHATML_CASES = {
    "single": (chat("hi", "answer"), [
        (False, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
        (True, "answer<|im_end|>"),
        (False, "\n"),
    ]),
    "multi": (chat("Who are you?", "I am Loopy.", "Where from?", "From qlora_loop."), [
        (False, "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "I am Loopy.<|im_end|>"),
        (False, "\n<|im_start|>user\nWhere from?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "From qlora_loop.<|im_end|>"),
        (False, "\n"),
    ]),
    "system-chinese": (CHINESE, [
        (False, "<|im_start|>system\n你是一个助手。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                "<|im_start|>assistant\n"),
        (True, "你好！有什么可以帮你？<|im_end|>"),
        (False, "\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "4<|im_end|>"),
        (False, "\n"),
    ]),
}

# Llama-2 renders each answer as ' ' + content + ' </s>': the space before </s> is trained with it.
LLAMA2_CASES = {
    "single": (chat("hi", "answer"), [
        (False, "<s>[INST] hi [/INST]"),
        (True, " answer </s>"),
    ]),
    "multi": (chat("Who are you?", "I am Loopy.", "Where from?", "From qlora_loop."), [
        (False, "<s>[INST] Who are you? [/INST]"),
        (True, " I am Loopy. </s>"),
        (False, "<s>[INST] Where from? [/INST]"),
        (True, " From qlora_loop. </s>"),
    ]),
    "system-chinese": (CHINESE, [
        (False, "<s>[INST] <<SYS>>\n你是一个助手。\n<</SYS>>\n\n你好 [/INST]"),
        (True, " 你好！有什么可以帮你？ </s>"),
        (False, "<s>[INST] What is 2+2? [/INST]"),
        (True, " 4 </s>"),
    ]),
}


def check_runs(tokenizer, messages, expected):
    ids, labels, truncated = tokenize_conversation(tokenizer, messages, max_length=1024)
    got = runs(tokenizer, ids, labels)
    assert got == expected
    assert not truncated
    # One trained span per assistant turn, and the tokens are exactly the template's rendering.
    assert sum(trained for trained, _ in got) == sum(m["role"] == "assistant" for m in messages)
    assert ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    return ids, labels


def test_the_runs_path_trains_the_assistant_text_and_masks_the_prompt(qwen2_tokenizer, tmp_path):
    """tokenize_rows, which prepares every source of a run, on rows read from a file: the trained labels
    decode to the assistant turns, each with its <|im_end|>, and every other token (system and user
    text, the template's markup) has label -100."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": chat("Who are you?", "I am Loopy.", "Who made you?", "The qlora_loop authors.", system="Be brief.")},
        {"messages": chat("你好", "你好！有什么可以帮你？")}])
    conversations = load_conversations(path)
    for conversation, result in zip(conversations, tokenize_rows(qwen2_tokenizer, conversations, max_length=256)):
        ids, labels = result["input_ids"], result["labels"]
        answers = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
        assert all(label in (IGNORE, tok) for tok, label in zip(ids, labels))
        assert qwen2_tokenizer.decode([label for label in labels if label != IGNORE]) == \
            "".join(f"{answer}<|im_end|>" for answer in answers)
        prompt = qwen2_tokenizer.apply_chat_template(conversation.messages, tokenize=False)
        for answer in answers:
            prompt = prompt.replace(f"{answer}<|im_end|>", "", 1)
        assert qwen2_tokenizer.decode([tok for tok, label in zip(ids, labels) if label == IGNORE]) == prompt


@pytest.mark.parametrize("case", CHATML_CASES)
def test_chatml_trains_each_answer_and_its_im_end(qwen2_tokenizer, case):
    ids, labels = check_runs(qwen2_tokenizer, *CHATML_CASES[case])
    im_start = qwen2_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(label != im_start for label in labels)


@pytest.mark.parametrize("case", LLAMA2_CASES)
def test_llama2_trains_each_answer_and_its_eos(llama_tokenizer, case):
    ids, labels = check_runs(llama_tokenizer, *LLAMA2_CASES[case])
    assert labels[-1] == llama_tokenizer.eos_token_id
    assert llama_tokenizer.bos_token_id not in labels


@pytest.mark.parametrize("fixture", ["qwen2_tokenizer", "llama_tokenizer"])
def test_piecewise_tokenization_for_slow_tokenizers_trains_the_same_spans(request, fixture):
    """Slow tokenizers (Baichuan2's) have no offsets, so the text is tokenized span by span."""
    tokenizer = request.getfixturevalue(fixture)
    text, spans = render_with_spans(tokenizer, CHINESE)
    ids, labels = tokenize_by_pieces(tokenizer, text, spans)
    trained = [t for ok, t in runs(tokenizer, ids, labels) if ok]
    assert trained == [text[s:e] for s, e in spans]
    assert tokenizer.decode(ids) == tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_spans_are_character_ranges_of_the_rendered_text(qwen2_tokenizer, llama_tokenizer):
    text, spans = render_with_spans(qwen2_tokenizer, CHINESE)
    assert text == qwen2_tokenizer.apply_chat_template(CHINESE, tokenize=False)
    assert [text[s:e] for s, e in spans] == ["你好！有什么可以帮你？<|im_end|>", "4<|im_end|>"]
    text, spans = render_with_spans(llama_tokenizer, CHINESE)
    assert [text[s:e] for s, e in spans] == [" 你好！有什么可以帮你？ </s>", " 4 </s>"]


# --- templates that close an answer with no special token ---------------------------------------

# A generation prompt ending in a newline: the answer starts on a token boundary.
PLAIN = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:\n{% endif %}")


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_plain_template_gets_eos_after_each_answer_and_trains_it(request, fixture):
    tokenizer = load_tokenizer(str(request.getfixturevalue(fixture)), chat_template=PLAIN)
    eos = tokenizer.eos_token
    ids, labels, _ = tokenize_conversation(tokenizer, chat("hi", "hello there", "再见", "我很好"), 1024)
    assert runs(tokenizer, ids, labels) == [
        (False, "user:\nhi\nassistant:\n"),
        (True, f"hello there{eos}"),
        (False, "\nuser:\n再见\nassistant:\n"),
        (True, f"我很好{eos}"),
        (False, "\n"),
    ]
    eos_positions = [i for i, tok in enumerate(ids) if tok == tokenizer.eos_token_id]
    assert len(eos_positions) == 2
    assert all(labels[i] == tokenizer.eos_token_id for i in eos_positions)


def test_prompt_ending_in_a_space_still_trains_the_answers_first_token(tiny_llama):
    # "assistant: hello" pre-tokenizes as "assistant", ":", " hello": the answer's first token
    # starts on the prompt's space. It must be trained, or the model never learns to begin an answer.
    tokenizer = load_tokenizer(str(tiny_llama), chat_template=PLAIN.replace(":\n", ": "))
    ids, labels, _ = tokenize_conversation(tokenizer, chat("hi", "hello there"), 1024)
    assert runs(tokenizer, ids, labels) == [
        (False, "user: hi\nassistant:"),
        (True, " hello there</s>"),
        (False, "\n"),
    ]


def test_template_without_generation_prompt_trains_the_role_header_too(tiny_llama):
    # With no generation prompt, generation cannot add "assistant: ", so the model must learn to write it.
    tokenizer = load_tokenizer(str(tiny_llama),
                               chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    ids, labels, _ = tokenize_conversation(tokenizer, chat("hi", "hello", "again", "bye"), 1024)
    assert runs(tokenizer, ids, labels) == [
        (False, "user: hi\n"),
        (True, "assistant: hello</s>"),
        (False, "\nuser: again\n"),
        (True, "assistant: bye</s>"),
        (False, "\n"),
    ]


def test_template_that_rewrites_earlier_turns_is_an_error_naming_the_row(tmp_path, tiny_qwen2):
    # Prefixes a conversation of more than two messages, so its first turn renders differently alone.
    counts_turns = ("{% for m in messages %}{% if loop.first and messages|length > 2 %}MANY {% endif %}"
                    "{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}")
    tokenizer = load_tokenizer(str(tiny_qwen2), chat_template=counts_turns)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat("a", "b")}, {"messages": chat("a", "b", "c", "d")}])
    conversations = load_conversations(path)
    examples, _ = build_examples(tokenizer, conversations[:1], 64)  # a single turn renders consistently
    assert trained_text(tokenizer, examples[0]) == ["assistant: b<|im_end|>"]  # no generation prompt
    with data_error(f"{path}:2", "renders earlier turns differently", "data.chat_template"):
        build_examples(tokenizer, conversations, 64)


# --- rows -> messages ---------------------------------------------------------------------------

def test_alpaca_rows_become_messages(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "猫", "output": "cat", "system": "Be exact.",
         "history": [["q1", "a1"], ["q2", "a2"]]},
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Say hi", "input": "", "output": "hi", "system": None, "history": []},
    ])
    assert [c.messages for c in load_conversations(path)] == [
        [{"role": "system", "content": "Be exact."},
         {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
         {"role": "user", "content": "Translate\n猫"}, {"role": "assistant", "content": "cat"}],
        chat("Say hi", "hi"),
        chat("Say hi", "hi"),
    ]


def test_messages_rows_keep_role_and_content_in_order(tmp_path):
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U", "name": "x"},
                        {"role": "assistant", "content": "A", "weight": 1}], "id": 7}
    path = write_jsonl(tmp_path / "m.jsonl", [row])
    [conversation] = load_conversations(path)
    assert conversation.messages == chat("U", "A", system="S")
    assert conversation.where == f"{path}:1"


def test_system_prompt_is_added_only_to_rows_without_a_system_turn(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "q", "output": "a"},
        {"instruction": "q", "output": "a", "system": "own"},
    ])
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": chat("q", "a")},
                                                  {"messages": chat("q", "a", system="own")}])
    for path in (alpaca, messages):
        assert [c.messages for c in load_conversations(path, system_prompt="default")] == [
            chat("q", "a", system="default"), chat("q", "a", system="own")]
        assert [c.messages for c in load_conversations(path)] == [chat("q", "a"), chat("q", "a", system="own")]


# --- reading files ------------------------------------------------------------------------------

def test_jsonl_keeps_line_numbers_skips_blank_lines_and_accepts_bom_and_crlf(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"n": 1}\r\n\r\n   \n{"n": "\xe4\xb8\xad"}\n\n{"n": 3}')
    assert read_rows(path) == [(f"{path}:1", {"n": 1}), (f"{path}:4", {"n": "中"}), (f"{path}:6", {"n": 3})]


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+0085 / \f raw; they do not end a JSONL line.
    text = "a\u2028b\x85c\x0cd"
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat(text, "x")}, {"messages": chat("q", "y")}])
    assert [(where, row["messages"][0]["content"]) for where, row in read_rows(path)] == [(f"{path}:1", text),
                                                                                          (f"{path}:2", "q")]


def test_json_array_rows_keep_their_index_and_the_line_each_starts_on(tmp_path):
    rows = [{"instruction": "q1", "output": "a1"}, {"instruction": "中文", "output": "答案"},
            {"instruction": "q3", "output": "a3"}]
    path = tmp_path / "d.json"
    # indent=2 puts "[" on line 1 and each 4-line object after it: rows start on lines 2, 6, 10.
    path.write_text("\ufeff" + json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    assert read_rows(path) == [(f"{path}: row 0 (line 2)", rows[0]), (f"{path}: row 1 (line 6)", rows[1]),
                               (f"{path}: row 2 (line 10)", rows[2])]
    assert [c.where for c in load_conversations(path)] == [where for where, _ in read_rows(path)]
    # Several rows on one line, blank lines and a leading newline.
    path.write_text('\n[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"},\n\n'
                    '{"instruction": "e", "output": "f"}]\n', encoding="utf-8")
    assert [where for where, _ in read_rows(path)] == [f"{path}: row 0 (line 2)", f"{path}: row 1 (line 2)",
                                                       f"{path}: row 2 (line 4)"]


ALPACA_ROW = '{"instruction": "q", "output": "a"}'
MESSAGES_ROW = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'

# name: (file name, file bytes, line in the message, what else the message says)
BAD_FILES = {
    "jsonl-malformed": ("d.jsonl", f"{ALPACA_ROW}\n\n{{\"instruction\": \"q\", \"output\": }}\n", 3, "invalid JSON"),
    "array-malformed": ("d.json", f'[\n{ALPACA_ROW},\n\n{{"instruction": "q" "output": "a"}}\n]', 4, "invalid JSON"),
    "array-missing-comma": ("d.json", f"[\n{ALPACA_ROW}\n{ALPACA_ROW}\n]", 3, "expected ',' or ']'"),
    "array-not-closed": ("d.json", f"[\n{ALPACA_ROW},\n{ALPACA_ROW}\n", 4, "expected ',' or ']'"),  # at the end
    "array-then-more": ("d.json", f"[{ALPACA_ROW}]\n[{ALPACA_ROW}]\n", 2, "after the array's closing ']'"),
    "missing-field": ("d.jsonl", f'{ALPACA_ROW}\n{{"instruction": "q"}}\n', 2, "missing field 'output'"),
    "wrong-type": ("d.jsonl", f'{ALPACA_ROW}\n{ALPACA_ROW}\n{{"instruction": "q", "output": 5}}\n', 3,
                   "field 'output' must be str, got int"),
    "history-pair": ("d.jsonl", '{"instruction": "q", "output": "a", "history": [["q0"]]}\n', 1,
                     "field 'history'[0] must be a [question, answer] pair"),
    "messages-not-list": ("d.jsonl", f'{MESSAGES_ROW}\n{{"messages": "hi"}}\n', 2,
                          "field 'messages' must be list, got str"),
    "content-type": ("d.jsonl",
                     '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 1}]}\n', 1,
                     "messages[1]: field 'content' must be str, got int"),
    "role-missing": ("d.jsonl", f'{MESSAGES_ROW}\n{{"messages": [{{"content": "q"}}]}}\n', 2,
                     "messages[0]: missing field 'role'"),
    "bad-role": ("d.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n',
                 1, "messages[1].role is 'bot'; expected system, user or assistant"),
    "no-assistant": ("d.jsonl", f'{MESSAGES_ROW}\n\n{{"messages": [{{"role": "user", "content": "q"}}]}}\n', 3,
                     "the row has no assistant turn"),
    "row-not-object": ("d.jsonl", f'{ALPACA_ROW}\n["q", "a"]\n', 2, "a row must be a JSON object, got list"),
    "unknown-format": ("d.jsonl", '\n{"prompt": "q", "completion": "a"}\n', 2,
                       "unknown row format with keys ['completion', 'prompt']"),
    "not-utf8": ("d.jsonl", f'{ALPACA_ROW}\n{{"instruction": "caf\xe9", "output": "a"}}\n'.encode("latin-1"), 2,
                 "not UTF-8 text"),
    "not-utf8-after-bom": ("d.jsonl", b"\xef\xbb\xbf" + f"{ALPACA_ROW}\n\xff\n".encode("latin-1"), 2, "not UTF-8 text"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_rows_name_file_line_and_field(tmp_path, case):
    name, content, line, says = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(DataError) as error:
        load_conversations(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert says in message


@pytest.mark.parametrize("content", ["", "\n  \n", "[]", "[\n]\n"])
def test_empty_file_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with data_error(path, "no rows; expected a JSON array or one JSON object per line"):
        load_conversations(path)


def test_missing_file_is_an_error_naming_the_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with data_error(path, "data file does not exist"):
        load_conversations(path)


# --- truncation ---------------------------------------------------------------------------------

def prompt_tokens(tokenizer, user: str) -> int:
    """Tokens before the first answer of a ChatML single-turn row."""
    prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_truncation_is_counted_and_rows_with_no_trained_token_are_dropped(tmp_path, qwen2_tokenizer):
    tok, max_length = qwen2_tokenizer, 24
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "hi", "output": "ok"},                  # fits
        {"instruction": "hi", "output": "long answer " * 20},   # cut inside the answer: kept
        {"instruction": "long question " * 20, "output": "a"},  # cut inside the prompt: dropped
        {"instruction": "hi", "output": "答" * 30},              # cut inside a Chinese answer: kept
    ])
    assert prompt_tokens(tok, "hi") < max_length < prompt_tokens(tok, "long question " * 20)
    # strict (the default): the row whose prompt fills max_length is an error naming it
    with data_error(f"{path}:3", "prompt fills all data.max_length=24 tokens", "data.on_error=skip"):
        build_examples(tok, load_conversations(path), max_length)
    examples, stats = build_examples(tok, load_conversations(path), max_length, Rejects(strict=False))

    assert (stats.rows, stats.truncated, stats.dropped, stats.examples) == (4, 2, 1, 3)
    assert stats.dropped_by_kind == {"too_long": 1}
    assert [w.split(": ")[0] for w in stats.dropped_where] == [f"{path}:3"]
    assert [e["index"] for e in examples] == [0, 1, 2]
    assert [len(e["input_ids"]) for e in examples][1:] == [max_length, max_length]
    ok_tokens = len(tok("ok<|im_end|>", add_special_tokens=False)["input_ids"])
    assert trained_text(tok, examples[0]) == ["ok<|im_end|>"]
    # A truncated row trains every token after its prompt, up to max_length; no EOS is added.
    assert sum(label != IGNORE for label in examples[1]["labels"]) == max_length - prompt_tokens(tok, "hi")
    assert examples[1]["labels"][-1] != tok.eos_token_id
    assert trained_text(tok, examples[1])[0].startswith("long answer long")
    assert stats.target_tokens == ok_tokens + 2 * (max_length - prompt_tokens(tok, "hi"))
    # The cut row's ids are the first max_length ids of the full row.
    full, _, truncated = tokenize_conversation(tok, chat("hi", "long answer " * 20), 10_000)
    assert not truncated and examples[1]["input_ids"] == full[:max_length]


def test_skipping_more_than_max_skip_fraction_stops_the_run(tmp_path, qwen2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "long question " * 20, "output": "a"}] * 3
                       + [{"instruction": "hi", "output": "ok"}] * 7)
    with data_error(path, "3 of 10 rows would be skipped (3 too_long)", "data.max_skip_fraction=0.1",
                    f"first: {path}:1"):
        build_datasets(qwen2_tokenizer, DataConfig(train=path, val_split=0.0, max_length=16, on_error="skip"))
    train, _, stats = build_datasets(qwen2_tokenizer, DataConfig(train=path, val_split=0.0, max_length=16,
                                                                 on_error="skip", max_skip_fraction=0.3))
    assert len(train) == 7 and stats["train"].dropped == 3


def test_all_val_rows_dropped_is_an_error(tmp_path, qwen2_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "hi", "output": "ok"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "long question " * 20, "output": "a"}])
    with data_error(val, "all 1 rows are bad (1 too_long; first: ", f"{val}:1: the prompt fills"):
        build_datasets(qwen2_tokenizer, DataConfig(train=train, val=val, val_split=0.0, max_length=24, on_error="skip",
                                                   max_skip_fraction=1.0))


# --- splits -------------------------------------------------------------------------------------

@pytest.fixture
def numbered(tmp_path) -> str:
    """20 rows whose answers are "answer 0" .. "answer 19"."""
    return write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(20)])


def answers(tokenizer, examples) -> list[int]:
    out = []
    for e in examples:
        [text] = trained_text(tokenizer, e)
        assert text.startswith("answer ") and text.endswith("<|im_end|>"), text
        out.append(int(text[len("answer "):-len("<|im_end|>")]))
    return out


def test_val_split_is_deterministic_disjoint_and_sized(numbered, qwen2_tokenizer):
    tok = qwen2_tokenizer
    train, val, stats = build_datasets(tok, DataConfig(train=numbered, val_split=0.25, max_length=128), seed=3)
    train_ids, val_ids = answers(tok, train), answers(tok, val)
    assert (len(train_ids), len(val_ids)) == (15, 5)
    assert sorted(train_ids + val_ids) == list(range(20))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)  # file order is kept
    assert (stats["train"].rows, stats["val"].rows, stats["val"].examples) == (15, 5, 5)
    assert [e["index"] for e in val] == list(range(5))

    again_train, again_val, _ = build_datasets(tok, DataConfig(train=numbered, val_split=0.25, max_length=128), seed=3)
    assert (answers(tok, again_train), answers(tok, again_val)) == (train_ids, val_ids)
    assert [e["input_ids"] for e in again_train] == [e["input_ids"] for e in train]
    _, other_val, _ = build_datasets(tok, DataConfig(train=numbered, val_split=0.25, max_length=128), seed=4)
    assert answers(tok, other_val) != val_ids

    _, small_val, _ = build_datasets(tok, DataConfig(train=numbered, val_split=0.01, max_length=128))
    assert len(small_val) == 1  # at least one row is held out


def test_no_val_split_keeps_every_row_for_training(numbered, qwen2_tokenizer):
    train, val, stats = build_datasets(qwen2_tokenizer, DataConfig(train=numbered, val_split=0.0, max_length=128))
    assert answers(qwen2_tokenizer, train) == list(range(20))
    assert val == [] and stats["val"].rows == 0


def test_val_file_is_used_instead_of_a_split(numbered, tmp_path, qwen2_tokenizer):
    val_path = write_jsonl(tmp_path / "val.jsonl", [{"messages": chat("q", f"answer {i}")} for i in (100, 101)])
    train, val, stats = build_datasets(qwen2_tokenizer, DataConfig(train=numbered, val=val_path, val_split=0.5,
                                                                   max_length=128, system_prompt="S"))
    assert answers(qwen2_tokenizer, train) == list(range(20))
    assert answers(qwen2_tokenizer, val) == [100, 101]
    assert (stats["train"].rows, stats["val"].rows) == (20, 2)
    # The system prompt reaches both files' rows.
    assert qwen2_tokenizer.decode(val[0]["input_ids"]).startswith("<|im_start|>system\nS<|im_end|>\n")
    assert qwen2_tokenizer.decode(train[0]["input_ids"]).startswith("<|im_start|>system\nS<|im_end|>\n")


def test_too_few_rows_to_split_is_an_error_naming_val_split(tmp_path, qwen2_tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "q", "output": "a"}])
    with data_error(path, "1 rows cannot be split with data.val_split=0.1"):
        build_datasets(qwen2_tokenizer, DataConfig(train=path, val_split=0.1, max_length=128))


# --- batches ------------------------------------------------------------------------------------

def test_collate_right_pads_and_masks_padding(qwen2_tokenizer):
    pad = qwen2_tokenizer.pad_token_id
    a = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8], "index": 0}
    b = {"input_ids": [9, 10], "labels": [IGNORE, 10], "index": 1}
    batch = collate([b, a], pad)
    assert pad == 0 and pad != qwen2_tokenizer.eos_token_id
    assert batch["input_ids"].tolist() == [[9, 10, 0, 0], [5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 10, IGNORE, IGNORE], [IGNORE, IGNORE, 7, 8]]
    assert batch["index"].tolist() == [1, 0]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_with_pad_equal_to_eos_still_trains_the_answers_eos(tmp_path, llama_tokenizer):
    tok = llama_tokenizer
    eos = tok.eos_token_id
    assert tok.pad_token == tok.eos_token == "</s>"
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "hi", "output": "ok"},
                                              {"instruction": "tell me more", "output": "a much longer answer"}])
    examples, _, _ = build_datasets(tok, DataConfig(train=path, val_split=0.0, max_length=128))
    short, long = examples
    batch = collate(examples, tok.pad_token_id)
    n, width = len(short["input_ids"]), len(long["input_ids"])
    assert batch["input_ids"].shape == (2, width) and n < width
    assert batch["input_ids"][0, n - 1] == eos and batch["labels"][0, n - 1] == eos  # the answer's </s>
    assert batch["input_ids"][0, n:].tolist() == [eos] * (width - n)  # padding is </s> too ...
    assert batch["labels"][0, n:].tolist() == [IGNORE] * (width - n)  # ... but is never trained
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][1, -1] == eos
    assert (batch["labels"] == eos).sum() == 2


def test_dataloaders_shuffle_by_seed_and_keep_val_order(numbered, qwen2_tokenizer):
    train, val, _ = build_datasets(qwen2_tokenizer, DataConfig(train=numbered, val_split=0.25, max_length=128))
    def order(seed):
        return [i for batch in build_dataloaders(train, val, DataConfig(group_by_length=False), batch_size=4, pad_id=0,
                                                 seed=seed)[0] for i in batch["index"].tolist()]

    first, same, other = order(0), order(0), order(1)
    assert sorted(first) == list(range(15)) and first == same and first != other
    train_loader, val_loader = build_dataloaders(train, val, DataConfig(group_by_length=False), batch_size=4, pad_id=0)
    assert len(train_loader) == 4
    assert [i for b in val_loader for i in b["index"].tolist()] == list(range(5))
    assert build_dataloaders(train, [], DataConfig(group_by_length=False), batch_size=4, pad_id=0)[1] is None


@pytest.mark.parametrize(("micro_batches", "grad_accum", "steps"), [(8, 4, 2), (9, 4, 3), (3, 4, 1), (5, 1, 5)])
def test_steps_per_epoch_counts_a_short_last_window(micro_batches, grad_accum, steps):
    assert steps_per_epoch(micro_batches, grad_accum) == steps


# --- data.on_error: skip -------------------------------------------------------------------------

def test_skip_mode_drops_each_bad_alpaca_row_and_counts_it_by_kind(tmp_path, llama_tokenizer):
    good = json.dumps({"instruction": "hi", "output": "ok"})
    lines = [
        good,                                                                # 1
        "{not json",                                                         # 2 invalid_json
        json.dumps({"instruction": "hi"}),                                   # 3 missing_field
        json.dumps({"instruction": 3, "output": "x"}),                       # 4 wrong_type
        json.dumps({"instruction": "hi", "output": "  "}),                   # 5 empty_response
        json.dumps({"instruction": "long question " * 40, "output": "a"}),   # 6 too_long
        "",                                                                  # 7 blank: not a row
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"instruction": "\xff", "output": "x"}\n' + (good + "\n").encode()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + raw)                                 # 8 not_utf8, 9 good
    train, _, stats = build_datasets(llama_tokenizer, DataConfig(train=str(path), val_split=0.0, max_length=48,
                                                                 on_error="skip", max_skip_fraction=0.9))
    s = stats["train"]
    assert s.dropped_by_kind == {"invalid_json": 1, "missing_field": 1, "wrong_type": 1, "empty_response": 1,
                                 "too_long": 1, "not_utf8": 1}
    assert (len(train), s.rows, s.dropped) == (2, 8, 6)
    assert sorted(w.split(": ")[0] for w in s.dropped_where) == sorted(f"{path}:{n}" for n in (2, 3, 4, 5, 6, 8))
    with data_error(f"{path}:2", "invalid JSON"):  # strict, the default: the first bad row stops the run
        build_datasets(llama_tokenizer, DataConfig(train=str(path), val_split=0.0, max_length=48))


def test_skip_mode_drops_bad_conversations(tmp_path, llama_tokenizer):
    user, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [user, answer]},
        {"messages": [user]},                                       # no_assistant
        {"messages": [{"role": "robot", "content": "q"}, answer]},  # bad_role
        {"messages": [user, user, answer]},                         # template_error: Llama-2 needs alternation
        {"messages": [user, {"role": "assistant", "content": ""}]},  # empty_response
    ])
    train, _, stats = build_datasets(llama_tokenizer, DataConfig(train=path, val_split=0.0, max_length=64,
                                                                 on_error="skip", max_skip_fraction=0.9))
    assert len(train) == 1 and stats["train"].dropped_by_kind == {
        "no_assistant": 1, "bad_role": 1, "template_error": 1, "empty_response": 1}
    with data_error(f"{path}:4", "the chat template rejects this conversation", "must alternate"):
        build_examples(llama_tokenizer, load_conversations(path, rejects=Rejects(strict=False)), 64)


# --- length-grouped batches -----------------------------------------------------------------------

def grouped_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    sampler = EpochSampler(len(lengths), seed, lengths=lengths, batch_size=batch_size, mega=4)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("size", [40, 43])  # a whole number of batches, and a short last batch
def test_grouped_batches_cover_every_row_once_and_repeat_from_the_seed(size):
    lengths = [int(x) for x in torch.randint(5, 100, (size,), generator=torch.Generator().manual_seed(size))]
    order = grouped_order(lengths, 4, seed=3, epoch=1)
    assert sorted(order) == list(range(size))  # every row exactly once
    assert order == grouped_order(lengths, 4, seed=3, epoch=1)  # the same (seed, epoch), the same order
    assert order != grouped_order(lengths, 4, seed=3, epoch=2) and order != grouped_order(lengths, 4, seed=4, epoch=1)
    if size % 4:  # the short batch comes last, so no full batch is split across two
        assert len(order[size - size % 4:]) == size % 4


def test_grouped_batches_hold_rows_of_similar_length():
    lengths = [int(x) for x in torch.randint(5, 200, (400,), generator=torch.Generator().manual_seed(0))]

    def padding(order):  # padding share of the batches of 8 that the order makes
        batches = [order[i:i + 8] for i in range(0, len(order), 8)]
        slots = sum(8 * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / slots

    plain = EpochSampler(400, 0)
    grouped = EpochSampler(400, 0, lengths=lengths, batch_size=8)
    assert padding(list(plain)) > 0.4 and padding(list(grouped)) < 0.05  # 0.46 and 0.02 when pinned
    first_batches = [tuple(list(grouped)[i:i + 8]) for i in range(0, 40, 8)]
    grouped.set_epoch(1)
    assert first_batches != [tuple(list(grouped)[i:i + 8]) for i in range(0, 40, 8)]  # order changes by epoch


def test_dataloader_groups_by_length_when_asked(numbered, qwen2_tokenizer):
    train, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=numbered, val_split=0.0, max_length=128))
    grouped, _ = build_dataloaders(train, [], DataConfig(group_by_length=True), batch_size=4, pad_id=0)
    assert isinstance(grouped.sampler, EpochSampler) and grouped.sampler.lengths == [len(e["input_ids"]) for e in train]
    assert sorted(i for b in grouped for i in b["index"].tolist()) == list(range(len(train)))


def test_collate_packed_puts_rows_end_to_end_with_restarting_positions():
    first = {"input_ids": [11, 12, 13], "labels": [11, 12, 13], "index": 4}  # first token labelled: must not train
    second = {"input_ids": [21, 22], "labels": [IGNORE, 22], "index": 7}
    batch = collate_packed([first, second])
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # no row is trained to predict the next row's first token, and nothing is padding
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22]]
    assert batch["attention_mask"].tolist() == [[1] * 5] and batch["index"].tolist() == [4, 7]
    # the model gets position_ids and no mask (how transformers recognises packed rows); padded batches the mask
    assert set(model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    assert set(model_inputs(collate([first, second], 0))) == {"input_ids", "attention_mask"}


def test_packing_trains_packed_rows_in_shuffled_order_and_validates_padded(numbered, qwen2_tokenizer):
    train, val, _ = build_datasets(qwen2_tokenizer, DataConfig(train=numbered, val_split=0.25, max_length=128))
    packed_loader, val_loader = build_dataloaders(train, val, DataConfig(group_by_length=True, packing=True),
                                                  batch_size=4, pad_id=0)
    shuffled_loader, _ = build_dataloaders(train, val, DataConfig(group_by_length=False), batch_size=4, pad_id=0)
    packed, shuffled = list(packed_loader), list(shuffled_loader)
    # grouping does not apply: the batches hold the rows of the plain shuffled order, each batch one row
    assert [b["index"].tolist() for b in packed] == [b["index"].tolist() for b in shuffled]
    for p, s in zip(packed, shuffled):
        assert p["input_ids"].shape == (1, int(s["attention_mask"].sum()))
        assert p["input_ids"][0].tolist() == s["input_ids"][s["attention_mask"].bool()].tolist()
    assert all("position_ids" not in b for b in val_loader)
