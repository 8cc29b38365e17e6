"""eval.metrics while training: at every evaluation, greedy replies to the validation rows, scored
against their references (eval/metrics.py). Under DDP each process answers its share of the rows and
the replies are gathered, so every process computes the same scores."""

from __future__ import annotations

from typing import Callable

from accelerate.utils import gather_object

from qlora_loop.config import EvalConfig
from qlora_loop.errors import LaunchError
from qlora_loop.eval.metrics import score
from qlora_loop.model.generate import generate_replies, rng_preserved


def reference_prompts(rows: list[dict]) -> tuple[list[list[dict]], list[str]]:
    """(prompts, references): each row's messages cut before its last trained assistant turn, and that
    turn's text, the answer the row teaches. Every row counts, a prompt asked twice included."""
    prompts, references = [], []
    for row in rows:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train") is not False)
        prompts.append([{k: v for k, v in m.items() if k != "train"} for m in messages[:last]])
        references.append(messages[last]["content"])
    return prompts, references


def metrics_watch(runner, tokenizer, evals: EvalConfig, *, rows: list[dict],
                  sharded_by: str | None = None) -> Callable[[], dict[str, float]] | None:
    """fit's `metrics()`: {metric: score} of eval.metrics over the first eval.metrics_rows validation
    `rows` (all when null), replies of eval.metrics_max_new_tokens tokens at most, batched and greedy;
    None when no metric is asked for. The model and the random state are left as they were."""
    if not evals.metrics or not rows:
        return None
    if sharded_by:  # one process cannot generate with weights spread over all of them
        raise LaunchError(f"eval.metrics={evals.metrics} cannot be measured under {sharded_by}: generation "
                          "would need every process; launch with DDP (configs/accelerate/ddp.yaml) or set "
                          "eval.metrics=[]")
    prompts, references = reference_prompts(rows[:evals.metrics_rows or None])
    accelerator = runner.accelerator
    share = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))

    def metrics() -> dict[str, float]:
        model = accelerator.unwrap_model(runner.model)
        # generate() runs the unwrapped model, outside the autocast Accelerate wraps its forward in
        with rng_preserved(model.device), accelerator.autocast():
            replies = generate_replies(model, tokenizer, [prompts[i] for i in share],
                                       max_new_tokens=evals.metrics_max_new_tokens)
        completions = [reply for _, reply in sorted(gather_object(list(zip(share, replies))))]
        return score(evals.metrics, prompts, completions, references)

    return metrics
