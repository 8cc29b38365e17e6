"""Look at the training data as the model will see it, before training: N rows rendered with the
chat template (a pair's chosen and rejected answer each after its prompt), trained tokens highlighted (everything else has label -100), then statistics —
rows, dropped and truncated counts, token-length percentiles, the share of tokens trained, the
share of padding at the configured batch size — and the label-mask audit's verdict."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.text import Text

from qlora_loop.config import DataConfig, load_config
from qlora_loop.data.audit import audit_label_masks, trained_runs
from qlora_loop.data.batches import build_dataloaders
from qlora_loop.data.cache import cache_root
from qlora_loop.data.mixtures import build_datasets, source_lines
from qlora_loop.data.preference import answer_rows, build_preference_datasets
from qlora_loop.data.rows import per_kind
from qlora_loop.model.builtin import resolve_model_path
from qlora_loop.model.load import load_tokenizer

TRAINED = "bold black on green3"
PROMPT = "grey50"


def main(argv: list[str] | None = None, console: Console | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file, as for scripts/train.py (default: the embedded demo)")
    parser.add_argument("--n", type=int, default=5, help="rows to render (default 5)")
    parser.add_argument("--audit-rows", type=int, default=1000, help="rows the label-mask audit checks (default 1000)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_intermixed_args(argv)
    console = console or Console(highlight=False)
    cfg = load_config(args.config, args.overrides)
    d = cfg.data
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file),
                               trust_remote_code=cfg.model.trust_remote_code,
                               revision=cfg.model.revision, chat_template=d.chat_template)
    if cfg.train.objective == "sft":
        train, val, stats = build_datasets(tokenizer, d, seed=cfg.train.seed, cache=cache_root() if d.cache else None)
    else:  # pairs (dpo, orpo) or judged answers (kto): each answer after its prompt
        train, val, stats = build_preference_datasets(tokenizer, d, objective=cfg.train.objective, seed=cfg.train.seed)

    for example in train[: args.n]:
        what = "" if "desirable" not in example else "  desirable" if example["desirable"] else "  undesirable"
        console.rule(f"[bold]{example['where']}[/]  {len(example['input_ids'])} tokens"
                     + ("  chosen" if "rejected_ids" in example else what))
        console.print(highlight(tokenizer, example["input_ids"], example["labels"]), soft_wrap=True)
        if "rejected_ids" in example:
            console.rule(f"[bold]{example['where']}[/]  {len(example['rejected_ids'])} tokens  rejected")
            console.print(highlight(tokenizer, example["rejected_ids"], example["rejected_labels"]), soft_wrap=True)
    console.rule("statistics")
    numbers = statistics(train, val, stats, d, batch_size=cfg.train.batch_size, pad_id=tokenizer.pad_token_id,
                         seed=cfg.train.seed)
    for line in format_statistics(numbers, stats, batch_size=cfg.train.batch_size, max_length=d.max_length,
                                  packing=d.packing) + source_lines(stats):
        console.print(line, soft_wrap=True)

    answers = answer_rows(train)  # a pair's rejected answer is audited too
    audited = min(args.audit_rows, len(answers))
    problems = audit_label_masks(tokenizer, answers, [e["messages"] for e in answers], sample=audited,
                                 max_length=d.max_length)
    numbers["audit_problems"] = problems
    if problems:
        console.print(f"[bold red]label-mask audit: {len(problems)} problem(s) in {audited} of {len(answers)} train rows:",
                      soft_wrap=True)
        for problem in problems:
            console.print(f"  {problem}", soft_wrap=True)
    else:
        console.print(f"label-mask audit: {audited} of {len(answers)} train rows checked, all pass", soft_wrap=True)
    return numbers


def highlight(tokenizer, ids: list[int], labels: list[int]) -> Text:
    """The row's text, trained runs highlighted; each run decoded on its own."""
    text = Text()
    for trained, start, end in trained_runs(labels):
        piece = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text.append(piece, style=TRAINED if trained else PROMPT)
    return text


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats
    return ordered[int(rank) - 1]


def statistics(train: list[dict], val: list[dict], stats: dict, data: DataConfig, *, batch_size: int, pad_id: int,
               seed: int) -> dict:
    lengths = [len(e["input_ids"]) for e in train]
    trained = stats["train"].target_tokens
    # Padding in epoch 1's order, batched (grouped by length, packed, or neither) as training does.
    loader, _ = build_dataloaders(train, [], data, batch_size=batch_size, pad_id=pad_id, seed=seed)
    loader.sampler.set_epoch(1)
    positions = real = 0
    for batch in loader:
        positions += batch["attention_mask"].numel()
        real += int(batch["attention_mask"].sum())
    return {
        "rows": {split: s.rows for split, s in stats.items()},
        "dropped": {split: s.dropped for split, s in stats.items()},
        "truncated": {split: s.truncated for split, s in stats.items()},
        "examples": {"train": len(train), "val": len(val)},
        "length": {"p50": percentile(lengths, 50), "p90": percentile(lengths, 90), "p99": percentile(lengths, 99),
                   "max": max(lengths), "min": min(lengths), "mean": sum(lengths) / len(lengths)},
        "tokens": sum(lengths),
        "trained_tokens": trained,
        "trained_share": trained / sum(lengths),
        "padding": positions - real,
        "padded_positions": positions,
        "padding_share": (positions - real) / positions,
    }


def format_statistics(n: dict, stats: dict, *, batch_size: int, max_length: int, packing: bool = False) -> list[str]:
    def splits(key: str) -> str:
        return "  ".join(f"{split} {n[key][split]:,}" for split in ("train", "val"))

    kinds = {split: per_kind(s.dropped_by_kind) for split, s in stats.items()}
    dropped = "  ".join(f"{split} {n['dropped'][split]:,}" + (f" ({kinds[split]})" if kinds[split] else "")
                        for split in ("train", "val"))
    length = n["length"]
    return [
        f"rows read        {splits('rows')}",
        f"dropped          {dropped}",
        f"truncated        {splits('truncated')}  (at data.max_length={max_length})",
        f"examples         {splits('examples')}",
        f"tokens per row   p50 {length['p50']}  p90 {length['p90']}  p99 {length['p99']}  max {length['max']}  "
        f"min {length['min']}  mean {length['mean']:.1f}  (train)",
        f"trained tokens   {n['trained_tokens']:,} of {n['tokens']:,} ({100 * n['trained_share']:.1f}%)",
        f"padding          {n['padding']:,} of {n['padded_positions']:,} positions ({100 * n['padding_share']:.1f}%) "
        f"at train.batch_size={batch_size}" + (" (data.packing=true)" if packing else ""),
    ]

