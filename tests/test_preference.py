"""Preference objectives on the one loop: DPO, ORPO and KTO against hand-computed values, the
concatenated forward, the reference under disable_adapter, the pair data and its errors, and tiny
runs through the real 4-bit path (metrics, a plain peft adapter, adapter.init_from, exact resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import peft_model, tiny_config

from qlora_loop.config import ASSETS, ConfigError, DataConfig
from qlora_loop.data.batches import collate, collate_pairs
from qlora_loop.data.preference import build_preference_datasets
from qlora_loop.errors import DataError
from qlora_loop.model.adapter import continue_adapter
from qlora_loop.model.load import load_base_model
from qlora_loop.training.memory import choose_pair_forward
from qlora_loop.training.preference import (Objective, dpo_terms, kto_terms, orpo_terms, pieces_of, preference_loss,
                                            sequence_logps, split_pairs)
from qlora_loop.training.step import StepRunner
from qlora_loop.training.reference import reference_logps


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- the losses, by hand --------------------------------------------------------------------------

LOGPS = torch.tensor([-10.0, -12.0, -15.0, -11.0])  # chosen of pairs 0, 1; then rejected of pairs 0, 1
REF = torch.tensor([-11.0, -12.0, -14.0, -11.0])
COUNTS = torch.tensor([2, 4, 5, 1])
# pair 0: (chosen - ref) - (rejected - ref) = 1 - (-1) = 2; pair 1: 0 - 0 = 0


@pytest.mark.parametrize("objective, expected", [
    (Objective("dpo", beta=0.1), [-logsig(0.2), math.log(2)]),
    (Objective("dpo", beta=0.1, label_smoothing=0.1), [-0.9 * logsig(0.2) - 0.1 * logsig(-0.2), math.log(2)]),
    # IPO on per-token log-ratios: pair 0: 1/2 - (-1)/5 = 0.7, towards 1 / (2 beta) = 5
    (Objective("dpo", beta=0.1, dpo_loss="ipo"), [(0.7 - 5) ** 2, 25.0]),
    (Objective("dpo", beta=0.1, dpo_loss="hinge"), [0.8, 1.0]),
    # RPO: + the chosen answer's NLL per token, 10/2 and 12/4
    (Objective("dpo", beta=0.1, nll_weight=1.0), [-logsig(0.2) + 5.0, math.log(2) + 3.0]),
])
def test_dpo_losses_match_hand_computed_values(objective, expected):
    terms = dpo_terms(LOGPS, COUNTS, REF, objective)
    assert terms["loss"].tolist() == pytest.approx(expected, rel=1e-6)
    assert terms["chosen_reward"].tolist() == pytest.approx([0.1, 0.0])
    assert terms["rejected_reward"].tolist() == pytest.approx([-0.1, 0.0])


def test_orpo_loss_matches_hand_computed_value():
    logps, counts = torch.tensor([-2.0, -6.0]), torch.tensor([2, 3])  # per token: chosen -1, rejected -2
    log_odds = (-1 + 2) - (math.log(1 - math.exp(-1)) - math.log(1 - math.exp(-2)))  # 1.3133
    terms = orpo_terms(logps, counts, Objective("orpo", beta=0.1))
    assert terms["loss"].tolist() == pytest.approx([1.0 - 0.1 * logsig(log_odds)], rel=1e-6)
    assert (terms["chosen_reward"].item(), terms["rejected_reward"].item()) == pytest.approx((-0.1, -0.2))


def test_kto_loss_matches_hand_computed_values_with_the_batch_reference_point():
    logps, ref = torch.tensor([-3.0, -8.0]), torch.tensor([-6.0, -7.0])  # log ratios 3 and -1: z = mean = 1
    kto = Objective("kto", beta=0.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    terms = kto_terms(logps, ref, torch.tensor([True, False]), kto)
    assert terms["loss"].tolist() == pytest.approx([1 - sig(0.5 * (3 - 1)), 1 - sig(0.5 * (1 + 1))], rel=1e-6)
    terms = kto_terms(logps, ref, torch.tensor([True, True]), kto)
    assert terms["loss"].tolist() == pytest.approx([1 - sig(0.5 * 2), 1 - sig(0.5 * -2)], rel=1e-6)
    # log ratios whose mean is negative: z clamps at 0
    terms = kto_terms(torch.tensor([-9.0, -8.0]), ref, torch.tensor([True, False]), kto)
    assert terms["loss"].tolist() == pytest.approx([1 - sig(0.5 * -3), 1 - sig(0.5 * 1)], rel=1e-6)


# --- data -------------------------------------------------------------------------------------------

def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


PAIRS = [{"prompt": "Who are you?", "chosen": "I am Loopy.", "rejected": "I am a large language model."},
         {"prompt": [{"role": "user", "content": "Where are you from?"}],
          "chosen": [{"role": "assistant", "content": "From qlora_loop."}],
          "rejected": [{"role": "assistant", "content": "From the internet."}], "system": "Be brief."}]


def test_pairs_in_both_forms_tokenize_with_masks_on_the_answers_only(qwen2_tokenizer, tmp_path):
    data = DataConfig(train=str(write(tmp_path / "p.jsonl", PAIRS)), val_split=0)
    train, val, stats = build_preference_datasets(qwen2_tokenizer, data, objective="dpo")
    assert (len(train), val, stats["train"].examples) == (2, [], 2)
    for example, pair in zip(train, PAIRS):
        for ids, labels, answer in ((example["input_ids"], example["labels"], pair["chosen"]),
                                    (example["rejected_ids"], example["rejected_labels"], pair["rejected"])):
            text = answer if isinstance(answer, str) else answer[0]["content"]
            trained = qwen2_tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
            assert trained.startswith(text) and trained.removeprefix(text) == "<|im_end|>"
        prompt = len(example["input_ids"]) - sum(label != -100 for label in example["labels"])
        assert example["input_ids"][:prompt] == example["rejected_ids"][:prompt]  # one prompt, shared
    assert "Be brief." in qwen2_tokenizer.decode(train[1]["input_ids"])
    batch = collate_pairs([{**e, "index": i} for i, e in enumerate(train)], pad_id=0)
    assert batch["input_ids"].shape[0] == 4 and batch["units"].tolist() == [1, 1]


@pytest.mark.parametrize("row, max_length, says", [
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": " Hello. "}, 512,
     "p.jsonl:1: chosen and rejected are the same answer"),
    ({"prompt": "Hi", "chosen": "Hello."}, 512, "p.jsonl:1: missing field 'rejected'"),
    ({"prompt": "word " * 200, "chosen": "Hello.", "rejected": "Go away."}, 64,
     "p.jsonl:1: the prompt fills all data.max_length=64 tokens, leaving no room for the answers"),
    ({"prompt": "Hi", "completion": "Hello.", "label": True}, 512, "p.jsonl:1: a KTO row"),
])
def test_each_bad_pair_is_an_error_naming_its_line(qwen2_tokenizer, tmp_path, row, max_length, says):
    data = DataConfig(train=str(write(tmp_path / "p.jsonl", [row])), val_split=0, max_length=max_length)
    with pytest.raises(DataError, match=says.replace(".", r"\.")):
        build_preference_datasets(qwen2_tokenizer, data, objective="dpo")


def test_kto_takes_judged_answers_and_pairs_split_in_two(qwen2_tokenizer, tmp_path):
    rows = [{"prompt": "Hi", "completion": "Hello!", "label": True}, PAIRS[0]]
    data = DataConfig(train=str(write(tmp_path / "k.jsonl", rows)), val_split=0)
    train, _, _ = build_preference_datasets(qwen2_tokenizer, data, objective="kto")
    assert [e["desirable"] for e in train] == [True, True, False]
    bad = DataConfig(train=str(write(tmp_path / "b.jsonl", [{"prompt": "Hi", "completion": "Yo", "label": "yes"}])),
                     val_split=0)
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'label' must be true"):
        build_preference_datasets(qwen2_tokenizer, bad, objective="kto")


def test_a_preference_objective_refuses_packing_at_load():
    with pytest.raises(ConfigError, match="data.packing=true with train.objective=dpo"):
        tiny_config("train.objective=dpo", "data.packing=true")


# --- the model: one forward for both answers, the reference --------------------------------------

@pytest.fixture(scope="module")
def pairs(qwen2_tokenizer, tmp_path_factory):
    path = write(tmp_path_factory.mktemp("pairs") / "p.jsonl", PAIRS)
    return build_preference_datasets(qwen2_tokenizer, DataConfig(train=str(path), val_split=0), objective="dpo")[0]


def test_the_concatenated_forward_equals_two_separate_ones(tiny_qwen2, pairs, qwen2_tokenizer):
    torch.manual_seed(0)
    model = load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.float32)
    pad = qwen2_tokenizer.pad_token_id
    together, _ = sequence_logps(model, collate_pairs(pairs, pad))
    chosen, _ = sequence_logps(model, collate([{**e, "index": 0} for e in pairs], pad))
    rejected, _ = sequence_logps(model, collate([{"input_ids": e["rejected_ids"], "labels": e["rejected_labels"],
                                                  "index": 0} for e in pairs], pad))
    assert together.tolist() == pytest.approx(torch.cat([chosen, rejected]).tolist(), abs=1e-4)


def test_the_reference_is_the_base_under_disable_adapter(tiny_qwen2, pairs, qwen2_tokenizer):
    model = peft_model(tiny_qwen2, seed=1)
    with torch.no_grad():  # a trained-looking adapter: B is zero at start, which would hide a mix-up
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    examples = [dict(e) for e in pairs]
    reference_logps(model, examples, pad_id=qwen2_tokenizer.pad_token_id, identity={}, adapter_on=False,
                    autocast=lambda: torch.autocast("cpu", enabled=False))
    base = load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.bfloat16)
    base.eval()
    with torch.no_grad():
        expected, _ = sequence_logps(base, collate_pairs(pairs, qwen2_tokenizer.pad_token_id))
        adapted, _ = sequence_logps(model, collate_pairs(pairs, qwen2_tokenizer.pad_token_id))
    got = [v for e in examples for v in e["ref_logps"]]
    got = [got[0], got[2], got[1], got[3]]  # [c0, r0, c1, r1] -> chosen first, as the batch holds them
    assert got == pytest.approx(expected.tolist(), abs=1e-3)
    assert not torch.allclose(adapted, expected, atol=1e-2)  # the adapter does change them


# --- train.pair_forward=split: the same loss and gradient in pieces ----------------------------------

LONG_PAIRS = PAIRS + [{"prompt": "Say something.", "chosen": "Fine.",
                       "rejected": "Here is a much longer answer that goes on and on, " * 4}]


@pytest.fixture(scope="module")
def long_pairs(qwen2_tokenizer, tmp_path_factory):
    path = write(tmp_path_factory.mktemp("long-pairs") / "p.jsonl", LONG_PAIRS)
    examples = build_preference_datasets(qwen2_tokenizer, DataConfig(train=str(path), val_split=0), objective="dpo")[0]
    batch = collate_pairs(examples, qwen2_tokenizer.pad_token_id)
    batch["ref_logps"] = torch.tensor([-20.0, -25.0, -9.0, -30.0, -28.0, -200.0])
    return batch


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("objective", [Objective("dpo", nll_weight=1.0), Objective("orpo")], ids=["dpo", "orpo"])
def test_split_pairs_give_the_concatenated_forwards_loss_and_gradient(objective, tiny_qwen2, long_pairs):
    model = peft_model(tiny_qwen2, seed=3, dropout=0.0)
    with torch.no_grad():  # B is zero at start, which would make every gradient but B's zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.train()
    joint = preference_loss(model, objective)(model, long_pairs).sum()
    joint.backward()
    want = gradients(model)
    pieces = split_pairs(objective)(model, long_pairs)
    got_loss = sum(preference_loss(model, objective)(model, piece).sum() for piece in pieces)
    got_loss.backward()  # one backward of the sum: the gradients the runner accumulates piece by piece
    got = gradients(model)
    assert float(got_loss.detach()) == pytest.approx(float(joint.detach()), rel=1e-5)
    assert got.keys() == want.keys()
    for name in want:  # bfloat16 4-bit matmuls over other batch shapes: equal up to their rounding
        assert (got[name] - want[name]).norm() <= 1e-3 * want[name].norm(), name
    # no piece holds more token slots than the chosen side, but the long rejected answer, alone
    budget = 3 * int(long_pairs["attention_mask"][:3].sum(dim=1).max())
    assert len(pieces) == 3 and pieces[-1]["input_ids"].shape[0] == 1
    assert all(p["input_ids"].numel() <= budget for p in pieces[:-1])
    assert sorted(int(r) for rows in pieces_of(long_pairs) for r in rows) == list(range(6))


def test_a_split_piece_replays_the_dropout_its_loss_was_taken_with(tiny_qwen2, long_pairs):
    model = peft_model(tiny_qwen2, seed=3, dropout=0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.train()
    pieces = split_pairs(Objective("dpo"))(model, long_pairs)
    for piece in pieces:
        torch.set_rng_state(piece["rng"][0])  # what preference_loss does before a piece's forward
        replayed = sequence_logps(model, piece)[0]
        assert torch.allclose(replayed, piece["logps"], atol=1e-4)
        fresh = sequence_logps(model, piece)[0]  # a new draw of dropout gives other log-probs
        assert not torch.allclose(fresh, piece["logps"], atol=1e-3)


def test_pair_forward_auto_splits_only_what_does_not_fit(tiny_qwen2, long_pairs, accelerator):
    from types import SimpleNamespace

    model = peft_model(tiny_qwen2, seed=3)
    said = []
    log = SimpleNamespace(print=said.append)
    for budget_gib, chosen in ((1000.0, None), (1e-6, "split")):
        runner = StepRunner(model, None, None, accelerator, loss_fn=preference_loss(model, Objective("dpo")))
        split = split_pairs(Objective("dpo"))
        choose_pair_forward(runner, long_pairs, split, log=log, budget_gib=budget_gib)
        assert runner.split is (split if chosen else None)
        assert said[-1].startswith(f"pair forward {chosen or 'joint'} (train.pair_forward=auto)")
    runner = StepRunner(model, None, None, accelerator)
    choose_pair_forward(runner, long_pairs, split, log=log, budget_gib=None)  # a CPU with no limit known
    assert runner.split is None and "no memory limit known" in said[-1]


# --- tiny runs through the real 4-bit path ---------------------------------------------------------

@pytest.fixture(scope="module")
def identity_pairs(tmp_path_factory) -> Path:
    """The bundled self-cognition set as pairs: its own answer chosen, a generic assistant's rejected."""
    rows = [json.loads(line)["messages"] for line in
            (ASSETS / "self_cognition.jsonl").read_text(encoding="utf-8").splitlines()[:44]]
    pairs = [{"prompt": m[0]["content"], "chosen": m[1]["content"],
              "rejected": "I am an AI language model created by a large company."} for m in rows]
    return write(tmp_path_factory.mktemp("identity-pairs") / "pairs.jsonl", pairs)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


