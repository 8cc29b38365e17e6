"""Chat messages -> token ids with a label mask (sources are read in sources.py and rows.py; mixtures
of sources in mixtures.py; batches in batches.py).

Every assistant turn, plus the end-of-turn token the chat template closes it with, is trained;
every other token has label -100. A turn marked "train": false (or, with data.train_on=last, every
turn but the last) stays in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jinja2

from qlora_loop.data.rows import Conversation, DataError, Rejects

IGNORE = -100
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
        examples.append(example_of(result, conversation, len(examples)))
    count_examples(stats, examples)
    stats.rows, stats.dropped = rows, rejects.count
    stats.dropped_by_kind, stats.dropped_where = dict(rejects.by_kind), list(rejects.where)
    return examples, stats


def example_of(result: dict, conversation: Conversation, index: int) -> dict:
    """A tokenized row (tokenize_rows) as the example the batches read."""
    return {"input_ids": result["input_ids"], "labels": result["labels"], "index": index,
            "where": conversation.where, "messages": conversation.messages, "truncated": result["truncated"]}


def count_examples(stats: DataStats, examples: list[dict]) -> None:
    """Set the examples, truncated and trained-token counts of `stats` from `examples`."""
    stats.examples = len(examples)
    stats.truncated = sum(e["truncated"] for e in examples)
    stats.target_tokens = sum(sum(label != IGNORE for label in e["labels"][1:]) for e in examples)
