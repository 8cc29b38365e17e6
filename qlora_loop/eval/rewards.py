"""GRPO's rewards: plain functions `(prompts, completions, rows) -> list[float]`, one score per completion.

Built in (train.rewards names them):
  exact_match, rouge_l, chrf   the row metrics of eval/metrics.py against the row's "answer": the
                               metric and the reward are the same code
  format                       1.0 when the stripped completion matches the regex `pattern` whole, else 0.0
  length                       0.0 up to `max_chars` characters, falling linearly to -1.0 at twice that
A user's own: "package.module:function", importable from where the run starts. An entry is a name, or
a mapping {name, weight (1.0), and options passed to the function as keyword arguments}, e.g.
  train.rewards: [exact_match, {name: format, pattern: '\\d{4}-\\d{2}-\\d{2}', weight: 0.5}]
A completion's reward is the weighted sum. A function that raises, or returns anything but one finite
number per completion, is a RewardError naming the function and the row.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate.utils import gather_object

from qlora_loop.errors import ConfigError, DataError, RewardError
from qlora_loop.eval.metrics import ROW_METRICS, score
from qlora_loop.model.generate import generate_replies, rng_preserved


def metric_reward(metric: Callable) -> Callable:
    """A row metric of eval/metrics.py as a reward, scored against each row's "answer"."""
    def reward(prompts, completions: list[str], rows: list[dict]) -> list[float]:
        return [metric(p, c, {"reference": _answer(row)}) for p, c, row in zip(prompts, completions, rows)]
    return reward


def _answer(row: dict) -> str:
    if not isinstance(row.get("answer"), str):
        raise KeyError("the row has no string 'answer' to score against; map your column with data.columns, e.g. "
                       "{answer: solution}")
    return row["answer"]


def format_reward(prompts, completions: list[str], rows, *, pattern: str) -> list[float]:
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length_reward(prompts, completions: list[str], rows, *, max_chars: int = 200) -> list[float]:
    return [-min(1.0, max(0, len(c) - max_chars) / max_chars) for c in completions]


BUILTIN: dict[str, Callable] = {**{name: metric_reward(metric) for name, metric in ROW_METRICS.items()},
                                "format": format_reward, "length": length_reward}


@dataclass(frozen=True)
class Reward:
    name: str  # as train.rewards gives it
    fn: Callable
    weight: float = 1.0


def build_rewards(specs: list, where: str = "train.rewards") -> list[Reward]:
    """train.rewards' entries as Rewards: each a built-in name, "module:function", or a mapping {name,
    weight, options...}. An unknown name, a module that does not import, a missing function or option is
    a ConfigError naming the entry."""
    rewards = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        options = dict(spec) if isinstance(spec, dict) else {"name": spec}
        name, weight = options.pop("name", None), options.pop("weight", 1.0)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{at}={spec!r}: give a reward's name, e.g. exact_match, or {{name: format, pattern: ...}}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{at}: weight={weight!r} must be a number")
        fn = _find(name, at)
        if name == "format" and "pattern" not in options:
            raise ConfigError(f"{at}: the format reward needs a regex, e.g. {{name: format, pattern: '\\d+'}}")
        if name == "format":
            try:
                re.compile(options["pattern"])
            except (re.error, TypeError) as e:
                raise ConfigError(f"{at}: pattern={options['pattern']!r} is not a regex ({e})") from None
        rewards.append(Reward(name, functools.partial(fn, **options) if options else fn, float(weight)))
    if not rewards:
        raise ConfigError(f"{where} is empty: GRPO learns from rewards; give one, e.g. {where}=[exact_match]")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}={names} names a reward twice; give it once with its weight")
    return rewards


def _find(name: str, at: str) -> Callable:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        close = difflib.get_close_matches(name, BUILTIN, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"{at}: unknown reward {name!r}; {hint}choose from {', '.join(BUILTIN)}, or give your own "
                          "as package.module:function")
    module, _, function = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), function)
    except ImportError as e:
        raise ConfigError(f"{at}: cannot import {module!r} for reward {name!r} ({e}); run from the folder that holds "
                          "it, or install it") from None
    except AttributeError:
        raise ConfigError(f"{at}: {module!r} has no function {function!r}") from None
    if not callable(fn):
        raise ConfigError(f"{at}: {name} is not a function")
    return fn


