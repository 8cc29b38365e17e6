"""Scores of generated replies against reference answers, every one in [0, 1], higher is better.

Row metrics score one reply at a time, `(prompt, completion, row) -> float` with the reference in
row["reference"], and a set's score is their mean over rows: the same functions score completions
as rewards. Corpus metrics (BLEU) score a whole set at once, as sacrebleu defines them; a single
row's BLEU is not BLEU's meaning.

  exact_match  1.0 when the reply equals the reference once both are stripped of leading and
               trailing whitespace; case, punctuation and inner spaces count
  rouge_l      ROUGE-L F1 (rouge-score) on lower-cased words, each CJK character a word of its own
               (rouge-score's own tokenizer keeps only a-z0-9, so Chinese would score 0)
  chrf         chrF, character 6-grams with beta 2 (sacrebleu), / 100
  bleu         corpus BLEU-4 (sacrebleu), tokenizer 13a, or zh when a reference holds CJK, / 100
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Callable

from qlora_loop.errors import ConfigError

# CJK ideographs, kana and hangul: each one a word for ROUGE, and sacrebleu's zh tokenizer for BLEU
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def exact_match(prompt, completion: str, row: dict) -> float:
    return float(completion.strip() == row["reference"].strip())


class _Words:
    """rouge-score's tokenizer interface: lower-cased runs of letters and digits in any script, and
    each CJK character alone."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[^\W_]+", CJK.sub(lambda m: f" {m.group()} ", text.lower()))


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())


def rouge_l(prompt, completion: str, row: dict) -> float:
    return _rouge().score(row["reference"], completion)["rougeL"].fmeasure


def chrf(prompt, completion: str, row: dict) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(completion, [row["reference"]]).score / 100


def bleu(completions: list[str], references: list[str]) -> float:
    import sacrebleu

    tokenize = "zh" if any(CJK.search(r) for r in references) else "13a"
    return sacrebleu.corpus_bleu(completions, [references], tokenize=tokenize).score / 100


ROW_METRICS: dict[str, Callable[[object, str, dict], float]] = {
    "exact_match": exact_match, "rouge_l": rouge_l, "chrf": chrf}
CORPUS_METRICS: dict[str, Callable[[list[str], list[str]], float]] = {"bleu": bleu}
METRICS = (*ROW_METRICS, *CORPUS_METRICS)


def check_metrics(names: list[str], where: str = "eval.metrics") -> list[str]:
    """The metric names, checked: each one known, none twice. Raises ConfigError naming `where`."""
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(str(name), METRICS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{where}: unknown metric {name!r}; {hint}choose from {', '.join(METRICS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}={list(names)} names a metric twice")
    return list(names)


def row_scores(names: list[str], prompts: list, completions: list[str], references: list[str]) -> list[dict]:
    """Each row's score by every row metric among `names` (corpus metrics have none per row)."""
    rows = [{"reference": r} for r in references]
    return [{name: ROW_METRICS[name](p, c, row) for name in names if name in ROW_METRICS}
            for p, c, row in zip(prompts, completions, rows)]


def score(names: list[str], prompts: list, completions: list[str], references: list[str]) -> dict[str, float]:
    """{metric: score of the set}: row metrics averaged over rows, corpus metrics over the set, in `names`' order."""
    per_row = row_scores(names, prompts, completions, references)
    return {name: (CORPUS_METRICS[name](completions, references) if name in CORPUS_METRICS
                   else sum(r[name] for r in per_row) / max(len(per_row), 1)) for name in names}
