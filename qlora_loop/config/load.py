"""YAML file <- `key.path=value` overrides -> Config, checked key by key, then validated; data.train /
data.val as checked SourceConfigs; the config as a dict and as flat `section.key` pairs."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from qlora_loop.config.checks import check_monitor, check_objective, check_variants
from qlora_loop.config.sections import CHOICES, Config, SourceConfig
from qlora_loop.errors import ConfigError, not_utf8


# Names other trainers use (transformers' TrainingArguments, peft) that string similarity alone
# maps to the wrong key (difflib suggests train.warmup_ratio for learning_rate).
ALIASES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "lora_r": "adapter.r", "lora_alpha": "adapter.alpha", "lora_dropout": "adapter.dropout",
    "max_seq_length": "data.max_length", "cutoff_len": "data.max_length",
}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `key.path=value` overrides, checked key by key, then validated."""
    cfg, in_file = Config(), {}  # in_file: key -> "file:line" of the keys the file set (and no override did)
    if path is not None:
        data, lines = _read_yaml(Path(path))
        for key, value in _flatten(data):
            in_file[key] = f"{path}:{lines.get(key, '?')}"
            _set(cfg, key, value, where=in_file[key])
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); quote "
                              f"it, e.g. '{key}=\"...\"' or '{key}=[\"a b\", c]'") from None
        _set(cfg, key.strip(), value, where=f"override {item!r}")
        in_file.pop(key.strip(), None)
    try:
        validate(cfg)
    except ConfigError as e:  # a value from the file: say where it is
        named = sorted((str(e).find(key), key) for key in in_file if re.search(rf"\b{re.escape(key)}\b", str(e)))
        if named:
            raise ConfigError(f"{in_file[named[0][1]]}: {e}") from None
        raise
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express. Raises ConfigError naming key and fix."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(a or 'null' for a in allowed)}")
    positive = ["adapter.r", "data.max_length", "train.epochs", "train.batch_size", "train.grad_accum",
                "train.lr", "adapter.delta_t", "train.log_every"]
    for key in positive:
        if not _get(cfg, key) > 0:  # written so that NaN fails too
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in ["adapter.dropout", "data.val_split", "train.warmup_ratio", "adapter.tinit", "adapter.tfinal"]:
        if not 0 <= _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be in [0, 1)")
    for key in ["train.max_grad_norm", "train.weight_decay", "train.patience", "train.eval_every",
                "adapter.orth_reg_weight", "data.num_workers", "train.save_every", "train.keep_last",
                "train.skip_nonfinite", "data.audit_rows", "eval.num_samples", "eval.max_new_tokens", "data.replay",
                "eval.drift_samples"]:
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    if cfg.adapter.kind == "adalora":
        if cfg.adapter.tinit + cfg.adapter.tfinal >= 1:
            raise ConfigError(
                f"adapter.tinit + adapter.tfinal = {cfg.adapter.tinit + cfg.adapter.tfinal:g} leaves AdaLoRA no "
                "steps to reallocate its rank budget; keep the sum below 1 (e.g. tinit=0.1 tfinal=0.2)")
        if cfg.adapter.init_r is not None and cfg.adapter.init_r < cfg.adapter.r:
            raise ConfigError(f"adapter.init_r={cfg.adapter.init_r} is below adapter.r={cfg.adapter.r}: AdaLoRA "
                              "only shrinks ranks; set adapter.init_r >= adapter.r or leave it unset (1.5 x r)")
    if not 0 <= cfg.train.seed < 2**32:
        raise ConfigError(f"train.seed={cfg.train.seed} must be in [0, 2**32), as numpy's and torch's seeds are")
    for key in ["data.replay_max_new_tokens", "eval.drift_max_new_tokens", "eval.metrics_max_new_tokens"]:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in ["train.global_batch_size", "train.memory_budget_gib"]:
        if _get(cfg, key) is not None and not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0, or null")
    threads = cfg.train.cpu_threads
    if threads != "auto" and (isinstance(threads, str) or isinstance(threads, bool) or not threads > 0):
        raise ConfigError(f"train.cpu_threads={threads!r} must be auto or a number of threads > 0")
    if cfg.model.gradient_checkpointing not in (True, False, "auto"):
        raise ConfigError(f"model.gradient_checkpointing={cfg.model.gradient_checkpointing!r} must be true, false "
                          "or auto")
    if cfg.train.max_drift is not None and not cfg.train.max_drift >= 0:
        raise ConfigError(f"train.max_drift={cfg.train.max_drift!r} must be >= 0, or null")
    if cfg.train.max_drift is not None and not cfg.eval.drift_samples:
        raise ConfigError("train.max_drift needs the drift measured: set eval.drift_samples > 0, or "
                          "train.max_drift=null")
    if not all(isinstance(a, str) and isinstance(b, str) for a, b in cfg.data.columns.items()):
        raise ConfigError(f"data.columns={cfg.data.columns!r} must map our field names to the source's, e.g. "
                          "{output: answer}")
    source_configs(cfg.data.train, "data.train", columns=cfg.data.columns)
    if cfg.data.val is not None:
        source_configs(cfg.data.val, "data.val", columns=cfg.data.columns)
    if not 0 <= cfg.data.max_skip_fraction <= 1:
        raise ConfigError(f"data.max_skip_fraction={cfg.data.max_skip_fraction!r} must be in [0, 1]")
    check_monitor(cfg)
    check_objective(cfg)
    check_variants(cfg)
    if isinstance(cfg.adapter.target_modules, str) and cfg.adapter.target_modules != "auto":
        raise ConfigError(f"adapter.target_modules={cfg.adapter.target_modules!r}: use auto or a list of "
                          "module names, e.g. [q_proj, v_proj]")


