"""The tokenized cache: one source's prepared rows, written once, read back on the next start.

An entry is a folder under the user cache, ~/.cache/qlora_loop/data/KEY/ (shared by train.py and
inspect_data.py, which have no output folder in common, and by every run of the same data; safe to
share because KEY hashes the content): index.json (the source's reading rejects and a sha256 of each file),
rows.jsonl (each row's where, messages and drop reason, if any) and tokens.safetensors (the kept
rows' input_ids and labels end to end, with offsets). No pickle. KEY hashes the source's content
and name (rows are named by it) and everything that shapes its rows: format options, system prompt,
train_on, max_length, the tokenizer (vocabulary, chat template, special tokens), the library
versions and the code that prepares rows (code_hash of the modules the caller names). An entry is
written into a temporary folder and renamed into place; one that does not check out against its
index is rebuilt, never trusted. Weights and the validation split are applied after reading, so
changing them or the seed reuses the entry. Delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from qlora_loop.data.rows import Conversation, DataError
from qlora_loop.files import replace_dir, sha256_file
from qlora_loop.paths import cache_dir

FORMAT = 1  # the layout of an entry's files


def code_hash(modules) -> str:
    """The source of `modules`, the code that turns a source into rows and masks: a change to it is a
    new key, so no entry made by other code is ever read back (no version to remember to bump)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


@dataclass
class Prepared:
    """One source, read and tokenized: every row it yielded in order, each an example dict
    (input_ids, labels, truncated) or a DataError it was dropped for, and the rows its reading dropped."""
    label: str
    conversations: list[Conversation]
    results: list  # dict | DataError, one per conversation
    read_rejects: list[DataError] = field(default_factory=list)
    from_cache: bool = False


def cache_root() -> Path:
    return cache_dir() / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    import tokenizers
    import transformers
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, vocab, tokenizer.chat_template or "", str(tokenizer.all_special_tokens),
             str(tokenizer.eos_token), transformers.__version__, tokenizers.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def entry_key(fingerprint: str, *, tokenizer_hash: str, code: list, **options) -> str:
    """`code`: the modules that prepare the rows (hashed by code_hash)."""
    described = json.dumps({"format": FORMAT, "code": code_hash(code), "source": fingerprint,
                            "tokenizer": tokenizer_hash, **options},
                           sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()[:24]


def load_entry(root: Path, key: str) -> tuple[Prepared | None, str | None]:
    """(the entry, None), (None, None) when there is none, or (None, why) when it is corrupt."""
    folder = root / key
    if not folder.is_dir():
        return None, None
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        if index.get("format") != FORMAT or index.get("key") != key:
            return None, "written for another key or format"
        for name, digest in index["sha256"].items():
            if sha256_file(folder / name) != digest:
                return None, f"{name} does not match its checksum"
        arrays = load_file(str(folder / "tokens.safetensors"))
        rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
        ids, labels, offsets = arrays["ids"].tolist(), arrays["labels"].tolist(), arrays["offsets"].tolist()
        conversations, results, k = [], [], 0
        for row in rows:
            conversations.append(Conversation(row["where"], row["messages"]))
            if row["reject"] is not None:
                results.append(DataError(row["reject"][1], row["reject"][0]))
                continue
            start, end = offsets[k], offsets[k + 1]
            results.append({"input_ids": ids[start:end], "labels": labels[start:end], "truncated": row["truncated"]})
            k += 1
        if k != len(offsets) - 1:
            return None, "rows.jsonl and tokens.safetensors disagree"
        rejects = [DataError(message, kind) for kind, message in index["read_rejects"]]
        return Prepared(index["label"], conversations, results, rejects, from_cache=True), None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:  # a truncated or edited entry
        return None, f"unreadable ({type(e).__name__})"


def save_entry(root: Path, key: str, prepared: Prepared) -> None:
    """Write the entry atomically: into a temporary folder beside it, then renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
    try:
        kept = [r for r in prepared.results if isinstance(r, dict)]
        offsets = np.cumsum([0] + [len(r["input_ids"]) for r in kept], dtype=np.int64)
        flat = [t for r in kept for t in r["input_ids"]]
        save_file({"ids": np.asarray(flat, dtype=np.int32).reshape(-1),
                   "labels": np.asarray([t for r in kept for t in r["labels"]], dtype=np.int32).reshape(-1),
                   "offsets": offsets}, str(tmp / "tokens.safetensors"))
        with open(tmp / "rows.jsonl", "w", encoding="utf-8") as f:
            for conversation, result in zip(prepared.conversations, prepared.results):
                reject = [result.kind, str(result)] if isinstance(result, DataError) else None
                f.write(json.dumps({"where": conversation.where, "messages": conversation.messages, "reject": reject,
                                    "truncated": bool(result.get("truncated")) if reject is None else False},
                                   ensure_ascii=False) + "\n")
        index = {"format": FORMAT, "key": key, "label": prepared.label,
                 "read_rejects": [[e.kind, str(e)] for e in prepared.read_rejects],
                 "sha256": {name: sha256_file(tmp / name) for name in ("tokens.safetensors", "rows.jsonl")}}
        (tmp / "index.json").write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")
        replace_dir(tmp, root / key)  # over a corrupt entry being rebuilt
    except OSError:  # another process renamed its copy first, or the disk is full: the cache is only a saving
        shutil.rmtree(tmp, ignore_errors=True)
