"""Run manifest: what an adapter was trained with, written as manifest.json into every adapter
folder (best/ and each checkpoint), and compared when the adapter is loaded again.

It records the package versions, the device, a hash of the config, hashes of the data files, a
hash of the chat template, the special tokens, the base model (name, architecture, and a
fingerprint of its files when they are local) and the git commit of the code. Loading an adapter
(chat, merge, resume) calls check_manifest, which warns on a mismatch that changes what the
adapter means: a different base model, a different chat template or special tokens.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path

import torch

from qlora_loop.config import flat_config
from qlora_loop.files import sha256_file

FILE = "manifest.json"
FORMAT = 1
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "qlora_loop")
# Keys that steer the run but not what it learns; they are left out of the config hash, so a
# resume with train.resume=auto or more epochs keeps the hash.
RUN_CONTROL = ("output_dir", "train.resume", "train.force_resume", "train.epochs", "train.log_with",
               "train.log_every", "train.save_every", "train.keep_last", "data.audit_rows", "data.num_workers",
               "eval.prompts", "eval.num_samples", "eval.max_new_tokens")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SAMPLE_BYTES = 1 << 16  # bytes read from the middle of each weights file for the fingerprint


def build_manifest(config: dict, tokenizer, base: str, *, data_files: list[str | None] = (),
                   device: torch.device | None = None, quantization: dict | None = None) -> dict:
    """Everything worth recording about a run, computed once at its start (it hashes the data).
    `quantization`: model.load.quantization_of the loaded base; its compute dtype (model.compute_dtype
    as resolved on this machine) fixes the weights the adapter was trained against, which merge and
    export rebuild."""
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": describe_device(device),
        "config_hash": config_hash(config),
        "data": {str(path): sha256_file(path)[:16] for path in data_files if path is not None},
        "base": {**describe_base(base, config.get("model", {}).get("name_or_path", base)),
                 "gguf_file": config.get("model", {}).get("gguf_file")},
        "quantization": quantization,
        "chat_template_hash": text_hash(tokenizer.chat_template),
        "special_tokens": special_tokens(tokenizer),
        "git": git_state(Path(str(resources.files("qlora_loop"))).resolve().parent),  # the checkout holding the package
    }


def write_manifest(directory: str | Path, manifest: dict) -> Path:
    """Write manifest.json into `directory` (an adapter folder being written)."""
    path = Path(directory) / FILE
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_manifest(adapter_dir: str | Path, tokenizer=None, base: str | None = None) -> list[str]:
    """Warnings, one line each, for what differs between the adapter's manifest and what it is being
    loaded with: the base model (`base`, a hub id or folder) and the tokenizer (chat template and
    special tokens). An empty list: nothing that matters differs."""
    recorded = read_manifest(adapter_dir)
    if recorded is None:
        return [f"{adapter_dir} has no readable {FILE} (written by an older version or another tool): "
                "cannot check that the base model and chat template are the ones it was trained with"]
    warnings = []
    if base is not None:
        warnings += _compare_base(recorded.get("base", {}), describe_base(base, base), adapter_dir)
    if tokenizer is not None:
        if recorded.get("chat_template_hash") != text_hash(tokenizer.chat_template):
            warnings.append(f"the chat template differs from the one the adapter in {adapter_dir} was trained with: "
                            "prompts will be rendered differently from training; use the tokenizer saved beside "
                            "the adapter, or the run's data.chat_template")
        now = special_tokens(tokenizer)
        for name, was in recorded.get("special_tokens", {}).items():
            if now.get(name) != was:
                warnings.append(f"the tokenizer's {name} is {now.get(name)!r}, but the adapter in {adapter_dir} was "
                                f"trained with {was!r}: it learned to stop on a different token")
    return warnings


def _compare_base(was: dict, now: dict, adapter_dir) -> list[str]:
    trained_on = was.get("name") or "?"
    if was.get("model_type") and now.get("model_type") and was["model_type"] != now["model_type"]:
        return [f"the adapter in {adapter_dir} was trained on a {was['model_type']} model ({trained_on}), but the "
                f"base being loaded, {now['name']}, is a {now['model_type']} model"]
    if was.get("fingerprint") and now.get("fingerprint"):
        if was["fingerprint"] != now["fingerprint"]:
            return [f"the base {now['name']} is not the model the adapter in {adapter_dir} was trained on "
                    f"({trained_on}): its files differ; the adapter's update assumes the weights it was trained on"]
        return []
    if was.get("name") not in (now.get("name"), now.get("path")) and was.get("path") != now.get("path"):
        return [f"the adapter in {adapter_dir} was trained on {trained_on}, but the base being loaded is "
                f"{now['name']}; check it is the same model"]
    return []


# --- the pieces ---------------------------------------------------------------------------------

def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_device(device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "count": 1}


def config_hash(config: dict) -> str:
    kept = {k: v for k, v in flat_config(config).items() if k not in RUN_CONTROL}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def text_hash(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else None


def special_tokens(tokenizer) -> dict[str, str | None]:
    return {name: getattr(tokenizer, name, None) for name in ("eos_token", "pad_token", "bos_token")}


def describe_base(path: str, name: str) -> dict:
    """The base's name as configured, the folder it was loaded from, its model_type, and for a local
    folder a fingerprint: config.json, the weight files' names and sizes, and a sample of bytes
    from the middle of each, which differ between two checkpoints of one architecture."""
    info = {"name": name, "path": str(path), "model_type": None, "fingerprint": None}
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return info  # a hub id not downloaded here: name only
    config = folder / "config.json"
    if config.is_file():
        info["model_type"] = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    digest = hashlib.sha256(config.read_bytes() if config.is_file() else b"")
    weights = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file())
    for weight in weights:
        size = weight.stat().st_size
        digest.update(f"{weight.name}:{size}".encode())
        with open(weight, "rb") as f:
            f.seek(max(0, size // 2 - SAMPLE_BYTES // 2))
            digest.update(f.read(SAMPLE_BYTES))
    info["fingerprint"] = digest.hexdigest()[:16] if weights else None
    return info


def git_state(directory: Path) -> dict | None:
    """The commit of the code that trained, and whether it had uncommitted changes; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
