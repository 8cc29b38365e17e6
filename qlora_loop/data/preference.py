"""Preference data: rows -> pairs (DPO, ORPO) or judged answers (KTO) -> tokenized examples -> batches.

Rows, from every source a run reads (data.columns maps other field names):
  pairs   {"prompt", "chosen", "rejected"[, "system"]}, strings; or conversational: prompt a list of
          messages, chosen / rejected a list holding the assistant's message
  judged  {"prompt", "completion", "label": true|false}; KTO also takes pairs (chosen true, rejected false)
  prompts {"prompt", and any columns the rewards read}: GRPO's (data/prompts.py)
Each answer is tokenized after its prompt by the chat template, as SFT rows are, its label mask
covering the answer (and its end-of-turn) only. A pair example keeps the chosen row as input_ids /
labels and the rejected one as rejected_ids / rejected_labels; data.batches.collate_pairs puts the B chosen rows,
then the B rejected ones, in one batch of 2B rows: one forward of the model gives both.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_loop.config import DataConfig, source_configs
from qlora_loop.data.examples import IGNORE, DataStats, tokenize_conversation
from qlora_loop.data.mixtures import check_rejects, split_validation, weigh
from qlora_loop.data.prompts import prompt_example, prompt_messages
from qlora_loop.data.rows import Conversation, DataError, Rejects, _rename
from qlora_loop.data.sources import open_source


@dataclass
class Judged:
    """One answer to a prompt: a pair's chosen (desirable) or rejected one, or a KTO row's."""
    where: str
    prompt: list[dict]
    answer: str
    desirable: bool


@dataclass
class Pair:
    where: str
    prompt: list[dict]
    chosen: str
    rejected: str


def _answer(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):  # [{"role": "assistant", ...}]
        value = value[0].get("content") if value[0].get("role") == "assistant" else None
        if value is None:
            raise DataError(f"{where}: field {name!r} must hold one assistant message", "format")
    if value is None:
        raise DataError(f"{where}: missing field {name!r}", "missing_field")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string or [{{\"role\": \"assistant\", ...}}], got "
                        f"{type(value).__name__}", "wrong_type")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is an empty answer", "empty_response")
    return value


def _rows(rows: list[tuple[str, object]], *, columns: dict | None, rejects: Rejects, convert) -> list:
    """Each row renamed by `columns` and converted by `convert(where, row)` (a list of items); a bad row
    goes to `rejects` (an error in strict mode)."""
    items = []
    for where, row in ((w, _rename(r, columns)) for w, r in rows):
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}", "wrong_type")
            items += convert(where, row)
        except DataError as e:
            rejects.reject(e)
    return items


def _pair(where: str, row: dict, system_prompt: str | None) -> Pair:
    if "completion" in row and "chosen" not in row:
        raise DataError(f"{where}: a KTO row (prompt, completion, label) where DPO and ORPO need pairs "
                        "{prompt, chosen, rejected}; use train.objective=kto, or map your fields with "
                        "data.columns", "format")
    pair = Pair(where, prompt_messages(row, where, system_prompt), _answer(row, "chosen", where),
                _answer(row, "rejected", where))
    if pair.chosen.strip() == pair.rejected.strip():
        raise DataError(f"{where}: chosen and rejected are the same answer, so there is no preference to "
                        "learn; fix or drop the row", "identical_pair")
    return pair


def _judged(where: str, row: dict, system_prompt: str | None) -> list[Judged]:
    """A judged answer, or a pair split into a desirable and an undesirable answer."""
    if "chosen" in row:
        pair = _pair(where, row, system_prompt)
        return [Judged(where, pair.prompt, pair.chosen, True), Judged(where, pair.prompt, pair.rejected, False)]
    if not isinstance(row.get("label"), bool):
        raise DataError(f"{where}: field 'label' must be true (a desirable answer) or false, got "
                        f"{row.get('label')!r}", "missing_field" if "label" not in row else "wrong_type")
    return [Judged(where, prompt_messages(row, where, system_prompt), _answer(row, "completion", where), row["label"])]


def to_pairs(rows: list[tuple[str, object]], *, columns: dict | None, system_prompt: str | None,
             rejects: Rejects) -> list[Pair]:
    return _rows(rows, columns=columns, rejects=rejects, convert=lambda w, r: [_pair(w, r, system_prompt)])


def to_judged(rows: list[tuple[str, object]], *, columns: dict | None, system_prompt: str | None,
              rejects: Rejects) -> list[Judged]:
    """KTO's rows: judged answers, and pairs split into a desirable and an undesirable answer."""
    return _rows(rows, columns=columns, rejects=rejects, convert=lambda w, r: _judged(w, r, system_prompt))


