"""What a run shows and writes: rich progress, tables and sample panels on the main process;
steps.jsonl (one row every log_every steps), history.jsonl (one per epoch), samples.jsonl and
summary.json in the output folder; the same numbers to the trackers of train.log_with.
Every method marked @main_process is a no-op on the other processes."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from qlora_loop.observe.trackers import epoch_metrics, log_samples, step_metrics
from qlora_loop.training.disk import as_disk_error
from qlora_loop.data.rows import per_kind
from qlora_loop.files import GIB
from qlora_loop.training.memory import peak_memory_bytes

STEP_COLUMNS = ("loss", "grad_norm", "lr", "tokens", "target_tokens", "positions")
HISTORY_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "drift", "lr", "grad_norm", "train_tokens", "seconds",
                   "tokens_per_second", "loss_tokens_per_second", "padding_share", "peak_memory_bytes")


def main_process(method):
    """Run `method` on the main process only, through the run's Accelerator (its on_main_process)."""
    @functools.wraps(method)
    def on_main(self, *args, **kwargs):
        return self.accelerator.on_main_process(method)(self, *args, **kwargs)

    return on_main


# the epoch table's header of each metric of eval.metrics (history.jsonl has the names)
METRIC_HEADERS = {"exact_match": "EM", "rouge_l": "RL", "chrf": "chrF", "bleu": "BLEU", "reward_accuracy": "acc",
                  "reward_margin": "margin", "chosen_logp": "logp+", "rejected_logp": "logp-", "reward": "reward"}
METRIC_NAMES = {"exact_match": "exact match", "rouge_l": "ROUGE-L"}
PREFERENCE_CAPTION = ("acc, margin: reward accuracy and margin on the validation pairs; logp+, logp-: the chosen "
                      "and rejected answers' log-probs")


def _metrics_caption(metrics: list[str]) -> str:
    """'; EM exact match: greedy replies to the validation rows, 0-1' for the metrics shown."""
    scored = [m for m in metrics if m in ("exact_match", "rouge_l", "chrf", "bleu")]
    parts = [PREFERENCE_CAPTION] if "reward_accuracy" in metrics else []
    if "reward" in metrics:
        parts.append("reward, R.name: the weighted reward and each function's, greedy completions of the validation "
                     "prompts")
    if scored:
        named = ", ".join(f"{METRIC_HEADERS[m]} {METRIC_NAMES[m]}" if m in METRIC_NAMES else METRIC_HEADERS[m]
                          for m in scored)
        parts.append(f"{named}: greedy replies to the validation rows, 0-1")
    return "".join(f"; {p}" for p in parts)


