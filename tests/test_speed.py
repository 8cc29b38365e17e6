"""What makes the step faster without changing what it computes: activation checkpointing only where the
memory probe says the batch needs it (model.gradient_checkpointing=auto), and LoRA layers that share their
input's A matmul and draw dropout inside it (qlora_loop.model.fused_lora)."""

from __future__ import annotations

import pytest
import torch

from conftest import run_training

from qlora_loop.config import ASSETS, AdapterConfig, DataConfig
from qlora_loop.data.batches import collate
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.model.adapter import add_adapter
from qlora_loop.model.fused_lora import SharedInputLinear4bit, SharedInputLoraA, dropped_positions
from qlora_loop.model.load import load_base_model, set_gradient_checkpointing
from qlora_loop.training.loss import default_loss
from qlora_loop.training.memory import OutOfMemory


@pytest.fixture(scope="module")
def batch(qwen2_tokenizer):
    rows, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"), val_split=0.0,
                                                            max_length=128))
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
                        AdapterConfig(kind="lora", r=4, dropout=0.1))
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
def test_dropped_positions_drop_each_element_with_probability_p_independently(p):
    torch.manual_seed(0)
    n = 200_000
    dropped = torch.zeros(n, dtype=torch.bool)
    positions = dropped_positions(n, p)
    dropped[positions] = True
    assert positions.min() >= 0 and positions.max() < n and bool((positions.diff() > 0).all())
    share = dropped.double().mean().item()
    assert abs(share - p) < 5 * (p * (1 - p) / n) ** 0.5  # 5 sigma of a Binomial share
    both = (dropped[1:] & dropped[:-1]).double().mean().item()  # neighbours independent: p^2
    assert abs(both - p * p) < 5 * (p * p / n) ** 0.5


def test_shared_input_a_equals_dropout_then_each_a_with_one_mask():
    """The fused A output and its gradients are dropout(x) @ A_j^T * scale_j computed plainly, with the
    mask drawn as the fused path draws it: one mask for every projection reading x."""
    torch.manual_seed(0)
    x = torch.randn(3, 50, 40, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(r, 40, dtype=torch.float64, requires_grad=True) for r in (4, 2, 2)]
    scales, p = (2.0, 2.0, 0.5), 0.1
    torch.manual_seed(1)
    fused = SharedInputLoraA.apply(x, p, scales, *weights)
    torch.manual_seed(1)
    mask = torch.ones(x.numel(), dtype=torch.float64)
    mask[dropped_positions(x.numel(), p)] = 0
    mask = mask.view(x.shape)
    assert 0.08 < 1 - mask.mean().item() < 0.12
    plain = torch.cat([(x * mask / (1 - p)) @ w.t() * s for w, s in zip(weights, scales)], -1)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(fused)
    for got, want in zip(torch.autograd.grad(fused, [x, *weights], upstream),
                         torch.autograd.grad(plain, [x, *weights], upstream)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # without dropout: the plain product (one stacked matmul against three; BLAS may block them apart)
    torch.testing.assert_close(SharedInputLoraA.apply(x, 0.0, scales, *weights),
                               torch.cat([x @ w.t() * s for w, s in zip(weights, scales)], -1), rtol=1e-12, atol=1e-12)


def test_adapter_shares_inputs_and_computes_what_peft_computes(tiny_qwen2, batch):
    """q/k/v and gate/up each share one A matmul (o and down alone); with dropout 0 the loss and every
    gradient equal plain peft's to float tolerance, and the adapter's parameter names are peft's."""
    from peft import LoraConfig, get_peft_model
    from qlora_loop.model.adapter import find_linear4bit_targets
    # float32 compute: in bfloat16 a last-bit difference in a layer's input can round the base matmul's
    # input the other way, and that grows through the layers below it
    ours, base = (load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.float32, gradient_checkpointing=False)
                  for _ in range(2))
    torch.manual_seed(0)  # the same LoRA A initialisation
    ours = add_adapter(ours, AdapterConfig(kind="lora", r=4, dropout=0.0))
    torch.manual_seed(0)
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=32.0, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=find_linear4bit_targets(base)))
    shared = {n.split(".")[-1]: len(m.shared_input.layers) for n, m in ours.named_modules()
              if isinstance(m, SharedInputLinear4bit)}
    assert shared == {"q_proj": 3, "k_proj": 3, "v_proj": 3, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 1}
    for model in (ours, plain):
        model.train()
        torch.manual_seed(1)  # B non-zero, so that every gradient is
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    (ours_loss, ours_grads), (plain_loss, plain_grads) = loss_and_grads(ours, batch), loss_and_grads(plain, batch)
    assert ours_loss == pytest.approx(plain_loss, rel=1e-6) and ours_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        assert (ours_grads[name] - plain_grads[name]).norm() < 1e-5 * plain_grads[name].norm(), name  # ~5e-7 here
    assert ours.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("shared", [True, False])
def test_adapter_shared_inputs_key_reaches_the_trained_model(tiny_qwen2, tmp_path, shared):
    """adapter.shared_inputs=false trains with peft's forward; the default with the shared path."""
    seen = []

    def loss_fn(model, batch):
        seen.append(any(isinstance(m, SharedInputLinear4bit) for m in model.modules()))
        return default_loss(model)(model, batch)

    run_training([f"model.name_or_path={tiny_qwen2}", "train.epochs=1", f"output_dir={tmp_path / 'out'}",
                  f"adapter.shared_inputs={str(shared).lower()}"], loss_fn=loss_fn)
    assert seen and set(seen) == {shared}
