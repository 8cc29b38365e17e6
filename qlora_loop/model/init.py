"""adapter.init on the 4-bit base: how A and B start.

default and gaussian are peft's own (LoraConfig.init_lora_weights), eva is peft's EVA run on training
batches. loftq and pissa are computed here, from the dequantized NF4 weights, because peft runs them
only on unquantized weights (PiSSA's pissa_init refuses a 4-bit layer) or on CUDA (LoftQ's
replace_lora_weights_loftq); each leaves the 4-bit base as it is, so disable_adapter still gives the
base (drift, the preference reference) and chat, merge and export read the saved adapter unchanged:

  loftq  A, B fitted to the quantization error: scaling x B A = the best rank-r approximation of
         W - dequantize(NF4(W)), W the original weights read from the model's safetensors files
         (LoftQ with one alternation, as replace_lora_weights_loftq; peft's leaves out the scaling,
         which here would double the correction at alpha = 2r)
  pissa  A, B = the principal singular directions of each weight (PiSSA), and the same product,
         frozen, subtracted in the layer's forward, so the model starts as the base and the adapter
         trains in the principal subspace; saved as peft converts a PiSSA adapter for the unmodified
         base (path_initial_model_for_weight_conversion): rank 2r, [B, -B0] [A; A0], alpha doubled
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft.tuners.lora import Linear4bit as LoraLinear4bit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora_loop.errors import ModelError

INITS = ("default", "gaussian", "pissa", "loftq", "eva")
PEFT_INITS = {"default": True, "gaussian": "gaussian", "pissa": True, "loftq": True, "eva": "eva"}
PISSA_NITER = 16  # subspace iterations of the randomized SVD (peft's pissa_niter_16, LLaMA-Factory's default)


def lora_layers(model) -> dict[str, LoraLinear4bit]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)}


@torch.no_grad()
def loftq_init(model, adapter: str = "default") -> int:
    """Set every LoRA Linear4bit's A and B so that scaling x B A fits W - dequantize(W's NF4), W read
    from the base's safetensors files; returns the layers set."""
    weights = SafetensorsWeights(base_path(model))
    layers = lora_layers(model)
    for name, layer in layers.items():
        original = weights.get(name.removeprefix("base_model.model.") + ".weight").float()
        error = original - dequantized(layer)
        b, a = low_rank(error, layer.r[adapter], layer.scaling[adapter])
        layer.lora_A[adapter].weight.copy_(a)
        layer.lora_B[adapter].weight.copy_(b)
    return len(layers)


@torch.no_grad()
def pissa_init(model, adapter: str = "default", seed: int = 0) -> int:
    """PiSSA on the 4-bit base: A, B = the top r singular directions of each dequantized weight, and
    the same product kept frozen (pissa_A0, pissa_B0) and subtracted by a forward hook, so the model
    starts as the base. The randomized SVD is seeded: a resumed run rebuilds the same frozen product."""
    layers = lora_layers(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in layers.values():
            weight = dequantized(layer)
            u, s, v = torch.svd_lowrank(weight, q=layer.r[adapter], niter=PISSA_NITER)
            b, a = split_singular(u, s, v.T, layer.scaling[adapter])
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)
            layer.register_buffer("pissa_A0", a.clone(), persistent=False)
            layer.register_buffer("pissa_B0", b.clone(), persistent=False)
            layer.register_forward_hook(_subtract_start)
    return len(layers)


def _subtract_start(layer, args, out):
    """PiSSA's frozen start, scaling x B0 A0 x, taken off the output while the adapter is on and unmerged."""
    adapter = layer.active_adapters[0] if layer.active_adapters else None
    if layer.disable_adapters or layer.merged or adapter not in layer.lora_A:
        return out
    x = args[0].to(layer.pissa_A0.dtype)
    start = (x @ layer.pissa_A0.T) @ layer.pissa_B0.T * layer.scaling[adapter]
    return out - start.to(out.dtype)


def pissa_layers(model) -> dict[str, LoraLinear4bit]:
    return {name: m for name, m in lora_layers(model).items() if hasattr(m, "pissa_A0")}


def convert_pissa(adapter_dir: Path, model) -> None:
    """Rewrite a PiSSA adapter saved by peft in `adapter_dir` as a LoRA of the unmodified base: rank 2r,
    A' = [A; A0], B' = [B, -B0], lora_alpha doubled (x sqrt 2 with rsLoRA) so the scaling stays; what
    peft's save_pretrained(path_initial_model_for_weight_conversion=...) writes."""
    starts = {name.removeprefix("base_model.model."): m for name, m in pissa_layers(model).items()}
    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = load_file(path)
    for key in list(tensors):
        module, _, kind = key.rpartition(".lora_")
        layer = starts.get(module.removeprefix("base_model.model."))
        if layer is None:
            continue
        if kind == "A.weight":
            tensors[key] = torch.cat([tensors[key], layer.pissa_A0.to(tensors[key].dtype)])
        elif kind == "B.weight":
            tensors[key] = torch.cat([tensors[key], -layer.pissa_B0.to(tensors[key].dtype)], dim=1)
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["r"] *= 2
    config["lora_alpha"] *= 2 ** 0.5 if config.get("use_rslora") else 2
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()}
    config["init_lora_weights"] = True
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def eva_init(model, batches: list[dict]) -> dict[str, int]:
    """peft's EVA: A from the SVD of each layer's inputs on the answer tokens of `batches` (padded
    batches: input_ids, attention_mask, labels), ranks redistributed (rho); returns the ranks it gave.
    Every process is given the same batches."""
    from peft import initialize_lora_eva_weights

    was_training = model.training
    model.eval()
    initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False,
                                forward_fn=lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]))
    model.train(was_training)
    for param in model.parameters():  # EVA rebuilds A and B in the base's compute dtype; adapters train in float32
        if param.requires_grad:
            param.data = param.data.float()
    return dict(model.peft_config["default"].rank_pattern or {})


def dequantized(layer: LoraLinear4bit) -> torch.Tensor:
    """The float32 weight the 4-bit layer computes with."""
    weight = layer.get_base_layer().weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.float()


def low_rank(matrix: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in]) with scaling x B A the best rank-r approximation of `matrix`."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return split_singular(u[:, :r], s[:r], vh[:r], scaling)


def split_singular(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float):
    root = (s / scaling).sqrt()
    return (u * root).contiguous(), (root[:, None] * vh).contiguous()


def base_path(model) -> Path:
    """The folder the base was loaded from, for its original weights: a local folder, or the hub
    cache's snapshot of its id."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = base.config._name_or_path
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # noqa: BLE001 - any failure reads as: the original weights are not here
        raise ModelError(f"adapter.init=loftq reads the base's original weights, and {name} is neither a local "
                         f"folder nor in the hub cache ({type(e).__name__}); load it once, or use another "
                         "adapter.init") from None


class SafetensorsWeights:
    """Tensors by name from a model folder's model.safetensors or its shards (model.safetensors.index.json)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                self.files = {k: folder / "model.safetensors" for k in f.keys()}
        else:
            raise ModelError(f"adapter.init=loftq reads the base's original weights from safetensors files, and "
                             f"{folder} has none; convert the model to safetensors, or use another adapter.init")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ModelError(f"adapter.init=loftq: no tensor {name} in the base's safetensors files")
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)
