"""Dry run: the model built on the meta device from its config.json alone (no weights read, no GPU),
the LoRA targets, the trainable parameter count, and an estimate of peak memory for the configured
batch — what `scripts/train.py --dry-run` prints before you rent the GPU. The estimate is for this
machine's device and the compute dtype model.compute_dtype resolves to on it (qlora_loop.cpu); on a
machine without a GPU, a GPU's under bfloat16 autocast is given beside it.

The targets are found as the 4-bit path finds them (every Linear except lm_head; on the meta
device they are plain nn.Linear, as bitsandbytes has not replaced them), and the adapter is added
by the same model.adapter.add_adapter, so the counts are those of the real run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from qlora_loop.config import Config
from qlora_loop.cpu import resolve_compute_dtype
from qlora_loop.errors import ModelError
from qlora_loop.model.adapter import add_adapter, describe_variants, find_linear4bit_targets, trainable_parameters
from qlora_loop.model.load import embedding_parameters
from qlora_loop.training.loss import chunk_tokens, chunked_lm_loss, default_loss

# Bytes per parameter. NF4 with double quantisation: 4 bits, plus one 8-bit absmax per block of
# 64 and one fp32 absmax per 256 blocks. Under bf16 autocast (a GPU run) the other weights stay bf16;
# under float16 the norms are up-cast to float32 (model.load.load_base_model).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
FP32 = 4
# Adapter weights in fp32, their gradients, and AdamW's two moments (32-bit or 8-bit).
OPTIMIZER_BYTES = {"paged_adamw_32bit": 8, "paged_adamw_8bit": 2}
NOMINAL_STEPS = 1000  # AdaLoRA's schedule needs a total; its parameter count does not depend on it


@dataclass
class DryRun:
    model: str
    model_type: str
    targets: list[str]
    trainable: int
    total: int
    batch_size: int
    max_length: int
    memory: dict[str, int] = field(default_factory=dict)  # bytes per part, and "total"
    device: str = "cuda"  # the device the estimate is for: cuda or cpu
    compute_dtype: str = "bfloat16"
    dtype_why: str = ""  # why that compute dtype (cpu.resolve_compute_dtype)
    gpu_total: int | None = None  # on a CPU: the same batch's total on a GPU under bfloat16 autocast
    variants: list[str] = field(default_factory=list)  # model.adapter.describe_variants
    prompts: int = 0  # grpo: prompts per micro-batch (batch_size is then the group, max_length prompt + completion)


def dry_run(name_or_path: str, cfg: Config, *, compute_dtype: str = "bfloat16",
            logits_chunk: int | None | str = "auto", autocast: bool = True) -> DryRun:
    """The peak memory of one training step of `cfg` (its adapter, model.gradient_checkpointing,
    model.attn_implementation, train.batch_size, train.optimizer, data.max_length, data.packing) on
    the model at `name_or_path` (cfg.model.name_or_path resolved). `logits_chunk`: None for a loss
    that computes all logits at once (loss.causal_lm_loss), N for one that computes them N tokens at
    a time (loss.chunked_lm_loss), "auto" for the loss a run picks (loss.default_loss). `autocast`: a
    GPU run's autocast in the compute dtype (train.mixed_precision=auto); without it (a CPU run)
    every weight beside the 4-bit ones, and so the residual stream, is float32. Reads config.json only."""
    m, adapter, t = cfg.model, cfg.adapter, cfg.train
    batch_size, max_length, packing = t.batch_size, cfg.data.max_length, cfg.data.packing
    grpo = t.objective == "grpo"
    if grpo:  # forward/backward one prompt's group at a time, each row a prompt + a completion
        batch_size, max_length = t.num_generations, max_length + t.max_new_tokens
    attn_implementation = m.attn_implementation
    gradient_checkpointing = m.gradient_checkpointing is not False
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name_or_path={name_or_path!r}: cannot read its config "
                         f"({str(e).splitlines()[0]})") from None
    with init_empty_weights():  # parameters on the meta device: shapes only, no memory
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    quantized = {name: module.weight.numel() for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head"}
    largest_linear = max(quantized.values(), default=0)
    base_total = sum(p.numel() for p in model.parameters())
    # Embeddings and lm_head stay in the compute dtype under a GPU's autocast (model.load.load_base_model).
    embeddings = sum(p.numel() for p in embedding_parameters(model))
    targets = find_linear4bit_targets(model, torch.nn.Linear) if adapter.target_modules == "auto" \
        else adapter.target_modules
    with init_empty_weights():
        model = add_adapter(model, dataclasses.replace(adapter, target_modules=targets), total_steps=NOMINAL_STEPS)
    trainable, total = trainable_parameters(model)
    if logits_chunk == "auto":
        chunked = default_loss(model) is chunked_lm_loss
        logits_chunk = chunk_tokens(model.get_output_embeddings().out_features) if chunked else None

    act = 4 if compute_dtype == "float32" else 2
    # The residual stream and the norms: bf16 under bf16 autocast; float32 otherwise, as float16 runs
    # keep their norms up-cast (model.load.load_base_model) and a float32 norm makes its output float32.
    stream = 2 if compute_dtype == "bfloat16" and autocast else 4
    if not autocast:  # embeddings and head up-cast to float32 as well (model.load.load_base_model)
        act = 4
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    inter = getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", heads) or heads
    tokens = batch_size * max_length
    scores = 0
    if attn_implementation == "eager":  # T x T scores and probabilities per head, T the whole row when packed
        rows, length = (1, tokens) if packing else (batch_size, max_length)
        scores = 2 * rows * heads * length ** 2 * act
    held, one_layer = activation_bytes(tokens, hidden=hidden, intermediate=inter, kv_width=hidden * kv // heads,
                                       layers=layers, stream_bytes=stream, checkpointing=gradient_checkpointing,
                                       scores_bytes=scores)
    memory = {
        "base_4bit": int(sum(quantized.values()) * NF4_BYTES),
        "embeddings_and_head": embeddings * act,
        "norms_and_biases": (base_total - sum(quantized.values()) - embeddings) * stream,
        "adapter_and_optimizer": trainable * (FP32 + FP32 + OPTIMIZER_BYTES.get(cfg.train.optimizer, 8)),
        "activations": held + one_layer,
        # logits in the compute dtype, their float32 copy, log-softmax kept for backward, and its gradient
        "logits": min(tokens, logits_chunk or tokens) * vocab * (act + 3 * FP32),
        "dequantized_weight": largest_linear * act * 2,  # one Linear4bit unpacked for its matmul, and its grad path
    }
    if grpo:  # generation holds the KV cache of every prompt's group at once, at full length, never beside
        # the training activations and logits: the peak is the larger of the two, so only what the cache needs
        # beyond those is added
        kv_cache = 2 * layers * t.batch_size * t.num_generations * max_length * (hidden * kv // heads) * act
        memory["generation_kv_extra"] = max(0, kv_cache - memory["activations"] - memory["logits"])
    if packing and attn_implementation != "flash_attention_2":  # flash attention takes row lengths, no mask
        memory["packed_mask"] = tokens ** 2 * (1 + act)  # transformers' boolean T x T mask, and sdpa's float copy
    memory["total"] = sum(memory.values())
    return DryRun(name_or_path, config.model_type, list(targets), trainable, total, batch_size, max_length, memory,
                  compute_dtype=compute_dtype, prompts=t.batch_size if grpo else 0)


def activation_bytes(tokens: int, *, hidden: int, intermediate: int, kv_width: int, layers: int,
                     stream_bytes: int, checkpointing: bool = True, scores_bytes: int = 0) -> tuple[int, int]:
    """The activations a QLoRA backward holds for `tokens` tokens, in bytes, as (held through the whole
    backward, held while one layer's backward runs). The dry run adds the two; the bench's GPU floor
    (bench.bounds) sets the second against the loss's logits, which are freed before it.

    One decoder layer keeps, in the residual stream's dtype (`stream_bytes`): attention (norm, q/k/v
    outputs, output), the MLP (norm, gate, up, activation, product) and the inputs LoRA dropout copies,
    plus `scores_bytes` (eager attention's scores). With gradient checkpointing every layer's input is
    held and one layer at a time is recomputed; without, every layer keeps its own."""
    one_layer = tokens * (8 * hidden + 2 * kv_width + 5 * intermediate) * stream_bytes + scores_bytes
    if checkpointing:
        return layers * tokens * hidden * stream_bytes, one_layer
    return layers * one_layer, 0


def dry_run_config(cfg: Config, model_path: str, logits_chunk: int | None | str = "auto",
                   device: torch.device | None = None) -> DryRun:
    """dry_run for a loaded config.Config on `device` (None: a GPU if this machine has one, else the
    CPU), in the compute dtype the run would resolve there; `model_path` is cfg.model.name_or_path
    resolved (builtin.resolve_model_path). On a CPU, the same batch's total on a GPU beside it."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, why = resolve_compute_dtype(cfg.model.compute_dtype, device)
    precision = cfg.train.mixed_precision
    run = dry_run(model_path, cfg, compute_dtype=str(dtype).removeprefix("torch."), logits_chunk=logits_chunk,
                  autocast=precision != "no" if precision != "auto" else device.type == "cuda")
    run.device, run.dtype_why = device.type, why
    run.variants = describe_variants(cfg.adapter, loraplus_lr_ratio=cfg.train.loraplus_lr_ratio,
                                     neftune_alpha=cfg.train.neftune_alpha, device_type=device.type)
    if device.type == "cpu":
        run.gpu_total = dry_run(model_path, cfg, compute_dtype="bfloat16", logits_chunk=logits_chunk).memory["total"]
    return run


def report(run: DryRun, print_fn=print) -> None:
    gib = 2 ** 30
    print_fn(f"dry run: {run.model} ({run.model_type}), no weights loaded")
    print_fn(f"LoRA targets: {', '.join(run.targets)}")
    print_fn(f"trainable parameters: {run.trainable:,} of {run.total:,} ({100 * run.trainable / run.total:.3f}%)")
    for line in run.variants:
        print_fn(line)
    if run.dtype_why:
        print_fn(f"compute dtype {run.compute_dtype} ({run.dtype_why})")
    where, extra = ("GPU memory", "; plus ~0.5 GiB CUDA context") if run.device == "cuda" else ("memory on this CPU", "")
    shape = f"batch_size={run.batch_size} x max_length={run.max_length}" if not run.prompts else \
        (f"grpo, {run.prompts} prompts x {run.batch_size} completions of {run.max_length} tokens (data.max_length + "
         "train.max_new_tokens), generated at once, trained one group at a time")
    print_fn(f"estimated peak {where} for {shape}: {run.memory['total'] / gib:.2f} GiB (rows at full length{extra})")
    for part, value in run.memory.items():
        if part != "total":
            print_fn(f"  {part:<22} {value / gib:8.3f} GiB")
    if run.gpu_total is not None:
        print_fn(f"on a GPU under bfloat16 autocast: {run.gpu_total / gib:.2f} GiB (plus ~0.5 GiB CUDA context)")
