"""torchkeras interop: let torchkeras' KerasModel.fit drive our StepRunner (pip install -e ".[keras]").

KerasModel looks its step runner up as a class attribute (`self.StepRunner(net=..., loss_fn=...,
accelerator=..., stage=..., metrics_dict=..., optimizer=..., lr_scheduler=...)`), so a subclass
sets its own; nothing in torchkeras is patched. Each torchkeras "step" is one of our optimizer
steps over one micro-batch: the loss is normalised by the batch's target tokens, gradients are
clipped at `max_grad_norm` (not torchkeras' fixed 1.0), and the logged loss is the mean over
processes (not torchkeras' sum). Checkpoints hold only the adapter, as safetensors.

    model = QLoraKerasModel(peft_model, optimizer=build_optimizer(...), lr_scheduler=build_scheduler(...))
    history = model.fit(train_dl, val_dl, epochs=3, ckpt_path="outputs/keras-best", patience=2, plot=False)

Gradient accumulation goes through our StepRunner, not torchkeras: keep
`gradient_accumulation_steps=1` and raise the batch size, or use scripts/train.py (train.grad_accum).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qlora_loop.training.loss import default_loss, target_mask
from qlora_loop.training.step import StepRunner

try:
    from torchkeras import KerasModel
except ImportError as e:  # an optional extra
    raise ImportError(f"qlora_loop.training.keras needs torchkeras ({e}): pip install -e \".[keras]\"") from None

ADAPTER_FILE = "adapter.safetensors"


class KerasStepRunner:
    """torchkeras' StepRunner interface over our StepRunner: __call__(batch) -> (losses, metrics)."""

    def __init__(self, net, loss_fn, accelerator=None, stage="train", metrics_dict=None, optimizer=None,
                 lr_scheduler=None, max_grad_norm: float = 1.0, step_counter: dict | None = None, **kwargs):
        if accelerator.gradient_accumulation_steps != 1:
            raise ValueError(f"fit(gradient_accumulation_steps={accelerator.gradient_accumulation_steps}): our "
                             "StepRunner accumulates itself; pass 1 and raise the batch size, or use scripts/train.py "
                             "with train.grad_accum")
        self.net, self.accelerator, self.stage = net, accelerator, stage
        self.loss_fn = loss_fn or default_loss(net)
        self.metrics_dict = metrics_dict if metrics_dict is not None else {}
        # torchkeras builds a new runner every epoch; the optimizer-step count (AdaLoRA's schedule
        # needs it) lives in a dict the KerasModel keeps.
        self.step_counter = step_counter if step_counter is not None else {"step": 0}
        self.runner = None
        if stage == "train" and optimizer is not None:
            self.runner = StepRunner(net, optimizer, lr_scheduler, accelerator, loss_fn=self.loss_fn,
                                     max_grad_norm=max_grad_norm, step=self.step_counter["step"])
        self.net.train() if stage == "train" else self.net.eval()

    def __call__(self, batch: dict):
        if self.runner is not None:
            result = self.runner([batch])
            self.step_counter["step"] = self.runner.step
            return ({"train_loss": result.loss},
                    {"lr": result.lr, "grad_norm": result.grad_norm, "tokens": result.tokens})
        # validation (or an epoch torchkeras runs without an optimizer): loss per target token
        with self.accelerator.autocast():
            per_sample = self.loss_fn(self.net, batch).float()
        counts = target_mask(batch["labels"]).sum(dim=1)
        per_sample, counts = self.accelerator.gather_for_metrics((per_sample, counts))
        loss = (per_sample.sum() / counts.sum().clamp(min=1)).item()
        return {f"{self.stage}_loss": loss}, ({"lr": 0.0} if self.stage == "train" else {})


class QLoraKerasModel(KerasModel):
    """KerasModel with our StepRunner, our loss and adapter-only checkpoints (ckpt_path is a folder)."""

    StepRunner = KerasStepRunner

    def __init__(self, net, loss_fn=None, optimizer=None, lr_scheduler=None, max_grad_norm: float = 1.0):
        # torchkeras passes every extra keyword through accelerator.prepare() (which returns plain
        # objects as they are) to each StepRunner it builds.
        super().__init__(net, loss_fn, metrics_dict=None, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         max_grad_norm=max_grad_norm, step_counter={"step": 0})

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.kwargs["step_counter"]["step"]

    def save_ckpt(self, ckpt_path=None, accelerator=None):
        """The trainable (adapter) weights only, as safetensors: never the 4-bit base, never pickle."""
        accelerator = accelerator if accelerator is not None else self.accelerator
        net = accelerator.unwrap_model(self.net)
        folder = Path(ckpt_path if ckpt_path is not None else self.ckpt_path)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().cpu().contiguous() for n, p in net.named_parameters() if p.requires_grad}
        save_file(weights, str(folder / ADAPTER_FILE))

    def load_ckpt(self, ckpt_path=None):
        """Put the best adapter weights back (torchkeras calls this at the end of fit)."""
        weights = load_file(str(Path(ckpt_path if ckpt_path is not None else self.ckpt_path) / ADAPTER_FILE))
        params = dict(self.net.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        self.from_scratch = False