def check_answers(rewards: list[Reward], examples: list[dict], *, metrics: list[str]) -> None:
    """Before step 1: every prompt row has a string "answer" when a reward (exact_match, rouge_l, chrf) or
    eval.metrics `metrics` scores against it; else one DataError naming the first row without."""
    needs = [r.name for r in rewards if r.name in ROW_METRICS] + [f"eval.metrics {m}" for m in metrics]
    missing = [e["where"] for e in examples if not isinstance(e["row"].get("answer"), str)]
    if needs and missing:
        raise DataError(f"{missing[0]}: no string 'answer' for {', '.join(needs)} to score against ({len(missing)} "
                        "row(s) without one); map your column with data.columns, e.g. {answer: solution}, or drop "
                        "those rewards", "missing_field")


def scorer(rewards: list[Reward]):
    """score(prompts, completions, examples) -> (weighted rewards [N], {name: [N]}), for grpo_split and
    the evaluation; `examples` are prompt examples (data/prompts.py), whose "row" the functions get and
    whose "where" names the row of a failure."""
    def score_all(prompts: list, completions: list[str], examples: list[dict]) -> tuple[torch.Tensor, dict]:
        rows = [e["row"] for e in examples]
        by_name = {r.name: torch.tensor(call(r, prompts, completions, rows, examples), dtype=torch.float)
                   for r in rewards}
        total = sum(r.weight * by_name[r.name] for r in rewards)
        return total, by_name
    return score_all


def call(reward: Reward, prompts: list, completions: list[str], rows: list[dict], examples: list[dict]) -> list[float]:
    """The reward's scores, checked; a failure is found again row by row, so the error names its row."""
    try:
        values = reward.fn(prompts, completions, rows)
    except Exception as whole:
        for k in range(len(completions)):
            try:
                reward.fn(prompts[k:k + 1], completions[k:k + 1], rows[k:k + 1])
            except Exception as e:
                raise RewardError(f"reward {reward.name} failed on {examples[k]['where']} (completion "
                                  f"{completions[k][:60]!r}): {type(e).__name__}: {e}") from e
        raise RewardError(f"reward {reward.name} failed on the {len(completions)} completions from "
                          f"{examples[0]['where']} on, though on none alone: {type(whole).__name__}: {whole}") from whole
    values = list(values) if not isinstance(values, (str, bytes)) else values
    if not isinstance(values, list) or len(values) != len(completions):
        raise RewardError(f"reward {reward.name} returned {type(values).__name__} of length "
                          f"{len(values) if hasattr(values, '__len__') else '?'}, not one score per completion "
                          f"({len(completions)}), for the rows from {examples[0]['where']}")
    scores = []
    for k, value in enumerate(values):
        try:
            scores.append(float(value))  # numbers, numpy scalars, 0-d tensors
        except (TypeError, ValueError):
            scores.append(math.nan)
        if not math.isfinite(scores[-1]):
            raise RewardError(f"reward {reward.name} gave {value!r} for {examples[k]['where']} (completion "
                              f"{completions[k][:60]!r}); a reward is a finite number")
    return scores


def reward_watch(runner, tokenizer, rewards: list[Reward], *, rows: list[dict], metrics: list[str], max_new_tokens: int,
                 log, num_samples: int = 2):
    """fit's `metrics()` for GRPO: greedy completions of the validation prompts `rows`, their mean
    weighted "reward", each function's ("reward/NAME"), and eval.metrics `metrics` against the rows'
    answers; the first `num_samples` completions printed with their rewards. Under DDP each process
    completes its share and the completions are gathered. The model and random state are left as they were."""
    accelerator, score_all = runner.accelerator, scorer(rewards)
    prompts = [e["messages"][:-1] if e["messages"][-1]["role"] == "assistant" else e["messages"] for e in rows]
    share = list(range(accelerator.process_index, len(rows), accelerator.num_processes))

    def measure() -> dict[str, float]:
        model = accelerator.unwrap_model(runner.model)
        with rng_preserved(model.device), accelerator.autocast():
            replies = generate_replies(model, tokenizer, [prompts[i] for i in share], max_new_tokens=max_new_tokens)
        completions = [reply for _, reply in sorted(gather_object(list(zip(share, replies))))]
        total, by_name = score_all([e["prompt"] for e in rows], completions, rows)
        scores = {"reward": float(total.mean()), **{f"reward/{k}": float(v.mean()) for k, v in by_name.items()}}
        if metrics:
            scores.update(score(metrics, prompts, completions, [_answer(e["row"]) for e in rows]))
        log.scored_samples(runner.step, prompts=[p[-1]["content"] for p in prompts[:num_samples]],
                           completions=completions[:num_samples], rewards=total[:num_samples].tolist(),
                           by_name=[{k: float(v[i]) for k, v in by_name.items()} for i in range(min(num_samples, len(rows)))])
        return scores

    return measure
