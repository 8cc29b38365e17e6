"""torchkeras' KerasModel.fit driving our StepRunner on the tiny 4-bit model.

Run: python -m pytest tests/test_keras.py -q   (needs: pip install -e ".[keras]")
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import peft_model
from safetensors.torch import load_file

pytest.importorskip("torchkeras", reason="torchkeras is not installed: pip install -e \".[keras]\"")

from torchkeras import KerasModel  # noqa: E402

from qlora_loop.config import DataConfig
from qlora_loop.data.batches import build_dataloaders  # noqa: E402
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.training.keras import ADAPTER_FILE, KerasStepRunner, QLoraKerasModel  # noqa: E402
from qlora_loop.training.optim import build_optimizer, build_scheduler  # noqa: E402


def test_keras_model_trains_the_tiny_model_through_our_step_runner(tmp_path, tiny_qwen2, qwen2_tokenizer, rows44):
    train, val, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(rows44), val_split=0.1, max_length=512),
                                   seed=0)
    train_dl, val_dl = build_dataloaders(train, val, DataConfig(group_by_length=False), batch_size=4,
                                         pad_id=qwen2_tokenizer.pad_token_id, seed=0)
    model = peft_model(tiny_qwen2, r=8, alpha=16, dropout=0.0)
    optimizer = build_optimizer(model, "paged_adamw_32bit", 3e-3)
    scheduler = build_scheduler(optimizer, "cosine", len(train_dl) * 3, 0.05)
    keras = QLoraKerasModel(model, optimizer=optimizer, lr_scheduler=scheduler, max_grad_norm=0.5)
    assert isinstance(keras, KerasModel) and keras.StepRunner is KerasStepRunner
    assert KerasModel.StepRunner is not KerasStepRunner  # torchkeras itself is left as it was

    history = keras.fit(train_dl, val_dl, epochs=3, ckpt_path=str(tmp_path / "best"), patience=2, plot=False)

    assert list(history["epoch"]) == [1, 2, 3]
    assert {"train_loss", "val_loss", "lr", "grad_norm", "tokens"} <= set(history.columns)
    val_loss = list(history["val_loss"])
    assert val_loss[0] > 3.0 and val_loss[-1] < 2.5 and val_loss == sorted(val_loss, reverse=True)
    # one optimizer step per batch of 4, counted across epochs; the schedule advanced once per step
    assert keras.step == 3 * math.ceil(len(train) / 4) == scheduler.last_epoch
    # the best checkpoint is the adapter only, as safetensors, and fit put it back into the model
    saved = load_file(tmp_path / "best" / ADAPTER_FILE)
    trainable = {n: p for n, p in keras.net.named_parameters() if p.requires_grad}
    assert set(saved) == set(trainable) and all("lora_" in n for n in saved)
    assert all(torch.equal(saved[n], trainable[n].detach().cpu()) for n in saved)


def test_torchkeras_gradient_accumulation_is_refused_with_the_fix(tiny_qwen2, qwen2_tokenizer):
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2.*pass 1 and raise the batch size"):
        KerasStepRunner(net=torch.nn.Linear(2, 2), loss_fn=None, accelerator=accelerator)
