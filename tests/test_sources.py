"""sources.py, the formats of rows.py and cache.py: ShareGPT and column maps, CSV / Parquet / Arrow /
save_to_disk / hub-layout sources, mixtures with weights, turn-level loss, the tokenized cache.

Run: python -m pytest tests/test_sources.py -q
"""

from __future__ import annotations

import dataclasses
import json
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_training
from qlora_loop.config import ConfigError, DataConfig, load_config
from qlora_loop.data.audit import audit_label_masks
from qlora_loop.data.cache import load_entry
from qlora_loop.data.examples import IGNORE, max_chars, tokenize_rows
from qlora_loop.data.mixtures import build_datasets, weigh
from qlora_loop.data.rows import DataError
from qlora_loop.data.sources import load_conversations
from qlora_loop.use.inference import validation_prompts


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def trained(tokenizer, example) -> list[str]:
    """The decoded runs of trained tokens."""
    runs, current = [], []
    for tok, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            current.append(tok)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


def data_error(where, *says: str):
    return pytest.raises(DataError, match="^" + re.escape(f"{where}: ") + ".*".join(map(re.escape, ("",) + says)))


ALPACA = [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(10)]
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                              {"from": "human", "value": "and?"}, {"from": "gpt", "value": "bye"}], "system": "S"}


# --- formats ------------------------------------------------------------------------------------

def test_sharegpt_rows_become_messages_and_unknown_roles_are_named(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, {"conversations": [
        {"from": "user", "value": "q"}, {"from": "function_call", "value": "{}"}, {"from": "model", "value": "a"}]}])
    with data_error(f"{path}:2", "conversations[1].from is 'function_call'", "cannot be trained"):
        load_conversations(path)
    write_jsonl(tmp_path / "s.jsonl", [SHAREGPT])
    assert load_conversations(path)[0].messages == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]


def test_columns_map_other_field_names(tmp_path, qwen2_tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"answer {i}"} for i in range(4)])
    with data_error(f"{path}:1", "unknown row format", "data.columns"):
        build_datasets(qwen2_tokenizer, DataConfig(train=path, val_split=0.0, max_length=64))
    train, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=path, val_split=0.0, max_length=64,
                                                             columns={"instruction": "question", "output": "answer"}))
    assert [trained(qwen2_tokenizer, e) for e in train] == [[f"answer {i}<|im_end|>"] for i in range(4)]


def test_history_with_an_empty_answer_and_a_last_user_turn_are_errors(tmp_path):
    history = write_jsonl(tmp_path / "h.jsonl", [ALPACA[0], {"instruction": "q", "output": "a",
                                                             "history": [["q0", "  "]]}])
    with data_error(f"{history}:2", "field 'history'[0][1] is an empty answer"):
        load_conversations(history)
    ends = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"},
                                                            {"role": "user", "content": "and?"}]}])
    with data_error(f"{ends}:1", "ends with a user turn that nothing answers"):
        load_conversations(ends)


def test_train_false_and_train_on_last_keep_turns_in_the_prompt(tmp_path, qwen2_tokenizer):
    flagged = {"messages": [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello", "train": False},
                            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [flagged])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [SHAREGPT])
    tok = qwen2_tokenizer
    [example], _, _ = build_datasets(tok, DataConfig(train=path, val_split=0.0, max_length=128))
    assert trained(tok, example) == ["bye<|im_end|>"]
    [everything], _, _ = build_datasets(tok, DataConfig(train=sharegpt, val_split=0.0, max_length=128))
    [last], _, _ = build_datasets(tok, DataConfig(train=sharegpt, val_split=0.0, max_length=128, train_on="last"))
    assert trained(tok, everything) == ["hello<|im_end|>", "bye<|im_end|>"]
    assert trained(tok, last) == ["bye<|im_end|>"] and last["input_ids"] == everything["input_ids"]
    # the audit honours the flag: the masks pass, and training the flagged turn would be a problem
    assert audit_label_masks(tok, [example, last], [example["messages"], last["messages"]]) == []
    flagged_sharegpt = [{**m, "train": False} if m["content"] == "hello" else m for m in everything["messages"]]
    [problem] = audit_label_masks(tok, [everything], [flagged_sharegpt])
    assert "assistant (\"train\": false) text ('hello') is trained" in problem
    none = write_jsonl(tmp_path / "n.jsonl", [{"messages": flagged["messages"][:2]}])
    with data_error(f"{none}:1", "every assistant turn has \"train\": false"):
        load_conversations(none)


# --- sources ------------------------------------------------------------------------------------

def test_a_csv_that_is_not_utf8_names_the_byte_counted_from_the_start_of_the_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "instruction,output\nq,café\n".encode("latin-1"))  # BOM, then 0xe9 at 27
    with data_error(f"{path}:2", "not UTF-8 text (byte 0xe9 at offset 27); re-save the file as UTF-8"):
        load_conversations(path)


