"""Rows -> chat messages, every fault named by its row and field; JSON and JSONL files read here, the
other sources in sources.py. A row is named `file:line` in a JSONL file, `file: row N (line L)` in a
JSON array (N its index, from 0 as for the columnar sources' `file row N`: one line may hold them all).

Three row formats, detected per source from its first row, or given with data.format:
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": str, "train"?: bool}, ...]}
  sharegpt  {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str, "train"?: bool}], "system"?}
data.columns renames a source's fields to these ({instruction: question}). A message with
"train": false is in the prompt, not trained. Strict by default: the first bad row is an error.
With data.on_error=skip a bad row is dropped and counted by kind (Rejects), and the caller stops a
run that would drop too many.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qlora_loop.errors import DataError, not_utf8


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
    errors: list[DataError] = field(default_factory=list)

    def reject(self, error: DataError) -> None:
        if self.strict:
            raise error
        self.by_kind[error.kind] += 1
        self.where.append(str(error))
        self.errors.append(error)

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())

    def summary(self, shown: int = 3) -> str:
        """'2 invalid_json, 1 too_long; first: a.jsonl:2: ...; a.jsonl:5: ...'"""
        return f"{per_kind(self.by_kind)}; first: " + "; ".join(self.where[:shown])


def per_kind(counts: dict[str, int]) -> str:
    """'2 invalid_json, 1 too_long': counts by kind, in the kinds' order."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


# --- reading ------------------------------------------------------------------------------------

def read_rows(path: str | Path, rejects: Rejects | None = None) -> list[tuple[str, object]]:
    """(where, row) pairs from a JSON array or a JSONL file. In a JSONL file each line is decoded on
    its own, so a bad line can be skipped; a broken JSON array is an error of the whole file."""
    path, rejects = Path(path), rejects or Rejects()
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist", "missing_file")
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    if raw[bom:].lstrip().startswith(b"["):
        rows = _read_json_array(decode(raw, path), path)
    else:
        rows = _read_jsonl(raw, bom, path, rejects)
    if not rows and not rejects.count:
        raise DataError(f"{path}: no rows; expected a JSON array or one JSON object per line", "empty")
    return rows


def decode(raw: bytes, path: Path) -> str:
    """A text file's bytes as text, without a UTF-8 BOM; bytes that are not UTF-8 are an error naming their line."""
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(not_utf8(path, raw, e, start), "not_utf8") from None


def _read_jsonl(raw: bytes, bom: int, path: Path, rejects: Rejects) -> list[tuple[str, object]]:
    rows, offset = [], 0
    # split on b"\n" only: JSON strings may hold U+2028, U+0085 or \f, which splitlines() breaks on.
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        start, offset = offset, offset + len(line_bytes) + 1
        skip = bom if number == 1 else 0
        try:
            line = line_bytes[skip:].decode("utf-8")
        except UnicodeDecodeError as e:
            rejects.reject(DataError(not_utf8(path, raw, e, start + skip), "not_utf8"))
            continue
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as e:
            rejects.reject(DataError(f"{path}:{number}: invalid JSON ({e.msg}, column {e.colno})", "invalid_json"))
    return rows


def _read_json_array(text: str, path: Path) -> list[tuple[str, object]]:
    """Parse `[obj, obj, ...]` element by element so each row keeps its index and the line it starts on."""
    decoder = json.JSONDecoder()
    rows, i = [], _skip_space(text, text.index("[") + 1)
    try:
        while i < len(text) and text[i] != "]":
            row, end = decoder.raw_decode(text, i)
            rows.append((f"{path}: row {len(rows)} (line {text.count(chr(10), 0, i) + 1})", row))
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

MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "system": "system"}


def to_conversations(rows: list[tuple[str, object]], *, fmt: str = "auto", columns: dict | None = None,
                     system_prompt: str | None = None, rejects: Rejects | None = None,
                     source: str = "data") -> list[Conversation]:
    """(where, row) pairs -> Conversations; a bad row goes to `rejects` (an error in strict mode).
    fmt "auto" detects the format from the first row that is an object."""
    rejects = rejects or Rejects()
    renamed = [(where, _rename(row, columns)) for where, row in rows]
    if fmt == "auto":
        fmt = detect_format(renamed, columns)
    convert = {"alpaca": _from_alpaca, "messages": _from_messages, "sharegpt": _from_sharegpt}[fmt]
    conversations = []
    for where, row in renamed:
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}", "wrong_type")
            messages = _checked(convert(row, where), where)
        except DataError as e:
            rejects.reject(e)
            continue
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        conversations.append(Conversation(where, messages))
    return conversations


