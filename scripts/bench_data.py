# python scripts/bench_data.py [--rows 20000] [--model builtin:smollm2-135m-instruct]
"""The tokenized cache, measured: a generated set of --rows alpaca rows (1 to 3 turns, 10 to 200
words), prepared once in-process (rows/s of a first preparation), then the whole command
`scripts/inspect_data.py --n 0` run twice on it: the first start tokenizes, the second reads the cache."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the model learns to answer questions about data files and formats in a short clear way".split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            history = [[text(5, 20), text(10, 60)] for _ in range(rng.randint(0, 2))]
            row = {"instruction": f"{i}: {text(5, 40)}", "output": text(10, 200), "history": history}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    args = parser.parse_args()
    from qlora_loop.config import DataConfig
    from qlora_loop.data.mixtures import build_datasets
    from qlora_loop.model.builtin import resolve_model_path
    from qlora_loop.model.load import load_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = folder / "rows.jsonl"
    generate(data, args.rows)
    tokenizer = load_tokenizer(resolve_model_path(args.model))
    start = time.perf_counter()
    train, val, _ = build_datasets(tokenizer, DataConfig(train=str(data), val_split=0.1, max_length=512))
    seconds = time.perf_counter() - start
    print(f"first preparation, in-process, no cache: {args.rows} rows in {seconds:.1f} s "
          f"= {args.rows / seconds:.0f} rows/s")
    command = [sys.executable, str(ROOT / "scripts" / "inspect_data.py"), "--n", "0",
               f"model.name_or_path={args.model}", f"data.train={data}"]
    times = []
    for label in ("first start (tokenizes, writes the cache)", "second start (reads the cache)"):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        times.append(time.perf_counter() - start)
        print(f"{label}: {times[-1]:.1f} s")
    print(f"speedup of the second start: {times[0] / times[1]:.1f}x  (command: {' '.join(command[1:])})")


if __name__ == "__main__":
    main()