def to_prompts(rows: list[tuple[str, object]], *, columns: dict | None, system_prompt: str | None,
               rejects: Rejects) -> list[dict]:
    """GRPO's rows: {"where", "messages" (the prompt's), "row"} (data/prompts.py)."""
    return _rows(rows, columns=columns, rejects=rejects, convert=lambda w, r: [
        {"where": w, "messages": prompt_messages(r, w, system_prompt), "row": r}])


def answer_conversations(objective: str):
    """data.mixtures.held_out_conversations' `read` for a run of `objective` (dpo, orpo, kto, grpo): each of the
    run's examples as its prompt and the answer it teaches (a pair's chosen answer, a desirable KTO answer, a
    GRPO row's "answer"), None for one that teaches none (an undesirable KTO answer, a GRPO row without an
    answer), so that the validation split is drawn over the same list as the run's and merge, export and
    eval ask the run's own prompts."""
    def answer(prompt: list[dict], text: str) -> list[dict]:
        return prompt + [{"role": "assistant", "content": text}]

    def read(opened, *, system_prompt: str | None, rejects: Rejects) -> list[Conversation | None]:
        rows, columns = opened.read(rejects), opened.source.columns
        if objective == "grpo":
            items = to_prompts(rows, columns=columns, system_prompt=system_prompt, rejects=rejects)
            return [Conversation(i["where"], answer(i["messages"], i["row"]["answer"]))
                    if isinstance(i["row"].get("answer"), str) else None for i in items]
        if objective == "kto":
            judged = to_judged(rows, columns=columns, system_prompt=system_prompt, rejects=rejects)
            return [Conversation(j.where, answer(j.prompt, j.answer)) if j.desirable else None for j in judged]
        pairs = to_pairs(rows, columns=columns, system_prompt=system_prompt, rejects=rejects)
        return [Conversation(p.where, answer(p.prompt, p.chosen)) for p in pairs]

    return read


def tokenize_answer(tokenizer, prompt: list[dict], answer: str, max_length: int, where: str) -> tuple[list, list, bool]:
    ids, labels, truncated = tokenize_conversation(tokenizer, prompt + [{"role": "assistant", "content": answer}],
                                                   max_length)
    if not any(label != IGNORE for label in labels[1:]):
        raise DataError(f"{where}: the prompt fills all data.max_length={max_length} tokens, leaving no room for the "
                        "answers; raise data.max_length, or drop such rows with data.on_error=skip", "too_long")
    return ids, labels, truncated


def pair_example(tokenizer, pair: Pair, max_length: int) -> dict:
    c_ids, c_labels, c_cut = tokenize_answer(tokenizer, pair.prompt, pair.chosen, max_length, pair.where)
    r_ids, r_labels, r_cut = tokenize_answer(tokenizer, pair.prompt, pair.rejected, max_length, pair.where)
    return {"input_ids": c_ids, "labels": c_labels, "rejected_ids": r_ids, "rejected_labels": r_labels,
            "where": pair.where, "messages": pair.prompt + [{"role": "assistant", "content": pair.chosen}],
            "rejected": pair.rejected, "truncated": c_cut or r_cut}


