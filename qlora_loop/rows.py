"""Data files -> (line, row) pairs -> chat messages, every fault named by file:line and field.

Two row formats, detected per file from its first row:
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
Strict by default: the first bad row is an error. With data.on_error=skip a bad row is dropped and
counted by kind (Rejects), and the caller stops a run that would drop too many.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names file:line, the field and the fix; `kind` groups the counts."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Conversation:
    where: str  # "file:line", for error messages
    messages: list[dict]


@dataclass
class Rejects:
    """Rows dropped for bad input, by kind. In strict mode the first one raises instead."""
    strict: bool = True
    by_kind: Counter = field(default_factory=Counter)
    where: list[str] = field(default_factory=list)

    def reject(self, error: DataError) -> None:
        if self.strict:
            raise error
        self.by_kind[error.kind] += 1
        self.where.append(str(error))

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())


# --- reading ------------------------------------------------------------------------------------

def read_rows(path: str | Path, rejects: Rejects | None = None) -> list[tuple[int, object]]:
    """(line, row) pairs from a JSON array or a JSONL file. In a JSONL file each line is decoded on
    its own, so a bad line can be skipped; a broken JSON array is an error of the whole file."""
    path, rejects = Path(path), rejects or Rejects()
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist", "missing_file")
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    if raw[bom:].lstrip().startswith(b"["):
        rows = _read_json_array(_decode(raw, bom, path), path)
    else:
        rows = _read_jsonl(raw, bom, path, rejects)
    if not rows and not rejects.count:
        raise DataError(f"{path}: no rows; expected a JSON array or one JSON object per line", "empty")
    return rows


def _decode(raw: bytes, start: int, path: Path) -> str:
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start  # counted from the start of the file, BOM included
        line = raw[:at].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {at}); "
                        "re-save the file as UTF-8", "not_utf8") from None


def _read_jsonl(raw: bytes, bom: int, path: Path, rejects: Rejects) -> list[tuple[int, object]]:
    rows, offset = [], 0
    # split on b"\n" only: JSON strings may hold U+2028, U+0085 or \f, which splitlines() breaks on.
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        start, offset = offset, offset + len(line_bytes) + 1
        try:
            line = line_bytes[bom if number == 1 else 0:].decode("utf-8")
        except UnicodeDecodeError as e:
            at = start + (bom if number == 1 else 0) + e.start
            rejects.reject(DataError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {at}); re-save the "
                                     "file as UTF-8", "not_utf8"))
            continue
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            rejects.reject(DataError(f"{path}:{number}: invalid JSON ({e.msg}, column {e.colno})", "invalid_json"))
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
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})", "invalid_json") from None
    if i >= len(text):
        raise DataError(f"{path}:{text.count(chr(10)) + 1}: invalid JSON (the array is never closed with ']')",
                        "invalid_json")
    after = _skip_space(text, i + 1)
    if after < len(text):  # e.g. two arrays concatenated: the second would be silently lost
        raise DataError(f"{path}:{text.count(chr(10), 0, after) + 1}: invalid JSON (text after the array's "
                        "closing ']'); a file holds one array, or one object per line", "invalid_json")
    return rows


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


# --- rows -> messages ---------------------------------------------------------------------------

def load_conversations(path: str | Path, system_prompt: str | None = None,
                       rejects: Rejects | None = None) -> list[Conversation]:
    rejects = rejects or Rejects()
    rows = read_rows(path, rejects)
    first = next(((line, row) for line, row in rows if isinstance(row, dict)), rows[0] if rows else None)
    fmt = None
    if first is not None and isinstance(first[1], dict):
        fmt = "messages" if "messages" in first[1] else "alpaca" if "instruction" in first[1] else None
        if fmt is None:
            raise DataError(f"{path}:{first[0]}: unknown row format with keys {sorted(first[1])}; expected "
                            "'messages' (role/content list) or alpaca 'instruction'/'input'/'output'", "format")
    convert = _from_messages if fmt == "messages" else _from_alpaca
    conversations = []
    for line, row in rows:
        where = f"{path}:{line}"
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}", "wrong_type")
            messages = convert(row, where)
        except DataError as e:
            rejects.reject(e)
            continue
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        conversations.append(Conversation(where, messages))
    return conversations


def _field(row: dict, name: str, kind: type, where: str, required: bool = True):
    if name not in row or row[name] is None:
        if required:
            raise DataError(f"{where}: missing field {name!r}", "missing_field")
        return None
    if not isinstance(row[name], kind):
        raise DataError(f"{where}: field {name!r} must be {kind.__name__}, got {type(row[name]).__name__}",
                        "wrong_type")
    return row[name]


def _answer(text: str, where: str, name: str) -> str:
    if not text.strip():
        raise DataError(f"{where}: field {name} is an empty answer; there is nothing to learn from it",
                        "empty_response")
    return text


def _from_alpaca(row: dict, where: str) -> list[dict]:
    instruction = _field(row, "instruction", str, where)
    extra = _field(row, "input", str, where, required=False)
    output = _answer(_field(row, "output", str, where), where, "'output'")
    system = _field(row, "system", str, where, required=False)
    history = _field(row, "history", list, where, required=False) or []
    messages = [{"role": "system", "content": system}] if system else []
    for k, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: field 'history'[{k}] must be a [question, answer] pair of strings",
                            "wrong_type")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _from_messages(row: dict, where: str) -> list[dict]:
    messages = _field(row, "messages", list, where)
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field 'messages'[{k}] must be an object with 'role' and 'content'",
                            "wrong_type")
        role = _field(message, "role", str, f"{where}: messages[{k}]")
        content = _field(message, "content", str, f"{where}: messages[{k}]")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{k}].role is {role!r}; expected system, user or assistant",
                            "bad_role")
        if role == "assistant":
            _answer(content, where, f"messages[{k}].content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages' has no assistant turn, so nothing would be trained",
                        "no_assistant")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
