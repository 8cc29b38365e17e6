"""GRPO (training/grpo.py, eval/rewards.py): advantages and the loss variants on hand-computed values,
the reference pass (none at beta 0; the base with the adapter off), rewards and their errors, and tiny
runs through the one StepRunner: the reward rises, the adapter is plain peft, resume is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import peft_model, tiny_config
from qlora_loop.config import ConfigError
from qlora_loop.data.mixtures import split_validation
from qlora_loop.errors import DataError, RewardError
from qlora_loop.eval.metrics import exact_match
from qlora_loop.eval.rewards import Reward, build_rewards, check_answers, scorer
from qlora_loop.model.generate import generate_replies
from qlora_loop.model.load import load_base_model, load_tokenizer
from qlora_loop.training.grpo import (Grpo, completion_rows, grpo_loss, grpo_split, group_advantages,
                                      reference_token_logps, sequence_losses, sequence_units, token_policy_loss)
from qlora_loop.training.dryrun import dry_run
from qlora_loop.training.loss import token_losses
from qlora_loop.use.inference import validation_prompts


def latin(prompts, completions, rows):
    """A reward the tiny random model can learn in a few steps: the share of its characters that are
    latin letters (its vocabulary is half English, half Chinese)."""
    return [sum(ch.isascii() and ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]


# --- the maths, by hand ---------------------------------------------------------------------------

def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.25, sample std sqrt((0.75^2 + 3 x 0.25^2) / 3) = 0.5; group 2: all equal, no signal
    scaled = group_advantages(rewards, 4)
    assert scaled.tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0])
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    knobs = dict(num_generations=4, max_new_tokens=8, temperature=1.0, beta=0.0)
    assert Grpo(**knobs, loss="dr_grpo").scale_rewards is False
    assert Grpo(**knobs, loss="dapo").scale_rewards and Grpo(**knobs, loss="grpo").scale_rewards


def test_the_token_loss_and_the_kl_by_hand():
    # one update per sample: the ratio is 1 in value, and the gradient is -A x d log p
    p = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, kl = token_policy_loss(p, torch.tensor([2.0, -3.0]), None, beta=0.0)
    assert kl is None and loss.tolist() == pytest.approx([-2.0, 3.0])
    loss.sum().backward()
    assert p.grad.tolist() == pytest.approx([-2.0, 3.0])
    logps, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -3.0])  # exp(ref - logp) - (ref - logp) - 1: 0, e^-1
    loss, kl = token_policy_loss(logps, torch.tensor([0.0, 0.0]), ref, beta=0.5)
    assert kl.tolist() == pytest.approx([0.0, math.exp(-1)], abs=1e-6)
    assert loss.tolist() == pytest.approx([0.0, 0.5 * math.exp(-1)], abs=1e-6)
    p = torch.tensor([-2.0], requires_grad=True)  # d KL / d logp = 1 - exp(ref - logp) = 1 - e^-1
    token_policy_loss(p, torch.tensor([0.0]), torch.tensor([-3.0]), beta=1.0)[0].sum().backward()
    assert p.grad.tolist() == pytest.approx([1 - math.exp(-1)])


def test_log_probs_are_taken_at_the_sampling_temperature(tiny_qwen2, qwen2_tokenizer):
    """token_losses at temperature T is the cross-entropy of the model's logits / T (here on the chunked path)."""
    policy = peft_model(tiny_qwen2)
    piece = _piece(qwen2_tokenizer)
    keep = piece["labels"][:, 1:] != -100
    with torch.no_grad():
        logits = policy(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"]).logits[:, :-1][keep]
        for t in (1.0, 0.5):
            want = torch.nn.functional.cross_entropy(logits.float() / t, piece["labels"][:, 1:][keep], reduction="none")
            assert torch.allclose(token_losses(policy, piece, temperature=t), want, atol=1e-4)
        assert not torch.allclose(token_losses(policy, piece, temperature=0.5), token_losses(policy, piece), atol=1e-2)


@pytest.mark.parametrize("loss, want, units", [
    ("grpo", [1.5, 4.0], [1, 1]),  # each completion's mean over its tokens
    ("dapo", [3.0, 12.0], [2, 3]),  # sums; the runner divides by the step's tokens
    ("dr_grpo", [0.3, 1.2], [1, 1]),  # sums / max_new_tokens
])
def test_each_loss_variant_normalises_as_it_defines(loss, want, units):
    token_loss, rows, lengths = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([0, 0, 1, 1, 1]), torch.tensor([2, 3])
    got = sequence_losses(token_loss, rows, lengths, loss=loss, max_new_tokens=10)
    assert got.tolist() == pytest.approx(want)
    assert sequence_units(lengths, loss).tolist() == units
    # what the StepRunner logs and backpropagates: the sum over the step / its units
    assert float(got.sum() / sequence_units(lengths, loss).sum()) == pytest.approx(sum(want) / sum(units))


# --- the reference pass ---------------------------------------------------------------------------

def _piece(tokenizer, prompt: str = "Say a number", completions=("1 2 3", "four five")) -> dict:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    done = [tokenizer(c, add_special_tokens=False, return_tensors="pt")["input_ids"][0] for c in completions]
    return completion_rows(ids, done, tokenizer.pad_token_id, torch.device("cpu"))


def _trained(policy) -> None:
    """Give the adapter weights that change the model (peft starts B at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_the_reference_is_the_base_with_the_adapter_disabled(tiny_qwen2, qwen2_tokenizer):
    policy = peft_model(tiny_qwen2)
    _trained(policy)
    piece = _piece(qwen2_tokenizer)
    ref = reference_token_logps(policy, piece)
    base = load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.bfloat16)
    with torch.no_grad():
        own = -token_losses(base.eval(), piece).float()
        adapted = -token_losses(policy.eval(), piece).float()
    assert torch.allclose(ref, own, atol=1e-5)
    assert (ref - adapted).abs().max() > 0.1  # the adapter does change them: the check can fail
    assert policy.training is False  # the mode it came in (eval here) is kept


@pytest.mark.parametrize("beta, passes", [(0.0, 0), (0.1, 2)])
def test_beta_zero_runs_no_reference_forward(tiny_qwen2, qwen2_tokenizer, beta, passes):
    """Forwards with the adapter disabled, counted at a LoRA layer: none at beta 0, one per group else."""
    policy = peft_model(tiny_qwen2)
    tokenizer = qwen2_tokenizer
    examples = [{"input_ids": tokenizer(f"Say {i}", add_special_tokens=False)["input_ids"], "prompt": f"Say {i}",
                 "row": {"prompt": f"Say {i}"}, "where": f"row {i}"} for i in range(2)]
    disabled = []
    layer = next(m for n, m in policy.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    layer.register_forward_hook(lambda module, args, out: disabled.append(module.disable_adapters))
    settings = Grpo(num_generations=3, max_new_tokens=4, temperature=1.0, beta=beta, loss="dapo")
    split = grpo_split(settings, examples=examples, tokenizer=tokenizer,
                       score=scorer([Reward("latin", latin)]), unwrap=lambda model: model)
    pieces = split(policy, {"input_ids": torch.zeros(2, 1, dtype=torch.long), "index": torch.tensor([0, 1])})
    assert len(pieces) == 2 and all(p["input_ids"].shape[0] == 3 for p in pieces)
    assert sum(disabled) == passes and len(disabled) > passes  # generation ran with the adapter on
    assert ("ref_logps" in pieces[0]) == (beta > 0)
    if beta:  # a completion token each, under the base
        assert pieces[0]["ref_logps"].shape[0] == int((pieces[0]["labels"] != -100).sum())
    stats = pieces[0]["stats"]
    assert {"reward", "reward/latin", "reward_std", "no_signal", "completion_tokens", "cut_share",
            "generate_seconds", "score_seconds"} <= set(stats)
    loss = grpo_loss(settings)(policy, pieces[0])
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    assert ("kl" in pieces[0]["stats"]) == (beta > 0)


# --- rewards --------------------------------------------------------------------------------------

def test_builtin_rewards_score_as_the_metrics_and_their_options():
    rows = [{"answer": "1991-03-13"}, {"answer": "x"}]
    rewards = build_rewards(["exact_match", {"name": "format", "pattern": r"\d{4}-\d{2}-\d{2}", "weight": 0.5},
                             {"name": "length", "max_chars": 10}])
    total, by_name = scorer(rewards)(["p", "q"], [" 1991-03-13 ", "1991-3-13 and more words"],
                                     [{"row": r, "where": f"r{i}"} for i, r in enumerate(rows)])
    assert by_name["exact_match"].tolist() == [exact_match(None, " 1991-03-13 ", {"reference": "1991-03-13"}), 0.0]
    assert by_name["format"].tolist() == [1.0, 0.0]
    assert by_name["length"].tolist() == pytest.approx([-0.2, -1.0])  # 12 chars: (12 - 10) / 10; 24: capped at -1
    assert total.tolist() == pytest.approx([1.0 + 0.5 - 0.2, -1.0])


def test_an_unknown_or_broken_reward_spec_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.rewards\[0\]: unknown reward 'exact_mach'; did you mean exact_match"):
        build_rewards(["exact_mach"])
    with pytest.raises(ConfigError, match="cannot import 'no_such_pkg.rewards'"):
        build_rewards(["no_such_pkg.rewards:brevity"])
    with pytest.raises(ConfigError, match="has no function 'nothing'"):
        build_rewards(["test_grpo:nothing"])
    with pytest.raises(ConfigError, match="format reward needs a regex"):
        build_rewards(["format"])
    with pytest.raises(ConfigError, match="names a reward twice"):
        build_rewards(["chrf", {"name": "chrf", "weight": 2}])
    assert build_rewards(["test_grpo:latin"])[0].fn is latin


def test_a_reward_that_raises_is_reported_with_its_name_and_row():
    def picky(prompts, completions, rows):
        return [1.0 / (len(c) - 3) for c in completions]  # fails on a completion of 3 characters

    examples = [{"row": {}, "where": "prompts.jsonl:7"}, {"row": {}, "where": "prompts.jsonl:9"}]
    with pytest.raises(RewardError, match=r"reward picky failed on prompts.jsonl:9 \(completion 'abc'\): "
                                          "ZeroDivisionError"):
        scorer([Reward("picky", picky)])(["p", "q"], ["abcd", "abc"], examples)
    with pytest.raises(RewardError, match="reward half returned list of length 1, not one score per completion"):
        scorer([Reward("half", lambda p, c, r: [1.0])])(["p", "q"], ["a", "b"], examples)
    with pytest.raises(RewardError, match="reward nan gave nan for prompts.jsonl:7"):
        scorer([Reward("nan", lambda p, c, r: [math.nan, 1.0])])(["p", "q"], ["a", "b"], examples)
    with pytest.raises(RewardError, match="no string 'answer'"):
        scorer(build_rewards(["exact_match"]))(["p"], ["a"], examples[:1])
    assert scorer([Reward("numpy", lambda p, c, r: [np.float32(0.5), torch.tensor(1.0)])])(
        ["p", "q"], ["a", "b"], examples)[0].tolist() == [0.5, 1.0]
    with pytest.raises(DataError, match="prompts.jsonl:7: no string 'answer' for exact_match, eval.metrics chrf"):
        check_answers(build_rewards(["exact_match"]), examples, metrics=["chrf"])
    check_answers(build_rewards([{"name": "format", "pattern": "a"}]), examples, metrics=[])  # none scores an answer


def test_grpo_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="grpo has no validation loss"):
        tiny_config("train.objective=grpo")
    base = ["train.objective=grpo", "train.monitor=reward", "train.mode=max"]
    with pytest.raises(ConfigError, match="num_generations=1 must be >= 2"):
        tiny_config(*base, "train.num_generations=1")
    with pytest.raises(ConfigError, match="train.monitor=reward: higher is better"):
        tiny_config("train.objective=grpo", "train.monitor=reward")
    with pytest.raises(ConfigError, match="adapter.init=eva with train.objective=grpo"):
        tiny_config(*base, "adapter.init=eva")
    assert tiny_config(*base, "train.monitor=reward/exact_match").train.monitor == "reward/exact_match"
    assert tiny_config(*base).train.beta is None  # resolved to 0.0 for grpo: no reference pass


# --- tiny runs ------------------------------------------------------------------------------------

def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def number_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grpo-data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": f"Say the number {i}", "answer": str(i)}) + "\n"
                            for i in range(40)), encoding="utf-8")
    return path


def grpo_args(data: Path, out: Path) -> list[str]:
    return [f"data.train={data}", "data.columns={prompt: question}", "train.objective=grpo", "train.monitor=reward",
            "train.mode=max", "train.rewards=[test_grpo:latin, exact_match]", "train.max_new_tokens=8",
            "train.epochs=3", "train.lr=1e-2", "train.batch_size=4", "train.grad_accum=2", "train.save_every=2",
            "train.keep_last=0", "train.patience=0", "eval.num_samples=1", "eval.max_new_tokens=8", f"output_dir={out}"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, number_prompts, train_main) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("grpo") / "out"
    return out, train_main(grpo_args(number_prompts, out))


def test_a_grpo_run_raises_its_reward_and_logs_what_it_sampled(grpo_run):
    out, summary = grpo_run
    steps = rows(out / "steps.jsonl")
    assert len(steps) == 15  # 36 training prompts / (4 x grad_accum 2): 5 steps per epoch
    for s in steps:
        assert {"reward", "reward/test_grpo:latin", "reward/exact_match", "reward_std", "no_signal",
                "completion_tokens", "generate_seconds"} <= set(s) and "kl" not in s  # beta 0: no KL
        # dapo: a step's units are its completion tokens, 32 completions (2 x 4 prompts x 4), 16 at an epoch's end
        assert s["target_tokens"] / s["completion_tokens"] == pytest.approx(16 if s["step"] % 5 == 0 else 32)
    first, last = (sum(s["reward"] for s in part) / len(part) for part in (steps[:3], steps[-3:]))
    assert last > first + 0.2  # the tiny model learns to write latin letters
    history = rows(out / "history.jsonl")
    assert all(h["val_loss"] is None and {"reward", "reward/test_grpo:latin"} <= set(h) for h in history)
    assert summary["monitor"] == "reward" and summary["best_metric"] == max(h["reward"] for h in history)
    scored = [s for s in rows(out / "samples.jsonl") if "rewards" in s]
    assert scored and set(scored[0]["rewards"]) == {"test_grpo:latin", "exact_match"}


def test_the_grpo_adapter_is_a_plain_peft_adapter(grpo_run, tiny_qwen2):
    """Loaded by plain peft on the unmodified base, its greedy completions of the validation prompts
    score the run's best validation reward."""
    out, summary = grpo_run
    assert json.loads((out / "best" / "adapter_config.json").read_text(encoding="utf-8"))["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.bfloat16),
                                      str(out / "best"))
    _, held = split_validation(list(range(40)), 0.1, 42, "prompts.jsonl")  # the run's validation rows
    tokenizer = load_tokenizer(str(tiny_qwen2))
    replies = generate_replies(model, tokenizer, [[{"role": "user", "content": f"Say the number {i}"}] for i in held],
                               max_new_tokens=8)
    total, _ = scorer(build_rewards(["test_grpo:latin", "exact_match"]))(
        [None] * len(held), replies, [{"row": {"answer": str(i)}, "where": str(i)} for i in held])
    assert float(total.mean()) == pytest.approx(summary["best_metric"], abs=0.02)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


class Crash(Exception):
    pass


def test_a_grpo_run_resumes_exactly(grpo_run, number_prompts, train_main, tmp_path, capsys):
    """Killed inside an accumulation window of epoch 2; resumed, it samples the same completions (the
    same rewards and lengths at every step) and ends with the uninterrupted run's adapter, bit for bit."""
    out = tmp_path / "out"
    args = grpo_args(number_prompts, out)
    calls, inner = [0], grpo_loss(Grpo(num_generations=4, max_new_tokens=8, temperature=1.0, beta=0.0, loss="dapo"))

    def crashing(model, batch):
        calls[0] += 1
        if calls[0] == 1 + 36 + 6:  # the memory probe, epoch 1's 36 groups, then inside step 6's second micro-batch
            raise Crash("killed")
        return inner(model, batch)

    with pytest.raises(Crash):
        train_main(args, loss_fn=crashing)
    capsys.readouterr()
    train_main(args + ["train.resume=auto"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "resumed from" in shown and ": step 5, epoch 2" in shown  # the checkpoint at epoch 1's end
    timed = ("generate_seconds", "score_seconds")
    got, want = ([{k: v for k, v in s.items() if k not in timed} for s in rows(o / "steps.jsonl")]
                 for o in (out, grpo_run[0]))
    assert got == want
    a, b = (load_file(o / "best" / "adapter_model.safetensors") for o in (out, grpo_run[0]))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in b)


@pytest.mark.parametrize("objective", ["grpo", "dpo", "kto"])
def test_merge_export_and_eval_ask_the_runs_own_validation_prompts(tmp_path, objective):
    """A GRPO run's validation rows are prompts with an answer, a DPO run's pairs, a KTO run's judged answers:
    merge's and export's report (inference.validation_prompts) and eval read the run's own held-out rows as
    the prompt and the answer it teaches, the split drawn over the same examples as the run's."""
    path = tmp_path / "rows.jsonl"
    if objective == "grpo":  # every third row has no answer: a row the run trains, eval cannot score
        rows = [{"question": f"Say the number {i}", **({"answer": str(i)} if i % 3 else {})} for i in range(40)]
        examples = [str(i) if i % 3 else None for i in range(40)]
    elif objective == "dpo":
        rows = [{"prompt": f"Say the number {i}", "chosen": str(i), "rejected": "no"} for i in range(40)]
        examples = [str(i) for i in range(40)]
    else:  # each pair is two judged examples, the chosen one desirable
        rows = [{"prompt": f"Say the number {i}", "chosen": str(i), "rejected": "no"} for i in range(20)]
        examples = [a for i in range(20) for a in (str(i), None)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = {"train": str(path), "columns": {"prompt": "question"} if objective == "grpo" else {}, "val_split": 0.2,
            "cache": False}
    prompts, references, source = validation_prompts({"data": data, "train": {"objective": objective, "seed": 42}}, 40)
    _, held = split_validation(examples, 0.2, 42)  # the run's own split of its examples
    assert references == [e for e in held if e is not None] and references
    assert [p[-1]["content"] for p in prompts] == [f"Say the number {e}" for e in references]
    assert "validation rows" in source


def test_the_dry_run_sizes_one_group_for_training_and_every_group_for_generation(tiny_qwen2):
    base = ["train.objective=grpo", "train.monitor=reward", "train.mode=max", "data.max_length=64",
            "train.max_new_tokens=32", "model.gradient_checkpointing=false"]
    small, wide = (dry_run(str(tiny_qwen2), tiny_config(*base, f"train.num_generations={g}", f"train.batch_size={b}"),
                           compute_dtype="float32", autocast=False) for g, b in ((2, 8), (64, 256)))
    assert (small.batch_size, small.max_length, small.prompts) == (2, 96, 8)  # a group of prompt + completion rows
    assert wide.batch_size == 64 and wide.memory["activations"] > small.memory["activations"]
    # 256 prompts x 64 completions of 96 tokens: a KV cache larger than one group's training transients
    assert wide.memory["generation_kv_extra"] > 0 == small.memory["generation_kv_extra"]
    assert wide.memory["total"] == sum(v for k, v in wide.memory.items() if k != "total")
