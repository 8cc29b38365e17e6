"""What makes the step faster without changing what it computes: activation checkpointing only where the
memory probe says the batch needs it (model.gradient_checkpointing=auto), LoRA dropout masks drawn by gaps."""

from __future__ import annotations

import pytest
import torch

from conftest import run_training

from qlora_loop.config import ASSETS
from qlora_loop.data import build_datasets, collate
from qlora_loop.dropout import GapDropout, dropped_positions
from qlora_loop.loss import default_loss
from qlora_loop.memory import OutOfMemory
from qlora_loop.model import add_adapter, load_base_model, set_gradient_checkpointing


@pytest.fixture(scope="module")
def batch(qwen2_tokenizer):
    rows, _, _ = build_datasets(qwen2_tokenizer, str(ASSETS / "self_cognition.jsonl"), None, val_split=0.0,
                                max_length=128)
    return collate(rows[:4], qwen2_tokenizer.pad_token_id)


def loss_and_grads(model, batch, seed: int = 0) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    loss = default_loss(model)(model, batch).sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_changes_neither_loss_nor_gradients(tiny_qwen2, batch):
    """Recomputed layers replay the RNG state, so even with LoRA dropout on the numbers are the same."""
    model = add_adapter(load_base_model(str(tiny_qwen2), torch.device("cpu"), gradient_checkpointing=False),
                        "lora", r=4, dropout=0.1)
    model.train()
    plain_loss, plain = loss_and_grads(model, batch)
    set_gradient_checkpointing(model, True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed_loss, checkpointed = loss_and_grads(model, batch)
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert checkpointed.keys() == plain.keys() and len(plain) == 2 * 14
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_auto_checkpointing_is_off_when_the_longest_batch_fits(tiny_qwen2, tmp_path, capsys):
    summary = run_training([f"model.name_or_path={tiny_qwen2}", "train.epochs=1", f"output_dir={tmp_path / 'out'}"])
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert "gradient checkpointing off (model.gradient_checkpointing=auto): the longest batch fits without it" in out
    assert out.count("memory probe (longest batch") == 1  # one probe: no second one with checkpointing
    assert summary["steps"] > 0


def test_auto_checkpointing_is_on_when_the_budget_is_too_small(tiny_qwen2, tmp_path, capsys):
    """Without checkpointing the batch does not fit 0.01 GiB: it is turned on and probed again; that does
    not fit either, so the run stops before step 1, and the advice no longer offers checkpointing."""
    with pytest.raises(OutOfMemory) as stopped:
        run_training([f"model.name_or_path={tiny_qwen2}", "train.epochs=1", f"output_dir={tmp_path / 'out'}",
                      "train.memory_budget_gib=0.01"])
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert "gradient checkpointing on (model.gradient_checkpointing=auto): without it the longest batch needs" in out
    assert "of a 0.01 GiB budget" in out and out.count("memory probe (longest batch") == 2
    assert "gradient_checkpointing" not in str(stopped.value) and "train.grad_accum=2" in str(stopped.value)
    assert not (tmp_path / "out" / "steps.jsonl").exists()


def test_auto_checkpointing_is_on_without_a_probe(tiny_qwen2, tmp_path, capsys):
    run_training([f"model.name_or_path={tiny_qwen2}", "train.epochs=1", f"output_dir={tmp_path / 'out'}",
                  "train.memory_probe=false"])
    out = " ".join(capsys.readouterr().out.split())
    assert "gradient checkpointing on (model.gradient_checkpointing=auto): train.memory_probe=false" in out


def test_gradient_checkpointing_takes_true_false_or_auto():
    from conftest import tiny_config
    from qlora_loop.config import ConfigError
    assert tiny_config().model.gradient_checkpointing == "auto"
    assert tiny_config("model.gradient_checkpointing=false").model.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="model.gradient_checkpointing='sometimes' must be true, false or auto"):
        tiny_config("model.gradient_checkpointing=sometimes")


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_gap_dropout_drops_each_element_with_probability_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.ones(200, 1000, requires_grad=True)
    y = GapDropout(p).train()(x)
    kept = (y != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / x.numel()) ** 0.5  # 5 sigma of a Binomial share
    assert y.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    dropped = (y == 0).flatten()
    both = (dropped[1:] & dropped[:-1]).double().mean().item()  # neighbours independent: p^2
    assert abs(both - p * p) < 5 * (p * p / x.numel()) ** 0.5
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, y.detach())  # backward: the same mask, the same scale
    assert torch.equal(GapDropout(p).eval()(x), x)
    positions = dropped_positions(10_000, p)
    assert positions.min() >= 0 and positions.max() < 10_000 and bool((positions.diff() > 0).all())


def test_adapter_uses_gap_dropout_and_with_dropout_0_is_peft_exactly(tiny_qwen2, batch):
    from peft import LoraConfig, get_peft_model
    from qlora_loop.model import find_linear4bit_targets
    dropped = add_adapter(load_base_model(str(tiny_qwen2), torch.device("cpu")), "lora", r=4, dropout=0.05)
    assert sum(isinstance(m, GapDropout) for m in dropped.modules()) == 14
    ours, base = (load_base_model(str(tiny_qwen2), torch.device("cpu")) for _ in range(2))
    torch.manual_seed(0)  # the same LoRA A initialisation
    ours = add_adapter(ours, "lora", r=4, dropout=0.0)
    torch.manual_seed(0)
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=32.0, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=find_linear4bit_targets(base)))
    for model in (ours, plain):
        model.train()
        torch.manual_seed(1)  # B non-zero, so that every gradient is
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    (ours_loss, ours_grads), (plain_loss, plain_grads) = loss_and_grads(ours, batch), loss_and_grads(plain, batch)
    assert ours_loss == plain_loss and ours_grads.keys() == plain_grads.keys()
    assert all(torch.equal(ours_grads[n], plain_grads[n]) for n in plain_grads)
