"""StepRunner: one optimizer step over its micro-batches, and the loss it is given.

The runner never reads the config, never saves and never prints; `fit` calls it once per
optimizer step with that step's micro-batches (`grad_accum` of them, fewer at an epoch's end).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora_loop.data import IGNORE, model_inputs
from qlora_loop.model import adalora_of, adalora_orth_reg


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """Per-sample *sum* of next-token cross-entropy over trained tokens, shape [batch].

    A loss function takes (model, batch) and returns per-sample sums; the runner divides by the
    target-token count of the whole step. Swap in another objective by passing another function.
    """
    logits = model(**model_inputs(batch)).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                             ignore_index=IGNORE, reduction="none")
    return losses.view(labels.shape).sum(dim=1)


LOGITS_CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk; its backward holds a few times this


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of chunked_lm_loss: ~440 at Qwen's 152k vocabulary, a whole batch at a tiny one."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def chunked_lm_loss(model, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """causal_lm_loss without ever materialising [tokens, vocab] logits: the forward gives the final
    hidden states (final_hidden_states; its logits are one position's), and lm_head is applied here only at positions
    whose next token is trained, `chunk_size` at a time (default: chunk_tokens), each chunk recomputed
    in backward. For a 152k vocabulary at 2048 tokens this saves ~3 GB of fp32 logits and their gradient.

    The forward still goes through `model` (the DDP wrapper under several processes), so gradient
    synchronisation is untouched; lm_head is frozen, so applying it outside costs DDP nothing."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    final = final_hidden_states(model, batch)
    if not keep.any():  # zero, but through the graph: backward (and DDP's all-reduce) still runs
        return final.float().sum(dim=(1, 2)) * 0
    hidden = final[:, :-1][keep]  # [trained tokens, hidden]
    targets, rows = labels[keep], keep.nonzero()[:, 0]
    head = output_head(model)
    chunk_size = chunk_size or chunk_tokens(head.out_features)
    losses = [checkpoint(_token_losses, head, hidden[i:i + chunk_size], targets[i:i + chunk_size], use_reentrant=False)
              for i in range(0, len(targets), chunk_size)]
    per_token = torch.cat(losses)
    return torch.zeros(labels.shape[0], device=per_token.device).index_add(0, rows, per_token)


def final_hidden_states(model, batch: dict) -> torch.Tensor:
    """The forward through `model` (so DDP and Accelerate's autocast apply) and the decoder's output,
    the final hidden states after the last norm, taken by a hook. output_hidden_states=True would
    return every layer's, which Accelerate's mixed-precision wrapper copies to float32 (0.85 GB at
    7B, seq 2048); logits_to_keep=1 keeps the model's own logits to one position."""
    captured = []
    hook = base_model(model).get_decoder().register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        model(**model_inputs(batch), logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1]


def base_model(model):
    """The transformers model inside DDP / Accelerate / peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _token_losses(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def output_head(model):
    """The (unwrapped) model's lm_head module."""
    return base_model(model).get_output_embeddings()


def default_loss(model):
    """chunked_lm_loss where the model's logits are plainly lm_head(final hidden state) and its
    forward takes logits_to_keep and it has a decoder to hook; else (remote code, logit soft-capping
    or scaling) causal_lm_loss."""
    head, base = output_head(model), base_model(model)
    plain = not any(getattr(base.config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
    takes_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
    has_decoder = callable(getattr(base, "get_decoder", None)) and base.get_decoder() is not None
    frozen = head is not None and not any(p.requires_grad for p in head.parameters())
    return chunked_lm_loss if plain and takes_keep and has_decoder and frozen else causal_lm_loss


def count_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@dataclass
class StepResult:
    loss: float  # mean cross-entropy per target token of this step, over all processes
    grad_norm: float  # before clipping
    lr: float  # the learning rate this step used
    tokens: int  # non-padding tokens through forward, all processes
    target_tokens: int  # loss-bearing tokens, all processes
    positions: int = 0  # token slots through forward, padding included, all processes
    finite: bool = True  # False: loss or grad norm was inf/NaN and the update was not applied
    sample_ids: list[int] | None = None  # the step's example indices on all processes, when not finite


class StepRunner:
    def __init__(self, model, optimizer, scheduler, accelerator, loss_fn=causal_lm_loss,
                 max_grad_norm: float = 1.0, step: int = 0):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accelerator, self.loss_fn, self.max_grad_norm = accelerator, loss_fn, max_grad_norm
        self.step = step  # optimizer steps taken so far
        self.adalora = adalora_of(accelerator.unwrap_model(model))

    def __call__(self, micro_batches: list[dict]) -> StepResult:
        accelerator, model = self.accelerator, self.model
        model.train()
        # Normalise by the target tokens of the whole step on all processes, so a step is the mean
        # over its tokens whatever the split into micro-batches and ranks. DDP averages gradients
        # over ranks, hence the x num_processes.
        local = torch.tensor([count_targets(b) for b in micro_batches], device=accelerator.device).sum()
        n_targets = int(accelerator.reduce(local, "sum"))
        scale = accelerator.num_processes / max(n_targets, 1)  # max(): a step with no targets is a no-op, not NaN
        loss_sum = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(micro_batches):
            # Gradients are all-reduced once per step, on the last micro-batch only.
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    per_sample = self.loss_fn(model, batch)
                    loss = per_sample.sum() * scale
                    if self.adalora is not None:  # spread over the window: added once per step
                        weight = self.adalora.peft_config[self.adalora.trainable_adapter_name].orth_reg_weight
                        loss = loss + weight * adalora_orth_reg(self.adalora) / len(micro_batches)
                accelerator.backward(loss)
            loss_sum += per_sample.detach().sum().float()

        # Clip (or, with max_grad_norm 0, only measure) the norm; accelerate unscales fp16 first.
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm or math.inf))
        loss = (accelerator.reduce(loss_sum, "sum") / max(n_targets, 1)).item()  # a CPU-GPU sync point
        tokens = int(accelerator.reduce(sum(b["attention_mask"].sum() for b in micro_batches), "sum"))
        positions = int(accelerator.reduce(torch.tensor(sum(b["attention_mask"].numel() for b in micro_batches),
                                                        device=accelerator.device), "sum"))
        lr = self.scheduler.get_last_lr()[0]
        # Loss and norm are reduced over processes, so every rank takes the same branch. Under fp16
        # an inf norm is the grad scaler's business (it skips the step and lowers the scale).
        finite = math.isfinite(loss) and (math.isfinite(grad_norm) or accelerator.scaler is not None)
        if not finite:  # leave weights, optimizer, schedule and AdaLoRA budget as they were
            self.optimizer.zero_grad(set_to_none=True)
            ids = accelerator.gather(torch.cat([b["index"] for b in micro_batches]))
            return StepResult(loss, grad_norm, lr, tokens, n_targets, positions, finite=False, sample_ids=ids.tolist())
        self.optimizer.step()
        self.scheduler.step()
        if self.adalora is not None:  # needs this step's gradients, so before zero_grad
            self.adalora.update_and_allocate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(loss, grad_norm, lr, tokens, n_targets, positions)
