"""Tokenizer; 4-bit NF4 base with k-bit preparation; gradient checkpointing and the training layout."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qlora_loop.config import ModelConfig
from qlora_loop.errors import ModelError


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
        tokenizer.pad_token = tokenizer.eos_token  # safe: padding is masked by position, see data.batches.collate
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(name_or_path: str, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16, *,
                    config: ModelConfig | None = None, gradient_checkpointing: bool = True, autocast: bool = False):
    """The base model in 4-bit NF4 with double quantisation, frozen and prepared for k-bit training.
    Each process loads onto its own device, so several ranks never share one GPU's copy.

    config (config.ModelConfig; None = its defaults): trust_remote_code, revision, attn_implementation
    and quant_storage are read from it; `name_or_path` (resolved), the compute dtype (resolved for this
    device) and gradient checkpointing (resolved from "auto") are the caller's.

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
    config = config or ModelConfig()
    quant_storage = getattr(torch, config.quant_storage) if config.quant_storage else None
    sharded = quant_storage is not None and quant_storage.is_floating_point
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                                      bnb_4bit_quant_storage=quant_storage or torch.uint8)
    device_map = {"": device_index(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, quantization_config=quantization, device_map=device_map,
            dtype=quant_storage if sharded else compute_dtype, trust_remote_code=config.trust_remote_code,
            revision=config.revision, attn_implementation=config.attn_implementation)
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


def quantization_of(model) -> dict:
    """How the loaded base is quantized, read from its own BitsAndBytesConfig (for the run's manifest)."""
    q = model.config.quantization_config

    def name(dtype) -> str:
        return str(dtype).removeprefix("torch.")

    return {"quant_type": q.bnb_4bit_quant_type, "double_quant": q.bnb_4bit_use_double_quant,
            "quant_storage": name(q.bnb_4bit_quant_storage), "compute_dtype": name(q.bnb_4bit_compute_dtype)}


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
