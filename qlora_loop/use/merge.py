"""Merge an adapter into its base, and measure how faithfully the merged model stands in for
4-bit base + adapter.

The adapter was trained against the NF4-rounded base, not the original weights: its update corrects
for that rounding as much as it teaches. So the merge (peft's merge_and_unload) adds it, by default
(`--weights trained`), to the NF4 weights dequantized exactly as training saw them (the same
quantization: NF4, double quantization, the trained compute dtype), written in a 16- or 32-bit
dtype, which keeps the update that a 4-bit merge would round away. `--weights original` adds it to
the original weights instead: the model to keep when the base is later used at full precision with
other adapters, but not the model that was trained. The fidelity report says how far the merged
model is from 4-bit base + adapter, on that model's own replies; `--weights best` builds both and
keeps the closer one.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from transformers import AutoModelForCausalLM

from qlora_loop.data.rows import DataError
from qlora_loop.files import replace_dir
from qlora_loop.model.generate import as_messages, encode_chat, generate_ids, stop_token_ids
from qlora_loop.model.load import load_base_model, load_tokenizer
from qlora_loop.use.inference import (Base, InferenceError, attach_adapter, load_for_inference,
                                      load_inference_tokenizer, locate_base, read_adapter_config, read_prompt_lines,
                                      run_config, validation_prompts)

# Questions for an adapter whose run (config.yaml, data) is not at hand and no --prompts were given.
FALLBACK_PROMPTS = ["Who are you?", "What can you do?", "Explain what a language model is in one sentence."]


def check_out_dir(out: str | Path, force: bool, adapter_dir: str | Path) -> None:
    out, adapter = Path(out).resolve(), Path(adapter_dir).resolve()
    if out == adapter or out in adapter.parents:
        raise InferenceError(f"--out {out} holds the adapter being merged; replacing it would delete the adapter: "
                             "choose another folder")
    if out.exists() and not out.is_dir():
        raise InferenceError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InferenceError(f"--out {out} is not empty; pass --force to replace it, or choose another folder")


WEIGHTS = ("trained", "original", "best")


def trained_weights(found: Base) -> tuple[dict[str, torch.Tensor], str]:
    """({parameter name: tensor}, how) of the base as training computed with it: each Linear4bit's
    NF4 weight dequantized by bitsandbytes (the weight its forward multiplies by), and every other
    weight as the 4-bit load holds it (embeddings and norms rounded to the compute dtype as training's
    were). The base is loaded as training loaded it (model.load.load_base_model), in the compute
    dtype training used, and dequantized before any forward pass: on a CPU the first forward may
    repack the 4-bit weights."""
    device = torch.device("cpu")
    dtype, why = found.dtype(device, as_trained=True)
    quantized = load_base_model(found.name, device, dtype, config=found.model_config(), gradient_checkpointing=False)
    weights = {}
    for name, module in quantized.named_modules():
        if isinstance(module, Linear4bit):
            weights[f"{name}.weight"] = dequantize_4bit(module.weight.data, module.weight.quant_state)
    for name, param in quantized.named_parameters():
        weights.setdefault(name, param.data)
    del quantized
    return weights, f"NF4 dequantized in {str(dtype).removeprefix('torch.')} ({why})"


def merged_model(adapter_dir: str | Path, base: str | None = None, *, trust_remote_code: bool | None = None,
                 dtype: torch.dtype = torch.bfloat16, weights: str = "trained"):
    """(base + adapter as one plain transformers model in `dtype`, the adapter's tokenizer, the base
    found, the weights merged into in words). `weights`: "trained" (trained_weights) or "original"
    (the base's files). Runs on the CPU: it needs the model in `dtype` in RAM."""
    found = locate_base(adapter_dir, base, trust_remote_code)
    tokenizer = load_inference_tokenizer(adapter_dir, found)
    model = AutoModelForCausalLM.from_pretrained(found.name, dtype=dtype, device_map={"": "cpu"},
                                                 trust_remote_code=found.trust_remote_code, revision=found.revision)
    how = "the original weights"
    if weights == "trained":
        trained, how = trained_weights(found)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name not in trained:
                    raise InferenceError(f"{found.name}: the 4-bit load has no {name}; merge with --weights original")
                param.copy_(trained[name].to(dtype))
        del trained
    model = attach_adapter(model, adapter_dir, found)
    try:
        merged = model.merge_and_unload(safe_merge=True)  # safe_merge: check the merged weights are finite
    except ValueError as e:
        raise InferenceError(f"the adapter in {adapter_dir} cannot be merged: {str(e).splitlines()[0]}") from None
    # Stop where training taught the model to: the tokenizer's end-of-turn token, and the base's own.
    merged.generation_config.eos_token_id = stop_token_ids(merged, tokenizer)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.config.use_cache = True
    return merged, tokenizer, found, how


def merge_adapter(adapter_dir: str | Path, out: str | Path, base: str | None = None, *,
                  trust_remote_code: bool | None = None, dtype: torch.dtype = torch.bfloat16,
                  weights: str = "trained") -> tuple[str, str]:
    """Write base + adapter as one plain transformers model (safetensors, tokenizer, generation
    config, a README.md saying which weights) to `out`; returns (the base it used, the weights
    merged into in words)."""
    out = Path(out)
    merged, tokenizer, found, how = merged_model(adapter_dir, base, trust_remote_code=trust_remote_code, dtype=dtype,
                                                 weights=weights)
    # Written beside `out` and renamed in place, so an interrupted merge never leaves half a model.
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(weights_note(weights, how, what=f"merged into {found.name} in "
                                                f"{str(dtype).removeprefix('torch.')}"), encoding="utf-8")
    replace_dir(tmp, out)
    return found.name, how


def weights_note(weights: str, how: str, *, what: str) -> str:
    """The README.md of a merged or exported folder: which weights the adapter was added to, and why."""
    why = ("the weights the adapter was trained against, so this is the model that was trained and evaluated "
           "(4-bit base + adapter) up to the rounding of the dtype written" if weights == "trained" else
           "the base's original weights, not the NF4-rounded ones the adapter was trained against: the model it "
           "describes was never trained or evaluated; keep it for a base used at full precision with other adapters")
    return (f"# {what}\n\nThe adapter was added (peft's merge_and_unload) to {how}: {why}.\n"
            "`--weights trained` (the default), `original` or `best` chose this; the report beside it measures "
            "how far this model is from 4-bit base + adapter.\n")


# --- prompts for the report ---------------------------------------------------------------------

def report_prompts(adapter_dir: str | Path, prompts_file: str | None = None, *, n: int = 8,
                   system: str | None = None) -> tuple[list[list[dict]], list[str | None], str]:
    """(conversations to reply to, reference answers or None, where they came from).
    --prompts FILE: one question per line. Otherwise the first n validation rows of the run that
    wrote the adapter (OUTPUT_DIR/config.yaml), asked up to their first assistant turn, from the
    run's tokenized cache when it is there."""
    run = run_config(adapter_dir)
    system = system if system is not None else run.get("data", {}).get("system_prompt")
    if prompts_file is not None:
        lines = read_prompt_lines(prompts_file)
        return [as_messages(q, system) for q in lines], [None] * len(lines), str(prompts_file)
    tokenizer = None  # the run's, saved with the adapter: the key to its tokenized cache
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(adapter_dir), trust_remote_code=run.get("model", {}).get("trust_remote_code",
                                                                                              False))
    try:
        found = validation_prompts(run, n, tokenizer)
    except DataError as e:  # e.g. a relative data path, read from another folder than the run's
        raise InferenceError(f"the run's validation rows cannot be read ({e}); pass --prompts FILE") from None
    if found is None:
        return [as_messages(q, system) for q in FALLBACK_PROMPTS], [None] * len(FALLBACK_PROMPTS), \
            "built-in questions (no run config.yaml beside the adapter)"
    return found


