"""Data sources -> (where, row) pairs, and mixtures of sources -> the rows of each split.

A source (config.SourceConfig) is a JSON / JSONL / CSV / Parquet / Arrow file, a folder written by
`datasets`' save_to_disk, a folder of data files laid out as a hub dataset repo, or a hub dataset
id (datasets.load_dataset; offline it must already be in the datasets cache). Rows of text files
are named file:line, rows of columnar sources by their row index ("data.parquet row 17").

A mixture is data.train given as a list: each source's validation rows are held out first, then
its training rows are weighted (weight 2: every row twice per epoch; 0.5: half of them, drawn by
the seed), so no copy of a training row lands in validation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qlora_loop.cache import Prepared
from qlora_loop.config import DataConfig, SourceConfig, source_configs
from qlora_loop.rows import Conversation, DataError, Rejects, read_rows, to_conversations

TEXT_SUFFIXES = (".json", ".jsonl")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Opened:
    """A source ready to read: `fingerprint` changes whenever its rows may have (content hash of its
    files, or the datasets fingerprint of a hub dataset); read(rejects) gives its (where, row) pairs."""
    source: SourceConfig
    label: str  # how errors and the data table name it
    fingerprint: str
    read: Callable[[Rejects], list[tuple[str, object]]]


def as_source(source: str | Path | SourceConfig) -> SourceConfig:
    return source if isinstance(source, SourceConfig) else source_configs(str(source))[0]


def open_source(source: str | Path | SourceConfig) -> Opened:
    """What the source is, found from its path: a file by its suffix, a folder by what it holds,
    anything else that looks like owner/name a hub dataset id."""
    source = as_source(source)
    path = Path(source.path)
    limit = source.max_rows
    if path.is_file():
        suffix = path.suffix.lower()
        reader = {".csv": _read_csv, ".parquet": _read_parquet, ".arrow": _read_arrow}.get(suffix, _read_text)
        return Opened(source, str(path), file_digest(path), lambda rejects: reader(path, rejects)[:limit])
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return Opened(source, str(path), folder_digest(path), lambda rejects: _read_saved(path, source))
        if any(p.suffix.lower() in DATA_SUFFIXES for p in path.rglob("*") if p.is_file()):
            return _open_hub(source, str(path))
        raise DataError(f"{path}: this folder holds no data; a folder source must be written by datasets' "
                        "save_to_disk (state.json or dataset_dict.json in it), or hold data files (.json, .jsonl, "
                        ".csv, .parquet, .arrow) laid out as a hub dataset repo; or give a file", "missing_file")
    if path.suffix.lower() in DATA_SUFFIXES or not HUB_ID.match(source.path):
        raise DataError(f"{path}: data file does not exist", "missing_file")
    return _open_hub(source, source.path)


def load_source(source: str | Path | SourceConfig, system_prompt: str | None = None,
                rejects: Rejects | None = None) -> list[Conversation]:
    """Every row of one source as Conversations (rows.load_conversations)."""
    opened, rejects = open_source(source), rejects or Rejects()
    return conversations_of(opened, system_prompt=system_prompt, rejects=rejects)


def conversations_of(opened: Opened, *, system_prompt: str | None, rejects: Rejects) -> list[Conversation]:
    pairs = opened.read(rejects)
    if not pairs and not rejects.count:
        raise DataError(f"{opened.label}: no rows; expected a JSON array or one JSON object per line, or a table "
                        "with rows", "empty")
    return to_conversations(pairs, fmt=opened.source.format, columns=opened.source.columns,
                            system_prompt=system_prompt, rejects=rejects, source=opened.label)


# --- files --------------------------------------------------------------------------------------

def _read_text(path: Path, rejects: Rejects) -> list[tuple[str, object]]:
    return [(f"{path}:{line}", row) for line, row in read_rows(path, rejects)]


def _read_csv(path: Path, rejects: Rejects) -> list[tuple[str, object]]:
    """A header row, then one row per record; an empty cell is a missing field. A record's line is
    the line it starts on (a quoted cell may hold newlines)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8",
                        "not_utf8") from None
    stream = io.StringIO(text, newline="")
    reader = csv.DictReader(stream)
    rows, start = [], 2
    try:
        for record in reader:
            rows.append((f"{path}:{start}", {k: v for k, v in record.items() if k is not None and v not in ("", None)}))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})", "invalid_csv") from None
    return rows


