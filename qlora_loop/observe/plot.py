"""curves.png from a run's steps.jsonl, history.jsonl and summary.json (matplotlib, Agg backend).

Four panels against the optimizer step, sharing one x axis: loss (train per step, train and
validation per epoch, the drift from the base per epoch, the best epoch marked), learning rate,
gradient norm (before clipping, with the clipping threshold), and throughput per epoch. Epoch
values sit at the step that ended the epoch; a run without steps.jsonl is drawn against the epoch
instead.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")  # files only: no display, no GUI toolkit needed on a server
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from qlora_loop.files import GIB  # noqa: E402

def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_run(output_dir: str | Path, out: str | Path | None = None) -> dict:
    """Write OUTPUT_DIR/curves.png (or `out`). Returns what was drawn: for each panel ("loss", "lr",
    "grad_norm", "tokens_per_second") each series' label -> (x, y) read back from the plotted lines;
    "legends": each panel's legend texts; "yscale": each panel's "linear" or "log"; "path"; "best_epoch"."""
    output_dir = Path(output_dir)
    steps = read_jsonl(output_dir / "steps.jsonl")
    history = read_jsonl(output_dir / "history.jsonl")
    summary_path = output_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    if not steps and not history:
        raise FileNotFoundError(f"{output_dir}: no steps.jsonl or history.jsonl to plot; give the output_dir of a run")
    at, xlabel = _epoch_position(steps, history)
    good = [row for row in steps if row.get("finite", True)]
    skipped = [row["step"] for row in steps if not row.get("finite", True)]

    def per_step(key: str) -> tuple[list, list]:
        return [r["step"] for r in good], [r[key] for r in good]

    def per_epoch(key: str) -> tuple[list, list]:
        rows = [h for h in history if h.get(key) is not None]
        return [at(h["epoch"]) for h in rows], [h[key] for h in rows]

    # sharex: every panel spans the same steps, so a step lines up across the four
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex=True, constrained_layout=True)
    loss_ax, lr_ax, norm_ax, speed_ax = axes.flat
    title = output_dir.resolve().name
    if summary.get("best_metric") is not None:
        title += f" — best {summary.get('monitor', 'val_loss')} {summary['best_metric']:.4g} " \
                 f"at epoch {summary.get('best_epoch')}"
    fig.suptitle(title, fontsize=13)

    # loss
    if good:
        loss_ax.plot(*per_step("loss"), color="tab:blue", alpha=0.35, linewidth=1, label="train (per step)")
    if history:
        loss_ax.plot(*per_epoch("train_loss"), "o-", color="tab:blue", label="train (epoch mean)")
        if any(h.get("val_loss") is not None for h in history):
            loss_ax.plot(*per_epoch("val_loss"), "s-", color="tab:orange", label="validation (end of epoch)")
        if any(h.get("drift") is not None for h in history):  # nats per token, as the loss
            loss_ax.plot(*per_epoch("drift"), "^--", color="tab:purple", label="drift: KL(base || adapted)")
    best_epoch = summary.get("best_epoch")
    best = next((h for h in history if h["epoch"] == best_epoch), None)
    if best is not None:
        metric = summary.get("monitor", "val_loss")
        value = best.get(metric) if best.get(metric) is not None else best["train_loss"]
        for ax in axes.flat:
            ax.axvline(at(best_epoch), color="tab:green", linestyle="--", linewidth=1)
        loss_ax.plot([at(best_epoch)], [value], "*", color="tab:green", markersize=16,
                     label=f"best: epoch {best_epoch} ({metric} {value:.4g})")
    for step in skipped:
        loss_ax.axvline(step, color="tab:red", alpha=0.4, linewidth=1)
    if skipped:
        loss_ax.plot([], [], color="tab:red", alpha=0.4, label=f"skipped non-finite steps ({len(skipped)})")
    _log_scale_if_wide(loss_ax, [r["loss"] for r in good])
    _style(loss_ax, "loss", "loss (mean per target token)", xlabel)

    # learning rate
    if good:
        lr_ax.plot(*per_step("lr"), color="tab:purple", label="lr (per step)")
    else:
        lr_ax.plot(*per_epoch("lr"), "o-", color="tab:purple", label="lr (end of epoch)")
    # plain numbers at 3 significant digits: "%.1e" printed a tick at 1.75e-3 as 1.8e-03, and an
    # offset text ("1e-3") would sit under the epoch axis on top
    lr_ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:.3g}"))
    _style(lr_ax, "learning rate", "learning rate", xlabel)

    # gradient norm
    if good:
        norm_ax.plot(*per_step("grad_norm"), color="tab:gray", alpha=0.6, linewidth=1,
                     label="grad norm (per step, before clipping)")
    if history:
        norm_ax.plot(*per_epoch("grad_norm"), "o-", color="black", label="grad norm (epoch mean)")
    max_grad_norm = _max_grad_norm(output_dir)
    if max_grad_norm:
        norm_ax.axhline(max_grad_norm, color="tab:red", linestyle=":", label=f"clipped at {max_grad_norm:g}")
    # early spikes would flatten the later, smaller norms against the x axis
    _log_scale_if_wide(norm_ax, [r["grad_norm"] for r in good])
    _style(norm_ax, "gradient norm", "L2 norm", xlabel)

    # throughput, labelled with the peak memory wherever it changes (it rarely does after epoch 1)
    if history:
        speed_ax.plot(*per_epoch("tokens_per_second"), "o-", color="tab:cyan",
                      label="tokens/s (per epoch, non-padding)")
        shown = None
        for h in history:
            label = f"{h['peak_memory_bytes'] / GIB:.1f} GiB" if h.get("peak_memory_bytes") else None
            if label and label != shown:
                speed_ax.annotate(label, (at(h["epoch"]), h["tokens_per_second"]), textcoords="offset points",
                                  xytext=(0, 7), ha="center", fontsize=7, color="dimgray",
                                  bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none"})
                shown = label
        speed_ax.set_ylim(bottom=0, top=max(h["tokens_per_second"] for h in history) * 1.25)
    _style(speed_ax, "throughput (labels: peak memory where it changes)", "tokens / second", xlabel)

    if steps and history:
        for ax in axes.flat:
            _epoch_axis(ax, history, at)
    path = Path(out) if out is not None else output_dir / "curves.png"
    fig.savefig(path, dpi=110)
    panels = {"loss": loss_ax, "lr": lr_ax, "grad_norm": norm_ax, "tokens_per_second": speed_ax}
    drawn = {name: _series(ax) for name, ax in panels.items()}
    legends = {name: [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
               for name, ax in panels.items()}
    yscale = {name: ax.get_yscale() for name, ax in panels.items()}
    plt.close(fig)
    return {**drawn, "legends": legends, "yscale": yscale, "path": path, "best_epoch": best_epoch}


def _epoch_position(steps: list[dict], history: list[dict]):
    """(epoch -> x, x label). The step that ended each epoch: history's own "step" where it records
    one, else the epoch's last row in steps.jsonl (the true end only when log_every divides it)."""
    if not steps:
        return (lambda epoch: epoch), "epoch"
    end_step = {}
    for row in steps:
        end_step[row["epoch"]] = max(end_step.get(row["epoch"], 0), row["step"])
    end_step.update({h["epoch"]: h["step"] for h in history if "step" in h})
    return (lambda epoch: end_step.get(epoch, math.nan)), "optimizer step"