class RunLog:
    """`metrics`: the names of eval.metrics, a column each in the epoch table and history.jsonl."""

    def __init__(self, accelerator, output_dir: str | Path, log_every: int = 1, metrics: list[str] = ()):
        self.accelerator, self.output_dir, self.log_every = accelerator, Path(output_dir), log_every
        self.metrics = list(metrics)
        self.console = Console()
        self.progress: Progress | None = None
        # Short headers, so that the table fits an 80-column terminal; history.jsonl has the full names.
        unit = "per pair (judged answer for KTO)" if "reward_accuracy" in self.metrics else "per trained token"
        rate = "pairs/s" if "reward_accuracy" in self.metrics else "trained tokens/s"
        self.table = Table(title="epochs", pad_edge=False, box=box.SIMPLE_HEAD, padding=0, show_edge=False,
                           caption=f"train, val: loss {unit}; drift: KL(base || adapted) per token; tgt/s: {rate}"
                                   + _metrics_caption(self.metrics))
        for column in ("ep", "train", "val", "drift", *(METRIC_HEADERS.get(m, m.replace("reward/", "R.")) for m in self.metrics), "lr",
                       "gnorm", "tok/s", "tgt/s", "pad%", "sec"):
            self.table.add_column(column, justify="right")

    @main_process
    def print(self, *args, **kwargs) -> None:
        self.console.print(*args, **kwargs)

    @main_process
    def data_report(self, stats: dict) -> None:
        table = Table(title="data")
        for column in ("split", "rows", "truncated", "dropped", "examples", "target tokens"):
            table.add_column(column, justify="right")
        for split, s in stats.items():
            table.add_row(split, str(s.rows), str(s.truncated), str(s.dropped), str(s.examples), str(s.target_tokens))
        self.console.print(table)
        for split, s in stats.items():
            if s.dropped:
                self.console.print(f"[yellow]{split}: {s.dropped} rows skipped ({per_kind(s.dropped_by_kind)}); "
                                   f"first: {s.dropped_where[0]}")

    @main_process
    def model_report(self, targets: list[str], trainable: int, total: int) -> None:
        self.console.print(f"LoRA targets (every Linear4bit but lm_head): [bold]{', '.join(targets)}[/]")
        self.console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    @main_process
    def memory_report(self, probe) -> None:
        headroom = "" if probe.budget_bytes is None else \
            f", headroom {probe.headroom_bytes / GIB:.2f} GiB of {probe.budget_bytes / GIB:.2f} GiB"
        what = "CUDA max allocated" if self.accelerator.device.type == "cuda" else "process peak RSS"
        self.console.print(f"memory probe (longest batch, {probe.tokens} token slots): peak "
                           f"{probe.peak_bytes / GIB:.2f} GiB {what}{headroom}")

    @main_process
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        self.progress = Progress(TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, completed=done, stats="")

    @main_process
    def resume(self, step: int, epoch: int) -> None:
        """Cut the logs back to a checkpoint taken after `step`, inside `epoch`."""
        for name, keep in (("steps.jsonl", lambda row: row["step"] <= step),
                           ("history.jsonl", lambda row: row["epoch"] < epoch),
                           ("samples.jsonl", lambda row: row["epoch"] < epoch if "epoch" in row else row["step"] <= step)):
            path = self.output_dir / name
            if path.exists():
                rows = [line for line in path.read_text(encoding="utf-8").splitlines() if keep(_row(line))]
                path.write_text("".join(line + "\n" for line in rows), encoding="utf-8")

    @main_process
    def step(self, step: int, epoch: int, result, tokens_per_second: float) -> None:
        reward = f"  reward {result.stats['reward']:.3f}" if "reward" in result.stats else ""
        stats = f"loss {result.loss:.4f}{reward}  lr {result.lr:.2e}  gnorm {result.grad_norm:.3f}  {tokens_per_second:,.0f} tok/s"
        self.progress.update(self.task, advance=1, stats=stats)
        if step % self.log_every == 0:
            row = {"step": step, "epoch": epoch, **{k: getattr(result, k) for k in STEP_COLUMNS}, **result.stats}
            self._append("steps.jsonl", row)
            if self.accelerator.trackers:
                self.accelerator.log(step_metrics(result, tokens_per_second,
                                                  peak_memory_bytes(self.accelerator.device)), step=step)

    @main_process
    def epoch_end(self, row: dict) -> None:
        self.progress.stop()
        val = "-" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
        drift = "-" if row.get("drift") is None else f"{row['drift']:.4f}"
        measured = row.get("metrics") or {}
        scores = ["-" if measured.get(m) is None else f"{measured[m]:.1f}" if m.endswith("_logp") else
                  f"{measured[m]:.2f}" for m in self.metrics]
        self.table.add_row(str(row["epoch"]), f"{row['train_loss']:.4f}", val, drift, *scores, f"{row['lr']:.1e}",
                           f"{row['grad_norm']:.2f}", f"{row['tokens_per_second']:,.0f}",
                           f"{row['loss_tokens_per_second']:,.0f}", f"{100 * row['padding_share']:.1f}",
                           f"{row['seconds']:.0f}")
        self.console.print(self.table)
        self._append("history.jsonl", {**{k: row[k] for k in HISTORY_COLUMNS}, **{m: measured.get(m) for m in self.metrics}})
        if self.accelerator.trackers:
            self.accelerator.log(epoch_metrics(row), step=row["step"])

    @main_process
    def samples(self, epoch: int, step: int, *, prompts: list[str], responses: list[str],
                references: list[str | None], sources: list[str]) -> None:
        """Replies to the sample prompts: a panel each, a row each in samples.jsonl, and the trackers.
        sources: what each reference is ("reference": a held-out answer; "base": the base's reply)."""
        when = "before training" if epoch == 0 else f"after epoch {epoch}"
        for prompt, response, reference, source in zip(prompts, responses, references, sources):
            text = f"[bold]Q:[/] {prompt}\n[bold]A:[/] {response}"
            if reference is not None:
                text += f"\n[dim]{source}: {reference}[/]"
            self.console.print(Panel(text, title=f"sample, {when}", expand=False))
            self._append("samples.jsonl", {"epoch": epoch, "prompt": prompt, "response": response,
                                           "reference": reference, "reference_from": source})
        log_samples(self.accelerator, list(zip(prompts, responses)), step)

    @main_process
    def scored_samples(self, step: int, *, prompts: list[str], completions: list[str], rewards: list[float],
                       by_name: list[dict]) -> None:
        """GRPO's greedy completions of validation prompts with their rewards: a panel each, a row each in
        samples.jsonl."""
        for prompt, completion, reward, named in zip(prompts, completions, rewards, by_name):
            parts = ", ".join(f"{k} {v:.2f}" for k, v in named.items())
            self.console.print(Panel(f"[bold]Q:[/] {prompt}\n[bold]A:[/] {completion}\n[dim]reward {reward:.3f} "
                                     f"({parts})[/]", title=f"validation completion, step {step}", expand=False))
            self._append("samples.jsonl", {"step": step, "prompt": prompt, "response": completion, "reward": reward,
                                           "rewards": named})

    @main_process
    def summary(self, summary: dict) -> None:
        path = self.output_dir / "summary.json"
        try:
            path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise as_disk_error(e, path) from None
        table = Table(title="summary", show_header=False)
        for key, value in summary.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        self.console.print(table)
        where = self.output_dir.resolve()
        best = f"the adapter in {where / 'best'}; " if (self.output_dir / "best").is_dir() else ""
        self.console.print(f"{best}logs, curves.png and summary.json in {where}", soft_wrap=True)

    def _append(self, name: str, row: dict) -> None:
        try:
            with open(self.output_dir / name, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as e:  # a full disk: the line may be cut short; resume drops such a line
            raise as_disk_error(e, self.output_dir / name) from None


def _row(line: str) -> dict:
    """A log line; one cut short by a crash or a full disk reads as a row nothing keeps."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return {"step": math.inf, "epoch": math.inf}
