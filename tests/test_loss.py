"""The loss functions: the chunked loss equals the full-logits one, packed rows equal padded ones."""

from __future__ import annotations

import pytest
import torch

from qlora_loop.config import ASSETS, AdapterConfig, DataConfig
from qlora_loop.data.batches import collate, collate_packed
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.training.loss import causal_lm_loss, chunked_lm_loss, count_targets


@pytest.fixture(scope="module")
def examples(qwen2_tokenizer):
    train, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"), val_split=0.0,
                                                             max_length=256))
    return train


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(request, fixture):
    from qlora_loop.model.adapter import add_adapter
    from qlora_loop.model.load import load_base_model, load_tokenizer
    from qlora_loop.training.loss import default_loss
    path = request.getfixturevalue(fixture)
    tokenizer = load_tokenizer(str(path))
    train, _, _ = build_datasets(tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"), val_split=0.0,
                                                       max_length=256))
    batch = collate(train[:5], tokenizer.pad_token_id)
    # float32 compute: in bf16 the two orders of summation differ by rounding (~3e-4), which would
    # hide a real error; in float32 they agree to ~1e-7.
    torch.manual_seed(0)
    model = add_adapter(load_base_model(str(path), torch.device("cpu"), torch.float32), AdapterConfig(r=4, dropout=0.0))
    with torch.no_grad():  # non-zero B, so the adapter's gradients are not trivially alike
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    assert default_loss(model) is chunked_lm_loss
    results = []
    for loss_fn in (causal_lm_loss, lambda m, b: chunked_lm_loss(m, b, chunk_size=7)):  # many uneven chunks
        per_sample = loss_fn(model, batch)
        per_sample.sum().backward()
        results.append((per_sample.detach(), {n: p.grad.clone() for n,
                                              p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (full, full_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    for name, grad in full_grads.items():
        assert ((chunked_grads[name] - grad).norm() / grad.norm()).item() < 1e-5, name


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
@pytest.mark.parametrize("loss_fn", [causal_lm_loss, chunked_lm_loss])
def test_packed_batch_gives_the_padded_batch_loss_and_gradients(request, fixture, loss_fn):
    """data.packing: five rows end to end in one row compute what the same five rows padded do,
    so each row attends only to itself and no row is trained to predict the next one's start."""
    from qlora_loop.model.adapter import add_adapter
    from qlora_loop.model.load import load_base_model, load_tokenizer
    path = request.getfixturevalue(fixture)
    tokenizer = load_tokenizer(str(path))
    train, _, _ = build_datasets(tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"), val_split=0.0,
                                                       max_length=256))
    torch.manual_seed(0)
    model = add_adapter(load_base_model(str(path), torch.device("cpu"), torch.float32), AdapterConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    results = []
    for batch in (collate(train[:5], tokenizer.pad_token_id), collate_packed(train[:5])):
        total = loss_fn(model, batch).sum()
        total.backward()
        results.append((total.detach(), count_targets(batch),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (padded, padded_targets, padded_grads), (packed, packed_targets, packed_grads) = results
    assert packed_targets == padded_targets
    # float32: ~1e-7 apart; with position_ids that do not restart (rows seeing their neighbours) 0.7-2%
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=0)
    for name, grad in padded_grads.items():
        assert ((packed_grads[name] - grad).norm() / grad.norm()).item() < 1e-4, name


def test_chunked_loss_asks_for_no_per_layer_hidden_states_under_accelerates_bf16_wrapper(tiny_qwen2, examples,
                                                                                          qwen2_tokenizer):
    """Accelerate's mixed-precision wrapper copies every bf16 output to float32; the chunked loss
    takes the final hidden state by a hook, so no per-layer hidden states come out to be copied
    (at 7B, seq 2048, they would be 0.85 GB), and its loss is still the full-logits loss."""
    from types import MethodType

    from accelerate.utils.operations import convert_outputs_to_fp32

    from qlora_loop.model.adapter import add_adapter
    from qlora_loop.model.load import load_base_model
    torch.manual_seed(0)
    model = add_adapter(load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.bfloat16, autocast=True),
                        AdapterConfig(r=4, dropout=0.0))
    model.forward = MethodType(convert_outputs_to_fp32(model.forward.__func__), model)  # as accelerator.prepare
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out))
    batch = collate(examples[:4], qwen2_tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_lm_loss(model, batch).sum()
        full = causal_lm_loss(model, batch).sum()
    assert outputs[0].hidden_states is None and outputs[0].logits.shape[1] == 1
    assert chunked.item() == pytest.approx(full.item(), rel=1e-2)  # bf16 logits either way
