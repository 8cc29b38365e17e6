"""The report: per peer the median over its repeats, ratios ours / peer, the targets read off them,
the GPU bounds in --gpu-7b mode; written as JSON and printed as one table."""

from __future__ import annotations

import datetime
import json
import statistics
import sys

from rich.console import Console
from rich.table import Table

from qlora_loop.bench.bounds import gpu_report

RATIO_METRICS = ("loss_tokens_per_second", "tokens_per_second", "loop_tokens_per_second", "step_seconds_mean",
                 "loop_seconds",
                 "peak_memory_bytes", "padding_share", "final_train_loss", "eval_loss")
COLUMNS = [("target tok/s", "loss_tokens_per_second"), ("tok/s", "tokens_per_second"),
           ("loop tok/s", "loop_tokens_per_second"),
           ("step ms", "step_seconds_mean"), ("loop s", "loop_seconds"), ("peak MiB", "peak_memory_bytes"),
           ("padding", "padding_share"), ("train loss", "final_train_loss"), ("eval loss", "eval_loss")]


def summarize(runs: list[dict]) -> tuple[dict, dict]:
    """Per peer: the median over its repeats of every number. Ratios: ours / peer of those medians."""
    peers = {}
    for peer in dict.fromkeys(r["peer"] for r in runs):
        mine = [r for r in runs if r["peer"] == peer]
        keys = [k for k, v in mine[0].items() if isinstance(v, (int, float)) and k != "repeat"]
        peers[peer] = {k: statistics.median(r[k] for r in mine) for k in keys}
    ratios = {peer: {k: peers["ours"][k] / peers[peer][k] for k in RATIO_METRICS if peers[peer][k]}
              for peer in peers if peer != "ours" and "ours" in peers}
    return peers, ratios


# --real: tokens/s of the whole training loop, ours / peer, at least this
REAL_LOOP_TARGETS = {"hf": 2.0, "hf_grouped": 1.3}


def targets(peers: dict, ratios: dict, *, vocab: int, real: bool = False) -> list[dict]:
    """The bench's targets, evaluated on this report (informational; nothing asserts them)."""
    out = []
    for peer, ratio in ratios.items():
        if real and peer in REAL_LOOP_TARGETS:
            need = REAL_LOOP_TARGETS[peer]
            out.append({"target": f"whole-loop tokens/s >= {need}x {peer}", "value": ratio["loop_tokens_per_second"],
                        "met": ratio["loop_tokens_per_second"] >= need})
        elif not real:
            out.append({"target": f"loss-bearing tokens/s >= 1.5x {peer}", "value": ratio["loss_tokens_per_second"],
                        "met": ratio["loss_tokens_per_second"] >= 1.5})
        for loss in ("final_train_loss", "eval_loss"):  # "no worse": within a 2% tolerance; strictly: <= 1
            out.append({"target": f"{loss} no worse than {peer} (ours/peer <= 1.02)", "value": ratio[loss],
                        "met": ratio[loss] <= 1.02, "strictly": ratio[loss] <= 1.0})
        if vocab >= 100_000:  # the large-vocabulary case, where the logits dominate memory
            out.append({"target": f"peak memory <= 0.6x {peer}", "value": ratio["peak_memory_bytes"],
                        "met": ratio["peak_memory_bytes"] <= 0.6})
    if "ours" in peers:
        out.append({"target": "padding share <= 5% (ours)", "value": peers["ours"]["padding_share"],
                    "met": peers["ours"]["padding_share"] <= 0.05})
    return out


def build_report(runs: list[dict], failed: list[dict], *, header: dict, vocab: int, bounds: dict | None = None,
                 peak_tflops: float = 0.0) -> dict:
    """The whole report; `header`: its command, machine, settings and data (fixed for the bench),
    `bounds`: bounds.gpu_bounds in --gpu-7b mode."""
    peer_values, ratios = summarize(runs)
    report = {"command": header["command"], "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": header["machine"], "settings": header["settings"], "data": header["data"],
              "runs": runs, "failed": failed, "peers": peer_values, "ratios": ratios,
              "targets": targets(peer_values, ratios, vocab=vocab, real=header["settings"]["real"]),
              "flops": flop_shares(peer_values, flops_per_token=header["settings"]["model_flops_per_token"],
                                   peaks=header["machine"]["matmul_peak_gflops"])}
    if bounds is not None:
        report["gpu_7b"] = gpu_report(bounds, peer_values, peak_tflops=peak_tflops)
    return report


def flop_shares(peers: dict, *, flops_per_token: int | None, peaks: dict[str, float]) -> dict:
    """Per peer: model GFLOP/s during its steps (tokens/s x bounds.model_flops_per_token) and that as a
    share of the measured matmul peak of each dtype. Empty when the model's shape is not known."""
    if not flops_per_token:
        return {}
    per_peer = {}
    for peer, v in peers.items():
        gflops = v["tokens_per_second"] * flops_per_token / 1e9
        per_peer[peer] = {"gflops": gflops, "share_of_peak": {d: gflops / g for d, g in peaks.items()}}
    return {"model_flops_per_token": flops_per_token, "matmul_peak_gflops": peaks, "per_peer": per_peer}


def print_report(report: dict) -> None:
    s = report["settings"]
    table = Table(title=f"bench: {s['model_desc']}, batch {s['batch_size']}, seq {s['seq']}, {s['epochs']} epoch(s), "
                        f"median of {s['repeats']}")
    for title in ["peer"] + [title for title, _ in COLUMNS]:
        table.add_column(title, justify="right")
    for peer, values in report["peers"].items():
        table.add_row(peer, *(_cell(key, values[key]) for _, key in COLUMNS))
    for peer, ratio in report["ratios"].items():
        table.add_row(f"ours/{peer}", *(f"{ratio[key]:.2f}x" if key in ratio else "-" for _, key in COLUMNS),
                      style="bold")
    console = Console(width=None if sys.stdout.isatty() else 140)  # a log or pipe gets the whole table
    console.print(table)
    machine = report["machine"]
    console.print(f"on {machine.get('cpu', machine['processor'])}, {machine['cpu_threads']} threads"
                  + (f"; GPU {machine['gpu']}" if machine.get("gpu") else ""))
    for t in report["targets"]:
        strictly = "" if t.get("strictly", True) else " (not strictly: ours is higher)"
        console.print(f"{'[green]met' if t['met'] else '[red]not met'}[/]  {t['target']}: {t['value']:.4g}{strictly}")
    if report.get("flops"):
        f = report["flops"]
        peaks = ", ".join(f"{d} {g:,.0f}" for d, g in f["matmul_peak_gflops"].items())
        console.print(f"model FLOPs per token {f['model_flops_per_token'] / 1e6:,.0f} M (6 x weights); "
                      f"measured matmul peak GFLOP/s: {peaks}")
        for peer, v in f["per_peer"].items():
            shares = ", ".join(f"{share:.1%} of {d}" for d, share in v["share_of_peak"].items())
            console.print(f"  {peer}: {v['gflops']:,.1f} GFLOP/s during steps, {shares}")
    if "gpu_7b" in report:
        console.print_json(json.dumps(report["gpu_7b"]))


def _cell(key: str, value: float) -> str:
    if key.endswith("loss"):
        return f"{value:.4f}"
    return {"step_seconds_mean": f"{value * 1e3:.1f}", "peak_memory_bytes": f"{value / 2**20:,.0f}",
            "padding_share": f"{value:.1%}"}.get(key, f"{value:,.0f}" if value >= 100 else f"{value:.1f}")
