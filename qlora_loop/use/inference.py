"""Loading what a run trained, for chat, merge and export: the adapter, its base and its run.

`load_for_inference` rebuilds what training saw: the base the adapter records (4-bit NF4, through
`model.load.load_base_model`), the tokenizer saved beside the adapter, then the adapter with plain peft.
Every check that needs no weights (the folder, the base's config, the architecture) runs first.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from qlora_loop.config import ModelConfig, TrainConfig
from qlora_loop.cpu import resolve_compute_dtype
from qlora_loop.data.mixtures import held_out_conversations
from qlora_loop.data.preference import answer_conversations
from qlora_loop.errors import InferenceError, ModelError, not_utf8
from qlora_loop.manifest import check_manifest, read_manifest
from qlora_loop.model.builtin import check_weights, resolve_model_path
from qlora_loop.model.generate import held_out_prompts
from qlora_loop.model.load import load_base_model, load_tokenizer


def read_adapter_config(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InferenceError(f"--adapter {adapter_dir}: no such folder; give the adapter folder a run wrote, "
                             "e.g. OUTPUT_DIR/best")
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        hint = f"; did you mean {adapter_dir / 'best'}?" if (adapter_dir / "best" / "adapter_config.json").is_file() \
            else "; give the adapter folder a run wrote, e.g. OUTPUT_DIR/best"
        raise InferenceError(f"--adapter {adapter_dir}: no adapter_config.json in it{hint}")
    return json.loads(config.read_text(encoding="utf-8"))


def run_config(adapter_dir: str | Path | None) -> dict:
    """The resolved config of the run that wrote the adapter (OUTPUT_DIR/config.yaml next to
    OUTPUT_DIR/best), or {} for an adapter that left its run behind."""
    path = Path(adapter_dir).parent / "config.yaml" if adapter_dir else None
    if path is None or not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def resolve_base(adapter_dir: str | Path | None, base: str | None = None) -> tuple[str, str]:
    """(base to load, where that came from). `base` (the --base flag) wins over the adapter's record."""
    if base is not None:
        return resolve_model_path(base), "--base"
    if adapter_dir is None:
        raise InferenceError("give --adapter DIR, or --base MODEL with --no-adapter")
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not recorded:
        raise InferenceError(f"{adapter_dir}/adapter_config.json records no base_model_name_or_path; pass --base")
    return recorded, f"recorded in {Path(adapter_dir) / 'adapter_config.json'}"


