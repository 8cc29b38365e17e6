"""LoRA's variants on the embedded default (scripts/bench_variants.py): each variant's step time and
held-out loss against plain LoRA, on the builtin SmolLM2-135M-Instruct in 4-bit with the default's
data, replay and settings, the same epochs for all, each run once in a fresh process.

  step s        the optimizer steps' seconds / steps (summary.json step_seconds / steps)
  val loss      the best validation loss (the default's held-out identity rows)
  drift         the drift at that best epoch (general answers against the base's)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "lora": [],
    "dora": ["adapter.use_dora=true"],
    "rslora": ["adapter.use_rslora=true"],
    "gaussian": ["adapter.init=gaussian"],
    "loftq": ["adapter.init=loftq"],
    "pissa": ["adapter.init=pissa"],
    "eva": ["adapter.init=eva"],
    "loraplus": ["train.loraplus_lr_ratio=16"],
    "neftune": ["train.neftune_alpha=5"],
}


def run_one(name: str, out: Path, epochs: int) -> dict:
    from qlora_loop.config import load_config
    from qlora_loop.run import train

    cfg = load_config(None, [f"output_dir={out}", f"train.epochs={epochs}", "train.patience=0",
                             "eval.num_samples=0", *VARIANTS[name]])
    summary = train(cfg, overwrite=True)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    best = next(row for row in history if row["epoch"] == summary["best_epoch"])
    return {"variant": name, "step_seconds": summary["step_seconds"] / max(summary["steps"], 1),
            "val_loss": summary["best_metric"], "drift": best.get("drift"), "steps": summary["steps"],
            "train_seconds": summary["train_seconds"]}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workdir", default="bench-variants")
    p.add_argument("--report", default="bench-variants/report.json")
    args = p.parse_args(argv)
    results = []
    for name in [v for v in args.variants.split(",") if v]:
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
        out = Path(args.workdir) / name
        done = subprocess.run([sys.executable, "-m", "qlora_loop.bench.variants", "--worker", name, str(out),
                               str(args.epochs)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads((out / "bench.json").read_text()))
        print(json.dumps(results[-1]), flush=True)
    plain = next((r for r in results if r["variant"] == "lora"), None)
    for r in results:
        if plain:
            r["step_vs_lora"] = r["step_seconds"] / plain["step_seconds"]
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps({"epochs": args.epochs, "results": results}, indent=2))
    print(f"{'variant':<10} {'step s':>7} {'x lora':>7} {'val loss':>9} {'drift':>6}")
    for r in results:
        drift = f"{r['drift']:.2f}" if r["drift"] is not None else "-"
        print(f"{r['variant']:<10} {r['step_seconds']:7.2f} {r.get('step_vs_lora', 1):7.2f} {r['val_loss']:9.4f} "
              f"{drift:>6}")
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        name, out, epochs = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
        result = run_one(name, out, epochs)
        (out / "bench.json").write_text(json.dumps(result))
    else:
        main()
