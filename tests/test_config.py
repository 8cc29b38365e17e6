"""load_config: defaults <- YAML <- `key.path=value`, with errors that name the key, where it was
set and the fix; and every shipped config under configs/ loads and builds on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from qlora_loop.config import ASSETS, AdapterConfig, Config, ConfigError, DataConfig, ModelConfig, load_config
from qlora_loop.cpu import resolve_compute_dtype
from qlora_loop.data.examples import IGNORE
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.data.sources import load_conversations
from qlora_loop.model.adapter import add_adapter, find_linear4bit_targets
from qlora_loop.model.load import load_base_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# the real-model recipes; the tiny demo and the SmolLM2 dates example are tested apart
SEVEN_B = [p for p in CONFIGS if p.name not in ("tiny-demo.yaml", "smollm2-dates.yaml", "smollm2-dpo.yaml",
                                                 "smollm2-dates-grpo.yaml")]
SELF_COGNITION = ASSETS / "self_cognition.jsonl"

# The tiny fixture of each shipped config's architecture family. Baichuan2's own modeling code
# (trust_remote_code) lives on the hub, which tests cannot reach; its decoder is Llama-like, so
# tiny_llama stands in (the W_pack name itself is then not exercised, only `auto` targeting).
FAMILY = {
    "qwen2.5-7b-instruct.yaml": "tiny_qwen2",
    "qwen2.5-coder-7b-legal.yaml": "tiny_qwen2",
    "atom-7b-chat.yaml": "tiny_llama",
    "baichuan2-7b-chat-adalora.yaml": "tiny_llama",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- layering: defaults <- YAML <- overrides ----------------------------------------------------

def test_defaults_load_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name_or_path == "builtin:smollm2-135m-instruct"  # the embedded default: a real model
    assert cfg.data.train == str(ASSETS / "identity.jsonl") and cfg.data.replay > 0 and cfg.eval.drift_samples > 0
    assert cfg.train.lr == 1e-3 and cfg.adapter.kind == "lora"


def test_the_tiny_demo_config_is_the_fast_loop_without_replay_or_drift():
    cfg = load_config(ROOT / "configs" / "tiny-demo.yaml")
    assert cfg.model.name_or_path == "builtin:tiny-qwen2" and cfg.data.replay == 0 and cfg.eval.drift_samples == 0
    assert cfg.data.train == "qlora_loop/assets/self_cognition.jsonl" and (ROOT / cfg.data.train).is_file()


def test_yaml_values_override_the_defaults_and_leave_the_rest(tmp_path):
    path = write(tmp_path, "adapter:\n  r: 4\n  target_modules: [q_proj, v_proj]\n"
                           "train:\n  epochs: 2\n  lr: 0.01\ndata:\n  val: null\n  system_prompt: Be brief.\n")
    cfg = load_config(path)
    assert (cfg.adapter.r, cfg.adapter.target_modules) == (4, ["q_proj", "v_proj"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.system_prompt) == (2, 0.01, "Be brief.")
    assert cfg.train.batch_size == Config().train.batch_size  # untouched keys keep their default


def test_overrides_win_over_yaml(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.01\n  epochs: 2\n")
    cfg = load_config(path, ["train.lr=1e-4", "adapter.kind=adalora", "output_dir=runs/x"])
    assert (cfg.train.lr, cfg.train.epochs) == (1e-4, 2)
    assert (cfg.adapter.kind, cfg.output_dir) == ("adalora", "runs/x")


def test_exponents_without_a_dot_become_floats(tmp_path):
    # YAML 1.1 reads `2e-4` as the string "2e-4"; a float key must still get a float.
    path = write(tmp_path, "train:\n  lr: 2e-4\nadapter:\n  alpha: 16\n")
    cfg = load_config(path)
    assert type(cfg.train.lr) is float and cfg.train.lr == 2e-4
    assert type(cfg.adapter.alpha) is float and cfg.adapter.alpha == 16.0
    cfg = load_config(path, ["train.lr=1e-4"])
    assert type(cfg.train.lr) is float and cfg.train.lr == 1e-4


def test_a_section_with_every_key_commented_out_is_empty(tmp_path):
    path = write(tmp_path, "data:\n  # train: data/train.json\ntrain:\n  epochs: 2\n")
    cfg = load_config(path)
    assert cfg.data == Config().data and cfg.train.epochs == 2


# --- errors that name the key, where it was set, and the fix ----------------------------------------

@pytest.mark.parametrize("key", ["learning_rate", "lrr"])
def test_unknown_yaml_key_names_file_line_and_the_closest_key(tmp_path, key):
    path = write(tmp_path, f"train:\n  epochs: 2\n  {key}: 2e-4\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: unknown config key 'train.{key}'; did you mean train.lr\?"):
        load_config(path)


def test_unknown_override_key_suggests_the_closest_key():
    with pytest.raises(ConfigError, match=r"override 'train.lrr=1e-4'.*did you mean train.lr\?"):
        load_config(None, ["train.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"did you mean adapter.alpha\?"):
        load_config(None, ["adapter.lora_alpha=16"])


@pytest.mark.parametrize("line, expected", [
    ("batch_size: four", "an integer"),
    ("epochs: 2.5", "an integer"),
    ("lr: fast", "a number"),
    ("lr: true", "a number"),  # a bool is not a number here, though Python says it is an int
])
def test_wrong_type_names_key_file_line_and_expected_type(tmp_path, line, expected):
    path = write(tmp_path, f"model:\n  name_or_path: x\ntrain:\n  {line}\n")
    key = "train." + line.split(":")[0]
    with pytest.raises(ConfigError, match=rf"{path}:4: {key} must be {expected}, got "):
        load_config(path)


def test_wrong_type_in_an_override_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'adapter.target_modules=3': adapter.target_modules must be "
                                          r"a string or a list of strings"):
        load_config(None, ["adapter.target_modules=3"])


def test_invalid_choice_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"adapter.kind='qlora' is not one of lora, adalora"):
        load_config(None, ["adapter.kind=qlora"])


@pytest.mark.parametrize("override, message", [
    ("adapter.dropout=1.5", r"adapter.dropout=1.5 must be in \[0, 1\)"),
    ("train.batch_size=0", r"train.batch_size=0 must be > 0"),
    ("train.lr=-1e-4", r"train.lr=-0.0001 must be > 0"),
    ("train.lr=nan", r"train.lr=nan must be > 0"),  # NaN fails every comparison, so it needs its own test
    ("train.patience=-1", r"train.patience=-1 must be >= 0"),
])
def test_out_of_range_value_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_monitoring_val_loss_needs_validation_data():
    with pytest.raises(ConfigError, match=r"train.monitor=val_loss needs validation data.*data.val"):
        load_config(None, ["data.val_split=0"])
    assert load_config(None, ["data.val_split=0", "train.monitor=train_loss"]).train.monitor == "train_loss"
    assert load_config(None, ["data.val_split=0", "data.val=val.jsonl"]).data.val == "val.jsonl"


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: [1e-4, 2e-4\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: not valid YAML"):
        load_config(path)


def test_a_key_set_twice_names_both_lines(tmp_path):
    # PyYAML keeps the last of two equal keys; editing the first would silently do nothing.
    path = write(tmp_path, "train:\n  lr: 1e-4\n  epochs: 2\n  lr: 2e-4\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: train.lr is set twice \(also on line 2\)"):
        load_config(path)


def test_a_section_given_a_value_says_to_set_its_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml:1: train is a section, not a value; set its keys, e.g. train\."):
        load_config(write(tmp_path, "train: 5\n"))


@pytest.mark.parametrize("override", ["train.lr", "=3"])
def test_malformed_override_shows_the_expected_form(override):
    with pytest.raises(ConfigError, match=r"expected key.path=value"):
        load_config(None, [override])


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.yaml")


# --- the shipped configs ----------------------------------------------------------------------------

def test_every_shipped_config_has_a_tiny_family():
    assert CONFIGS, "configs/ holds no *.yaml"
    assert {p.name for p in SEVEN_B} == set(FAMILY), "add each new config to FAMILY with its tiny fixture"


def test_the_dates_example_scores_exact_match_and_holds_out_dates_it_never_trains(monkeypatch):
    path = ROOT / "configs" / "smollm2-dates.yaml"
    assert path.read_text(encoding="utf-8").startswith(
        "# accelerate launch scripts/train.py --config configs/smollm2-dates.yaml\n")
    monkeypatch.chdir(ROOT)  # its data path is relative to the checkout, as the README runs it
    cfg = load_config(path)
    assert cfg.model.name_or_path == "builtin:smollm2-135m-instruct"
    assert (cfg.eval.metrics, cfg.train.monitor, cfg.train.mode) == (["exact_match"], "exact_match", "max")
    read = [[json.loads(line) for line in (ASSETS / name).read_text(encoding="utf-8").splitlines()]
            for name in ("dates_train.jsonl", "dates_heldout.jsonl")]
    assert Path(cfg.data.train).resolve() == ASSETS / "dates_train.jsonl"
    assert [len(rows) for rows in read] == [80, 40]
    assert not {r["instruction"] for r in read[0]} & {r["instruction"] for r in read[1]}


def test_the_dpo_example_trains_pairs_and_holds_out_other_kinds_of_question(monkeypatch):
    path = ROOT / "configs" / "smollm2-dpo.yaml"
    assert path.read_text(encoding="utf-8").startswith(
        "# accelerate launch scripts/train.py --config configs/smollm2-dpo.yaml\n")
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    assert (cfg.train.objective, cfg.train.monitor, cfg.train.mode) == ("dpo", "reward_accuracy", "max")
    read = [[json.loads(line) for line in (ASSETS / name).read_text(encoding="utf-8").splitlines()]
            for name in ("style_train.jsonl", "style_heldout.jsonl")]
    assert Path(cfg.data.train).resolve() == ASSETS / "style_train.jsonl"
    assert all(r["chosen"].startswith("In short: ") and not r["rejected"].startswith("In short")
               for rows in read for r in rows)
    assert not {r["prompt"] for r in read[0]} & {r["prompt"] for r in read[1]}


def test_the_grpo_example_continues_a_brief_sft_adapter_on_the_dates_prompts(monkeypatch):
    path = ROOT / "configs" / "smollm2-dates-grpo.yaml"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# accelerate launch scripts/train.py --config configs/smollm2-dates-grpo.yaml\n")
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    assert (cfg.train.objective, cfg.train.rewards, cfg.train.monitor, cfg.train.mode) == \
        ("grpo", ["exact_match"], "reward", "max")
    assert cfg.data.columns == {"prompt": "instruction", "answer": "output"}
    assert Path(cfg.data.train).resolve() == ASSETS / "dates_train.jsonl"
    assert f"output_dir={cfg.adapter.init_from.removesuffix('/best')}" in text  # the SFT command it continues


@pytest.mark.parametrize("path", SEVEN_B, ids=lambda p: p.name)
def test_shipped_config_loads_and_starts_with_its_command(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and f"scripts/train.py --config configs/{path.name}" in first
    cfg = load_config(path)
    assert not cfg.model.name_or_path.startswith("builtin:")
    assert cfg.data.train != str(SELF_COGNITION)  # points at the user's data


@pytest.mark.parametrize("name, expected", [
    ("atom-7b-chat.yaml", "<s>Human: S\nQ1\n</s><s>Assistant: A1\n</s><s>Human: Q2\n</s><s>Assistant: "),
    ("baichuan2-7b-chat-adalora.yaml", "S<reserved_106>Q1<reserved_107>A1</s><reserved_106>Q2<reserved_107>"),
])
def test_shipped_chat_templates_render_the_model_format(tiny_llama, name, expected):
    cfg = load_config(ROOT / "configs" / name)
    tokenizer = load_tokenizer(str(tiny_llama), chat_template=cfg.data.chat_template)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


@pytest.mark.parametrize("path", SEVEN_B, ids=lambda p: p.name)
def test_shipped_config_builds_data_and_adapter_on_a_tiny_model(path, request, tmp_path):
    tiny = request.getfixturevalue(FAMILY[path.name])
    cfg = load_config(path, [f"model.name_or_path={tiny}", "model.trust_remote_code=false",
                             f"data.train={SELF_COGNITION}", f"output_dir={tmp_path}"])

    # data: the label mask trains exactly the assistant turns, closed by the end-of-turn token
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                               revision=cfg.model.revision, chat_template=cfg.data.chat_template)
    # val_split 0 (not the config's) keeps the file's first row first.
    train_rows, _, _ = build_datasets(tokenizer, dataclasses.replace(cfg.data, val_split=0.0),
                                      seed=cfg.train.seed)
    first = load_conversations(cfg.data.train, cfg.data.system_prompt)[0].messages
    trained = tokenizer.decode([t for t in train_rows[0]["labels"] if t != IGNORE])
    for message in first:
        assert (message["content"] in trained) == (message["role"] == "assistant"), (message, trained)
    assert trained.endswith(tokenizer.eos_token), trained

    # model: 4-bit base + adapter, built as scripts/train.py builds them
    dtype, _ = resolve_compute_dtype(cfg.model.compute_dtype, torch.device("cpu"))
    torch.manual_seed(0)
    base = load_base_model(cfg.model.name_or_path, torch.device("cpu"), dtype,
                           config=cfg.model, gradient_checkpointing=cfg.model.gradient_checkpointing)
    linear4bit = {name for name, module in base.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    a = cfg.adapter
    targets = find_linear4bit_targets(base) if a.target_modules == "auto" else a.target_modules
    model = add_adapter(base, dataclasses.replace(a, target_modules=targets), total_steps=100)

    peft_config = model.peft_config["default"]
    assert peft_config.peft_type.value == a.kind.upper()
    if a.kind == "adalora":
        assert (peft_config.target_r, peft_config.init_r) == (a.r, math.ceil(1.5 * a.r))
    else:
        assert peft_config.r == a.r
    assert (peft_config.lora_alpha, peft_config.lora_dropout) == (a.alpha, a.dropout)
    wrapped = {name.removeprefix("base_model.model.") for name, module in model.named_modules()
               if isinstance(module, BaseTunerLayer)}
    # every Linear4bit: 7 projections in each of the tiny model's 2 layers; lm_head stays as it is
    assert wrapped == linear4bit and len(wrapped) == 14
    assert {name.split(".")[-1] for name in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"}
    assert not any(name.endswith("lm_head") for name in wrapped)


def test_override_value_that_is_not_yaml_names_the_override_and_how_to_quote():
    with pytest.raises(ConfigError, match=r"override 'eval.prompts=\[Who are you\?\]': the value is not valid YAML .*"
                                          r"quote it"):
        load_config(None, ["eval.prompts=[Who are you?]"])
    assert load_config(None, ['eval.prompts=["Who are you?"]']).eval.prompts == ["Who are you?"]


def test_yaml_booleans_read_as_the_word_a_string_key_expects_or_ask_for_quotes(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML reads `no` as false
    assert load_config(write(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"override 'model.compute_dtype=on': model.compute_dtype takes a string, "
                                          r"and YAML read this value as True; quote it"):
        load_config(None, ["model.compute_dtype=on"])


def test_a_seed_numpy_and_torch_cannot_take_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.seed=-1 must be in \[0, 2\*\*32\)"):
        load_config(None, ["train.seed=-1"])


def test_a_value_from_the_file_that_fails_validation_names_its_file_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n  seed: -1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: train\.seed=-1 must be in \[0, 2\*\*32\)"):
        load_config(path)
    path = write(tmp_path, "train:\n  monitor: val_loss\ndata:\n  val_split: 0\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2: train\.monitor=val_loss needs validation"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^train\.seed=-2 must be"):  # an override names itself
        load_config(path, ["train.seed=-2", "data.val_split=0.1"])