def _read_parquet(path: Path, rejects: Rejects) -> list[tuple[str, object]]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid and OSError both say what is wrong in one line
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(e)})", "invalid_parquet") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_arrow(path: Path, rejects: Rejects) -> list[tuple[str, object]]:
    import datasets
    try:
        rows = datasets.Dataset.from_file(str(path)).to_list()
    except Exception as e:
        raise DataError(f"{path}: not a readable Arrow file written by datasets ({_first_line(e)})",
                        "invalid_arrow") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)]


def _read_saved(path: Path, source: SourceConfig) -> list[tuple[str, object]]:
    import datasets
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        split = source.split or "train"
        if split not in dataset:
            raise DataError(f"{path}: no split {split!r} in this saved DatasetDict (it has {', '.join(dataset)}); "
                            "give the source a split, e.g. {path: ..., split: " + next(iter(dataset)) + "}", "split")
        dataset = dataset[split]
    return _dataset_rows(dataset, f"{path}", source.max_rows)


def _open_hub(source: SourceConfig, name: str) -> Opened:
    import datasets
    split = source.split or "train"
    label = f"{name} ({split})"
    try:
        dataset = datasets.load_dataset(name, source.name, split=split, revision=source.revision)
    except Exception as e:  # offline, unknown id, unknown split or configuration: datasets says which
        offline = " (offline: HF_HUB_OFFLINE is set and it is not in the datasets cache)" \
            if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(f"{label}: no such local file or folder, and datasets.load_dataset cannot load it as a "
                        f"dataset{offline}: {_first_line(e)}; check the path or id, its split/name, or load it once "
                        "online", "missing_file") from None
    return Opened(source, label, f"{dataset._fingerprint}:{source.revision}",
                  lambda rejects: _dataset_rows(dataset, label, source.max_rows))


def _dataset_rows(dataset, label: str, limit: int | None) -> list[tuple[str, object]]:
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return [(f"{label} row {i}", row) for i, row in enumerate(dataset.to_list())]


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def folder_digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(" ".join(f"{p.relative_to(path)}={file_digest(p)}" for p in files).encode()).hexdigest()[:20]


def local_files(spec) -> list[str]:
    """The local files of data.train / data.val (for the manifest's hashes); a hub dataset has none."""
    files = []
    for source in source_configs(spec) if spec is not None else []:
        path = Path(source.path)
        files += [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*") if p.is_file()) \
            if path.is_dir() else []
    return files


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
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counted.by_kind.items()))
        raise DataError(f"{prepared.label}: {len(bad)} of {rows} rows would be skipped ({kinds}), more than "
                        f"data.max_skip_fraction={max_skip_fraction}; first: {bad[0]}")
    return prepared


def weigh(rows: list, weight: float, seed: int) -> list:
    """`weight` copies of each row per epoch: the whole part as repeats, the fraction as that share
    of the rows drawn by the seed (weight 0.5: half of them); file order kept within each copy."""
    whole, fraction = int(weight), weight - int(weight)
    drawn = sorted(random.Random(seed).sample(range(len(rows)), round(len(rows) * fraction)))
    return rows * whole + [rows[i] for i in drawn]


def held_out_conversations(data: dict, seed: int, tokenizer=None) -> tuple[list[Conversation], str]:
    """The validation rows of a run, from its config's data section as a dict (run config.yaml):
    data.val's rows, or each source's held-out share, read and split as data.build_datasets does.
    With the run's `tokenizer` and data.cache on, each source comes from the tokenized cache the run
    wrote (read and tokenized again only if it is gone), and rows the run dropped stay out.
    Returns (rows, where they come from)."""
    from qlora_loop.cache import cache_root
    from qlora_loop.data import prepare_source  # data imports this module

    strict = data.get("on_error", DataConfig.on_error) == "error"  # bad rows dropped as in training
    val_split = data.get("val_split", DataConfig.val_split)
    fmt, columns = data.get("format", DataConfig.format), data.get("columns") or {}
    spec = data.get("val") or data["train"]
    rows, labels = [], []
    for source in source_configs(spec, fmt=fmt, columns=columns):
        if tokenizer is not None and data.get("cache", DataConfig.cache):
            prepared = prepare_source(tokenizer, source, max_length=data.get("max_length", DataConfig.max_length),
                                      system_prompt=data.get("system_prompt"),
                                      train_on=data.get("train_on", DataConfig.train_on), strict=False,
                                      cache=cache_root())
            label, kept = prepared.label, [isinstance(r, dict) for r in prepared.results]
            conversations = prepared.conversations
        else:
            opened = open_source(source)
            label, conversations = opened.label, conversations_of(opened, system_prompt=data.get("system_prompt"),
                                                                  rejects=Rejects(strict=strict))
            kept = [True] * len(conversations)
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
