"""GRPO on the one StepRunner: its `split` samples and scores, its loss function is the clipped policy
gradient. A training batch holds B prompts; a step

  1. samples train.num_generations completions of each prompt with the current adapter (one batched
     generate() with the KV cache, without gradients: model.generate.sample_completions);
  2. scores them (`score(prompts, completions, rows)`, the rewards of eval/rewards.py, given by run.py);
  3. normalises the rewards within each prompt's group into advantages (group_advantages);
  4. takes prompt + completion rows through forward/backward one group at a time (the pieces), the loss
     of each token -ratio x A (+ beta x KL to the base), summed per completion and normalised as the
     loss variant defines (sequence_losses); the runner divides by the step's units.

Each sampled batch is learned from once, so the probability ratio p / p_old is exactly 1 and its
gradient is A x the gradient of log p: PPO's clip of the ratio (TRL's epsilon) would bound nothing, and
is left out; it matters only when one sample is learned from several times, which this loop does not
do. Log-probs are taken at the sampling temperature (logits / T), the reference's too. With beta > 0
the reference is the 4-bit base with the adapter disabled, one forward without gradients per group;
with beta = 0 there is no reference pass at all. Log-probs come through the chunked loss, so no
[tokens, vocabulary] logits are held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qlora_loop.data.examples import IGNORE
from qlora_loop.model.generate import Sampling, sample_completions
from qlora_loop.training.loss import target_mask, token_losses


@dataclass(frozen=True, kw_only=True)
class Grpo:
    """train.objective=grpo's knobs, each config.TrainConfig's key of that name (the defaults live there)."""
    num_generations: int  # completions per prompt: the group
    max_new_tokens: int
    temperature: float
    beta: float  # KL to the base; 0 = no reference pass
    loss: str  # grpo | dapo | dr_grpo (train.grpo_loss)

    @property
    def scale_rewards(self) -> bool:
        """Dr. GRPO leaves out the division by the group's standard deviation (a difficulty bias)."""
        return self.loss != "dr_grpo"


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True) -> torch.Tensor:
    """Each reward minus its group's mean, divided by the group's standard deviation (+ 1e-4) when
    `scale`; rewards [N] are consecutive groups of `group_size`. A group whose rewards are all equal
    gets zero advantages: it teaches nothing."""
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centred.flatten()


def token_policy_loss(logps: torch.Tensor, advantages: torch.Tensor, ref_logps: torch.Tensor | None, *,
                      beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss of each token [K], KL of each token to the reference or None): -r A with r = exp(logp -
    logp.detach()), 1 in value and A x d log p in gradient (the sample's own policy is the current one),
    plus beta x KL, the estimator exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative). All
    arguments per token [K]."""
    loss = -torch.exp(logps - logps.detach()) * advantages
    if not beta:
        return loss, None
    delta = ref_logps - logps
    kl = torch.exp(delta) - delta - 1
    return loss + beta * kl, kl


def sequence_losses(token_loss: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, *, loss: str,
                    max_new_tokens: int) -> torch.Tensor:
    """Per completion [N] from the token losses [K] of rows `rows` [K], completions of `lengths` [N]:
    grpo: the mean over its tokens (each completion weighs the same); dapo: the sum, the runner then
    dividing by the step's tokens (each token weighs the same); dr_grpo: the sum / max_new_tokens (no
    length bias). sequence_units gives what the runner divides by."""
    sums = torch.zeros(lengths.shape[0], device=token_loss.device).index_add(0, rows, token_loss)
    if loss == "grpo":
        return sums / lengths.clamp(min=1)
    if loss == "dr_grpo":
        return sums / max_new_tokens
    return sums


def sequence_units(lengths: torch.Tensor, loss: str) -> torch.Tensor:
    """What the runner divides a step's summed losses by, per completion: its tokens for dapo, 1 otherwise."""
    return lengths.long() if loss == "dapo" else torch.ones_like(lengths, dtype=torch.long)


def grpo_loss(settings: Grpo):
    """The StepRunner's loss_fn for GRPO pieces (grpo_split): (model, piece) -> per-completion loss [N].
    A piece's "stats" dict gets the mean KL when beta > 0."""

    def loss_fn(model, batch: dict) -> torch.Tensor:
        logps = -token_losses(model, batch, temperature=settings.temperature).float()
        keep = target_mask(batch["labels"])
        rows = keep.nonzero()[:, 0]
        loss, kl = token_policy_loss(logps, batch["advantages"][rows], batch.get("ref_logps"), beta=settings.beta)
        if kl is not None and "stats" in batch:
            batch["stats"]["kl"] = float(kl.detach().mean())
        return sequence_losses(loss, rows, keep.sum(dim=1), loss=settings.loss, max_new_tokens=settings.max_new_tokens)

    return loss_fn


