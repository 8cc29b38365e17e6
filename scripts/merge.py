# python scripts/merge.py --adapter OUTPUT_DIR/best --out merged/ [--prompts FILE] [--force]
"""Merge an adapter into its base (reloaded in bfloat16, never the 4-bit weights) and save one plain
transformers model: safetensors, tokenizer, generation config. Then report how faithfully the merged
model reproduces 4-bit base + adapter: KL of next-token distributions, top-1 agreement and greedy
replies on a few prompts (the run's validation rows, or --prompts), written to OUT/merge_report.json."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
# bitsandbytes logs on import, on CPUs with AVX512-BF16, that an optional kernel is not installed;
# stderr is kept for the one `error:` line a bad flag or folder gets.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from qlora_loop.generate import as_script, read_adapter_config
from qlora_loop.merge import check_out_dir, fidelity_report, merge_adapter, report_prompts, report_table, write_report


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder a run wrote, e.g. OUTPUT_DIR/best")
    parser.add_argument("--out", required=True, help="folder for the merged model (must be empty, or --force)")
    parser.add_argument("--base", help="base model (hub id or folder); default: the one the adapter records")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--prompts", metavar="FILE", help="report on these prompts (one per line) instead of "
                                                          "the run's validation rows")
    parser.add_argument("--num-prompts", type=int, default=8, help="validation rows to report on")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the greedy replies compared")
    parser.add_argument("--max-kl", type=float, default=0.05,
                        help="warn when the mean KL (nats per token) of merged vs 4-bit + adapter exceeds this")
    parser.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="allow the base's own modeling code (default: as the run was configured)")
    args = parser.parse_args(argv)
    for flag in ("num_prompts", "max_new_tokens"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    if not args.max_kl >= 0:
        parser.error("--max-kl must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    # Every check that can fail cheaply runs before the (slow, memory-hungry) merge.
    read_adapter_config(args.adapter)
    check_out_dir(args.out, args.force, args.adapter)
    prompts, references, source = report_prompts(args.adapter, args.prompts, args.num_prompts)

    # merge
    console.print(f"merging {args.adapter} into its base in bfloat16 ...")
    base = merge_adapter(args.adapter, args.out, args.base, args.trust_remote_code)
    console.print(f"merged model written to [bold]{args.out}[/] (base {base})")

    # fidelity report
    console.print(f"comparing with 4-bit base + adapter on {len(prompts)} prompt(s) from {source} ...")
    report = fidelity_report(args.adapter, args.out, prompts, references, args.base, args.max_new_tokens,
                             args.max_kl)
    console.print(report_table(report))
    path = write_report(report, args.out, adapter=str(args.adapter), base=base, merged=str(args.out),
                        dtype="bfloat16", prompts_from=source)
    console.print(f"report: {path}")
    if not report["ok"]:
        console.print(Panel(
            f"mean KL {report['mean_kl']:.3g} nats/token is above --max-kl {args.max_kl:g}: the merged model does "
            f"not behave like the 4-bit base + adapter that was trained and evaluated (top-1 agreement "
            f"{report['top1_agreement']:.1%}, greedy replies the same on {report['greedy_match']}/{report['prompts']} "
            "prompts). Evaluate the merged model before shipping it, or serve the adapter on the 4-bit base.",
            title="WARNING: merge fidelity", border_style="bold red"))
    return report


if __name__ == "__main__":
    with as_script():  # one `error:` line and exit 2 for a bad flag, folder or file
        main()
