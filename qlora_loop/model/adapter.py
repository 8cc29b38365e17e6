"""Every Linear4bit of the prepared base found -> LoRA or AdaLoRA; trainable parameter counts."""

from __future__ import annotations

import math
import warnings

import bitsandbytes as bnb
import torch
from peft import AdaLoraConfig, EvaConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraModel

from qlora_loop.config import AdapterConfig
from qlora_loop.errors import ModelError
from qlora_loop.model.fused_lora import share_lora_inputs
from qlora_loop.model.init import PEFT_INITS, loftq_init, pissa_init


def find_linear4bit_targets(model, layer: type = bnb.nn.Linear4bit) -> list[str]:
    """Names of every `layer` except lm_head, as short suffixes when they are unambiguous. The dry
    run passes torch.nn.Linear: on the meta device bitsandbytes has not replaced them yet."""
    full = [name for name, module in model.named_modules()
            if isinstance(module, layer) and name.split(".")[-1] != "lm_head"]
    if not full:
        raise ModelError(f"no {layer.__module__}.{layer.__name__} layer found: the base was not loaded in 4-bit, or "
                         "has no such layers; give adapter.target_modules explicitly")
    suffixes = sorted({name.split(".")[-1] for name in full})
    # A suffix is only safe if every module carrying it is a target (peft matches by suffix).
    matched = [name for name, _ in model.named_modules() if name.split(".")[-1] in suffixes]
    return suffixes if len(matched) == len(full) else full


def add_adapter(model, adapter: AdapterConfig | None = None, *, total_steps: int | None = None) -> PeftModel:
    """Wrap the prepared base in the LoRA or AdaLoRA adapter `adapter` describes (config.AdapterConfig;
    None = its defaults). adapter.target_modules "auto" = every Linear4bit but lm_head. AdaLoRA needs
    `total_steps` (optimizer steps of the whole run) to schedule its rank budget; adapter.tinit /
    adapter.tfinal are fractions of it. adapter.shared_inputs: on a CPU, the LoRA layers that read the
    same input (q/k/v, gate/up) share one A matmul and one dropout mask of that input
    (qlora_loop.model.fused_lora), with fewer copies than peft's forward; False keeps peft's, each layer
    with its own mask. adapter.use_dora / use_rslora are peft's; adapter.init: model.init (eva is
    configured here and computed by model.init.eva_init on training batches)."""
    a = adapter or AdapterConfig()
    kind, r, target_modules = a.kind, a.r, a.target_modules
    targets = find_linear4bit_targets(model) if target_modules == "auto" else list(target_modules)
    common = dict(lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets, task_type="CAUSAL_LM",
                  **(a.extra or {}))
    try:
        if kind == "lora":
            eva = dict(eva_config=EvaConfig()) if a.init == "eva" else {}
            lora = dict(r=r, use_dora=a.use_dora, use_rslora=a.use_rslora, init_lora_weights=PEFT_INITS[a.init], **eva)
            config = LoraConfig(**{**lora, **common})  # adapter.extra's keys win
        else:
            if not total_steps:
                raise ModelError("AdaLoRA needs the run's total optimizer steps to schedule its rank budget")
            t_init, t_final = int(a.tinit * total_steps), int(a.tfinal * total_steps)
            if t_init >= total_steps - t_final:
                raise ModelError(f"AdaLoRA has {total_steps} optimizer steps, too few to shrink ranks after "
                                 f"adapter.tinit={a.tinit} and before adapter.tfinal={a.tfinal}; train more steps "
                                 "(train.epochs) or lower adapter.tinit / adapter.tfinal")
            config = AdaLoraConfig(target_r=r, init_r=a.init_r or math.ceil(1.5 * r), tinit=t_init,
                                   tfinal=t_final, deltaT=a.delta_t, orth_reg_weight=a.orth_reg_weight,
                                   total_step=total_steps, **common)
    except TypeError as e:
        raise ModelError(f"adapter.extra: {e}; see peft's {'LoraConfig' if kind == 'lora' else 'AdaLoraConfig'} "
                         "for the accepted options") from None
    try:
        with warnings.catch_warnings():  # eva: peft suggests low_cpu_mem_usage, which would leave A, B on meta
            warnings.filterwarnings("ignore", message="lora with eva initialization")
            model = get_peft_model(model, config)
    except ValueError as e:
        raise ModelError(f"adapter.target_modules={targets}: {e}") from None
    # peft leaves AdaLoRA's `ranknum` (the fixed init_r its updates are divided by) trainable, so
    # the optimizer would drift it; peft's loader restores init_r, and the saved adapter would then
    # compute something else than the trained one.
    for name, param in model.named_parameters():
        if ".ranknum." in name:
            param.requires_grad_(False)
    if a.init in ("loftq", "pissa") and not on_meta(model):  # eva needs batches: model.init.eva_init, later
        (loftq_init if a.init == "loftq" else pissa_init)(model)
    if a.shared_inputs and kind == "lora":
        share_lora_inputs(model)
    return model


