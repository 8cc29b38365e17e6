"""Label-mask audit: before training, check on a sample of rows that the masks train what they should.

A broken template or mask trains silently: on the prompt (the model learns to write questions),
or never on the end-of-turn token (the model never stops talking). The audit does not reuse the
masking code; it decodes the trained and untrained runs of each example and checks them against
the row's messages:
  - every assistant turn's text lies inside one trained run (it is trained, and wholly);
  - that run ends with a special token (the end-of-turn / EOS the model must learn to stop on);
  - every system and user text, and every assistant turn marked "train": false, lies inside one
    untrained run (no prompt token is trained);
  - a trained label is the token at its position (labels are not shifted twice);
  - collating with padding keeps every trained label, EOS included when pad == EOS (padding
    masked by position, not by token id).
Turns cut off by data.max_length are not judged: what truncation removed cannot be checked.
"""

from __future__ import annotations

import random
import unicodedata

from qlora_loop.data.batches import collate
from qlora_loop.data.examples import IGNORE
from qlora_loop.data.rows import Conversation, DataError


class LabelMaskError(DataError):
    """The audit found rows whose label masks would train the wrong tokens."""


def audit_label_masks(tokenizer, examples: list[dict], conversations: list[Conversation] | list[list[dict]], *,
                      sample: int = 64, max_length: int | None = None, seed: int = 0,
                      collate_fn=collate) -> list[str]:
    """Problems found in up to `sample` examples (chosen with `seed`), each starting with the row's
    file:line. `conversations` are the rows' Conversations (matched by "where") or message lists in
    the examples' order. `max_length` lets an answer that runs into it end without EOS."""
    messages_of = _messages_by_example(examples, conversations)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), min(sample, len(examples))))
    # End-of-turn candidates: the named special tokens and any added token marked special
    # (e.g. <|eot_id|>, which some tokenizers do not list among their named ones).
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    problems = []
    for i in chosen:
        example = examples[i]
        where = example.get("where", f"example {i}")
        problems += [f"{where}: {p}" for p in _audit_example(tokenizer, example, messages_of[i], specials, max_length)]
    for where, problem in _audit_collate([examples[i] for i in chosen], tokenizer.pad_token_id, collate_fn):
        problems.append(f"{where}: {problem}")
    return problems


def check_label_masks(tokenizer, examples: list[dict], *, sample: int, max_length: int) -> int:
    """audit_label_masks against the messages each example was built from (data.build_examples keeps
    them), raising LabelMaskError naming the rows and what is wrong. Returns the number of rows
    audited (0 when sample is 0: the audit is off)."""
    if sample <= 0:
        return 0
    audited = min(sample, len(examples))
    problems = audit_label_masks(tokenizer, examples, [e["messages"] for e in examples], sample=sample,
                                 max_length=max_length)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise LabelMaskError(f"the label-mask audit found {len(problems)} problem(s) in {audited} rows; training "
                             f"would learn the wrong tokens:\n  {shown}\nFix the chat template "
                             "(data.chat_template) or the masking code; data.audit_rows=0 turns the audit off",
                             "label_mask")
    return audited


# --- one example --------------------------------------------------------------------------------

def _audit_example(tokenizer, example: dict, messages: list[dict], specials: set[int],
                   max_length: int | None) -> list[str]:
    ids, labels = example["input_ids"], example["labels"]
    problems = []
    shifted = [k for k, (tok, label) in enumerate(zip(ids, labels)) if label not in (IGNORE, tok)]
    if shifted:
        k = shifted[0]
        return [f"{len(shifted)} label(s) differ from their token (first at position {k}: label {labels[k]}, "
                f"token {ids[k]}); labels must copy input_ids where trained (the loss shifts them itself)"]
    if not any(label != IGNORE for label in labels[1:]):
        return ["no token is trained"]
    runs = _runs(tokenizer, ids, labels)
    whole = _norm(_decode(tokenizer, ids))
    truncated = max_length is not None and len(ids) >= max_length
    assistant_turn = 0
    for message in messages:
        text = _norm(message["content"])
        if not text or not _contains(whole, text):
            continue  # cut off by max_length, or not rendered by the template: nothing to judge
        role = message["role"]
        if role == "assistant" and message.get("train") is False:  # "train": false, or data.train_on=last
            role = "assistant (\"train\": false)"
        if role == "assistant":
            assistant_turn += 1
            run = next((r for r in runs if r.trained and _contains(r.text, text)), None)
            if run is None:
                partly = any(r.trained and _overlaps(r.text, text) for r in runs)
                problems.append(f"assistant turn {assistant_turn} ({_short(message['content'])}) "
                                f"{'is only partly trained' if partly else 'has no trained tokens'}")
            elif ids[run.end - 1] not in specials and not (truncated and run.end == len(ids)):
                if any(ids[k] in specials for k in range(run.start + 1, run.end)):
                    problems.append(f"assistant turn {assistant_turn} ({_short(message['content'])}): training runs "
                                    f"on past its end-of-turn token (trained tokens end with {_short(run.text[-20:])})")
                else:
                    problems.append(f"assistant turn {assistant_turn} ({_short(message['content'])}) ends without a "
                                    f"trained end-of-turn token (its trained tokens end with "
                                    f"{_short(run.text[-20:])}); the model would never learn to stop")
        elif not any(not r.trained and _contains(r.text, text) for r in runs):
            problems.append(f"{role} text ({_short(message['content'])}) is trained; only assistant turns "
                            "and their end-of-turn token may be")
    return problems


