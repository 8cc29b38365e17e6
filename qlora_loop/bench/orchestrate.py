"""run_bench: settings -> the model and rows every peer gets -> alternating runs (ours, hf,
torchkeras, ours, ...), each in a fresh process (bench.worker) -> the report, rewritten after every
run so that a run that fails or hangs late loses nothing measured."""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import qlora_loop
from qlora_loop.bench.bounds import QWEN25_7B, gpu_bounds, model_flops_per_token
from qlora_loop.bench.inputs import build_bench_model, load_examples, write_data, write_random_checkpoint
from qlora_loop.bench.measure import derived
from qlora_loop.bench.ours import ours_overrides
from qlora_loop.bench.peak import measured_peaks
from qlora_loop.bench.report import build_report
from qlora_loop.bench.settings import BenchError, Settings
from qlora_loop.config import ConfigError
from qlora_loop.cpu import describe_cpu
from qlora_loop.errors import ModelError
from qlora_loop.model.builtin import resolve_model_path
from qlora_loop.model.load import load_tokenizer

ROOT = Path(qlora_loop.__file__).resolve().parents[1]  # the workers run `python -m qlora_loop.bench.worker` here


def run_bench(settings: Settings, *, command: str) -> dict:
    """Every peer of `settings`, `repeats` times, alternating; the report (also written to
    settings.report). A run that fails is recorded under "failed" and the others go on."""
    s = settings.resolved()
    if s.gpu_7b and not torch.cuda.is_available():
        raise BenchError("--gpu-7b needs a CUDA GPU (about 10 GB free for the 4-bit 7B run, and ~16 GB of disk for "
                         "its random bf16 checkpoint) and this machine has none; on a CPU run `python scripts/bench.py "
                         "--tiny` (add --vocab 152064 --seq 1024 for the large-vocabulary case)")
    peers, skipped = available(s.peer_list())
    workdir = Path(s.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # inputs: the model and the rows, the same for every peer
    if s.model:
        try:
            model, desc = Path(resolve_model_path(s.model)).resolve(), s.model  # builtin:NAME built on first use
        except ModelError as e:
            raise BenchError(f"--model: {e}") from None
    else:
        model = build_bench_model(workdir / f"tiny-h{s.hidden}-l{s.layers}-v{s.vocab or 0}", vocab=s.vocab,
                                  hidden=s.hidden, layers=s.layers, seed=s.data_seed)
        desc = f"tiny Qwen2 (hidden {s.hidden}, {s.layers} layers, vocab {s.vocab or 'tokenizer'})"
        if s.gpu_7b:
            model = write_random_checkpoint(workdir / "qwen2.5-7b-shape-random", model, shape=QWEN25_7B,
                                            device=device, seed=s.data_seed)
            desc = "Qwen2.5-7B shape, random weights"
    train_path, val_path = write_data(workdir, load_tokenizer(str(model)), data=s.data, generate=s.generate,
                                      seq=s.seq, val_split=s.val_split, seed=s.data_seed, system="" if s.real else None)
    spec = {"model": str(model), "train": str(train_path), "val": str(val_path), "seq": s.seq,
            "batch_size": s.batch_size, "epochs": s.epochs, "lr": s.lr, "r": s.r, "alpha": s.alpha,
            "dropout": s.dropout, "seed": s.seed, "device": device, "workdir": str(workdir), "threads": s.threads}
    _, train, val = load_examples(spec)
    total = math.ceil(len(train) / s.batch_size) * s.epochs
    spec["warmup_steps"] = math.ceil(s.warmup_ratio * total)  # our build_scheduler's rule, given to the others
    try:
        spec["ours_overrides"] = ours_overrides(spec, warmup_ratio=s.warmup_ratio, extra=s.ours_set)
    except ConfigError as e:
        raise BenchError(f"--ours-set: {e}") from None
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))

    lengths = [len(e["input_ids"]) for e in train]
    shape = json.loads((model / "config.json").read_text())
    vocab = shape["vocab_size"]
    header = {"command": command,
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": device,
                          "cpu": describe_cpu(),
                          "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                          "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                          # measured here, with the runs' threads; a run's share of it is in the report
                          "matmul_peak_gflops": measured_peaks(torch.device(device), threads=s.threads)},
              "settings": {**{k: v for k, v in spec.items() if k not in ("ours_overrides", "workdir")},
                           "repeats": s.repeats, "model_desc": desc, "peers": peers, "skipped": skipped,
                           "ours_overrides": spec["ours_overrides"], "vocab_size": vocab, "real": s.real,
                           "model_flops_per_token": flops_per_token(shape)},
              "data": {"train_rows": len(train), "val_rows": len(val), "min_tokens": min(lengths),
                       "max_tokens": max(lengths), "length_ratio": max(lengths) / min(lengths),
                       "mean_tokens": statistics.mean(lengths), "steps_per_run": total}}
    bounds = gpu_bounds(QWEN25_7B, seq=s.seq, batch=s.batch_size, r=s.r) if s.gpu_7b else None

    # runs: alternating peers, the report rewritten after each
    runs, failed = [], []
    report_path = Path(s.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report = build_report(runs, failed, header=header, vocab=vocab, bounds=bounds, peak_tflops=s.peak_tflops)
    for repeat in range(s.repeats):
        for peer in peers:
            result = run_peer(peer, repeat, spec_path, workdir=workdir, timeout=s.run_timeout)
            (failed if "error" in result else runs).append(result)
            report = build_report(runs, failed, header=header, vocab=vocab, bounds=bounds, peak_tflops=s.peak_tflops)
            report_path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def flops_per_token(shape: dict) -> int | None:
    """bounds.model_flops_per_token of a Llama/Qwen2-shaped config.json; None for another shape."""
    try:
        return model_flops_per_token(shape)
    except KeyError:
        return None


def available(peers: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the peers that can run here, {peer: why not} for the others): torchkeras may be absent."""
    skipped = {}
    if "torchkeras" in peers:
        try:
            importlib.import_module("torchkeras")
        except Exception as e:  # not installed, or its own imports (pandas, IPython) missing
            skipped["torchkeras"] = f"not importable ({e}); pip install torchkeras pandas ipython"
    return [p for p in peers if p not in skipped], skipped


def run_peer(peer: str, repeat: int, spec_path: Path, *, workdir: Path, timeout: float | None = None) -> dict:
    """One peer, once, in a fresh process; its raw measures plus the derived rates, or {"error": ...}."""
    name = f"{peer}-{repeat}"
    result, log = workdir / "results" / f"{name}.json", workdir / "logs" / f"{name}.log"
    result.parent.mkdir(exist_ok=True), log.parent.mkdir(exist_ok=True)
    result.unlink(missing_ok=True)
    threads = json.loads(spec_path.read_text())["threads"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log, "w") as f:
        try:
            code = subprocess.run([sys.executable, "-m", "qlora_loop.bench.worker", peer, str(spec_path), str(result)],
                                  stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:  # the worker is killed; the other peers still run
            code = None
    if code != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        how = f"killed after --run-timeout {timeout} s" if code is None else f"exit {code}"
        return {"peer": peer, "repeat": repeat, "error": f"{how}; its log {log} ends:\n{tail}"}
    r = json.loads(result.read_text())
    return {"peer": peer, "repeat": repeat, **r, **derived(r)}