def detect_format(rows: list[tuple[str, object]], columns: dict | None = None) -> str:
    """The format of the first row that is an object (alpaca when there is none: every row is then
    reported as not an object)."""
    first = next(((where, row) for where, row in rows if isinstance(row, dict)), None)
    if first is None:
        return "alpaca"
    where, row = first
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
        if key in row:
            return fmt
    renamed = f" (after data.columns {columns})" if columns else ""
    raise DataError(f"{where}: unknown row format with keys {sorted(row)}{renamed}; expected 'messages' "
                    "(role/content list), ShareGPT 'conversations' (from/value list) or alpaca "
                    "'instruction'/'input'/'output'; map other field names with data.columns, e.g. "
                    "{instruction: question, output: answer}", "format")


def turns_to_train(messages: list[dict], train_on: str) -> list[dict]:
    """data.train_on=last: every assistant turn but the last trained one gets "train": false."""
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train") is not False]
    if train_on != "last" or len(trained) < 2:
        return messages
    return [{**m, "train": False} if i in trained[:-1] else m for i, m in enumerate(messages)]


def _rename(row, columns: dict | None):
    if not columns or not isinstance(row, dict):
        return row
    theirs = set(columns.values())
    kept = {k: v for k, v in row.items() if k not in theirs}
    return {**kept, **{ours: row[t] for ours, t in columns.items() if t in row}}


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


def _checked(messages: list[dict], where: str) -> list[dict]:
    """A conversation trains only if it ends with an assistant turn and one of its turns is trained."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the row has no assistant turn, so nothing would be trained", "no_assistant")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends with a {messages[-1]['role']} turn that nothing answers; "
                        "end it with the assistant's reply, or drop that last turn", "unanswered")
    if all(m.get("train") is False for m in messages if m["role"] == "assistant"):
        raise DataError(f"{where}: every assistant turn has \"train\": false, so nothing would be trained",
                        "no_trained_turn")
    return messages


def _message(role: str, content: str, train) -> dict:
    return {"role": role, "content": content, **({"train": False} if train is False else {})}


def _from_alpaca(row: dict, where: str) -> list[dict]:
    instruction = _field(row, "instruction", str, where)
    extra = _field(row, "input", str, where, required=False)
    output = _answer(_field(row, "output", str, where), where, "'output'")
    system = _field(row, "system", str, where, required=False)
    history = _field(row, "history", list, where, required=False) or []
    messages = [{"role": "system", "content": system}] if system else []
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: field 'history'[{k}] must be a [question, answer] pair of strings",
                            "wrong_type")
        _answer(pair[1], where, f"'history'[{k}][1]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _from_messages(row: dict, where: str) -> list[dict]:
    return _turns(row, where, key="messages", speaker="role", text="content", role_of=MESSAGE_ROLES.get,
                  unknown="; expected system, user or assistant")


def _from_sharegpt(row: dict, where: str) -> list[dict]:
    system = _field(row, "system", str, where, required=False)
    turns = _turns(row, where, key="conversations", speaker="from", text="value",
                   role_of=lambda who: SHAREGPT_ROLES.get(who.lower()),
                   unknown=", a turn that cannot be trained here (function calls and tool results are not "
                           "supported); expected human/user, gpt/assistant/model or system; drop such rows")
    return ([{"role": "system", "content": system}] if system else []) + turns


def _turns(row: dict, where: str, *, key: str, speaker: str, text: str, role_of, unknown: str) -> list[dict]:
    """The messages of row[key], a list of {speaker: ..., text: ..., "train"?: bool} objects (messages:
    role/content; ShareGPT: from/value); role_of maps a speaker to our role, None for one we cannot
    train on, which is an error ending in `unknown`."""
    messages = []
    for k, turn in enumerate(_field(row, key, list, where)):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field {key!r}[{k}] must be an object with {speaker!r} and {text!r}",
                            "wrong_type")
        who = _field(turn, speaker, str, f"{where}: {key}[{k}]")
        content = _field(turn, text, str, f"{where}: {key}[{k}]")
        train = _field(turn, "train", bool, f"{where}: {key}[{k}]", required=False)
        role = role_of(who)
        if role is None:
            raise DataError(f"{where}: {key}[{k}].{speaker} is {who!r}{unknown}", "bad_role")
        if role == "assistant":
            _answer(content, where, f"{key}[{k}].{text}")
        messages.append(_message(role, content, train))
    return messages