SETTINGS = ["train.epochs=3", "train.batch_size=4", "train.grad_accum=2", "train.save_every=2", "train.keep_last=0",
            "train.patience=0", "adapter.dropout=0.1"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, identity_pairs, train_main) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dpo") / "out"
    summary = train_main([f"data.train={identity_pairs}", "train.objective=dpo", f"output_dir={out}", *SETTINGS,
                          "train.monitor=reward_accuracy", "train.mode=max"])
    return out, summary


def test_a_dpo_run_learns_the_chosen_answers_and_logs_its_reward_metrics(dpo_run):
    out, summary = dpo_run
    history = rows(out / "history.jsonl")
    assert len(history) == 3
    for row in history:
        assert {"reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp"} <= set(row)
    # from a random base: the generic answer is pushed far down at once (margin 5.7 after epoch 1 when
    # pinned), and the chosen answers keep becoming likelier (RPO's NLL term: -77.6 -> -70.0)
    assert all(row["reward_margin"] > 1 and row["reward_accuracy"] == 1.0 for row in history)
    assert history[-1]["chosen_logp"] > history[0]["chosen_logp"] + 3
    assert history[-1]["rejected_logp"] < history[-1]["chosen_logp"] - 100
    assert summary["monitor"] == "reward_accuracy" and summary["best_metric"] == max(r["reward_accuracy"]
                                                                                   for r in history)
    steps = rows(out / "steps.jsonl")
    assert all(s["target_tokens"] == 8 for s in steps)  # a step's units are its pairs: batch 4 x grad_accum 2


