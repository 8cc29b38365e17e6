"""How a run was launched, checked before any model is loaded, and what FSDP and DeepSpeed need to
be told before `accelerator.prepare`. Accelerate does all the distributing; this module only
refuses launches it would get wrong, with a message naming the key or flag to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType, str_to_bool

from qlora_loop.errors import LaunchError

SHARDABLE_STORAGE = ("bfloat16", "float16", "float32")  # FSDP shards only floating-point tensors


@dataclass
class Launch:
    """What the run was launched as, in plain values: build it with `describe_launch(accelerator)`."""
    num_processes: int = 1
    shards_parameters: str | None = None  # "FSDP" or "DeepSpeed ZeRO-3": the 4-bit base is split across ranks
    deepspeed: bool = False
    deepspeed_clipping: float = 0.0  # DeepSpeed clips inside its own step, at this norm (0 = not at all)


def describe_launch(accelerator) -> Launch:
    if accelerator.distributed_type == DistributedType.FSDP:
        return Launch(accelerator.num_processes, shards_parameters="FSDP")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        clipping = plugin.deepspeed_config.get("gradient_clipping", 0.0)  # absent: DeepSpeed does not clip
        clipping = 1.0 if clipping == "auto" else float(clipping)  # accelerate fills "auto" with 1.0
        sharded = "DeepSpeed ZeRO-3" if plugin.zero_stage == 3 else None
        return Launch(accelerator.num_processes, sharded, deepspeed=True, deepspeed_clipping=clipping)
    return Launch(accelerator.num_processes)


def check_engine_taken(accelerator, environ=os.environ) -> None:
    """An accelerate config that asks for FSDP or DeepSpeed (accelerate launch passes it on as
    ACCELERATE_USE_*), but an Accelerator that did not take it up and would train as something else,
    silently: Accelerate takes up FSDP only for several GPU processes, DeepSpeed only on a GPU."""
    for variable, engine, kind, needs in (
            ("ACCELERATE_USE_FSDP", "FSDP", DistributedType.FSDP, "several processes on GPUs"),
            ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", DistributedType.DEEPSPEED, "a GPU")):
        if str_to_bool(environ.get(variable, "false")) and accelerator.distributed_type != kind:
            raise LaunchError(
                f"the accelerate config asks for {engine} ({variable}=true), but Accelerate runs this launch as "
                f"{accelerator.distributed_type.value}: {engine} needs {needs}; launch it so, or give accelerate "
                "launch a config without it (e.g. --config_file configs/accelerate/ddp.yaml)")


def check_launch(launch: Launch, *, batch_size: int, grad_accum: int, global_batch_size: int | None = None,
                 quant_storage: str | None = None, max_grad_norm: float = 1.0, resume: str | None = None,
                 adapter_kind: str = "lora") -> int:
    """Raise LaunchError if this launch cannot run the config as written. Returns the micro-batches
    per optimizer step: train.grad_accum, or what train.global_batch_size makes of it here."""
    grad_accum = resolve_grad_accum(global_batch_size, batch_size, grad_accum, launch.num_processes)
    engine = launch.shards_parameters or ("DeepSpeed" if launch.deepspeed else None)
    if engine and adapter_kind == "adalora":
        raise LaunchError(
            f"adapter.kind=adalora under {engine}: AdaLoRA re-allocates ranks from every parameter's full "
            "gradient, which no process holds here; use adapter.kind=lora, or launch with DDP")
    if engine and resume:
        raise LaunchError(
            f"train.resume={resume}: under {engine} each process holds only its share of the optimizer state "
            "(and weights), which our checkpoints do not gather, so a resumed run would not continue this one; "
            "resume under DDP or one process, or start afresh without train.resume")
    if launch.shards_parameters and quant_storage not in SHARDABLE_STORAGE:
        raise LaunchError(
            f"{launch.shards_parameters} shards only floating-point tensors, but model.quant_storage="
            f"{quant_storage or 'uint8'} packs the 4-bit base into bytes, so it cannot be split across the "
            f"{launch.num_processes} processes; set model.quant_storage=bfloat16 (or float16 / float32)")
    if launch.deepspeed:
        check_deepspeed(grad_accum, max_grad_norm, launch.deepspeed_clipping)
    return grad_accum


def resolve_grad_accum(global_batch_size: int | None, batch_size: int, grad_accum: int, num_processes: int) -> int:
    """With train.global_batch_size set, the run keeps that many sequences per optimizer step on any
    number of processes: grad_accum = global / (processes x batch_size), which must come out whole."""
    if global_batch_size is None:
        return grad_accum
    per_micro_step = num_processes * batch_size
    if global_batch_size % per_micro_step:
        fits = [n for n in range(1, global_batch_size // batch_size + 1) if global_batch_size % (n * batch_size) == 0]
        raise LaunchError(
            f"train.global_batch_size={global_batch_size} cannot be split into micro-batches of "
            f"{num_processes} processes x train.batch_size={batch_size} = {per_micro_step} sequences; launch "
            f"with --num_processes in {fits}, or change train.batch_size or train.global_batch_size")
    implied = global_batch_size // per_micro_step
    if grad_accum not in (1, implied):  # 1 is the default: left alone, it follows the global batch
        raise LaunchError(
            f"train.grad_accum={grad_accum} contradicts train.global_batch_size={global_batch_size}, which on "
            f"{num_processes} processes x train.batch_size={batch_size} means grad_accum={implied}; set only one")
    return implied


def check_deepspeed(grad_accum: int, max_grad_norm: float, deepspeed_clipping: float) -> None:
    """Accelerate lets DeepSpeed take its optimizer step inside backward(), after every micro-batch of
    our step, and clip there; so a step must be one micro-batch, clipped at train.max_grad_norm."""
    if grad_accum != 1:
        raise LaunchError(
            f"under DeepSpeed a step is one micro-batch (DeepSpeed steps its optimizer inside every backward), "
            f"so train.grad_accum={grad_accum} would take {grad_accum} small steps instead of one; set "
            "train.grad_accum=1 and raise train.batch_size, or launch with DDP or FSDP")
    if deepspeed_clipping != max_grad_norm:
        raise LaunchError(
            f"DeepSpeed clips gradients itself at gradient_clipping={deepspeed_clipping:g} (deepspeed_config in "
            f"the accelerate config file) but train.max_grad_norm={max_grad_norm:g}; make them equal")


def prepare_sharding(accelerator, model, batch_size: int, quant_storage: torch.dtype | None = None):
    """Before the optimizer is built. Under FSDP: wrap the model now, each LoRA layer in a unit of its
    own, because FSDP replaces the parameters and the optimizer must be built on the new ones. Under
    DeepSpeed: tell it the micro-batch size. Otherwise (DDP, one process): the model as it is."""
    if accelerator.distributed_type == DistributedType.FSDP:
        from peft.utils.other import fsdp_auto_wrap_policy

        plugin = accelerator.state.fsdp_plugin
        # With use_orig_params=false a wrapped unit becomes one flat tensor, all trainable or all frozen:
        # peft's policy wraps each LoRA layer apart from the frozen base, as transformers' Trainer does.
        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        if quant_storage is not None and quant_storage.is_floating_point:
            plugin.set_mixed_precision(quant_storage, override=True)  # compute in the dtype the base is stored in
        return accelerator.prepare(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Our dataloaders are prepared in a call of their own, so DeepSpeed cannot read the micro-batch size.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    return model
