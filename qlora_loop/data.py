"""Chat messages -> token ids with a label mask -> padded batches (reading files: rows.py).

Every assistant turn, plus the end-of-turn token the chat template closes it with, is trained;
every other token has label -100.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import jinja2
import torch
from torch.utils.data import DataLoader, Sampler

from qlora_loop.rows import Conversation, DataError, Rejects, load_conversations

IGNORE = -100


@dataclass
class DataStats:
    rows: int = 0  # rows read, bad ones included
    truncated: int = 0
    dropped: int = 0  # rows skipped under data.on_error=skip
    examples: int = 0
    target_tokens: int = 0
    dropped_by_kind: dict = field(default_factory=dict)
    dropped_where: list[str] = field(default_factory=list)


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
                            "so assistant turns cannot be located; supply a plain template with data.chat_template",
                            "template_error")
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


def build_examples(tokenizer, conversations: list[Conversation], max_length: int,
                   rejects: Rejects | None = None) -> tuple[list[dict], DataStats]:
    """Tokenized examples; a row the template rejects, or whose prompt fills max_length, goes to
    `rejects` (an error in strict mode). Stats count the rows `rejects` already dropped on reading."""
    rejects = rejects or Rejects()
    rows = len(conversations) + rejects.count
    stats, examples = DataStats(), []
    for conversation in conversations:
        try:
            ids, labels, truncated = _tokenize_row(tokenizer, conversation, max_length)
        except DataError as e:
            rejects.reject(e)
            continue
        stats.truncated += truncated
        stats.target_tokens += sum(label != IGNORE for label in labels[1:])
        examples.append({"input_ids": ids, "labels": labels, "index": len(examples), "where": conversation.where,
                         "messages": conversation.messages})
    stats.rows, stats.examples, stats.dropped = rows, len(examples), rejects.count
    stats.dropped_by_kind, stats.dropped_where = dict(rejects.by_kind), list(rejects.where)
    return examples, stats


def _tokenize_row(tokenizer, conversation: Conversation, max_length: int):
    where = conversation.where
    try:
        ids, labels, truncated = tokenize_conversation(tokenizer, conversation.messages, max_length)
    except jinja2.TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/..."
        raise DataError(f"{where}: the chat template rejects this conversation: {e}", "template_error") from None
    except DataError as e:
        raise DataError(f"{where}: {e}", e.kind) from None
    if not any(label != IGNORE for label in labels[1:]):  # position 0 is never predicted
        raise DataError(f"{where}: the prompt fills all data.max_length={max_length} tokens, leaving no answer "
                        "token to train; raise data.max_length, or drop such rows with data.on_error=skip",
                        "too_long")
    return ids, labels, truncated


def split_validation(rows: list, val_split: float, seed: int, where: str = "data.train") -> tuple[list, list]:
    """(train rows, held-out rows): a seeded random `val_split` share held out, both in file order.
    The one place the split is made, so chat and merge find the very rows a run validated on."""
    if val_split <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * val_split))
    if n_val >= len(rows):
        raise DataError(f"{where}: {len(rows)} rows cannot be split with data.val_split={val_split}; "
                        "add rows, lower data.val_split, or give data.val")
    return [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in sorted(order[:n_val])]


def build_datasets(tokenizer, train: str, val: str | None = None, *, val_split: float, max_length: int,
                   system_prompt: str | None = None, seed: int = 0, on_error: str = "error",
                   max_skip_fraction: float = 0.1, replay: list[Conversation] = ()):
    """(train examples, val examples or [], {"train": DataStats, "val": DataStats[, "replay": DataStats]}).
    on_error: "error" stops at the first bad row; "skip" drops bad rows, counting them by kind, and
    stops only when more than max_skip_fraction of a file's rows would be dropped. `replay` rows
    (replay.replay_conversations) are trained beside the file's, never held out; one of them that
    does not fit data.max_length is skipped and counted."""
    train_rejects, val_rejects = Rejects(on_error == "error"), Rejects(on_error == "error")
    conversations = load_conversations(train, system_prompt, train_rejects)
    if val is not None:
        held_out = load_conversations(val, system_prompt, val_rejects)
    else:
        conversations, held_out = split_validation(conversations, val_split, seed, train)
    train_examples, train_stats = build_examples(tokenizer, conversations, max_length, train_rejects)
    val_examples, val_stats = build_examples(tokenizer, held_out, max_length, val_rejects)
    for path, stats in ((train, train_stats), (val or train, val_stats)):
        if stats.rows and stats.dropped / stats.rows > max_skip_fraction:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(stats.dropped_by_kind.items()))
            raise DataError(f"{path}: {stats.dropped} of {stats.rows} rows would be skipped ({kinds}), more than "
                            f"data.max_skip_fraction={max_skip_fraction}; first: {stats.dropped_where[0]}")
    if not train_examples:
        raise DataError(f"{train}: no usable rows left")
    if held_out and not val_examples:
        raise DataError(f"{val or train}: no usable validation rows left")
    stats = {"train": train_stats, "val": val_stats}
    if replay:
        replayed, stats["replay"] = build_examples(tokenizer, list(replay), max_length, Rejects(strict=False))
        train_examples += [{**e, "index": len(train_examples) + e["index"]} for e in replayed]
    return train_examples, val_examples, stats


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


def collate_packed(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Padding-free (data.packing): the examples end to end in one row, with position_ids that
    restart at 0 for each. Given position_ids and no attention mask, transformers' attention keeps
    each example to itself (model.check_packing proves it for the model at hand). Each example's
    first label is -100, so no example learns to predict the start of the next one. attention_mask
    is all ones, for counting tokens only; model_inputs does not pass it to the model."""
    input_ids = torch.tensor([[t for e in examples for t in e["input_ids"]]])
    labels = torch.tensor([[label for e in examples for label in [IGNORE, *e["labels"][1:]]]])
    position_ids = torch.tensor([[p for e in examples for p in range(len(e["input_ids"]))]])
    index = torch.tensor([e["index"] for e in examples])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "position_ids": position_ids, "index": index}


