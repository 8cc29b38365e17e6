"""Sources -> tokenized rows (cached) -> the examples of each split.

A mixture is data.train given as a list: each source's validation rows are held out first, then
its training rows are weighted (weight 2: every row twice per epoch; 0.5: half of them, drawn by
the seed), so no copy of a training row lands in validation.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import qlora_loop.data.cache
import qlora_loop.data.examples
import qlora_loop.data.rows
import qlora_loop.data.sources
from qlora_loop.config import DataConfig, SourceConfig, source_configs
from qlora_loop.data.cache import Prepared, cache_root, entry_key, load_entry, save_entry, tokenizer_fingerprint
from qlora_loop.data.examples import DataStats, build_examples, count_examples, example_of, tokenize_rows
from qlora_loop.data.rows import Conversation, DataError, Rejects, per_kind, turns_to_train
from qlora_loop.data.sources import conversations_of, open_source

# The code that turns a source into cached rows: a change to any of it makes new cache keys.
PREPARING = (qlora_loop.data.rows, qlora_loop.data.sources, qlora_loop.data.examples, qlora_loop.data.cache,
             sys.modules[__name__])


def prepare_source(tokenizer, source: SourceConfig, *, max_length: int, system_prompt: str | None, train_on: str,
                   strict: bool, cache: Path | None = None) -> Prepared:
    """One source read and tokenized, from the cache at `cache` when it holds this very preparation.
    Strict: the first bad row is raised (the cache never holds a half-built entry)."""
    opened = open_source(source)
    key = entry_key(opened.fingerprint, code=PREPARING, label=opened.label,  # the label: rows are named by it
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


def build_datasets(tokenizer, data: DataConfig, *, seed: int = 0, replay: list[Conversation] = (),
                   cache: Path | None = None):
    """(train examples, val examples or [], {"train": DataStats, "val": DataStats[, "replay": DataStats]}).
    data.train / data.val: one source or a mixture (config.source_configs). Without data.val, each
    source's data.val_split share is held out (by `seed`) before its rows are weighted.
    data.on_error: "error" stops at the first bad row; "skip" drops bad rows, counting them by kind,
    and stops only when more than data.max_skip_fraction of a source's rows would be dropped. `replay`
    rows (replay.replay_conversations) are trained beside the sources', never held out; one of them
    that does not fit data.max_length is skipped and counted. `cache`: a folder for the tokenized
    cache (cache_root()); None = none (data.cache is the run's choice, not read here)."""
    train, val, max_length = data.train, data.val, data.max_length

    def prepare(source):
        return prepare_source(tokenizer, source, max_length=max_length, system_prompt=data.system_prompt,
                              train_on=data.train_on, strict=data.on_error == "error", cache=cache)

    def sources(spec, key):
        return source_configs(spec, key, fmt=data.format, columns=data.columns) if spec is not None else []

    splits = {"train": ([], DataStats()), "val": ([], DataStats())}
    for source in sources(train, "data.train"):
        prepared = check_rejects(prepare(source), data.max_skip_fraction)
        rows = list(range(len(prepared.conversations)))
        kept, held = (rows, []) if val is not None else split_validation(rows, data.val_split, seed, prepared.label)
        _add(splits["train"], prepared, kept, weight=source.weight, seed=seed, reading=True)
        _add(splits["val"], prepared, held, weight=1.0, seed=seed, reading=False)
    for source in sources(val, "data.val"):
        prepared = check_rejects(prepare(source), data.max_skip_fraction)
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
    kept = [example_of(prepared.results[i], prepared.conversations[i], 0) for i in rows
            if isinstance(prepared.results[i], dict)]
    weighted = weigh(kept, weight, seed)
    added = DataStats()
    count_examples(added, weighted)
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


# --- mixtures -----------------------------------------------------------------------------------

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


def check_rejects(prepared: Prepared, max_skip_fraction: float) -> Prepared:
    """Stop on a source whose rows are all bad, or more than max_skip_fraction of them."""
    bad = prepared.read_rejects + [r for r in prepared.results if isinstance(r, DataError)]
    rows = len(prepared.read_rejects) + len(prepared.results)
    if not bad:
        return prepared
    counted = Rejects(strict=False)
    for error in bad:
        counted.reject(error)
    if len(bad) == rows:
        raise DataError(f"{prepared.label}: all {rows} rows are bad ({counted.summary()}); fix them, or point "
                        "the source at the right file and format (data.format, data.columns)")
    if len(bad) / rows > max_skip_fraction:
        raise DataError(f"{prepared.label}: {len(bad)} of {rows} rows would be skipped ({per_kind(counted.by_kind)}), "
                        f"more than data.max_skip_fraction={max_skip_fraction}; first: {bad[0]}")
    return prepared


def weigh(rows: list, weight: float, seed: int) -> list:
    """`weight` copies of each row per epoch: the whole part as repeats, the fraction as that share
    of the rows drawn by the seed (weight 0.5: half of them); file order kept within each copy."""
    whole, fraction = int(weight), weight - int(weight)
    drawn = sorted(random.Random(seed).sample(range(len(rows)), round(len(rows) * fraction)))
    return rows * whole + [rows[i] for i in drawn]


def held_out_conversations(data: dict, seed: int, tokenizer=None, *, read=None) -> tuple[list[Conversation], str]:
    """The validation rows of a run, from its config's data section as a dict (run config.yaml):
    data.val's rows, or each source's held-out share, read and split as data.mixtures.build_datasets does.
    With the run's `tokenizer` and data.cache on, each source comes from the tokenized cache the run
    wrote (read and tokenized again only if it is gone), and rows the run dropped stay out. `read`:
    (opened source, *, system_prompt, rejects) -> conversations (None for a row without an answer),
    for rows that are not SFT rows (data.preference.answer_conversations); None = SFT rows.
    Returns (rows, where they come from)."""
    strict = data.get("on_error", DataConfig.on_error) == "error"  # bad rows dropped as in training
    val_split = data.get("val_split", DataConfig.val_split)
    fmt, columns = data.get("format", DataConfig.format), data.get("columns") or {}
    spec = data.get("val") or data["train"]
    rows, labels = [], []
    for source in source_configs(spec, fmt=fmt, columns=columns):
        if tokenizer is not None and data.get("cache", DataConfig.cache) and read is None:
            prepared = prepare_source(tokenizer, source, max_length=data.get("max_length", DataConfig.max_length),
                                      system_prompt=data.get("system_prompt"),
                                      train_on=data.get("train_on", DataConfig.train_on), strict=False,
                                      cache=cache_root())
            label, kept = prepared.label, [isinstance(r, dict) for r in prepared.results]
            conversations = prepared.conversations
        else:
            opened = open_source(source)
            label, conversations = opened.label, (read or conversations_of)(
                opened, system_prompt=data.get("system_prompt"), rejects=Rejects(strict=strict))
            kept = [c is not None for c in conversations]  # `read` gives None for a row with no answer to show
        labels.append(label)
        chosen = list(range(len(conversations)))
        if not (data.get("val") or val_split <= 0):
            chosen = split_validation(chosen, val_split, seed, label)[1]
        rows += [conversations[i] for i in chosen if kept[i]]
    what = ", ".join(labels)
    if data.get("val"):
        return rows, what
    return rows, f"{what} ({'validation rows' if val_split > 0 else 'training rows: the run held none out'})"


def source_lines(stats: dict) -> list[str]:
    """One line per source of a mixture (none for a single source): rows, dropped, weight, and its
    share of the trained tokens of an epoch."""
    sources = stats["train"].sources
    if len(sources) < 2:
        return []
    total = max(1, sum(s["target_tokens"] for s in sources))
    return [f"source {s['source']}: {s['rows']:,} rows, {s['dropped']:,} dropped, weight {s['weight']:g} -> "
            f"{s['examples']:,} examples, {100 * s['target_tokens'] / total:.1f}% of the trained tokens"
            + (" (tokenized cache)" if s["cached"] else "") for s in sources]
