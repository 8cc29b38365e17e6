"""Rows on disk -> chat messages -> token ids with a label mask -> padded batches.

Two row formats, detected per file from its first row:
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
Every assistant turn, plus the end-of-turn token the chat template closes it with, is trained;
every other token has label -100.
"""

from __future__ import annotations

import codecs
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

IGNORE = -100


class DataError(ValueError):
    """Bad input data; the message names file:line, the field and the fix."""


@dataclass
class Conversation:
    where: str  # "file:line", for error messages
    messages: list[dict]


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train after truncation
    examples: int = 0
    target_tokens: int = 0
    dropped_where: list[str] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------------------

def read_rows(path: str | Path) -> list[tuple[int, object]]:
    """(line, row) pairs from a JSON array or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)  # counted after the BOM
        line = raw[:start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {start}); re-save the file as UTF-8") from None
    stripped = text.lstrip()
    rows = _read_json_array(text, path) if stripped.startswith("[") else _read_jsonl(text, path)
    if not rows:
        raise DataError(f"{path}: no rows; expected a JSON array or one JSON object per line")
    return rows


def _read_jsonl(text: str, path: Path) -> list[tuple[int, object]]:
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028, U+0085 or \f, which splitlines breaks on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg}, column {e.colno})") from None
    return rows


def _read_json_array(text: str, path: Path) -> list[tuple[int, object]]:
    """Parse `[obj, obj, ...]` element by element so each row keeps the line it starts on."""
    decoder = json.JSONDecoder()
    rows, i = [], _skip_space(text, text.index("[") + 1)
    try:
        while i < len(text) and text[i] != "]":
            row, end = decoder.raw_decode(text, i)
            rows.append((text.count("\n", 0, i) + 1, row))
            i = _skip_space(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip_space(text, i + 1)
            elif i >= len(text) or text[i] != "]":
                raise json.JSONDecodeError("expected ',' or ']' after a row", text, i)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if i >= len(text):
        raise DataError(f"{path}:{text.count(chr(10)) + 1}: invalid JSON (the array is never closed with ']')")
    after = _skip_space(text, i + 1)
    if after < len(text):  # e.g. two arrays concatenated: the second would be silently lost
        raise DataError(f"{path}:{text.count(chr(10), 0, after) + 1}: invalid JSON (text after the array's "
                        "closing ']'); a file holds one array, or one object per line")
    return rows


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


# --- rows -> messages ---------------------------------------------------------------------------

def load_conversations(path: str | Path, system_prompt: str | None = None) -> list[Conversation]:
    rows = read_rows(path)
    first_line, first = rows[0]
    if not isinstance(first, dict):
        raise DataError(f"{path}:{first_line}: a row must be a JSON object, got {type(first).__name__}")
    fmt = "messages" if "messages" in first else "alpaca" if "instruction" in first else None
    if fmt is None:
        raise DataError(f"{path}:{first_line}: unknown row format with keys {sorted(first)}; expected "
                        "'messages' (role/content list) or alpaca 'instruction'/'input'/'output'")
    convert = _from_messages if fmt == "messages" else _from_alpaca
    conversations = []
    for line, row in rows:
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        messages = convert(row, where)
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        conversations.append(Conversation(where, messages))
    return conversations


def _field(row: dict, name: str, kind: type, where: str, required: bool = True):
    if name not in row or row[name] is None:
        if required:
            raise DataError(f"{where}: missing field {name!r}")
        return None
    if not isinstance(row[name], kind):
        raise DataError(f"{where}: field {name!r} must be {kind.__name__}, got {type(row[name]).__name__}")
    return row[name]


def _from_alpaca(row: dict, where: str) -> list[dict]:
    instruction = _field(row, "instruction", str, where)
    extra = _field(row, "input", str, where, required=False)
    output = _field(row, "output", str, where)
    system = _field(row, "system", str, where, required=False)
    history = _field(row, "history", list, where, required=False) or []
    messages = [{"role": "system", "content": system}] if system else []
    for k, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: field 'history'[{k}] must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _from_messages(row: dict, where: str) -> list[dict]:
    messages = _field(row, "messages", list, where)
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field 'messages'[{k}] must be an object with 'role' and 'content'")
        role = _field(message, "role", str, f"{where}: messages[{k}]")
        _field(message, "content", str, f"{where}: messages[{k}]")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{k}].role is {role!r}; expected system, user or assistant")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages' has no assistant turn, so nothing would be trained")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# --- messages -> tokens and labels --------------------------------------------------------------

def render_with_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text and the character spans to train: each assistant turn up to and
    including the last special token the template closes it with (e.g. `<|im_end|>`, `</s>`).

    A turn's span is found by rendering the conversation up to that turn twice, with and without
    the turn, so it holds for any template that renders earlier turns the same way each time. A
    template that closes a turn with no special token gets the EOS token appended, so the model
    still learns to stop.
    """
    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages)
    specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
    pieces, spans, cursor = [], [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError("the chat template renders earlier turns differently once later turns are added, "
                            "so assistant turns cannot be located; supply a plain template with data.chat_template")
        start, end = len(before), len(through)
        turn = full[start:end]
        close = max((turn.rfind(t) + len(t) for t in specials if t in turn), default=-1)
        pieces.append(full[cursor:start])
        if close > 0:
            span_text = turn[:close]
            pieces.append(turn)
        else:  # no end-of-turn marker: append EOS after the answer
            span_text = turn.rstrip() + tokenizer.eos_token
            pieces.append(span_text + turn[len(turn.rstrip()):])
        offset = sum(map(len, pieces[:-1]))
        spans.append((offset, offset + len(span_text)))
        cursor = end
    pieces.append(full[cursor:])
    return "".join(pieces), spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated). Labels copy the ids of trained tokens, -100 elsewhere."""
    text, spans = render_with_spans(tokenizer, messages)
    if not tokenizer.is_fast:  # slow (Python) tokenizers, e.g. Baichuan2's, give no offsets
        ids, labels = tokenize_by_pieces(tokenizer, text, spans)
        return ids[:max_length], labels[:max_length], len(ids) > max_length
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    # A token that starts before a span but runs into it is trained too: a prompt ending in a space
    # ("assistant: ") merges that space into the answer's first token ("Ġhel"), which must be learned.
    labels = [tok if any(s <= begin < e or begin < s < end for s, e in spans) else IGNORE
              for tok, (begin, end) in zip(ids, encoded["offset_mapping"])]
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def tokenize_by_pieces(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize the text between span edges piece by piece, each piece trained or not as a whole.
    For tokenizers without offset mappings; a merge across a span edge is not made."""
    cuts = sorted({0, len(text), *(edge for span in spans for edge in span)})
    ids, labels = [], []
    for begin, end in zip(cuts, cuts[1:]):
        piece = tokenizer(text[begin:end], add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if any(s <= begin < e for s, e in spans) else [IGNORE] * len(piece)
    return ids, labels


def build_examples(tokenizer, conversations: list[Conversation], max_length: int) -> tuple[list[dict], DataStats]:
    stats = DataStats(rows=len(conversations))
    examples = []
    for conversation in conversations:
        try:
            ids, labels, truncated = tokenize_conversation(tokenizer, conversation.messages, max_length)
        except DataError as e:
            raise DataError(f"{conversation.where}: {e}") from None
        stats.truncated += truncated
        trained = sum(label != IGNORE for label in labels[1:])  # position 0 is never predicted
        if trained == 0:
            stats.dropped += 1
            stats.dropped_where.append(conversation.where)
            continue
        stats.target_tokens += trained
        examples.append({"input_ids": ids, "labels": labels, "index": len(examples)})
    stats.examples = len(examples)
    return examples, stats


def build_datasets(tokenizer, train: str, val: str | None, val_split: float, max_length: int,
                   system_prompt: str | None = None, seed: int = 0):
    """(train examples, val examples or [], {"train": DataStats, "val": DataStats})."""
    conversations = load_conversations(train, system_prompt)
    if val is not None:
        held_out = load_conversations(val, system_prompt)
    elif val_split > 0:
        order = list(range(len(conversations)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(conversations) * val_split))
        if n_val >= len(conversations):
            raise DataError(f"{train}: {len(conversations)} rows cannot be split with data.val_split={val_split}; "
                            "add rows, lower data.val_split, or give data.val")
        held_out = [conversations[i] for i in sorted(order[:n_val])]
        conversations = [conversations[i] for i in sorted(order[n_val:])]
    else:
        held_out = []
    train_examples, train_stats = build_examples(tokenizer, conversations, max_length)
    val_examples, val_stats = build_examples(tokenizer, held_out, max_length)
    if not train_examples:
        raise DataError(f"{train}: all {train_stats.rows} rows were dropped: no assistant token fits in "
                        f"data.max_length={max_length}; raise data.max_length")
    if held_out and not val_examples:
        raise DataError(f"{val or train}: every validation row was dropped at data.max_length={max_length}")
    return train_examples, val_examples, {"train": train_stats, "val": val_stats}


# --- batches ------------------------------------------------------------------------------------

def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding is masked by position (attention_mask), never by
    token id, so a tokenizer whose pad token is its EOS still trains the EOS that ends an answer."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    index = torch.tensor([e["index"] for e in examples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


def build_dataloaders(train_examples: list[dict], val_examples: list[dict], batch_size: int, pad_id: int,
                      seed: int = 0, num_workers: int = 0) -> tuple[DataLoader, DataLoader | None]:
    def collate_fn(batch):
        return collate(batch, pad_id)

    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(train_examples, batch_size=batch_size, shuffle=True, generator=generator,
                       collate_fn=collate_fn, num_workers=num_workers)
    val = DataLoader(val_examples, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                     num_workers=num_workers) if val_examples else None
    return train, val


def steps_per_epoch(num_micro_batches: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch; the last window may hold fewer than grad_accum micro-batches."""
    return math.ceil(num_micro_batches / grad_accum)