def source_configs(spec: str | dict | list, key: str = "data.train", *, fmt: str = "auto",
                   columns: dict | None = None) -> list[SourceConfig]:
    """data.train / data.val as SourceConfigs, checked: a path, a mapping, or a list of either. A
    source's format and columns default to data.format and data.columns."""
    entries = spec if isinstance(spec, list) else [spec]
    if not entries:
        raise ConfigError(f"{key}=[] names no source; give a path, or a list of paths or mappings")
    fields = [f.name for f in dataclasses.fields(SourceConfig)]
    sources = []
    for k, entry in enumerate(entries):
        at = f"{key}[{k}]" if isinstance(spec, list) else key
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ConfigError(f"{at}={entry!r}: a source is a path, or a mapping with a path, e.g. "
                              "{path: data.jsonl, weight: 2}")
        for name in entry:
            if name not in fields:
                close = difflib.get_close_matches(str(name), fields, n=1)
                raise ConfigError(f"{at}: unknown source key {name!r}; "
                                  + (f"did you mean {close[0]}?" if close else f"valid: {', '.join(fields)}"))
        source = SourceConfig(**entry)
        if isinstance(source.columns or {}, dict):
            source.columns = {**(columns or {}), **(source.columns or {})}
        checks = [(isinstance(source.weight, (int, float)) and not isinstance(source.weight, bool)
                   and source.weight > 0, "weight", "a number > 0"),
                  (source.format in (None, *CHOICES["data.format"]), "format", "alpaca, messages, sharegpt or auto"),
                  (isinstance(source.columns, dict) and all(isinstance(a, str) and isinstance(b, str)
                                                            for a, b in source.columns.items()),
                   "columns", "a mapping of our field names to the source's, e.g. {output: answer}"),
                  (source.max_rows is None or (isinstance(source.max_rows, int) and source.max_rows > 0),
                   "max_rows", "an integer > 0, or null")]
        checks += [(getattr(source, name) is None or isinstance(getattr(source, name), str), name, "a string")
                   for name in ("split", "name", "revision")]
        for ok, name, what in checks:
            if not ok:
                raise ConfigError(f"{at}.{name}={getattr(source, name)!r} must be {what}")
        source.weight, source.format = float(source.weight), source.format or fmt
        sources.append(source)
    return sources


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def key_paths(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable key, e.g. ['model.name_or_path', ..., 'output_dir']."""
    paths = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            paths += key_paths(hint, f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths


# --- reading YAML with line numbers -------------------------------------------------------------

def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(not_utf8(path, raw, e)) from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{at}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of keys (model:, adapter:, data:, train:)")
    lines: dict[str, int] = {}
    _key_lines(node, "", lines, path)
    return data, lines


def _key_lines(node: yaml.Node, prefix: str, out: dict[str, int], path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in out:  # PyYAML keeps the last value silently, so an edit to the first would be ignored
                raise ConfigError(f"{path}:{line}: {key} is set twice (also on line {out[key]}); keep one")
            out[key] = line
            _key_lines(value_node, key + ".", out, path)


def flat_config(config: dict) -> dict[str, Any]:
    """{'train': {'lr': 1e-4}, 'output_dir': 'x'} -> {'train.lr': 1e-4, 'output_dir': 'x'}: the key
    paths of a config dict (to_dict, or a run's config.yaml); a dict-valued key such as adapter.extra
    stays one value."""
    return dict(_flatten(config))


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """{'train': {'lr': 1}} -> [('train.lr', 1)]; a section's dict is descended, a dict-typed value is not."""
    items = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if _is_section(path) and value is None:
            continue  # a section whose keys are all commented out
        if isinstance(value, dict) and _is_section(path):
            items += _flatten(value, path + ".")
        else:
            items.append((path, value))
    return items


def _is_section(path: str) -> bool:
    return dataclasses.is_dataclass(typing.get_type_hints(Config).get(path))


# --- setting one key with a type check -----------------------------------------------------------

def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    valid = key_paths()
    if _is_section(key):
        raise ConfigError(f"{where}: {key} is a section, not a value; set its keys, e.g. "
                          f"{next(k for k in valid if k.startswith(key + '.'))}")
    if key not in valid:
        alias = ALIASES.get(key.split(".")[-1])
        close = [alias] if alias else difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(valid)}"
        raise ConfigError(f"{where}: unknown config key {key!r}{hint}")
    *parents, name = key.split(".")
    obj = cfg
    for part in parents:
        obj = getattr(obj, part)
    hint = typing.get_type_hints(type(obj))[name]
    setattr(obj, name, _coerce(value, hint, key, where))


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if isinstance(value, bool) and bool not in options and str in options:
        # YAML 1.1 reads no/yes/on/off as booleans; a key that takes strings meant the word
        if not value and "no" in CHOICES.get(key, ()):
            return "no"
        raise ConfigError(f"{where}: {key} takes a string, and YAML read this value as {value}; quote it, "
                          f"e.g. {key}: \"{'on' if value else 'off'}\"")
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _is_number(value):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool, dict) and isinstance(value, option):
            return value
        if typing.get_origin(option) is list and isinstance(value, list) and all(
                isinstance(v, typing.get_args(option)[0]) for v in value):  # list[str]; data.train's list[str | dict]
            return value
    expected = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{where}: {key} must be {expected}, got {value!r} ({type(value).__name__})")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(t: Any) -> str:
    if t is type(None):
        return "null"
    if typing.get_origin(t) is list:
        return "a list of strings" if typing.get_args(t) == (str,) else "a list of strings or mappings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "a mapping"}[t]


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
