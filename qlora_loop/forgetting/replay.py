"""Forgetting, prevented: general prompts answered by the base itself, mixed into the training rows.

A model fine-tuned on a few dozen rows of one kind (a new name and maker) learns to answer
everything that way. Training on the base's own greedy replies to general prompts beside them
holds the rest of its behaviour where it was, at the cost of generating those replies once
(cached, keyed by the base, the template and the prompts) and of training on more rows.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qlora_loop.config import ConfigError
from qlora_loop.data.rows import Conversation
from qlora_loop.files import write_atomic
from qlora_loop.manifest import describe_base, text_hash
from qlora_loop.model.generate import as_messages, generate_replies, rng_preserved
from qlora_loop.paths import cache_dir

BATCH = 16  # prompts generated together


def read_prompts(path: str | Path, key: str) -> list[str]:
    """Prompts from a .jsonl file of {"prompt": ...} rows, or a text file with one per line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file; give a .jsonl file of {{\"prompt\": ...}} rows or a "
                          "text file with one prompt per line")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [line.strip() for line in lines]
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            prompts.append(json.loads(line)["prompt"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number}: expected a JSON object with a \"prompt\" string ({key})") from None
    return prompts


def choose(prompts: list[str], n: int, seed: int) -> list[str]:
    """n of the prompts, drawn by the seed, in file order."""
    if n > len(prompts):
        raise ConfigError(f"data.replay={n}, but data.replay_prompts holds only {len(prompts)} prompts; lower "
                          "data.replay or give a larger file")
    return [prompts[i] for i in sorted(random.Random(seed).sample(range(len(prompts)), n))]


def base_replies(model, tokenizer, prompts: list[str], *, base: str, system: str | None, max_new_tokens: int,
                 what: str = "replies", console=None) -> list[str]:
    """The base's greedy replies (pass the model before its adapter is added, or inside
    disable_adapter), cached under the user cache by the base's fingerprint, its chat template, the
    prompts and the reply length, so a second run with the same settings generates nothing."""
    if not prompts:
        return []
    key = hashlib.sha256(json.dumps([describe_base(base, base), text_hash(tokenizer.chat_template), system,
                                     prompts, max_new_tokens]).encode()).hexdigest()[:20]
    path = cache_dir() / "replies" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    replies = []
    columns = (TextColumn(f"the base answers {what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress, rng_preserved(model.device):
        task = progress.add_task("replies", total=len(prompts))
        for start in range(0, len(prompts), BATCH):
            batch = [as_messages(prompt, system) for prompt in prompts[start:start + BATCH]]
            replies += [r.strip() for r in generate_replies(model, tokenizer, batch, max_new_tokens=max_new_tokens,
                                                            batch_size=BATCH)]
            progress.advance(task, len(batch))
    write_atomic(path, json.dumps(replies, ensure_ascii=False))  # never half a cache file
    return replies


def replay_conversations(prompts: list[str], replies: list[str], system: str | None) -> list[Conversation]:
    """Training rows of the replay: each prompt with the base's reply; an empty reply is left out."""
    return [Conversation(f"replay:{i + 1}", as_messages(prompt, system) + [{"role": "assistant", "content": reply}])
            for i, (prompt, reply) in enumerate(zip(prompts, replies)) if reply]
