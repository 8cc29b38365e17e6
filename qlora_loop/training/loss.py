"""The loss functions: (model, batch) -> per-sample *sums* of next-token cross-entropy, shape [batch].

The StepRunner divides by the target-token count of the whole step, so a loss function never
normalises. `default_loss(model)` picks the chunked loss wherever it computes the same thing.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora_loop.data.batches import model_inputs
from qlora_loop.data.examples import IGNORE


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
    per_token = chunked_token_losses(model, batch, chunk_size)
    rows = target_mask(batch["labels"]).nonzero()[:, 0]
    sums = torch.zeros(batch["labels"].shape[0], device=per_token.device)
    if not len(rows):  # zero, but through the graph
        return sums + per_token.sum()
    return sums.index_add(0, rows, per_token)


def chunked_token_losses(model, batch: dict, chunk_size: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """The cross-entropy of each trained token [K], in the order of target_mask(labels).nonzero(),
    lm_head applied `chunk_size` tokens at a time (see chunked_lm_loss), its logits divided by
    `temperature`. With no trained token, [1] zero through the graph, so backward (and DDP's all-reduce)
    still runs."""
    keep = target_mask(batch["labels"])
    final = final_hidden_states(model, batch)
    if not keep.any():
        return final.float().sum().view(1) * 0
    hidden = final[:, :-1][keep]  # [trained tokens, hidden]
    targets = batch["labels"][:, 1:][keep]
    head = output_head(model)
    chunk_size = chunk_size or chunk_tokens(head.out_features)
    losses = [checkpoint(_token_losses, head, hidden[i:i + chunk_size], targets[i:i + chunk_size], temperature,
                         use_reentrant=False) for i in range(0, len(targets), chunk_size)]
    return torch.cat(losses)


def token_losses(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """The cross-entropy of each trained token [K] (target_mask order) under the logits divided by
    `temperature`: chunked where default_loss is, else from the model's whole logits. -token_losses is
    each token's log-probability under the distribution sampled at that temperature (GRPO's)."""
    if default_loss(model) is chunked_lm_loss:
        return chunked_token_losses(model, batch, temperature=temperature)
    logits = model(**model_inputs(batch)).logits
    keep = target_mask(batch["labels"])
    return F.cross_entropy(logits[:, :-1][keep].float() / temperature, batch["labels"][:, 1:][keep], reduction="none")


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


def _token_losses(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float() / temperature, targets, reduction="none")


def output_head(model):
    """The (unwrapped) model's lm_head module."""
    return base_model(model).get_output_embeddings()


def default_loss(model):
    """The loss of every run unless one is given: chunked_lm_loss where the model's logits are plainly
    lm_head(final hidden state), its forward takes logits_to_keep and it has a decoder to hook; else
    (remote code, logit soft-capping or scaling) causal_lm_loss."""
    head, base = output_head(model), base_model(model)
    plain = not any(getattr(base.config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
    takes_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
    has_decoder = callable(getattr(base, "get_decoder", None)) and base.get_decoder() is not None
    frozen = head is not None and not any(p.requires_grad for p in head.parameters())
    return chunked_lm_loss if plain and takes_keep and has_decoder and frozen else causal_lm_loss


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which positions of labels [B, T] are predicted and trained: position 0 is never predicted."""
    return labels[..., 1:] != IGNORE


def sample_units(batch: dict) -> torch.Tensor:
    """What each sample's loss is a sum over [B]: its loss-bearing tokens, or, in a preference batch
    (training/preference.py), 1 per pair or judged answer (batch["units"])."""
    return batch["units"] if "units" in batch else target_mask(batch["labels"]).sum(dim=1)


def count_targets(batch: dict) -> int:
    """The loss units of a batch, which the runner divides by: loss-bearing tokens, or samples of a
    preference batch."""
    return int(sample_units(batch).sum())