def model_inputs(batch: dict) -> dict:
    """What the model's forward is given. A packed batch (collate_packed) passes position_ids and
    no attention mask, which is how transformers recognises packed rows, and use_cache=False, as a
    cache (the config's use_cache, if set) would also turn that recognition off."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class EpochSampler(Sampler):
    """A shuffled order that depends only on (seed, epoch), so a resumed run rebuilds any epoch's
    order without replaying the epochs before it. Accelerate's dataloader calls set_epoch().

    With `lengths`, the order is grouped by length: shuffle, cut into mega-batches of `mega` batches,
    sort each by length (longest first), then shuffle the order of the full batches. Each batch then
    holds rows of similar length, so little of it is padding, and which batch comes when stays random.
    A short last batch stays last, so it never shifts the batches after it."""

    def __init__(self, size: int, seed: int = 0, *, lengths: list[int] | None = None, batch_size: int = 1,
                 mega: int = 50):
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths, self.batch_size, self.mega = lengths, batch_size, mega

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        span = self.batch_size * self.mega
        order = [i for start in range(0, self.size, span)
                 for i in sorted(order[start:start + span], key=lambda i: -self.lengths[i])]
        full = self.size // self.batch_size * self.batch_size
        batches = [order[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter([i for batch in shuffled for i in batch] + order[full:])

    def __len__(self) -> int:
        return self.size


def build_dataloaders(train_examples: list[dict], val_examples: list[dict], *, batch_size: int, pad_id: int,
                      seed: int = 0, num_workers: int = 0, group_by_length: bool = False,
                      processes: int = 1, packing: bool = False) -> tuple[DataLoader, DataLoader | None]:
    """Under `processes` ranks Accelerate deals consecutive batches out to the ranks in turn, so the
    rows are grouped by the global micro-batch (batch_size x processes): N ranks then see exactly the
    rows one process would see in a batch N times as large.

    With `packing`, training batches are packed rows (collate_packed) in plain shuffled order, as
    packing leaves no padding for grouping to remove; validation batches stay padded."""
    def collate_fn(batch):
        return collate(batch, pad_id)

    lengths = [len(e["input_ids"]) for e in train_examples] if group_by_length and not packing else None
    sampler = EpochSampler(len(train_examples), seed, lengths=lengths, batch_size=batch_size * processes)
    # Each loader gets its own generator: creating an iterator draws a seed from it, and without one
    # that draw comes from the global RNG, which dropout uses, so a resumed epoch would shift it.
    train = DataLoader(train_examples, batch_size=batch_size, sampler=sampler,
                       collate_fn=collate_packed if packing else collate_fn,
                       num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(val_examples, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                     num_workers=num_workers, generator=torch.Generator().manual_seed(seed)) if val_examples else None
    return train, val


def steps_per_epoch(num_micro_batches: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch; the last window may hold fewer than grad_accum micro-batches."""
    return math.ceil(num_micro_batches / grad_accum)