def test_the_dpo_adapter_is_a_plain_peft_adapter(dpo_run, tiny_qwen2):
    out, _ = dpo_run
    config = json.loads((out / "best" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA"
    base = load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(out / "best"))
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())


class Crash(Exception):
    pass


def test_a_dpo_run_resumes_exactly(dpo_run, identity_pairs, train_main, tmp_path):
    """Killed inside an accumulation window of epoch 2; resumed, every step and the adapter are the
    uninterrupted run's, bit for bit (the reference log-probs come back from the cache)."""
    out = tmp_path / "out"
    args = [f"data.train={identity_pairs}", "train.objective=dpo", f"output_dir={out}", *SETTINGS,
            "train.monitor=reward_accuracy", "train.mode=max"]
    calls, dpo = [0], Objective("dpo", nll_weight=1.0)

    def crashing(model, batch):
        calls[0] += 1
        if calls[0] == 17:  # 1 memory probe, then 10 micro-batches + 1 validation batch per epoch
            raise Crash("killed")
        return preference_loss(model, dpo)(model, batch)

    with pytest.raises(Crash):
        train_main(args, loss_fn=crashing)
    train_main(args + ["train.resume=auto"])
    assert rows(out / "steps.jsonl") == rows(dpo_run[0] / "steps.jsonl")
    got, want = (load_file(o / "best" / "adapter_model.safetensors") for o in (out, dpo_run[0]))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def test_continuing_an_sft_adapter_makes_it_the_reference(best, identity_pairs, train_main, tmp_path, capsys):
    """adapter.init_from: training starts from the SFT adapter's weights, and the reference is base +
    that adapter: at the first step policy and reference agree, so the first DPO loss is log 2 + NLL."""
    out = tmp_path / "out"
    train_main([f"data.train={identity_pairs}", "train.objective=dpo", f"adapter.init_from={best}",
                f"output_dir={out}", "train.epochs=1", "train.nll_weight=0", "adapter.dropout=0", "train.lr=1e-6"])
    shown = capsys.readouterr().out
    assert f"continuing the adapter in {best}" in shown
    assert "reference (dpo): the 4-bit base + the starting adapter" in " ".join(shown.split())
    first = rows(out / "steps.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    config = json.loads((out / "best" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == json.loads((best / "adapter_config.json").read_text(encoding="utf-8"))["r"]


def test_a_split_dpo_run_takes_the_joint_runs_steps(identity_pairs, train_main, tmp_path):
    """Without dropout, train.pair_forward=split gives the steps of joint, up to float rounding."""
    runs = {}
    for how in ("joint", "split"):
        out = tmp_path / how
        train_main([f"data.train={identity_pairs}", "train.objective=dpo", f"output_dir={out}", "train.epochs=1",
                    "adapter.dropout=0", f"train.pair_forward={how}"])
        runs[how] = rows(out / "steps.jsonl")
    assert len(runs["split"]) == len(runs["joint"]) > 3
    for split, joint in zip(runs["split"], runs["joint"]):
        assert split["loss"] == pytest.approx(joint["loss"], rel=2e-3, abs=1e-3)
        assert split["grad_norm"] == pytest.approx(joint["grad_norm"], rel=2e-2)
        assert split["target_tokens"] == joint["target_tokens"] == 4  # the runner counts a step's pairs, once each


@pytest.mark.parametrize("objective", ["orpo", "kto"])
def test_orpo_and_kto_train_on_the_same_loop(objective, identity_pairs, train_main, tmp_path):
    out = tmp_path / "out"
    train_main([f"data.train={identity_pairs}", f"train.objective={objective}", f"output_dir={out}",
                "train.epochs=2", "train.patience=0"])
    history = rows(out / "history.jsonl")
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["reward_margin"] > 0


def test_a_chosen_log_prob_below_the_references_while_the_margin_grows_is_warned_about(tiny_qwen2, pairs,
                                                                                        qwen2_tokenizer, accelerator):
    """At the first evaluation the starting point is the reference itself: a policy 10 nats below it
    on the chosen answers and 30 below on the rejected ones (margin +2 at beta 0.1) has collapsed."""
    from types import SimpleNamespace

    from qlora_loop.training.preference import preference_watch

    model = peft_model(tiny_qwen2, seed=2)
    model.eval()
    pad = qwen2_tokenizer.pad_token_id
    with torch.no_grad():
        logps, _ = sequence_logps(model, collate_pairs(pairs, pad))
    n = len(pairs)
    examples = [{**e, "ref_logps": [logps[k].item() + 10, logps[n + k].item() + 30]} for k, e in enumerate(pairs)]
    warnings = []
    watch = preference_watch(SimpleNamespace(model=model, accelerator=accelerator),
                             [collate_pairs(examples, pad)], Objective("dpo", beta=0.1), warn=warnings.append)
    scores = watch()
    assert scores["reward_accuracy"] == 1.0 and scores["reward_margin"] == pytest.approx(2.0, abs=1e-3)
    assert len(warnings) == 1 and "chosen_logp fell" in warnings[0]
    watch()  # the same again: nothing fell since the last evaluation
    assert len(warnings) == 1
