"""One peer, once, in a process of its own, so that its peak memory is its own:

    python -m qlora_loop.bench.worker PEER SPEC_JSON RESULT_JSON

(started by bench.orchestrate.run_peer). Writes the peer's raw measures to RESULT_JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from qlora_loop.training.memory import peak_memory_bytes, reset_peak

# Each process imports only its peer's module: our run's libraries (qlora_loop.run) and the
# tutorials' (torchkeras) would otherwise count in the other peers' peak memory.
RUNS = {"ours": ("qlora_loop.bench.ours", "run_ours", {}),
        "hf": ("qlora_loop.bench.tutorial", "run_hf", {}),
        "hf_grouped": ("qlora_loop.bench.tutorial", "run_hf", {"grouped": True}),
        "torchkeras": ("qlora_loop.bench.tutorial", "run_torchkeras", {})}


def work(peer: str, spec_path: Path, result_path: Path) -> dict:
    spec = json.loads(spec_path.read_text())
    out = Path(spec["workdir"]) / "runs" / result_path.stem
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder: no run ever meets a previous bench's files
    out.mkdir(parents=True)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    module, name, options = RUNS[peer]
    run = getattr(importlib.import_module(module), name)
    device = torch.device(spec["device"])
    load_before = os.getloadavg()[0]
    reset_peak(device)
    result = run(spec, out, **options)
    # Taken when training ended, before the bench's own held-out evaluation (ours: its whole run).
    result.setdefault("peak_memory_bytes", peak_memory_bytes(device))
    # The machine's 1-minute load average before and after: other processes on the cores skew the timings.
    result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
    result_path.write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    peer, spec_file, result_file = sys.argv[1:]
    work(peer, Path(spec_file), Path(result_file))