def test_csv_parquet_arrow_and_saved_folders_read_as_rows(tmp_path, qwen2_tokenizer):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('instruction,input,output\nq0,,answer 0\n"multi\nline",x,answer 1\n', encoding="utf-8")
    table = pa.Table.from_pylist([SHAREGPT, {"conversations": [{"from": "human", "value": "q"}]}])
    pq.write_table(table, tmp_path / "d.parquet")
    saved = datasets.Dataset.from_list(ALPACA[:3])
    saved.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": saved, "test": saved.select([0])}).save_to_disk(str(tmp_path / "dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert [c.messages[0]["content"] for c in load_conversations(csv_path)] == ["q0", "multi\nline\nx"]
    assert [c.where for c in load_conversations(csv_path)] == [f"{csv_path}:2", f"{csv_path}:3"]
    with data_error(f"{tmp_path / 'd.parquet'} row 1", "no assistant turn"):
        load_conversations(tmp_path / "d.parquet")  # read, not "re-save as UTF-8"
    assert len(load_conversations(tmp_path / "saved")) == len(load_conversations(arrow)) == 3
    train, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=[{"path": str(tmp_path / "dict"), "split": "test"}],
                                                             val_split=0.0, max_length=64))
    assert [e["where"] for e in train] == [f"{tmp_path / 'dict'} row 0"]
    with data_error(tmp_path / "dict", "no split 'dev'", "it has train, test"):
        load_conversations(_source(tmp_path / "dict", split="dev"))


def _source(path, **options):
    from qlora_loop.config import source_configs
    return source_configs({"path": str(path), **options})[0]