def grpo_split(settings: Grpo, *, examples: list[dict], tokenizer, score, unwrap):
    """The StepRunner's `split` for GRPO: (model, batch of prompts) -> one piece per prompt, its group of
    completions as rows ready for forward/backward. `examples`: the training examples, by batch["index"]
    (each with "input_ids", the prompt's tokens, "prompt" and "row", what the rewards read).
    score(prompts, completions, rows) -> (rewards [N], {reward name: [N]}); unwrap(model) -> the PeftModel
    that generates (Accelerate's unwrap_model). The first piece carries the step's "stats" (rewards, their
    spread, lengths, timings); a batch that already holds "advantages" (the memory probe's) goes through whole."""
    sampling = Sampling(temperature=settings.temperature, top_p=1.0, top_k=0)
    size = settings.num_generations

    def split(model, batch: dict) -> list[dict]:
        if "advantages" in batch:
            return [batch]
        policy, device = unwrap(model), batch["input_ids"].device
        chosen = [examples[i] for i in batch["index"].tolist()]
        prompts = [torch.tensor(e["input_ids"]) for e in chosen]
        started = time.perf_counter()
        completions, stopped = sample_completions(policy, tokenizer, prompts, num_generations=size,
                                                  max_new_tokens=settings.max_new_tokens, sampling=sampling)
        generated = time.perf_counter()
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        asked = [e for e in chosen for _ in range(size)]
        rewards, by_name = score([e["prompt"] for e in asked], texts, asked)
        scored = time.perf_counter()
        advantages = group_advantages(rewards, size, scale=settings.scale_rewards)
        pieces = []
        for g, prompt in enumerate(prompts):
            group = range(g * size, (g + 1) * size)
            piece = completion_rows(prompt, [completions[i] for i in group], tokenizer.pad_token_id, device)
            lengths = target_mask(piece["labels"]).sum(dim=1)
            piece.update(advantages=advantages[g * size:(g + 1) * size].to(device),
                         units=sequence_units(lengths, settings.loss), stats={})
            if settings.beta:
                piece["ref_logps"] = reference_token_logps(policy, piece, temperature=settings.temperature)
            pieces.append(piece)
        pieces[0]["stats"].update(group_stats(rewards, by_name, completions=completions, size=size, stopped=stopped),
                                  generate_seconds=generated - started, score_seconds=scored - generated)
        return pieces

    return split


def completion_rows(prompt: torch.Tensor, completions: list[torch.Tensor], pad_id: int, device) -> dict:
    """prompt + each completion as right-padded rows, labels on the completion's tokens only."""
    width = len(prompt) + max(len(c) for c in completions)
    input_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    attention_mask = torch.zeros_like(input_ids)
    for row, completion in enumerate(completions):
        ids = torch.cat([prompt, completion])
        input_ids[row, :len(ids)], attention_mask[row, :len(ids)] = ids, 1
        labels[row, len(prompt):len(ids)] = completion
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


@torch.no_grad()
def reference_token_logps(policy, piece: dict, *, temperature: float = 1.0) -> torch.Tensor:
    """Each completion token's log-prob [K] under the 4-bit base, at `temperature`: the adapter disabled,
    eval mode."""
    training = policy.training
    policy.eval()
    try:
        with policy.disable_adapter():
            return -token_losses(policy, piece, temperature=temperature).float()
    finally:
        policy.train(training)


def group_stats(rewards: torch.Tensor, by_name: dict[str, torch.Tensor], *, completions: list[torch.Tensor],
                size: int, stopped: list[bool]) -> dict[str, float]:
    """What a step's sampling shows: the mean reward and each function's, the spread within groups,
    the share of groups with no signal (every completion the same reward), completion lengths and the
    share cut at max_new_tokens (`stopped`: whether each completion ended with a stop token)."""
    groups = rewards.float().view(-1, size)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float)
    return {"reward": float(rewards.float().mean()), **{f"reward/{k}": float(v.float().mean()) for k, v in by_name.items()},
            "reward_std": float(groups.std(dim=1).mean()) if size > 1 else 0.0,
            "no_signal": float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean()),
            "completion_tokens": float(lengths.mean()),
            "cut_share": 1 - sum(stopped) / len(stopped)}


def probe_piece(examples: list[dict], settings: Grpo, *, pad_id: int) -> dict:
    """The heaviest piece a step can take, for the memory probe: the longest prompt with a group of
    completions of max_new_tokens each (tokens repeated from the prompt; what they are does not change
    the memory), advantages of 1, the reference's log-probs when beta > 0."""
    prompt = torch.tensor(max(examples, key=lambda e: len(e["input_ids"]))["input_ids"])
    filler = prompt.repeat(settings.max_new_tokens // len(prompt) + 1)[:settings.max_new_tokens]
    piece = completion_rows(prompt, [filler] * settings.num_generations, pad_id, torch.device("cpu"))
    lengths = target_mask(piece["labels"]).sum(dim=1)
    piece.update(advantages=torch.ones(settings.num_generations), units=sequence_units(lengths, settings.loss))
    if settings.beta:
        piece["ref_logps"] = torch.zeros(int(lengths.sum()))
    return piece
