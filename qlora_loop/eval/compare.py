"""`qlora-loop eval` (scripts/eval.py): an adapter scored beside its base on rows with reference answers.

Greedy replies of the 4-bit base + adapter to each row's prompt (the row cut before its last trained
assistant turn), then of the same loaded model with the adapter disabled (peft's disable_adapter: the
base, no second copy), each scored against that turn by eval.metrics' functions. Prints a table, one row
per metric, with the difference, and the rows where the two differ most; writes OUT/eval_report.json.
With --tasks, lm-evaluation-harness benchmarks of both (eval/harness.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from qlora_loop.config import SourceConfig, TrainConfig
from qlora_loop.data.mixtures import held_out_conversations
from qlora_loop.data.preference import answer_conversations
from qlora_loop.data.sources import load_conversations
from qlora_loop.errors import DataError, InferenceError
from qlora_loop.eval.during import reference_prompts
from qlora_loop.eval.metrics import METRICS, ROW_METRICS, check_metrics, row_scores, score
from qlora_loop.files import write_atomic
from qlora_loop.model.generate import generate_replies
from qlora_loop.model.load import quantization_of
from qlora_loop.use.inference import load_for_inference, run_config

DEFAULT_METRICS = ["exact_match", "rouge_l", "chrf", "bleu"]


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder a run wrote, e.g. OUTPUT_DIR/best")
    parser.add_argument("--data", help="rows with answers, in any form a run reads (.jsonl, .json, .csv, .parquet, "
                                       "a saved dataset, a hub id); default: the run's own validation rows")
    parser.add_argument("--format", default="auto", choices=["auto", "alpaca", "messages", "sharegpt"],
                        help="of --data, as data.format")
    parser.add_argument("--columns", help="of --data, as data.columns: OURS=THEIRS,..., e.g. instruction=question")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                        help=f"from {', '.join(METRICS)}; default: {' '.join(DEFAULT_METRICS)}")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rows", type=int, help="score only the first N rows")
    parser.add_argument("--batch-size", type=int, default=16, help="replies generated at once (left-padded)")
    parser.add_argument("--out", help="folder for eval_report.json; default: OUTPUT_DIR/eval beside the adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace an eval_report.json already in --out")
    parser.add_argument("--no-base", action="store_true", help="score the adapter only")
    parser.add_argument("--base", help="base model (hub id or folder); default: the one the adapter records")
    parser.add_argument("--tasks", help="lm-evaluation-harness tasks, NAME[,NAME] or a task .yaml file "
                                        "(pip install -e \".[harness]\")")
    parser.add_argument("--limit", type=int, help="with --tasks: at most N documents per task")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="with --tasks: render each prompt with the chat template, as training did")
    args = parser.parse_args(argv)
    for flag in ("max_new_tokens", "rows", "batch_size", "limit"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    return args


def parse_columns(text: str | None) -> dict | None:
    """'instruction=question,output=answer' -> {'instruction': 'question', 'output': 'answer'}."""
    if not text:
        return None
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise InferenceError(f"--columns {text!r}: write OURS=THEIRS pairs separated by commas, e.g. "
                             "instruction=question,output=answer")
    return {ours.strip(): theirs.strip() for ours, theirs in pairs}


def eval_rows(args, run: dict, tokenizer) -> tuple[list[list[dict]], list[str], list[str], str]:
    """(prompts, references, where each row is, where the rows come from): --data's rows, or the run's
    validation rows, with the run's data.system_prompt as training added it."""
    system = run.get("data", {}).get("system_prompt")
    if args.data is None:
        if not run.get("data"):
            raise InferenceError(f"--adapter {args.adapter}: no run config.yaml beside it names its data; pass --data")
        objective = run.get("train", {}).get("objective", "sft")
        conversations, label = held_out_conversations(run["data"], run.get("train", {}).get("seed", TrainConfig.seed),
                                                      tokenizer, read=None if objective == "sft" else
                                                      answer_conversations(objective))
    else:
        source = SourceConfig(args.data, format=args.format, columns=parse_columns(args.columns))
        try:
            conversations, label = load_conversations(source, system_prompt=system), args.data
        except DataError as e:
            if e.kind in ("missing_field", "no_assistant", "unanswered", "format", "empty_response"):
                raise DataError(f"--data {e}; eval scores each reply against the row's answer (alpaca's output, "
                                "the last assistant turn of messages): every row needs one (scripts/chat.py "
                                "--prompts answers prompts alone)", e.kind) from None
            raise
    conversations = conversations[:args.rows]
    if not conversations:
        raise DataError(f"{label}: no rows to score")
    prompts, references = reference_prompts([{"messages": c.messages} for c in conversations])
    return prompts, references, [c.where for c in conversations], label


def answer(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int,
           progress: Progress, what: str) -> list[str]:
    """Greedy replies to `prompts`, `batch_size` at a time, with a progress bar."""
    task = progress.add_task(what, total=len(prompts))
    replies = []
    for start in range(0, len(prompts), batch_size):
        replies += generate_replies(model, tokenizer, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                    batch_size=batch_size)
        progress.update(task, completed=len(replies))
    return replies