def _audit_collate(examples: list[dict], pad_id: int, collate_fn) -> list[tuple[str, str]]:
    """Pad each example behind a longer one with the real collate: its labels must come through
    unchanged, every trained EOS included, and no padding position may be trained."""
    if not examples:
        return []
    longest = max(examples, key=lambda e: len(e["input_ids"]))
    filler = {**longest, "input_ids": longest["input_ids"] + [pad_id], "labels": longest["labels"] + [IGNORE],
              "where": "padding filler"}
    found = []
    for example in examples:
        batch = collate_fn([example, filler], pad_id)
        got, n = batch["labels"][0].tolist(), len(example["labels"])
        lost = [k for k in range(n) if example["labels"][k] != IGNORE and got[k] == IGNORE]
        if lost:
            what = "the trained EOS" if example["input_ids"][lost[-1]] == pad_id else "trained tokens"
            found.append((example.get("where", "?"), f"collate drops {what} at position(s) {lost[:5]} (pad id "
                          f"{pad_id}): padding must be masked by position, not by token id"))
        if any(label != IGNORE for label in got[n:]):
            found.append((example.get("where", "?"), "collate trains padding positions"))
    return found


# --- runs of trained / untrained tokens ---------------------------------------------------------

class _Run:
    def __init__(self, trained: bool, start: int, end: int, text: str):
        self.trained, self.start, self.end, self.text = trained, start, end, text


def trained_runs(labels: list[int]) -> list[tuple[bool, int, int]]:
    """Maximal runs (trained, start, end) of trained / untrained positions. Position 0 is never
    predicted, so a label there does not count as trained."""
    trained = [k > 0 and label != IGNORE for k, label in enumerate(labels)]
    runs, start = [], 0
    for k in range(1, len(labels) + 1):
        if k == len(labels) or trained[k] != trained[start]:
            runs.append((trained[start], start, k))
            start = k
    return runs


def _runs(tokenizer, ids: list[int], labels: list[int]) -> list[_Run]:
    """trained_runs, each decoded on its own and normalised for matching."""
    return [_Run(trained, start, end, _norm(_decode(tokenizer, ids[start:end])))
            for trained, start, end in trained_runs(labels)]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _norm(text: str) -> str:
    """Whitespace collapsed, and NFKC-normalised as many tokenizers normalise (full-width ！ -> !)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _contains(haystack: str, needle: str) -> bool:
    """Whole-text containment; a character at either edge may be lost when a run boundary splits a
    multi-byte character's tokens, so long texts also match without their edge characters."""
    return needle in haystack or (len(needle) > 4 and needle[1:-1] in haystack)


def _overlaps(haystack: str, needle: str) -> bool:
    """Some of the text is there: one of its words, or (one word, e.g. Chinese) its first half."""
    words = needle.split()
    if len(words) > 1:
        return any(len(w) > 1 and w in haystack for w in words)
    return needle[: max(1, len(needle) // 2)] in haystack


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def _messages_by_example(examples: list[dict], conversations) -> list[list[dict]]:
    if conversations and isinstance(conversations[0], Conversation):
        by_where = {c.where: c.messages for c in conversations}
        missing = [e.get("where") for e in examples if e.get("where") not in by_where]
        if missing:
            raise ValueError(f"no conversation for example {missing[0]}: pass the conversations the examples were "
                             "built from")
        return [by_where[e["where"]] for e in examples]
    if len(conversations) != len(examples):
        raise ValueError(f"{len(conversations)} message lists for {len(examples)} examples: pass one per example")
    return list(conversations)
