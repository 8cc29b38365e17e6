"""Data sources -> (where, row) pairs -> Conversations (rows.py reads JSON and JSONL and turns rows into messages).

A source (config.SourceConfig) is a JSON / JSONL / CSV / Parquet / Arrow file, a folder written by
`datasets`' save_to_disk, a folder of data files laid out as a hub dataset repo, or a hub dataset
id (datasets.load_dataset; offline it must already be in the datasets cache). Rows of JSONL and CSV
files are named file:line, rows of a JSON array by index and line ("d.json: row 4 (line 1)"), rows
of columnar sources by their index ("data.parquet row 17").
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qlora_loop.config import SourceConfig, source_configs
from qlora_loop.data.rows import Conversation, DataError, Rejects, decode, read_rows, to_conversations
from qlora_loop.files import sha256_file

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
        reader = {".csv": _read_csv, ".parquet": _read_parquet, ".arrow": _read_arrow}.get(suffix, read_rows)
        return Opened(source, str(path), sha256_file(path)[:20], lambda rejects: reader(path, rejects)[:limit])
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


def load_conversations(source: str | Path | SourceConfig, system_prompt: str | None = None,
                       rejects: Rejects | None = None) -> list[Conversation]:
    """Every row of one source as Conversations."""
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

def _read_csv(path: Path, rejects: Rejects) -> list[tuple[str, object]]:
    """A header row, then one row per record; an empty cell is a missing field. A record's line is
    the line it starts on (a quoted cell may hold newlines)."""
    stream = io.StringIO(decode(path.read_bytes(), path), newline="")
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


def folder_digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = " ".join(f"{p.relative_to(path)}={sha256_file(p)[:20]}" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()[:20]


def local_files(spec) -> list[str]:
    """The local files of data.train / data.val (for the manifest's hashes); a hub dataset has none."""
    files = []
    for source in source_configs(spec) if spec is not None else []:
        path = Path(source.path)
        files += [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*") if p.is_file()) \
            if path.is_dir() else []
    return files
