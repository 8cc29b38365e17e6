"""StepRunner: one optimizer step, on the real 4-bit model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import peft_model

from qlora_loop.config import ASSETS, DataConfig
from qlora_loop.data.batches import collate
from qlora_loop.data.examples import IGNORE
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.training.loss import causal_lm_loss, chunked_lm_loss, count_targets
from qlora_loop.training.optim import build_optimizer, build_scheduler
from qlora_loop.training.step import StepRunner


@pytest.fixture(scope="module")
def examples(qwen2_tokenizer):
    train, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"), val_split=0.0,
                                                             max_length=256))
    return train


def sgd_runner(model, accelerator, lr=1.0, **kwargs):
    """Plain SGD with lr 1: the weight change of a step *is* minus the gradient, so two runs can be
    compared gradient for gradient (Adam's first step, lr * g/|g|, would hide differences)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return StepRunner(model, optimizer, scheduler, accelerator, **kwargs)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_one_step_changes_only_adapter_weights(tiny_qwen2, examples, qwen2_tokenizer, accelerator):
    model = peft_model(tiny_qwen2, r=4, dropout=0.0)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    optimizer = build_optimizer(model, "paged_adamw_32bit", lr=1e-2)
    runner = StepRunner(model, optimizer, build_scheduler(optimizer, "constant", 10, 0.0), accelerator)
    result = runner([collate(examples[:4], qwen2_tokenizer.pad_token_id)])

    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "the step changed nothing"
    assert all("lora_" in n for n in changed), sorted(changed - {n for n in changed if "lora_" in n})
    # LoRA B starts at zero, so it is the part that must move on the first step.
    assert any("lora_B" in n for n in changed)
    assert runner.step == 1 and math.isfinite(result.loss) and result.loss > 0
    assert result.target_tokens == sum(count_targets(collate([e], 0)) for e in examples[:4])
    assert result.tokens == sum(len(e["input_ids"]) for e in examples[:4])
    assert all(p.grad is None for p in model.parameters()), "zero_grad did not run"


def test_grad_accumulation_2x1_equals_one_batch_of_2(tiny_qwen2, examples, qwen2_tokenizer, accelerator):
    # Two rows of different lengths, so a per-micro-batch mean would weight them wrongly.
    a, b = examples[0], examples[5]
    assert len(a["labels"]) != len(b["labels"])
    pad = qwen2_tokenizer.pad_token_id

    accumulated = peft_model(tiny_qwen2, r=4, dropout=0.0, seed=1)
    init = adapter_state(accumulated)
    step_2x1 = sgd_runner(accumulated, accelerator)([collate([a], pad), collate([b], pad)])

    batched = peft_model(tiny_qwen2, r=4, dropout=0.0, seed=1)
    assert all(torch.equal(init[n], t) for n, t in adapter_state(batched).items())
    step_1x2 = sgd_runner(batched, accelerator)([collate([a, b], pad)])

    assert step_2x1.loss == pytest.approx(step_1x2.loss, rel=1e-4)
    assert step_2x1.grad_norm == pytest.approx(step_1x2.grad_norm, rel=1e-3)
    assert step_2x1.target_tokens == step_1x2.target_tokens
    for name, weight in adapter_state(accumulated).items():
        delta_2x1, delta_1x2 = weight - init[name], adapter_state(batched)[name] - init[name]
        torch.testing.assert_close(delta_2x1, delta_1x2, rtol=1e-3, atol=1e-5)


def test_loss_is_mean_cross_entropy_per_target_token(tiny_qwen2, examples, qwen2_tokenizer, accelerator):
    model = peft_model(tiny_qwen2, r=4, dropout=0.0)
    batch = collate(examples[:3], qwen2_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    result = sgd_runner(model, accelerator, lr=0.0)([batch])
    assert result.loss == pytest.approx(expected.item(), rel=1e-5)


def test_loss_function_is_swappable(tiny_qwen2, examples, qwen2_tokenizer, accelerator):
    batch = collate(examples[:2], qwen2_tokenizer.pad_token_id)
    plain = sgd_runner(peft_model(tiny_qwen2, r=4, dropout=0.0), accelerator, lr=0.0)([batch])
    doubled = sgd_runner(peft_model(tiny_qwen2, r=4, dropout=0.0), accelerator, lr=0.0,
                         loss_fn=lambda model, b: 2 * causal_lm_loss(model, b))([batch])
    assert doubled.loss == pytest.approx(2 * plain.loss, rel=1e-5)


def test_clipping_bounds_the_update_and_logs_the_unclipped_norm(tiny_qwen2, examples, qwen2_tokenizer, accelerator):
    model = peft_model(tiny_qwen2, r=4, dropout=0.0)
    init = adapter_state(model)
    result = sgd_runner(model, accelerator, max_grad_norm=1e-3)([collate(examples[:4], qwen2_tokenizer.pad_token_id)])
    update = torch.sqrt(sum(((w - init[n]) ** 2).sum() for n, w in adapter_state(model).items()))
    assert result.grad_norm > 1e-2  # the logged norm is the one before clipping
    assert update.item() == pytest.approx(1e-3, rel=1e-3)


def test_step_without_target_tokens_is_finite_and_a_no_op(tiny_qwen2, examples, qwen2_tokenizer, accelerator):
    model = peft_model(tiny_qwen2, r=4, dropout=0.0)
    init = adapter_state(model)
    batch = collate(examples[:2], qwen2_tokenizer.pad_token_id)
    batch["labels"].fill_(-100)
    result = sgd_runner(model, accelerator)([batch])
    assert result.loss == 0.0 and result.target_tokens == 0 and math.isfinite(result.grad_norm)
    assert all(torch.equal(init[n], w) for n, w in adapter_state(model).items())


def test_warmup_then_cosine_decay(tiny_qwen2, examples, qwen2_tokenizer, accelerator):
    model = peft_model(tiny_qwen2, r=4, dropout=0.0)
    optimizer = build_optimizer(model, "paged_adamw_32bit", lr=1e-3)
    runner = StepRunner(model, optimizer, build_scheduler(optimizer, "cosine", total_steps=10, warmup_ratio=0.2),
                        accelerator)
    batch = collate(examples[:1], qwen2_tokenizer.pad_token_id)
    lrs = [runner([batch]).lr for _ in range(10)]
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # 2 warmup steps, then the peak
    assert all(x > y for x, y in zip(lrs[2:], lrs[3:]))  # then strictly decreasing
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("loss_fn", [causal_lm_loss, chunked_lm_loss])
def test_micro_batches_without_targets_give_no_nan(tiny_qwen2, examples, qwen2_tokenizer, accelerator, loss_fn):
    """A micro-batch whose rows are all cut before their answer adds nothing to the step; a window of
    only such batches is a step of zero loss and zero gradient, never NaN or a crash."""
    pad = qwen2_tokenizer.pad_token_id
    empty = collate(examples[:2], pad)
    empty["labels"][:] = IGNORE
    full = collate(examples[2:4], pad)

    def step(windows):
        model = peft_model(tiny_qwen2, r=4, dropout=0.0, seed=1)
        with torch.no_grad():  # non-zero B, so gradients reach every adapter weight
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
        runner = sgd_runner(model, accelerator, loss_fn=loss_fn)
        before = adapter_state(model)
        result = runner(windows)
        return result, {n: (p - before[n]) for n, p in adapter_state(model).items()}

    mixed, mixed_update = step([empty, full])
    alone, alone_update = step([full])
    assert mixed.loss == pytest.approx(alone.loss) and mixed.target_tokens == alone.target_tokens
    assert all(torch.allclose(mixed_update[n], alone_update[n], atol=1e-6) for n in alone_update)
    nothing, no_update = step([empty])
    assert (nothing.loss, nothing.grad_norm, nothing.target_tokens, nothing.finite) == (0.0, 0.0, 0, True)
    assert all(not u.any() for u in no_update.values())