def base_config(name: str, source: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """The base's config.json, or one clear line on why it cannot be had (checked before any weights load)."""
    looks_local = name.startswith(("/", "./", "../", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise InferenceError(f"base model {name} ({source}): no such folder; pass --base with the model the "
                             "adapter was trained on")
    if looks_local:
        check_weights(name)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise InferenceError(f"base model {name!r} ({source}) cannot be found: {str(e).splitlines()[0]} "
                             "Download it, or pass --base with a local folder") from None


def check_architecture(adapter_dir: Path, recorded: str, base: str, config, *, trust_remote_code: bool = False) -> None:
    """An adapter fits only the architecture it was trained on. Module names (q_proj, ...) and even
    shapes can coincide across architectures, so peft would load it silently; compare model types
    whenever the recorded base is at hand (a local folder or the hub cache), else with the model type
    the run's manifest recorded."""
    if not recorded or Path(recorded) == Path(base):
        return
    try:
        model_type = AutoConfig.from_pretrained(recorded, trust_remote_code=trust_remote_code,
                                                local_files_only=True).model_type
    except (OSError, ValueError):  # gone, or never local: what the manifest recorded of it
        model_type = (read_manifest(adapter_dir) or {}).get("base", {}).get("model_type")
    if model_type and model_type != config.model_type:
        raise InferenceError(f"the adapter in {adapter_dir} was trained on a {model_type} model ({recorded}), "
                             f"but the base {base} is a {config.model_type} model; pass --base with a "
                             f"{model_type} model, ideally the one it was trained on")


def check_adapter_weights(adapter_dir: str | Path) -> None:
    """Read the adapter's safetensors header before any model is loaded: a file cut short (a copy
    that stopped, a full disk) or not safetensors at all is one line, not peft's traceback."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise InferenceError(f"{adapter_dir} has no adapter_model.safetensors; give an adapter folder written by "
                             "qlora_loop (OUTPUT_DIR/best) or by peft's save_pretrained")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise InferenceError(f"{path} is damaged ({str(e).splitlines()[0]}): it was cut short or is not a "
                             "safetensors file; copy the adapter folder again from where it was trained") from None


@dataclass
class Base:
    """Where the base comes from and how training loaded it (from the run's config.yaml when at hand)."""
    name: str  # what from_pretrained gets
    source: str  # "--base" or "recorded in .../adapter_config.json", for messages
    trust_remote_code: bool = False
    revision: str | None = None
    compute_dtype: str = "auto"
    attn_implementation: str | None = None
    quant_storage: str | None = None
    trained_dtype: str | None = None  # what compute_dtype resolved to where the adapter was trained (its manifest)

    def model_config(self) -> ModelConfig:
        return ModelConfig(trust_remote_code=self.trust_remote_code, revision=self.revision,
                           attn_implementation=self.attn_implementation, quant_storage=self.quant_storage)

    def dtype(self, device: torch.device, *, as_trained: bool = False) -> tuple[torch.dtype, str]:
        """(compute dtype, why): the one training used with `as_trained` (merge and export rebuild what
        was trained) when the manifest records it, else model.compute_dtype resolved for `device`."""
        if as_trained and self.trained_dtype:
            return getattr(torch, self.trained_dtype), "the dtype the adapter was trained in (its manifest.json)"
        return resolve_compute_dtype(self.compute_dtype, device)


def locate_base(adapter_dir: str | Path | None, base: str | None = None,
                trust_remote_code: bool | None = None) -> Base:
    """Every check that needs no weights: the adapter folder, the base's config, the architecture."""
    if adapter_dir is not None:
        read_adapter_config(adapter_dir)  # fails early on a missing or wrong folder
        check_adapter_weights(adapter_dir)
    model_cfg = run_config(adapter_dir).get("model", {})
    name, source = resolve_base(adapter_dir, base)
    found = Base(name, source,
                 model_cfg.get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code,
                 model_cfg.get("revision") if base is None else None,  # a revision of the recorded base only
                 model_cfg.get("compute_dtype", "auto"), model_cfg.get("attn_implementation"),
                 model_cfg.get("quant_storage") if base is None else None,
                 ((read_manifest(adapter_dir) or {}).get("quantization") or {}).get("compute_dtype")
                 if adapter_dir is not None else None)
    config = base_config(name, source, trust_remote_code=found.trust_remote_code, revision=found.revision)
    if adapter_dir is not None:
        recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
        check_architecture(Path(adapter_dir), recorded, name, config, trust_remote_code=found.trust_remote_code)
    return found


def load_inference_tokenizer(adapter_dir: str | Path | None, base: Base):
    """The tokenizer saved with the adapter (chat template as trained), else the base's."""
    try:
        if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
            return load_tokenizer(str(adapter_dir), trust_remote_code=base.trust_remote_code)
        return load_tokenizer(base.name, trust_remote_code=base.trust_remote_code, revision=base.revision)
    except ModelError as e:
        raise InferenceError(f"base model {base.name!r} ({base.source}): {str(e).split(': ', 1)[-1]}") from None


def attach_adapter(model, adapter_dir: str | Path, base: Base):
    from peft import PeftModel  # peft's import is slow; chat's --help should not pay for it

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, target modules not found
        raise InferenceError(f"the adapter in {adapter_dir} does not fit the base {base.name}: "
                             f"{str(e).strip().splitlines()[0]}") from None


def load_for_inference(adapter_dir: str | Path | None = None, base: str | None = None, *, no_adapter: bool = False,
                       device: torch.device | None = None, trust_remote_code: bool | None = None,
                       as_trained: bool = False):
    """(model, tokenizer) in eval mode with the KV cache on: the base in 4-bit NF4 as training loaded
    it without autocast (weights beside the 4-bit ones in float32), plus the adapter unless
    `no_adapter`. The tokenizer (and its chat template) is the one saved with the adapter, so prompts
    render as in training. `as_trained`: in the compute dtype training used (Base.dtype), not this
    machine's own choice: the reference merge and export are measured against."""
    found = locate_base(adapter_dir, base, trust_remote_code)
    tokenizer = load_inference_tokenizer(adapter_dir, found)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_base_model(found.name, device, found.dtype(device, as_trained=as_trained)[0],
                                config=found.model_config(), gradient_checkpointing=False)
    except ModelError as e:
        raise InferenceError(f"base model {found.name!r} ({found.source}): {str(e).split(': ', 1)[-1]}") from None
    if adapter_dir is not None and not no_adapter:
        model = attach_adapter(model, adapter_dir, found)
        for mismatch in check_manifest(adapter_dir, tokenizer, found.name):  # another base or template
            warnings.warn(mismatch, stacklevel=2)
    model.config.use_cache = True
    model.eval()
    return model, tokenizer


# --- prompts ------------------------------------------------------------------------------------

def read_prompt_lines(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"--prompts {path}: no such file; give a text file with one prompt per line")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InferenceError(f"--prompts {not_utf8(path, raw, e)}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InferenceError(f"--prompts {path}: no prompts in it; write one per line")
    return lines


def validation_prompts(run: dict, n: int, tokenizer=None) -> tuple[list[list[dict]], list[str], str] | None:
    """(prompts, reference answers, where from) for the first n validation rows of a run with distinct
    prompts, given its resolved config as a dict (OUTPUT_DIR/config.yaml, or config.to_dict(cfg));
    None if it names no data. Each row is cut before its first assistant turn, which becomes the
    reference. The rows are read and split as data.mixtures.build_datasets reads and splits them, so they are
    the rows the run held out; with the run's `tokenizer`, from the run's tokenized cache."""
    data, seed = run.get("data"), run.get("train", {}).get("seed", TrainConfig.seed)
    if not data:
        return None
    objective = run.get("train", {}).get("objective", "sft")
    rows, source = held_out_conversations(data, seed, tokenizer,
                                          read=None if objective == "sft" else answer_conversations(objective))
    prompts, references = held_out_prompts([{"messages": row.messages} for row in rows], n)
    return prompts, references, source