def describe_variants(a: AdapterConfig, *, loraplus_lr_ratio: float | None = None, neftune_alpha: float | None = None,
                      device_type: str = "cpu") -> list[str]:
    """The run's and the dry run's lines on LoRA's variants in use; none for plain LoRA."""
    used = [name for name, on in (("DoRA", a.use_dora), ("rsLoRA (scaling alpha / sqrt r)", a.use_rslora),
                                  (f"init {a.init}", a.init != "default")) if on]
    if loraplus_lr_ratio:
        used.append(f"LoRA+ (B at {loraplus_lr_ratio:g}x lr)")
    if neftune_alpha:
        used.append(f"NEFTune (alpha {neftune_alpha:g})")
    lines = [f"adapter variants: {', '.join(used)}"] if used else []
    if a.use_dora and a.shared_inputs and device_type == "cpu":
        lines.append("DoRA runs peft's own forward: adapter.shared_inputs (one A matmul per shared input) does not "
                     "apply to it")
    return lines


def on_meta(model) -> bool:
    """The dry run's model: weights on the meta device, nothing to compute an init from."""
    return any(p.device.type == "meta" for p in model.parameters())


def add_neftune(model, alpha: float):
    """NEFTune on the input embeddings (transformers' own hook): noise in training forwards only."""
    from transformers.integrations.neftune import activate_neftune

    return activate_neftune(model, alpha)


def continue_adapter(model, adapter_dir: str, *, dropout: float, shared_inputs: bool = True) -> PeftModel:
    """The prepared base with the LoRA adapter saved in `adapter_dir` (adapter.init_from), trainable:
    training continues from its weights with its own r, alpha and targets, and this run's `dropout`
    (adapter.dropout: a setting of training, not of the adapter)."""
    from pathlib import Path

    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        hint = f"; did you mean {Path(adapter_dir) / 'best'}?" if (Path(adapter_dir) / "best").is_dir() else ""
        raise ModelError(f"adapter.init_from={adapter_dir}: no adapter_config.json there{hint}; give the folder a run "
                         "wrote, e.g. OUTPUT_DIR/best")
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelError(f"adapter.init_from={adapter_dir} does not fit this base: "
                         f"{str(e).strip().splitlines()[0]}") from None
    if adalora_of(model) is not None:
        raise ModelError(f"adapter.init_from={adapter_dir} is an AdaLoRA adapter; continue a LoRA adapter")
    for layer in model.modules():
        for name, drop in getattr(layer, "lora_dropout", {}).items():
            layer.lora_dropout[name] = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
    model.peft_config["default"].lora_dropout = dropout
    if shared_inputs:
        share_lora_inputs(model)
    return model


def adalora_of(model) -> AdaLoraModel | None:
    """The AdaLoraModel inside an (unwrapped) PeftModel, or None for LoRA."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, AdaLoraModel) else None


def adalora_orth_reg(adalora: AdaLoraModel) -> torch.Tensor:
    """AdaLoRA's orthogonality regulariser, mean over its P and Q matrices of ||PP^T - I||_F.
    peft adds it only when the model computes the loss itself from `labels`; our loss function
    does not pass labels, so the StepRunner adds it explicitly. Same formula as peft."""
    adapter = adalora.trainable_adapter_name
    terms = []
    for name, p in adalora.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean()


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as stored (two per byte)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if isinstance(p, bnb.nn.Params4bit) else 1) for p in model.parameters())
    return trainable, total
