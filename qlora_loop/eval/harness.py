"""Benchmarks through lm-evaluation-harness (`pip install -e ".[harness]"`): `qlora-loop eval --tasks`
runs lm_eval's tasks on the loaded 4-bit base + adapter, then on the same model with the adapter
disabled (the base, no second copy). A task is a name lm_eval knows or a task .yaml of your own, e.g.
over a local file (`dataset_path: json`, `dataset_kwargs: {data_files: {test: /path/rows.jsonl}}`)."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from qlora_loop.errors import InferenceError


def check_tasks(spec: str) -> dict:
    """{"names": [...], "include": [folders of task files]} for --tasks NAME[,NAME|FILE.yaml], every task
    known and its data loadable (offline, a hub task needs its dataset in the datasets cache)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InferenceError("--tasks needs lm-evaluation-harness, which is not installed: "
                             "pip install -e \".[harness]\" (or pip install lm-eval)") from None
    for name in ("lm-eval", "lm_eval"):  # its INFO lines would drown the table
        logging.getLogger(name).setLevel(logging.WARNING)
    names, include = [], []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        if entry.endswith((".yaml", ".yml")):
            path = Path(entry)
            if not path.is_file():
                raise InferenceError(f"--tasks {entry}: no such task file")
            task = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("task")
            if not isinstance(task, str):
                raise InferenceError(f"--tasks {entry}: the file names no `task:`; lm_eval task files start with "
                                     "`task: NAME`")
            names.append(task)
            include.append(str(path.resolve().parent))
        else:
            names.append(entry)
    if not names:
        raise InferenceError("--tasks names no task; give NAME[,NAME] or a task .yaml file")
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise InferenceError(f"--tasks: lm_eval knows no task {', '.join(unknown)}; `lm_eval ls tasks` lists them, "
                             "or give a task .yaml file")
    try:
        manager.load(names)  # reads each task's data now, before any model loads
    except (OSError, ConnectionError, ValueError) as e:
        raise InferenceError(f"--tasks {','.join(names)}: the task data cannot be loaded "
                             f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); offline, "
                             "a hub task needs its dataset already in the datasets cache, or write a task .yaml "
                             "over a local file") from None
    return {"names": names, "manager": manager}


def compare_tasks(model, tokenizer, tasks: dict, *, base: bool, limit: int | None, batch_size: int,
                  chat_template: bool, console: Console) -> dict:
    """{task: {metric: {"adapter": value, "base": value}}} from lm_eval's simple_evaluate."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))

    def run() -> dict:
        out = simple_evaluate(model=lm, tasks=tasks["names"], task_manager=tasks["manager"], limit=limit,
                              log_samples=False, apply_chat_template=chat_template, bootstrap_iters=0)
        return {task: {k.split(",")[0]: v for k, v in values.items()
                       if isinstance(v, (int, float)) and "_stderr" not in k and k not in ("alias", "sample_len")}
                for task, values in out["results"].items()}

    results = {"adapter": run()}
    if base:
        with model.disable_adapter():
            results["base"] = run()
    merged = {task: {metric: {who: results[who][task].get(metric) for who in results} for metric in values}
              for task, values in results["adapter"].items()}
    show_tasks(console, merged)
    return merged


def show_tasks(console: Console, tasks: dict) -> None:
    table = Table(title="lm-evaluation-harness")
    for column in ("task", "metric", "base", "adapter", "adapter - base"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, values in tasks.items():
        for metric, by in values.items():
            gap = f"{by['adapter'] - by['base']:+.3f}" if by.get("base") is not None else ""
            table.add_row(task, metric, "-" if by.get("base") is None else f"{by['base']:.3f}",
                          f"{by['adapter']:.3f}", gap)
    console.print(table)