# --- the fidelity report ------------------------------------------------------------------------

@torch.no_grad()
def reply_logprobs(model, prompt_ids: torch.Tensor, reply_ids: torch.Tensor) -> torch.Tensor:
    """log p(next token) at each position that predicts a token of `reply_ids`, [len(reply), vocab] float32."""
    ids = torch.cat([prompt_ids[0], reply_ids]).unsqueeze(0).to(model.device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    start = prompt_ids.shape[1] - 1
    return F.log_softmax(logits[start:start + len(reply_ids)].float(), dim=-1).cpu()


def reference_pass(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[dict]:
    """The reference model's greedy reply to each prompt and its next-token distributions along it."""
    passes = []
    for messages in prompts:
        prompt_ids = encode_chat(tokenizer, messages)
        reply_ids = generate_ids(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens)
        passes.append({"prompt_ids": prompt_ids, "reply_ids": reply_ids,
                       "logprobs": reply_logprobs(model, prompt_ids, reply_ids)})
    return passes


def compare(candidate, tokenizer, passes: list[dict], max_new_tokens: int) -> list[dict]:
    """Per prompt: KL(reference || candidate) at every position of the reference's reply (teacher
    forced), top-1 agreement there, and whether the candidate's own greedy reply is the same."""
    rows = []
    for p in passes:
        logq = reply_logprobs(candidate, p["prompt_ids"], p["reply_ids"])
        logp = p["logprobs"]
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)  # rounding can make a ~0 KL slightly negative
        own = generate_ids(candidate, tokenizer, p["prompt_ids"], max_new_tokens=max_new_tokens)
        rows.append({"positions": len(kl), "mean_kl": kl.mean().item(), "max_kl": kl.max().item(),
                     "top1_agreement": (logp.argmax(-1) == logq.argmax(-1)).float().mean().item(),
                     "greedy_match": torch.equal(own, p["reply_ids"]),
                     "reply_reference": tokenizer.decode(p["reply_ids"], skip_special_tokens=True),
                     "reply_merged": tokenizer.decode(own, skip_special_tokens=True)})
    return rows


def reference_passes(adapter_dir: str | Path, prompts: list[list[dict]], *, base: str | None = None,
                     max_new_tokens: int = 64) -> tuple[list[dict], object]:
    """(reference_pass of 4-bit base + adapter, loaded in the dtype training used: what was trained
    and evaluated; its tokenizer). The model is freed before returning."""
    reference, tokenizer = load_for_inference(adapter_dir, base, as_trained=True)
    passes = reference_pass(reference, tokenizer, prompts, max_new_tokens)
    del reference
    free_memory()
    return passes, tokenizer


def measure(candidate, tokenizer, passes: list[dict], prompts: list[list[dict]], *, references: list[str | None],
            max_new_tokens: int = 64, max_kl: float = 0.05) -> dict:
    """The fidelity report of `candidate` against the reference's `passes` (summarise's dict)."""
    candidate.eval()
    rows = compare(candidate, tokenizer, passes, max_new_tokens)
    rows = [{"prompt": messages[-1]["content"], "reference_answer": answer, **row}
            for row, messages, answer in zip(rows, prompts, references)]
    return summarise(rows, max_kl)


def load_merged(folder: str | Path):
    """A merged folder as anyone loads it: plain transformers, nothing of ours."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(folder, device_map={"": device})


def fidelity_report(adapter_dir: str | Path, merged_dir: str | Path | None, prompts: list[list[dict]], *,
                    references: list[str | None], base: str | None = None, max_new_tokens: int = 64,
                    max_kl: float = 0.05, load_candidate=None) -> dict:
    """4-bit base + adapter (the reference: what was trained and evaluated) against the merged
    folder loaded with plain transformers, or the model `load_candidate()` returns (export's GGUF).
    One model in memory at a time."""
    passes, tokenizer = reference_passes(adapter_dir, prompts, base=base, max_new_tokens=max_new_tokens)
    candidate = load_candidate() if load_candidate is not None else load_merged(merged_dir)
    report = measure(candidate, tokenizer, passes, prompts, references=references, max_new_tokens=max_new_tokens,
                     max_kl=max_kl)
    del candidate
    free_memory()
    return report


def summarise(rows: list[dict], max_kl: float) -> dict:
    """Position-weighted means over all prompts; `ok` is mean_kl <= max_kl."""
    positions = sum(r["positions"] for r in rows)
    mean_kl = sum(r["mean_kl"] * r["positions"] for r in rows) / positions
    top1 = sum(r["top1_agreement"] * r["positions"] for r in rows) / positions
    return {"prompts": len(rows), "positions": positions, "mean_kl": mean_kl,
            "max_kl": max(r["max_kl"] for r in rows), "top1_agreement": top1,
            "greedy_match": sum(r["greedy_match"] for r in rows), "max_kl_threshold": max_kl,
            "ok": mean_kl <= max_kl, "rows": rows}


def report_table(report: dict, *,
                 title: str = "merge fidelity: 4-bit base + adapter vs merged bf16 (KL in nats)") -> Table:
    table = Table(title=title)
    for column in ("prompt", "tokens", "mean KL", "max KL", "top-1 agree", "greedy same"):
        table.add_column(column, justify="left" if column == "prompt" else "right")
    for r in report["rows"]:
        prompt = r["prompt"] if len(r["prompt"]) <= 40 else r["prompt"][:39] + "…"
        table.add_row(prompt, str(r["positions"]), f"{r['mean_kl']:.2e}", f"{r['max_kl']:.2e}",
                      f"{r['top1_agreement']:.1%}", "yes" if r["greedy_match"] else "[red]no")
    table.add_section()
    table.add_row("[bold]all", str(report["positions"]), f"[bold]{report['mean_kl']:.2e}",
                  f"{report['max_kl']:.2e}", f"{report['top1_agreement']:.1%}",
                  f"{report['greedy_match']}/{report['prompts']}")
    return table


def warn_fidelity(console: Console, report: dict, *, what: str, candidate: str, advice: str) -> None:
    """A red panel for a report whose mean KL is above --max-kl: by how much, and what to do about it."""
    panel = Panel(
        f"mean KL {report['mean_kl']:.3g} nats/token is above --max-kl {report['max_kl_threshold']:g}: {candidate} "
        f"does not behave like the 4-bit base + adapter that was trained and evaluated (top-1 agreement "
        f"{report['top1_agreement']:.1%}, greedy replies the same on {report['greedy_match']}/{report['prompts']} "
        f"prompts). {advice}", title=f"WARNING: {what} fidelity", border_style="bold red")
    console.print(panel, soft_wrap=False)  # wrapped inside the panel: a soft-wrapping console crops it to one line


def write_report(report: dict, out: str | Path, *, file_name: str = "merge_report.json", **context) -> Path:
    path = Path(out) / file_name
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()}
    path.write_text(json.dumps({**context, **clean}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the command line (scripts/merge.py) -------------------------------------------------------

def add_report_args(parser: argparse.ArgumentParser, *, candidate: str) -> None:
    """The flags merge and export share: the base, --force, and the fidelity report's prompts and
    limits; `candidate` names what the report compares with 4-bit base + adapter."""
    parser.add_argument("--base", help="base model (hub id or folder); default: the one the adapter records")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--prompts", metavar="FILE", help="report on these prompts (one per line) instead of "
                                                          "the run's validation rows")
    parser.add_argument("--num-prompts", type=int, default=8, help="validation rows to report on")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the greedy replies compared")
    parser.add_argument("--max-kl", type=float, default=0.05,
                        help=f"warn when the mean KL (nats per token) of {candidate} vs 4-bit + adapter exceeds this")
    parser.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="allow the base's own modeling code (default: as the run was configured)")
    parser.add_argument("--weights", choices=WEIGHTS, default="trained",
                        help="merge into the NF4 weights the adapter was trained against (trained, the default), "
                             "the base's original weights (original), or build both and keep the one closer to "
                             "4-bit base + adapter (best)")


def check_report_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    for flag in ("num_prompts", "max_new_tokens"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    if not args.max_kl >= 0:
        parser.error("--max-kl must be >= 0")
    return args


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder a run wrote, e.g. OUTPUT_DIR/best")
    parser.add_argument("--out", required=True, help="folder for the merged model (must be empty, or --force)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="dtype of the merged weights")
    add_report_args(parser, candidate="merged")
    return check_report_args(parser, parser.parse_args(argv))


def choices(weights: str) -> list[str]:
    """The weights --weights builds: both for best (trained first, so a tie keeps it)."""
    return ["trained", "original"] if weights == "best" else [weights]


def keep_closest(reports: dict[str, dict], console: Console) -> tuple[str, dict]:
    """(the weights whose report has the lowest mean KL, what the written report adds about the
    others: with --weights best, each candidate's summary numbers, also printed)."""
    kept = min(reports, key=lambda w: reports[w]["mean_kl"])
    if len(reports) < 2:
        return kept, {}
    console.print("mean KL against 4-bit base + adapter: " + ", ".join(
        f"{w} {r['mean_kl']:.2e}" for w, r in reports.items()) + f"; keeping {kept}")
    return kept, {"by_weights": {w: {k: r[k] for k in ("mean_kl", "max_kl", "top1_agreement", "greedy_match")}
                                 for w, r in reports.items()}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    out = Path(args.out)
    # Every check that can fail cheaply runs before the (slow, memory-hungry) merge.
    read_adapter_config(args.adapter)
    check_out_dir(out, args.force, args.adapter)
    prompts, references, source = report_prompts(args.adapter, args.prompts, n=args.num_prompts)
    console.print(f"4-bit base + adapter: greedy replies to {len(prompts)} prompt(s) from {source} ...")
    passes, tokenizer = reference_passes(args.adapter, prompts, base=args.base, max_new_tokens=args.max_new_tokens)

    # merge, then measure the folder as written (loaded with plain transformers); with --weights best,
    # both candidates are written beside --out and the closer one is renamed into place
    reports, folders, hows = {}, {}, {}
    for weights in choices(args.weights):
        folders[weights] = out if args.weights != "best" else out.with_name(f".{out.name}.{weights}")
        console.print(f"merging {args.adapter} into its base's {weights} weights in {args.dtype} ...")
        base, hows[weights] = merge_adapter(args.adapter, folders[weights], args.base,
                                            trust_remote_code=args.trust_remote_code, dtype=DTYPES[args.dtype],
                                            weights=weights)
        candidate = load_merged(folders[weights])
        reports[weights] = measure(candidate, tokenizer, passes, prompts, references=references,
                                   max_new_tokens=args.max_new_tokens, max_kl=args.max_kl)
        del candidate
        free_memory()
    kept, candidates = keep_closest(reports, console)
    if args.weights == "best":
        replace_dir(folders[kept], out)
        for weights, folder in folders.items():
            shutil.rmtree(folder, ignore_errors=True)
    report = {**reports[kept], "weights": kept, "weights_detail": hows[kept]}
    console.print(f"merged model written to [bold]{out}[/] (base {base}; {hows[kept]})")
    console.print(report_table(report, title=f"merge fidelity: 4-bit base + adapter vs merged {args.dtype}, "
                                             f"{kept} weights (KL in nats)"))
    path = write_report(report, out, adapter=str(args.adapter), base=base, merged=str(out), dtype=args.dtype,
                        prompts_from=source, **candidates)
    console.print(f"report: {path}")
    if not report["ok"]:
        warn_fidelity(console, report, what="merge", candidate="the merged model",
                      advice="Evaluate the merged model before shipping it, or serve the adapter on the 4-bit base.")
    return report
