"""AdaLoRA on the 4-bit tiny model: the rank budget really shrinks, and the final rank pattern
is saved and reloads with plain peft."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import peft_model
from peft import PeftModel
from safetensors.torch import load_file

from qlora_loop.config import ASSETS, DataConfig
from qlora_loop.data.batches import collate
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.model.adapter import adalora_of, adalora_orth_reg
from qlora_loop.model.load import load_base_model
from qlora_loop.training.checkpoint import save_adapter
from qlora_loop.training.loss import causal_lm_loss
from qlora_loop.training.optim import build_optimizer, build_scheduler
from qlora_loop.training.step import StepRunner

TOTAL, TARGET_R, INIT_R = 20, 2, 4


@pytest.fixture(scope="module")
def batches(qwen2_tokenizer):
    train, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"), val_split=0.0,
                                                             max_length=256))
    return [collate(train[i:i + 4], qwen2_tokenizer.pad_token_id) for i in range(0, 40, 4)]


@pytest.fixture(scope="module")
def trained(tiny_qwen2, batches):
    from accelerate import Accelerator
    accelerator = Accelerator(mixed_precision="no")
    model = peft_model(tiny_qwen2, "adalora", r=TARGET_R, init_r=INIT_R, total_steps=TOTAL, tinit=0.1,
                       tfinal=0.2, delta_t=1, dropout=0.0)
    optimizer = build_optimizer(model, lr=1e-2)
    runner = StepRunner(model, optimizer, build_scheduler(optimizer, "constant", TOTAL, 0.0), accelerator)
    losses = [runner([batches[step % len(batches)]]).loss for step in range(TOTAL)]
    return model, accelerator, losses


def test_budget_shrinks_to_target_rank(trained):
    model, _, losses = trained
    config = model.peft_config["default"]
    assert config.total_step == TOTAL and (config.tinit, config.tfinal) == (2, 4)
    pattern = config.rank_pattern
    assert pattern, "update_and_allocate never produced a rank pattern"
    n_modules = len(pattern)
    kept = sum(sum(mask) for mask in pattern.values())
    assert kept == TARGET_R * n_modules < INIT_R * n_modules
    assert len({sum(mask) for mask in pattern.values()}) > 1, "budget spread evenly: importance was not used"
    # The pruned singular values are zero in the live model.
    masks = {key.replace(".default", ""): mask for key, mask in pattern.items()}
    for name, param in model.named_parameters():
        if "lora_E" in name:  # base_model.model.<module>.lora_E.default -> <module>.lora_E
            pruned = ~torch.tensor(masks[name.removeprefix("base_model.model.").removesuffix(".default")])
            assert torch.all(param.detach().view(-1)[pruned] == 0)
    assert losses[-1] < losses[0]
    # ranknum divides every update and must stay init_r: peft's loader restores it to init_r.
    assert all(p.item() == INIT_R for n, p in model.named_parameters() if ".ranknum." in n)


def test_rank_pattern_saved_and_adapter_reloads(trained, tiny_qwen2, qwen2_tokenizer, batches, tmp_path):
    model, accelerator, _ = trained
    save_adapter(accelerator, model, qwen2_tokenizer, tmp_path / "best")
    saved = json.loads((tmp_path / "best" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]
    tensors = load_file(tmp_path / "best" / "adapter_model.safetensors")
    for key, mask in saved["rank_pattern"].items():
        lora_a = tensors[f"base_model.model.{key.removesuffix('.lora_E')}.lora_A"]
        assert lora_a.shape[0] == sum(mask)  # saved resized to the kept ranks

    assert {t.dtype for t in tensors.values()} == {torch.float32}

    reloaded = PeftModel.from_pretrained(load_base_model(str(tiny_qwen2), torch.device("cpu")), tmp_path / "best")
    model.eval(), reloaded.eval()
    with torch.no_grad():
        expected = sum(causal_lm_loss(model, b).sum() for b in batches)
        got = sum(causal_lm_loss(reloaded, b).sum() for b in batches)
    # peft's loader resizes AdaLoRA modules through the base's bf16 compute dtype, rounding the
    # fp32 weights we saved: agreement is to bf16 precision, not bit for bit.
    assert got.item() == pytest.approx(expected.item(), rel=1e-3)


def test_orth_regulariser_matches_peft(tiny_qwen2, batches):
    model = peft_model(tiny_qwen2, "adalora", r=TARGET_R, init_r=INIT_R, total_steps=TOTAL)
    adalora = adalora_of(model)
    with torch.no_grad():  # make A and B non-orthogonal so the regulariser is not trivially small
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(std=0.5)
    batch = batches[0]
    with torch.no_grad():
        plain = adalora.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        with_reg = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    weight = model.peft_config["default"].orth_reg_weight
    assert (with_reg - plain).item() == pytest.approx(weight * adalora_orth_reg(adalora).item(), rel=1e-4)
    assert adalora_orth_reg(adalora).item() > 0.1


def test_step_adds_orth_regulariser_to_the_gradient(tiny_qwen2, batches):
    from accelerate import Accelerator
    accelerator = Accelerator(mixed_precision="no")
    updates = []
    for weight in (0.0, 0.5):
        model = peft_model(tiny_qwen2, "adalora", r=TARGET_R, init_r=INIT_R, total_steps=TOTAL,
                           orth_reg_weight=weight, dropout=0.0)
        a = dict(model.named_parameters())
        name = next(n for n in a if "lora_A" in n)
        before = a[name].detach().clone()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        StepRunner(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), accelerator)(
            [batches[0]])
        updates.append(a[name].detach() - before)
    assert not torch.allclose(updates[0], updates[1])
