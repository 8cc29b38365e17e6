"""The embedded default on the real model (SmolLM2-135M-Instruct, from a PyPI wheel): its template's
label masks, and a run that learns the new identity on phrasings it never saw while keeping the
base's general answers, with the drift from the base lower with replay than without.

The two trainings here take about 4 minutes on 2 CPU cores; everything else tests on tiny models."""

from __future__ import annotations

import json

import pytest

from qlora_loop.config import ASSETS, DataConfig, load_config
from qlora_loop.data.examples import IGNORE
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.model.generate import generate_replies
from qlora_loop.model.load import load_tokenizer
from qlora_loop.run import train
from qlora_loop.use.inference import load_for_inference

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / name).read_text(encoding="utf-8").splitlines()]


def test_smollm2_template_injects_a_system_turn_that_is_never_trained(smollm2):
    tokenizer = load_tokenizer(str(smollm2))
    train_rows, _, _ = build_datasets(tokenizer, DataConfig(train=str(ASSETS / "identity.jsonl"), val_split=0.0,
                                                            max_length=256))
    for row, source in zip(train_rows, jsonl("identity.jsonl")):
        text = tokenizer.decode(row["input_ids"])
        trained = tokenizer.decode([t for t in row["labels"] if t != IGNORE])
        assert text.startswith(f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>")  # injected: the rows have none
        assert trained == source["messages"][1]["content"] + "<|im_end|>"  # the answer and its end of turn only


@pytest.fixture(scope="module")
def default_run(smollm2, tmp_path_factory):
    """`python scripts/train.py` with no arguments, into a temp folder: the embedded default."""
    out = tmp_path_factory.mktemp("default") / "out"
    return out, train(load_config(None, [f"output_dir={out}"]))


def answers(adapter, prompts: list[str]) -> list[str]:
    model, tokenizer = load_for_inference(adapter)
    return generate_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=56)


def test_default_run_learns_the_identity_on_unseen_phrasings_and_keeps_general_answers(default_run):
    out, summary = default_run
    heldout, checks = jsonl("identity_heldout.jsonl"), jsonl("general_checks.jsonl")
    trained = {row["messages"][0]["content"] for row in jsonl("identity.jsonl")}
    assert not trained & {row["prompt"] for row in heldout}  # phrasings training never saw
    replies = answers(out / "best", [row["prompt"] for row in heldout + checks])
    identity = sum(row["expect"] in reply for row, reply in zip(heldout, replies))
    general = sum(row["expect"] in reply for row, reply in zip(checks, replies[len(heldout):]))
    # measured: 8 of 8 and 5 of 6 (the base: 0 of 8 and 6 of 6; without replay: 8 of 8 and 0 of 6)
    assert identity >= 6, replies[:len(heldout)]
    assert general >= 4, replies[len(heldout):]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == summary["epochs_run"] and all(row["drift"] is not None for row in history)


def test_without_replay_the_model_drifts_further_from_its_base(default_run, tmp_path):
    out, _ = default_run
    drift = [json.loads(line)["drift"] for line in (out / "history.jsonl").read_text().splitlines()]
    train(load_config(None, [f"output_dir={tmp_path}", "data.replay=0", "eval.num_samples=0"]))
    without = [json.loads(line)["drift"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    # measured: 1.51, 1.57, 1.42 without replay; 0.47, 0.34, 0.41 with it
    assert min(without) > 2 * max(drift), (without, drift)