def output_folder(args) -> Path:
    """--out, or OUTPUT_DIR/eval beside the adapter; an earlier report there is kept unless --overwrite."""
    out = Path(args.out) if args.out else Path(args.adapter).parent / "eval"
    if (out / "eval_report.json").exists() and not args.overwrite:
        raise InferenceError(f"--out {out} already holds an eval_report.json; pass --overwrite to replace it, or "
                             "--out another folder")
    return out


def compare_replies(model, tokenizer, args, *, metrics: list[str], console: Console) -> dict:
    """Score the adapter (and its base unless --no-base) on the rows: {"metrics", "rows", "settings"}."""
    prompts, references, wheres, label = eval_rows(args, run_config(args.adapter), tokenizer)
    console.print(f"[dim]{model.name_or_path} (4-bit) + adapter {args.adapter}, on {model.device}; "
                  f"{len(prompts)} rows of {label}", soft_wrap=True)
    options = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    replies = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        replies["adapter"] = answer(model, tokenizer, prompts, progress=progress, what="adapter", **options)
        if not args.no_base:
            with model.disable_adapter():  # the same 4-bit base, no second copy
                replies["base"] = answer(model, tokenizer, prompts, progress=progress, what="base", **options)
    return {"metrics": {who: score(metrics, prompts, said, references) for who, said in replies.items()},
            "rows": rows_of(metrics, prompts, references, wheres, replies),
            "settings": {"adapter": str(args.adapter), "base": model.name_or_path, "data": label,
                         "metrics": metrics, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                         "rows": len(prompts), "decoding": "greedy", "quantization": quantization_of(model)}}

def rows_of(metrics: list[str], prompts: list[list[dict]], references: list[str], wheres: list[str],
            replies: dict[str, list[str]]) -> list[dict]:
    """One entry per row: its prompt (the last user turn; `messages` the whole prompt), reference,
    each model's reply and each model's row scores."""
    scores = {who: row_scores(metrics, prompts, said, references) for who, said in replies.items()}
    return [{"where": where, "prompt": prompt[-1]["content"], "reference": reference,
             **{who: said[i] for who, said in replies.items()},
             "scores": {who: s[i] for who, s in scores.items()}, "messages": prompt}
            for i, (where, prompt, reference) in enumerate(zip(wheres, prompts, references))]


def most_different(report: dict, n: int = 5) -> list[dict]:
    """The n rows where adapter and base score furthest apart, by the mean of the row metrics asked for."""
    metrics = [m for m in report["settings"]["metrics"] if m in ROW_METRICS]
    rows = [r for r in report["rows"] if "base" in r["scores"]]
    if not metrics or not rows:
        return []

    def gap(row: dict) -> float:
        return sum(row["scores"]["adapter"][m] - row["scores"]["base"][m] for m in metrics) / len(metrics)

    return sorted((r for r in rows if gap(r)), key=lambda r: -abs(gap(r)))[:n]

def show(console: Console, report: dict) -> None:
    """The metric table (base, adapter, difference) and the rows where the two differ most."""
    scores, n = report["metrics"], report["settings"]["rows"]
    table = Table(title=f"{n} rows, greedy replies scored against the references (0-1, higher is better)")
    table.add_column("metric")
    columns = [who for who in ("base", "adapter") if who in scores]
    for who in columns:
        table.add_column(who, justify="right")
    if "base" in scores:
        table.add_column("adapter - base", justify="right")
    for metric, value in scores["adapter"].items():
        cells = [f"{scores[who][metric]:.3f}" for who in columns]
        if "base" in scores:
            cells.append(f"{value - scores['base'][metric]:+.3f}")
        table.add_row(metric, *cells)
    console.print(table)
    for row in most_different(report):
        console.print(f"[bold]{row['where']}[/]  Q: {_short(row['prompt'])}\n  reference: {_short(row['reference'])}"
                      f"\n  adapter:   {_short(row['adapter'])}\n  base:      {_short(row['base'])}",
                      soft_wrap=True, highlight=False)


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console = Console(highlight=False)
    metrics = check_metrics(args.metrics if args.metrics is not None else DEFAULT_METRICS, "--metrics")
    out = output_folder(args)
    if args.tasks:  # before the model loads: lm_eval installed, the tasks' files readable
        from qlora_loop.eval.harness import check_tasks, compare_tasks

        tasks = check_tasks(args.tasks)
    model, tokenizer = load_for_inference(args.adapter, args.base)
    report = {}
    if args.data or not args.tasks:
        report = compare_replies(model, tokenizer, args, metrics=metrics, console=console)
        show(console, report)
    if args.tasks:
        report["tasks"] = compare_tasks(model, tokenizer, tasks, base=not args.no_base, limit=args.limit,
                                        batch_size=args.batch_size, chat_template=args.apply_chat_template,
                                        console=console)
    write_atomic(out / "eval_report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    console.print(f"report: {(out / 'eval_report.json').resolve()}", soft_wrap=True)
    return report
