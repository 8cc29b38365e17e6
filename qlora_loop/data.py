"""Chat messages -> token ids with a label mask -> padded batches (reading sources: rows.py, sources.py).

Every assistant turn, plus the end-of-turn token the chat template closes it with, is trained;
every other token has label -100. A turn marked "train": false (or, with data.train_on=last, every
turn but the last) stays in the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import torch
from torch.utils.data import DataLoader, Sampler

from qlora_loop.cache import Prepared, entry_key, load_entry, save_entry, tokenizer_fingerprint
from qlora_loop.config import SourceConfig, source_configs
from qlora_loop.rows import Conversation, DataError, Rejects, turns_to_train
from qlora_loop.sources import check_rejects, conversations_of, load_source, open_source, split_validation, weigh

IGNORE = -100
load_conversations = load_source  # one source's rows as Conversations (rows.load_conversations)
BATCH = 256  # rows per call of a fast tokenizer (it encodes a batch on all cores)


@dataclass
class DataStats:
    rows: int = 0  # rows read, bad ones included
    truncated: int = 0
    dropped: int = 0  # rows skipped under data.on_error=skip
    examples: int = 0  # after weighting: the rows one epoch trains on
    target_tokens: int = 0
    dropped_by_kind: dict = field(default_factory=dict)
    dropped_where: list[str] = field(default_factory=list)
    # one per source: {"source", "weight", "rows", "dropped", "examples", "target_tokens", "cached"}
    sources: list[dict] = field(default_factory=list)


# --- messages -> tokens and labels --------------------------------------------------------------

def render_with_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text and the character spans to train: each assistant turn (but those
    marked "train": false) up to and including the last special token the template closes it with
    (e.g. `<|im_end|>`, `</s>`).

    A turn's span is found by rendering the conversation up to that turn twice, with and without
    the turn, so it holds for any template that renders earlier turns the same way each time. A
    template that closes a turn with no special token gets the EOS token appended, so the model
    still learns to stop.
    """
    def render(msgs, generation_prompt=False):
        plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages)
    specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
    pieces, spans, cursor = [], [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("train") is False:
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


def max_chars(tokenizer, max_length: int) -> int:
    """Characters of one message that max_length tokens can reach. No token decodes to more
    characters than its vocabulary entry has (byte-level entries: one character per byte; <0xAB>
    byte-fallback entries: six for one), so max_length tokens cover at most max_length x the longest
    entry (81 for SmolLM2, whose longest entries are runs of spaces and dashes); twice that leaves room
    for the word the cut splits. A message is cut there before rendering, so a 50 MB row costs what a
    row of that length does, and keeps the tokens it would have kept."""
    longest = getattr(tokenizer, "_qlora_longest_token", None)
    if longest is None:
        longest = max(map(len, tokenizer.get_vocab()), default=1)
        tokenizer._qlora_longest_token = longest  # get_vocab() copies the vocabulary: once per tokenizer
    return 2 * max_length * longest


def cut_messages(messages: list[dict], limit: int) -> list[dict]:
    return [m if len(m["content"]) <= limit else {**m, "content": m["content"][:limit]} for m in messages]


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated). Labels copy the ids of trained tokens, -100 elsewhere."""
    text, spans = render_with_spans(tokenizer, cut_messages(messages, max_chars(tokenizer, max_length)))
    if not tokenizer.is_fast:  # slow (Python) tokenizers, e.g. Baichuan2's, give no offsets
        ids, labels = tokenize_by_pieces(tokenizer, text, spans)
        return ids[:max_length], labels[:max_length], len(ids) > max_length
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _masked(encoded["input_ids"], encoded["offset_mapping"], spans, max_length)


def _masked(ids: list[int], offsets, spans, max_length: int) -> tuple[list[int], list[int], bool]:
    # A token that starts before a span but runs into it is trained too: a prompt ending in a space
    # ("assistant: ") merges that space into the answer's first token ("Ġhel"), which must be learned.
    kept = ids[:max_length]
    labels = [tok if any(s <= begin < e or begin < s < end for s, e in spans) else IGNORE
              for tok, (begin, end) in zip(kept, offsets)]
    return kept, labels, len(ids) > max_length


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


def tokenize_rows(tokenizer, conversations: list[Conversation], max_length: int) -> list:
    """One result per conversation, in order: {input_ids, labels, truncated}, or the DataError it is
    dropped for. A fast tokenizer encodes the rendered rows BATCH at a time."""
    limit = max_chars(tokenizer, max_length)
    results, rendered = [None] * len(conversations), []
    for k, conversation in enumerate(conversations):
        try:
            rendered.append((k, *render_with_spans(tokenizer, cut_messages(conversation.messages, limit))))
        except jinja2.TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/..."
            results[k] = DataError(f"{conversation.where}: the chat template rejects this conversation: {e}",
                                   "template_error")
        except DataError as e:
            results[k] = DataError(f"{conversation.where}: {e}", e.kind)
    for start in range(0, len(rendered), BATCH):
        chunk = rendered[start:start + BATCH]
        if tokenizer.is_fast:
            encoded = tokenizer([text for _, text, _ in chunk], add_special_tokens=False, return_offsets_mapping=True)
            masked = [_masked(ids, offsets, spans, max_length) for ids, offsets, (_, _, spans)
                      in zip(encoded["input_ids"], encoded["offset_mapping"], chunk)]
        else:  # slow (Python) tokenizers, e.g. Baichuan2's, give no offsets
            masked = [(ids[:max_length], labels[:max_length], len(ids) > max_length)
                      for ids, labels in (tokenize_by_pieces(tokenizer, text, spans) for _, text, spans in chunk)]
        for (k, _, _), (ids, labels, truncated) in zip(chunk, masked):
            if not any(label != IGNORE for label in labels[1:]):  # position 0 is never predicted
                results[k] = DataError(f"{conversations[k].where}: the prompt fills all data.max_length={max_length} "
                                       "tokens, leaving no answer token to train; raise data.max_length, or drop such "
                                       "rows with data.on_error=skip", "too_long")
            else:
                results[k] = {"input_ids": ids, "labels": labels, "truncated": truncated}
    return results


def build_examples(tokenizer, conversations: list[Conversation], max_length: int,
                   rejects: Rejects | None = None) -> tuple[list[dict], DataStats]:
    """Tokenized examples; a row the template rejects, or whose prompt fills max_length, goes to
    `rejects` (an error in strict mode). Stats count the rows `rejects` already dropped on reading."""
    rejects = rejects or Rejects()
    rows = len(conversations) + rejects.count
    stats, examples = DataStats(), []
    for conversation, result in zip(conversations, tokenize_rows(tokenizer, conversations, max_length)):
        if isinstance(result, DataError):
            rejects.reject(result)
            continue
        examples.append(_example(result, conversation, len(examples)))
    _count(stats, examples)
    stats.rows, stats.dropped = rows, rejects.count
    stats.dropped_by_kind, stats.dropped_where = dict(rejects.by_kind), list(rejects.where)
    return examples, stats


def _example(result: dict, conversation: Conversation, index: int) -> dict:
    return {"input_ids": result["input_ids"], "labels": result["labels"], "index": index,
            "where": conversation.where, "messages": conversation.messages, "truncated": result["truncated"]}


def _count(stats: DataStats, examples: list[dict]) -> None:
    stats.examples = len(examples)
    stats.truncated = sum(e["truncated"] for e in examples)
    stats.target_tokens = sum(sum(label != IGNORE for label in e["labels"][1:]) for e in examples)


# --- sources -> prepared rows (cached) ----------------------------------------------------------

def prepare_source(tokenizer, source: SourceConfig, *, max_length: int, system_prompt: str | None, train_on: str,
                   strict: bool, cache: Path | None = None) -> Prepared:
    """One source read and tokenized, from the cache at `cache` when it holds this very preparation.
    Strict: the first bad row is raised (the cache never holds a half-built entry)."""
    opened = open_source(source)
    key = entry_key(opened.fingerprint, label=opened.label,  # the label: rows are named by it
                    tokenizer_hash=tokenizer_fingerprint(tokenizer), max_length=max_length,
                    system_prompt=system_prompt, train_on=train_on, format=source.format, columns=source.columns,
                    max_rows=source.max_rows)
    prepared = load_entry(cache, key)[0] if cache is not None else None  # a corrupt entry is rebuilt
    if prepared is None:
        rejects = Rejects(strict)
        conversations = [Conversation(c.where, turns_to_train(c.messages, train_on))
                         for c in conversations_of(opened, system_prompt=system_prompt, rejects=rejects)]
        prepared = Prepared(opened.label, conversations, [], list(rejects.errors))
        prepared.results = tokenize_rows(tokenizer, conversations, max_length)
        if strict:
            _raise_first(prepared)
        if cache is not None:
            save_entry(cache, key, prepared)
    if strict:
        _raise_first(prepared)
    return prepared


def _raise_first(prepared: Prepared) -> None:
    for error in prepared.read_rejects + [r for r in prepared.results if isinstance(r, DataError)]:
        raise error


def build_datasets(tokenizer, train, val=None, *, val_split: float, max_length: int,
                   system_prompt: str | None = None, seed: int = 0, on_error: str = "error",
                   max_skip_fraction: float = 0.1, replay: list[Conversation] = (), fmt: str = "auto",
                   columns: dict | None = None, train_on: str = "all", cache: Path | None = None):
    """(train examples, val examples or [], {"train": DataStats, "val": DataStats[, "replay": DataStats]}).
    train / val: one source or a mixture (config.source_configs). Without val, each source's
    val_split share is held out (by `seed`) before its rows are weighted. on_error: "error" stops at
    the first bad row; "skip" drops bad rows, counting them by kind, and stops only when more than
    max_skip_fraction of a source's rows would be dropped. `replay` rows (replay.replay_conversations)
    are trained beside the sources', never held out; one of them that does not fit data.max_length is
    skipped and counted. `cache`: a folder for the tokenized cache (cache_root()); None = none."""
    def prepare(source):
        return prepare_source(tokenizer, source, max_length=max_length, system_prompt=system_prompt,
                              train_on=train_on, strict=on_error == "error", cache=cache)

    splits = {"train": ([], DataStats()), "val": ([], DataStats())}
    for source in source_configs(train, "data.train", fmt=fmt, columns=columns):
        prepared = check_rejects(prepare(source), max_skip_fraction)
        rows = list(range(len(prepared.conversations)))
        kept, held = (rows, []) if val is not None else split_validation(rows, val_split, seed, prepared.label)
        _add(splits["train"], prepared, kept, weight=source.weight, seed=seed, reading=True)
        _add(splits["val"], prepared, held, weight=1.0, seed=seed, reading=False)
    for source in source_configs(val, "data.val", fmt=fmt, columns=columns) if val is not None else []:
        prepared = check_rejects(prepare(source), max_skip_fraction)
        _add(splits["val"], prepared, list(range(len(prepared.conversations))), weight=1.0, seed=seed, reading=True)
    (train_examples, train_stats), (val_examples, val_stats) = splits["train"], splits["val"]
    if not train_examples:
        raise DataError(f"{_names(train)}: no usable rows left")
    if val_stats.rows and not val_examples:
        raise DataError(f"{_names(val if val is not None else train)}: no usable validation rows left")
    stats = {"train": train_stats, "val": val_stats}
    if replay:
        replayed, stats["replay"] = build_examples(tokenizer, list(replay), max_length, Rejects(strict=False))
        train_examples += [{**e, "index": len(train_examples) + e["index"]} for e in replayed]
    return train_examples, val_examples, stats


def _names(spec) -> str:
    return ", ".join(s.path for s in source_configs(spec))


def _add(split: tuple[list[dict], DataStats], prepared: Prepared, rows: list[int], *, weight: float, seed: int,
         reading: bool) -> None:
    """Add the prepared source's `rows` (indices), weighted, to a split; `reading` counts the rows
    that reading dropped there (once per source)."""
    examples, stats = split
    bad = (prepared.read_rejects if reading else []) + [prepared.results[i] for i in rows
                                                        if isinstance(prepared.results[i], DataError)]
    kept = [_example(prepared.results[i], prepared.conversations[i], 0) for i in rows
            if isinstance(prepared.results[i], dict)]
    weighted = weigh(kept, weight, seed)
    added = DataStats()
    _count(added, weighted)
    examples += [{**e, "index": len(examples) + k} for k, e in enumerate(weighted)]
    read = len(prepared.read_rejects) if reading else 0
    stats.rows += len(rows) + read
    stats.dropped += len(bad)
    stats.examples, stats.truncated = stats.examples + added.examples, stats.truncated + added.truncated
    stats.target_tokens += added.target_tokens
    for error in bad:
        stats.dropped_by_kind[error.kind] = stats.dropped_by_kind.get(error.kind, 0) + 1
        stats.dropped_where.append(str(error))
    if rows or reading:
        stats.sources.append({"source": prepared.label, "weight": weight, "rows": len(rows) + read, "dropped": len(bad),
                              "examples": added.examples, "target_tokens": added.target_tokens,
                              "cached": prepared.from_cache})


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