def test_a_folder_without_data_says_what_a_folder_must_hold(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with data_error(tmp_path, "must be written by datasets' save_to_disk", "data files"):
        load_conversations(tmp_path)


def test_hub_layout_folders_load_through_load_dataset_and_offline_ids_fail_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", ALPACA[:4])
    write_jsonl(repo / "data" / "validation.jsonl", ALPACA[4:6])
    assert [c.messages[-1]["content"] for c in load_conversations(_source(repo, split="validation"))] == \
        ["answer 4", "answer 5"]
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as error:
        load_conversations("nobody/no-such-set")
    message = str(error.value)
    assert message.startswith("nobody/no-such-set (train): ") and "HF_HUB_OFFLINE" in message
    assert "\n" not in message


def test_every_row_bad_under_skip_names_the_count_kinds_and_first_rows(tmp_path, qwen2_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "q"}\n{oops\n{"instruction": "q", "output": ""}\n{"instruction": 1}\n')
    with data_error(path, "all 4 rows are bad (1 empty_response, 1 invalid_json, 1 missing_field, 1 wrong_type; "
                    "first: ",
                    f"{path}:2: invalid JSON", f"; {path}:1: missing field 'output'"):
        build_datasets(qwen2_tokenizer, DataConfig(train=str(path), val_split=0.1, max_length=64, on_error="skip",
                                                   max_skip_fraction=1.0))


class SpyTokenizer:
    """The real tokenizer, recording the longest text it was asked to encode."""

    def __init__(self, tokenizer):
        self.__dict__["inner"], self.__dict__["longest"] = tokenizer, 0

    def __call__(self, text, **kwargs):
        texts = [text] if isinstance(text, str) else text
        self.__dict__["longest"] = max([self.longest] + [len(t) for t in texts])
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)


def test_a_row_of_megabytes_is_cut_before_it_is_tokenized(tmp_path, qwen2_tokenizer):
    spy, max_length = SpyTokenizer(qwen2_tokenizer), 32
    huge = "word " * 1_000_000  # 5 MB
    path = write_jsonl(tmp_path / "big.jsonl", [{"instruction": huge, "output": "a"}, ALPACA[0],
                                                {"instruction": "q", "output": huge}])
    train, _, stats = build_datasets(spy, DataConfig(train=path, val_split=0.0, max_length=max_length, on_error="skip",
                                                     max_skip_fraction=0.5))
    assert stats["train"].dropped_by_kind == {"too_long": 1} and len(train) == 2
    assert spy.longest < max_chars(qwen2_tokenizer, max_length) + 200 < len(huge)  # the template's text on top
    # the cut row keeps exactly the tokens the whole row would have kept
    middle = "word " * 20_000
    [cut], [whole] = (tokenize_rows(qwen2_tokenizer, load_conversations(write_jsonl(
        tmp_path / "m.jsonl", [{"instruction": "q", "output": text}])), max_length) for text in (huge, middle))
    assert cut == whole and cut["truncated"]


# --- mixtures -----------------------------------------------------------------------------------

def test_weights_repeat_or_draw_rows_and_validation_is_held_out_first(tmp_path, qwen2_tokenizer):
    tok = qwen2_tokenizer
    one = write_jsonl(tmp_path / "one.jsonl", ALPACA)
    two = write_jsonl(tmp_path / "two.jsonl", [{"instruction": f"x{i}", "output": f"reply {i}"} for i in range(10)])
    _, _, single = build_datasets(tok, DataConfig(train=[one, two], val_split=0.0, max_length=64))
    _, _, doubled = build_datasets(tok, DataConfig(train=[{"path": one, "weight": 2}, two], val_split=0.0,
                                                   max_length=64))
    tokens = [[s["target_tokens"] for s in stats["train"].sources] for stats in (single, doubled)]
    assert tokens[1] == [2 * tokens[0][0], tokens[0][1]] and tokens[0][0] > 0
    assert doubled["train"].target_tokens == 2 * tokens[0][0] + tokens[0][1]
    train, val, stats = build_datasets(tok, DataConfig(train=[{"path": one, "weight": 0.5}, {"path": two, "weight": 3}],
                                                            val_split=0.2, max_length=64), seed=1)
    held = {e["where"] for e in val}
    assert len(val) == 4 and not held & {e["where"] for e in train}  # 2 per source, never trained
    assert [s["examples"] for s in stats["train"].sources] == [4, 24]  # half of 8, three times 8
    assert weigh(list(range(6)), 0.5, 0) == weigh(list(range(6)), 0.5, 0) != weigh(list(range(6)), 0.5, 1)


def test_config_takes_lists_of_sources_and_checks_them():
    cfg = load_config(None, ["data.train=[a.jsonl, {path: b.parquet, weight: 2}]", "data.train_on=last"])
    assert cfg.data.train == ["a.jsonl", {"path": "b.parquet", "weight": 2}]
    with pytest.raises(ConfigError, match=r"data.train\[0\]: unknown source key 'wieght'; did you mean weight"):
        load_config(None, ["data.train=[{path: a.jsonl, wieght: 2}]"])
    with pytest.raises(ConfigError, match=r"data.train\[1\].weight=0 must be a number > 0"):
        load_config(None, ["data.train=[a.jsonl, {path: b.jsonl, weight: 0}]"])


# --- the tokenized cache ------------------------------------------------------------------------

def test_second_build_reads_the_cache_and_a_corrupt_entry_is_rebuilt(tmp_path, qwen2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA + [{"instruction": "long " * 80, "output": "a"}])
    cache = tmp_path / "cache"

    def build(**options):
        data = DataConfig(train=path, val_split=0.2, max_length=48, on_error="skip", max_skip_fraction=0.5)
        return build_datasets(qwen2_tokenizer, dataclasses.replace(data, **options), cache=cache)

    first = build()
    [entry] = list(cache.iterdir())
    again = build()
    assert again[2]["train"].sources[0]["cached"] and not first[2]["train"].sources[0]["cached"]
    assert [(e["input_ids"], e["labels"], e["where"]) for e in again[0] + again[1]] == \
        [(e["input_ids"], e["labels"], e["where"]) for e in first[0] + first[1]]
    assert again[2]["train"].dropped_by_kind == {"too_long": 1}
    with data_error(f"{path}:11", "prompt fills"):  # strict reads the entry's dropped row as an error
        build_datasets(qwen2_tokenizer, DataConfig(train=path, val_split=0.2, max_length=48), cache=cache)
    tokens = entry / "tokens.safetensors"
    tokens.write_bytes(tokens.read_bytes()[:-8])  # a truncated write
    assert load_entry(cache, entry.name)[1] == "tokens.safetensors does not match its checksum"
    rebuilt = build()
    assert not rebuilt[2]["train"].sources[0]["cached"] and load_entry(cache, entry.name)[0] is not None
    assert [e["input_ids"] for e in rebuilt[0]] == [e["input_ids"] for e in first[0]]
    build(train_on="last")  # anything that shapes the rows is part of the key
    assert len(list(cache.iterdir())) == 2


# --- end to end ---------------------------------------------------------------------------------

def test_a_mixture_of_every_source_kind_trains_through_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    pq.write_table(pa.Table.from_pylist([SHAREGPT] * 6), tmp_path / "s.parquet")
    (tmp_path / "c.csv").write_text("question,answer\n" + "".join(f"c{i},csv {i}\n" for i in range(6)))
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": f"m{i}"},
                                              {"role": "assistant", "content": f"saved {i}"}]} for i in range(6)]
                               ).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "repo").mkdir()
    write_jsonl(tmp_path / "repo" / "train.jsonl", ALPACA[:6])
    mixture = (f"data.train=[{tmp_path / 'a.jsonl'}, {{path: {tmp_path / 's.parquet'}, weight: 2}}, "
               f"{{path: {tmp_path / 'c.csv'}, columns: {{instruction: question, output: answer}}}}, "
               f"{tmp_path / 'saved'}, {{path: {tmp_path / 'repo'}, weight: 0.5}}]")
    overrides = [mixture, "data.val_split=0.2", "train.epochs=1", f"output_dir={tmp_path / 'out'}"]
    summary = run_training(overrides)
    assert summary["epochs_run"] == 1 and summary["train_tokens"] > 0
    assert len(list((tmp_path / "xdg" / "qlora_loop" / "data").iterdir())) == 5  # one cache entry per source
    prompts, references, where = validation_prompts(json.loads(json.dumps(
        {"data": load_config(None, [mixture, "data.val_split=0.2"]).data.__dict__, "train": {"seed": 42}})), 20)
    assert "validation rows" in where
    assert {"answer", "hello", "csv", "saved"} <= {r.split()[0] for r in references}