def judged_example(tokenizer, judged: Judged, max_length: int) -> dict:
    ids, labels, cut = tokenize_answer(tokenizer, judged.prompt, judged.answer, max_length, judged.where)
    return {"input_ids": ids, "labels": labels, "desirable": judged.desirable, "where": judged.where,
            "messages": judged.prompt + [{"role": "assistant", "content": judged.answer}], "truncated": cut}


def build_preference_datasets(tokenizer, data: DataConfig, *, objective: str, seed: int = 0):
    """(train examples, val examples, {"train": DataStats, "val": DataStats}) for a preference
    objective, or GRPO's prompts (data/prompts.py), each source read, split (data.val, or data.val_split of each source) and weighted as
    data.mixtures.build_datasets does for SFT rows; bad rows as data.on_error says."""
    strict = data.on_error == "error"
    splits = {"train": ([], DataStats()), "val": ([], DataStats())}

    def read(source) -> list[dict]:
        opened, rejects = open_source(source), Rejects(strict)
        rows = opened.read(rejects)
        if not rows and not rejects.count:
            raise DataError(f"{opened.label}: no rows", "empty")
        convert, make = {"kto": (to_judged, judged_example), "grpo": (to_prompts, prompt_example)}.get(
            objective, (to_pairs, pair_example))
        examples = []
        for item in convert(rows, columns=source.columns, system_prompt=data.system_prompt, rejects=rejects):
            try:
                examples.append(make(tokenizer, item, data.max_length))
            except DataError as e:
                rejects.reject(e)
        counted = len(rows) + sum(1 for e in rejects.errors if e.kind in ("invalid_json",))
        _check_share(opened.label, rejects, counted, data.max_skip_fraction)
        return examples

    def add(split: str, examples: list[dict], weight: float = 1.0) -> None:
        kept, stats = splits[split]
        weighted = weigh(examples, weight, seed)
        kept += [{**e, "index": len(kept) + k} for k, e in enumerate(weighted)]
        stats.rows += len(examples)
        stats.examples += len(weighted)
        stats.truncated += sum(e["truncated"] for e in weighted)
        stats.target_tokens += sum(_answer_tokens(e) for e in weighted)

    for source in source_configs(data.train, "data.train", fmt=data.format, columns=data.columns):
        examples = read(source)
        rows = list(range(len(examples)))
        kept, held = (rows, []) if data.val is not None else split_validation(rows, data.val_split, seed, source.path)
        add("train", [examples[i] for i in kept], source.weight)
        add("val", [examples[i] for i in held])
    if data.val is not None:
        for source in source_configs(data.val, "data.val", fmt=data.format, columns=data.columns):
            add("val", read(source))
    (train, train_stats), (val, val_stats) = splits["train"], splits["val"]
    if not train:
        raise DataError(f"data.train: no usable {'prompt' if objective == 'grpo' else 'preference'} rows left")
    return train, val, {"train": train_stats, "val": val_stats}


def _answer_tokens(example: dict) -> int:
    return sum(label != IGNORE for key in ("labels", "rejected_labels") for label in example.get(key, [])[1:])


def _check_share(label: str, rejects: Rejects, rows: int, max_skip_fraction: float) -> None:
    if rejects.count and rejects.count / max(rows, 1) > max_skip_fraction:
        raise DataError(f"{label}: {rejects.count} of {rows} rows would be skipped ({rejects.summary()}), more than "
                        f"data.max_skip_fraction={max_skip_fraction}")


def answer_rows(examples: list[dict]) -> list[dict]:
    """Every answer of preference examples as an SFT-like row (input_ids, labels, messages), the
    rejected ones included, for the label-mask audit; SFT examples pass through."""
    rows = []
    for e in examples:
        rows.append(e)
        if "rejected_ids" in e:
            rows.append({**e, "input_ids": e["rejected_ids"], "labels": e["rejected_labels"],
                         "messages": e["messages"][:-1] + [{"role": "assistant", "content": e["rejected"]}]})
    return rows
