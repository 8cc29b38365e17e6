# python scripts/plot.py OUTPUT_DIR
"""Draw OUTPUT_DIR/curves.png from a run's steps.jsonl, history.jsonl and summary.json: loss per
step and per epoch (best epoch marked), learning rate, gradient norm, tokens/s. Works on a run
that is still going (it reads what has been written so far)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qlora_loop.plot import plot_run


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="the output_dir of a run")
    parser.add_argument("--out", help="where to write the PNG (default: OUTPUT_DIR/curves.png)")
    args = parser.parse_args(argv)
    drawn = plot_run(args.output_dir, args.out)
    print(drawn["path"])
    return drawn["path"]


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
