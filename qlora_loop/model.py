"""Tokenizer; 4-bit NF4 base -> every Linear4bit found -> k-bit preparation -> LoRA or AdaLoRA."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qlora_loop.data import collate_packed, model_inputs
from qlora_loop.fused_lora import share_lora_inputs


class ModelError(ValueError):
    """The model or tokenizer cannot be used as configured; the message says which key to change."""


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None,
                   chat_template: str | None = None):
    """The tokenizer, with a chat template (the config's wins) and a pad token (EOS if it has none)."""
    if name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().is_dir():
        raise ModelError(f"model.name_or_path={name_or_path!r}: no such folder; give a model folder "
                         "(with config.json) or a hub id such as Qwen/Qwen2.5-7B-Instruct")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                  revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name_or_path={name_or_path!r}: cannot load a tokenizer "
                         f"({str(e).splitlines()[0]}); give a local folder or a hub id you can reach") from None
    if chat_template is not None and chat_template.endswith(".jinja"):
        if not Path(chat_template).is_file():
            raise ModelError(f"data.chat_template={chat_template}: no such file; give a .jinja file, or the "
                             "template itself as a string")
        chat_template = Path(chat_template).read_text(encoding="utf-8")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not (tokenizer.chat_template or "").strip():
        raise ModelError(f"the tokenizer of {name_or_path} has no chat template; set data.chat_template "
                         "to a Jinja template string or a .jinja file")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: padding is masked by position, see data.collate
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(name_or_path: str, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16, *,
                    gradient_checkpointing: bool = True, trust_remote_code: bool = False,
                    revision: str | None = None, attn_implementation: str | None = None,
                    quant_storage: torch.dtype | None = None, autocast: bool = False):
    """The base model in 4-bit NF4 with double quantisation, frozen and prepared for k-bit training.
    Each process loads onto its own device, so several ranks never share one GPU's copy.

    quant_storage: the dtype the packed 4-bit weights are stored in; None = bitsandbytes' uint8. For
    FSDP (or DeepSpeed ZeRO-3) give a float dtype, e.g. torch.bfloat16: FSDP shards only float
    tensors. The whole model is then loaded in that dtype and kept in it, since FSDP flattens a
    wrapped unit only if all its parameters share one dtype.

    autocast: training runs under autocast in compute_dtype (on a GPU, train.mixed_precision=auto).
    Every frozen weight beside the 4-bit ones then stays in compute_dtype, as torchtune and
    LLaMA-Factory keep them, rather than being up-cast to float32 as peft's k-bit preparation does:
    the embeddings and lm_head (2 x 1.1 GB at Qwen2.5-7B's 152k vocabulary), and the norms, whose
    float32 weights would turn the whole residual stream float32 (+0.56 GB of activations at 7B,
    seq 2048). RMSNorm still normalises in float32 inside. In float16 (GPUs without bfloat16) the norms
    are up-cast all the same: a float16 residual stream can overflow. Without autocast a float32
    hidden state could not meet a 16-bit weight, so everything is up-cast as peft does.
    """
    sharded = quant_storage is not None and quant_storage.is_floating_point
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                                      bnb_4bit_quant_storage=quant_storage or torch.uint8)
    device_map = {"": device_index(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, quantization_config=quantization, device_map=device_map,
            dtype=quant_storage if sharded else compute_dtype, trust_remote_code=trust_remote_code,
            revision=revision, attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:  # no config.json or weights; a config transformers cannot read
        raise ModelError(f"model.name_or_path={name_or_path!r}: cannot load the model "
                         f"({str(e).splitlines()[0]})") from None
    model.config.use_cache = False  # the KV cache is useless while training and costs memory
    keep_training_layout(model)
    model.requires_grad_(False)
    if not sharded:
        # What peft's prepare_model_for_kbit_training does: every 16-bit weight beside the 4-bit ones
        # (norms, biases, embeddings, head) to float32, so a float32 hidden state meets float32 weights;
        # under autocast, all but the norms in float16 runs (see the docstring) stay as loaded.
        embeddings = {id(p) for p in embedding_parameters(model)}
        for param in model.parameters():
            stays = autocast and (compute_dtype == torch.bfloat16 or id(param) in embeddings)
            if param.dtype in (torch.float16, torch.bfloat16) and not isinstance(param, bnb.nn.Params4bit) \
                    and not stays:
                param.data = param.data.to(torch.float32)
    # Sharded (quant_storage a float dtype): nothing is up-cast, as FSDP flattens a wrapped unit only
    # if all its parameters share one dtype.
    if gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    return model


def set_gradient_checkpointing(model, on: bool) -> None:
    """Non-reentrant activation checkpointing on or off; `model` may be the base or the PeftModel
    around it (unwrapped). Dropout masks are the same when a layer is recomputed (the RNG state is
    restored), so losses and gradients do not depend on it."""
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def embedding_parameters(model) -> list[torch.nn.Parameter]:
    """The input embeddings' and lm_head's parameters, once each (a tied head shares the embedding's)."""
    modules = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return list({id(p): p for m in modules for p in m.parameters()}.values())


def device_index(device: torch.device) -> int | str:
    """from_pretrained's device_map target for `device`: a GPU by its index, anything else by name.
    A single process gets torch.device("cuda") from Accelerate, with no index: the current GPU."""
    if device.type != "cuda":
        return str(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def keep_training_layout(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weights for a faster kernel the
    first time it runs in eval mode without grad, and never packs them back. After an evaluation the
    training forward would then (a) fail on layers with a bias (Qwen2's q/k/v: an in-place add on a
    grad-requiring view) and (b) compute with other numbers (absmax un-nested to bf16), so a resumed
    run would no longer reproduce the uninterrupted one. Training keeps the one layout it started with."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


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


def add_adapter(model, kind: str = "lora", *, r: int = 16, alpha: float = 32.0, dropout: float = 0.05,
                target_modules: str | list[str] = "auto", total_steps: int | None = None,
                init_r: int | None = None, tinit: float = 0.1, tfinal: float = 0.2, delta_t: int = 1,
                orth_reg_weight: float = 0.5, extra: dict | None = None, shared_inputs: bool = True) -> PeftModel:
    """Wrap the prepared base in a LoRA or AdaLoRA adapter. AdaLoRA needs `total_steps` (optimizer
    steps of the whole run) to schedule its rank budget; tinit/tfinal are fractions of it.
    shared_inputs: on a CPU, the LoRA layers that read the same input (q/k/v, gate/up) share one A
    matmul and one dropout mask of that input (qlora_loop.fused_lora), with fewer copies than peft's
    forward; False keeps peft's, each layer with its own mask."""
    targets = find_linear4bit_targets(model) if target_modules == "auto" else list(target_modules)
    common = dict(lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                  **(extra or {}))
    try:
        if kind == "lora":
            config = LoraConfig(r=r, **common)
        else:
            if not total_steps:
                raise ModelError("AdaLoRA needs the run's total optimizer steps to schedule its rank budget")
            t_init, t_final = int(tinit * total_steps), int(tfinal * total_steps)
            if t_init >= total_steps - t_final:
                raise ModelError(f"AdaLoRA has {total_steps} optimizer steps, too few to shrink ranks after "
                                 f"adapter.tinit={tinit} and before adapter.tfinal={tfinal}; train more steps "
                                 "(train.epochs) or lower adapter.tinit / adapter.tfinal")
            config = AdaLoraConfig(target_r=r, init_r=init_r or math.ceil(1.5 * r), tinit=t_init,
                                   tfinal=t_final, deltaT=delta_t, orth_reg_weight=orth_reg_weight,
                                   total_step=total_steps, **common)
    except TypeError as e:
        raise ModelError(f"adapter.extra: {e}; see peft's {'LoraConfig' if kind == 'lora' else 'AdaLoraConfig'} "
                         "for the accepted options") from None
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise ModelError(f"adapter.target_modules={targets}: {e}") from None
    # peft leaves AdaLoRA's `ranknum` (the fixed init_r its updates are divided by) trainable, so
    # the optimizer would drift it; peft's loader restores init_r, and the saved adapter would then
    # compute something else than the trained one.
    for name, param in model.named_parameters():
        if ".ranknum." in name:
            param.requires_grad_(False)
    if shared_inputs and kind == "lora":
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


@torch.no_grad()
def check_packing(model, examples: list[dict], tokens: int = 24, tolerance: float = 0.25) -> float | None:
    """data.packing needs a model whose attention reads restarting position_ids as row boundaries:
    transformers' own models do (sdpa, eager, flash_attention_2, flex), remote code often does not.
    Runs two short rows apart, packed, and joined as one plain sequence (a control in which the rows
    do see each other), and returns how far packed is from apart as a share of how far the
    control is: ~0 when packing works, ~1 when the model mixes the rows. A share rather than an
    absolute bound, so that bf16 kernel noise over a large vocabulary cannot trip it. Raises
    ModelError above `tolerance`; None with fewer than two rows. Dropout off; the RNG is not drawn."""
    rows = [{"input_ids": e["input_ids"][:tokens], "labels": e["labels"][:tokens], "index": e["index"]}
            for e in examples[:2]]
    if len(rows) < 2:
        return None
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_packed(rows).items()}
    training = model.training
    model.eval()
    try:
        apart = torch.cat([model(input_ids=torch.tensor([r["input_ids"]], device=device)).logits[0]
                           for r in rows]).float()
        # the control: the joined rows as one plain sequence, in any attention implementation
        mixed = model(input_ids=batch["input_ids"]).logits[0].float()
        try:
            packed = model(**model_inputs(batch)).logits[0].float()
        except TypeError as e:  # e.g. remote code whose forward takes no position_ids
            raise ModelError(f"data.packing=true: this model's forward cannot be given packed rows ({e}); "
                             "set data.packing=false") from None
    finally:
        model.train(training)
    share = float((packed - apart).abs().max() / (mixed - apart).abs().max().clamp_min(1e-6))
    if share > tolerance:
        raise ModelError(f"data.packing=true: this model's attention does not keep packed rows apart (packed "
                         f"logits are {share:.0%} as far from unpacked ones as when the rows see each other); set "
                         "data.packing=false, or use a model transformers implements natively (no trust_remote_code)")
    return share
