# accelerate launch scripts/train.py [--config configs/FILE.yaml] [key.path=value ...] [--overwrite] [--dry-run]
"""Train a QLoRA adapter (qlora_loop.run.train). With no arguments, the embedded default: a model
built offline and the bundled self-cognition set, on a CPU.

Exit status: 0 done; 2 bad config, data, model, launch, or a batch that does not fit in memory;
3 non-finite loss; 75 stopped by SIGTERM/SIGINT after writing a checkpoint (run the same command
with train.resume=auto to continue)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qlora_loop.cli import as_script  # noqa: E402  (first: it quiets bitsandbytes' import-time log line)
from qlora_loop.config import load_config  # noqa: E402
from qlora_loop.run import dry_run, train  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file; keys override the defaults in qlora_loop/config/sections.py")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in output_dir and start afresh")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device: targets, trainable parameters, memory estimate")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        dry_run(cfg)
        return {}
    return train(cfg, overwrite=args.overwrite)


if __name__ == "__main__":
    with as_script():
        main()