def _log_scale_if_wide(ax, values: list[float]) -> None:
    """A series falling by orders of magnitude is unreadable on a linear axis."""
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")


def _style(ax, title: str, ylabel: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_tick_params(labelbottom=True)  # sharex hides the upper row's step numbers otherwise
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _epoch_axis(ax, history: list[dict], at) -> None:
    """A secondary x axis on top naming the epochs at the steps that ended them."""
    top = ax.secondary_xaxis("top")
    ticks = [(at(h["epoch"]), h["epoch"]) for h in history if not math.isnan(at(h["epoch"]))]
    every = max(1, len(ticks) // 10)
    top.set_xticks([x for x, _ in ticks[::every]], [str(e) for _, e in ticks[::every]], fontsize=7)
    top.set_xlabel("end of epoch", fontsize=8)


def _series(ax) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (x, y) of every labelled line on the axes, as drawn."""
    return {line.get_label(): ([float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()])
            for line in ax.get_lines() if not line.get_label().startswith("_") and len(line.get_xdata())}


def _max_grad_norm(output_dir: Path) -> float | None:
    config = output_dir / "config.yaml"
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("train", {}).get("max_grad_norm")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="the output_dir of a run")
    parser.add_argument("--out", help="where to write the PNG (default: OUTPUT_DIR/curves.png)")
    args = parser.parse_args(argv)
    drawn = plot_run(args.output_dir, args.out)
    print(drawn["path"])
    return drawn["path"]

