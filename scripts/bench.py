# python scripts/bench.py --tiny --generate 256 --seq 512 --batch-size 8 --epochs 3 --repeats 3 --threads 1
"""Benchmark our loop against the HF Trainer + PEFT baseline (and torchkeras' KerasModel, when installed).

Every peer trains the same 4-bit model, LoRA config, rows, optimizer, schedule, batch size and max
length; runs alternate, each in a fresh process (qlora_loop/bench/ says what is measured and how).
Writes --report (every run, per peer the median over repeats, ratios ours/peer) and prints a table.
--gpu-7b needs a CUDA GPU: a model of Qwen2.5-7B's shape with random weights (generated on the GPU,
written once to --workdir, no download) at seq 2048, r=16, batch 1, against the analytic memory floor
and the FLOP bound.

Exit status: 0 done; 1 a run failed (the others are in the report); 2 bad flags, or no GPU for --gpu-7b.
"""

from __future__ import annotations

import argparse
import sys

from qlora_loop.cli import as_script  # first: it quiets bitsandbytes' import-time log line
from qlora_loop.bench.orchestrate import run_bench
from qlora_loop.bench.report import print_report
from qlora_loop.bench.settings import DEFAULT_PEERS, PEERS, Settings


def parse_args(argv: list[str] | None = None) -> Settings:
    d = Settings()  # the defaults live there
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a local model folder (4-bit loadable by from_pretrained) or builtin:NAME")
    src.add_argument("--tiny", action="store_true", help="a tiny Qwen2-shaped model built on the fly (the default)")
    p.add_argument("--vocab", type=int, help="vocab_size of the tiny model (e.g. 152064); the tokenizer stays small")
    p.add_argument("--hidden", type=int, default=d.hidden, help="tiny model hidden size")
    p.add_argument("--layers", type=int, default=d.layers, help="tiny model layers")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", help="a chat/alpaca JSON or JSONL file; --val-split of it is held out")
    data.add_argument("--generate", type=int, metavar="N",
                      help="generate N chat rows whose lengths vary ~20x (default 256)")
    p.add_argument("--val-split", type=float, default=d.val_split)
    p.add_argument("--seq", type=int, default=d.seq, help="max_length in tokens")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--r", type=int, default=d.r)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--repeats", type=int, help="runs per peer, alternating peers (default 3; --real: 1)")
    p.add_argument("--peers",
                   help=f"comma-separated, from {','.join(PEERS)} (default: {DEFAULT_PEERS}; --quick: ours,hf)")
    p.add_argument("--seed", type=int, default=d.seed, help="training seed: adapter init, data order, dropout")
    p.add_argument("--data-seed", type=int,
                   help="seed of the base model, the generated rows and the split (default: --seed)")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra key.path=value for our run, e.g. data.group_by_length=false (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads in every run (default: torch's own choice)")
    p.add_argument("--run-timeout", type=float, metavar="SECONDS",
                   help="kill a run that takes longer (it is reported as failed; the other runs go on)")
    p.add_argument("--quick", action="store_true",
                   help="a few steps of ours and hf on a tiny set (well under a minute)")
    p.add_argument("--real", action="store_true",
                   help="the real-shape case: builtin SmolLM2-135M-Instruct (or --model), batch 8, lengths "
                        "varying ~20x, 1 epoch, against hf, hf_grouped and torchkeras")
    p.add_argument("--gpu-7b", action="store_true",
                   help="Qwen2.5-7B-shaped random model on a CUDA GPU; sets seq 2048, r 16, batch 1, 1 epoch")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                   help="the GPU's peak dense bf16 TFLOP/s for the FLOP bound (H100/H200 SXM: 989; H100 PCIe: 756)")
    p.add_argument("--workdir", default=d.workdir, help="model, data, per-run outputs and logs")
    p.add_argument("--report", default=d.report)
    args = vars(p.parse_args(argv))
    del args["tiny"]  # the default: no --model
    return Settings(**args)


def main(argv: list[str] | None = None) -> dict:
    settings = parse_args(argv)
    command = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run_bench(settings, command=command)
    if report["runs"]:
        print_report(report)
    if report["failed"]:
        failures = "; ".join(f"the {r['peer']} run {r['repeat']} failed ({r['error']})" for r in report["failed"])
        print(f"error: {failures}; the other runs are in {settings.report}", file=sys.stderr)
        sys.exit(1)
    return report


if __name__ == "__main__":
    with as_script():  # a bad flag, or no GPU for --gpu-7b: one `error:` line and exit 2
        main()
