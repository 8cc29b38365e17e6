"""Preference objectives as loss functions of the one StepRunner: DPO (sigmoid / IPO / hinge, with
RPO's NLL term on the chosen answer), ORPO and KTO, each (model, batch) -> per-sample loss, a
*sample* being one pair (DPO, ORPO) or one judged answer (KTO). The runner divides by the step's
samples (batch["units"]), as it divides SFT's token sums by the step's target tokens.

A pair batch (data/preference.py) holds 2B rows, the B chosen answers then the B rejected ones, each
after its prompt: one forward of the policy gives both (the concatenated forward). Its
`ref_logps` [2B] are the reference's log-probabilities of the same rows, computed once before step 1
(training/reference.py), so a step is one forward/backward of the policy alone.

With train.pair_forward=split (`split_pairs`) a pair batch never goes through one forward with
gradients: a forward without them gives every row's log-prob, hence each pair's loss and its
derivative by each row's log-prob; the rows then go through forward/backward in pieces no larger
than the chosen side, each row's loss being that derivative x its log-prob. The gradient is the
same, in the activation memory of SFT on the chosen answers, for one more forward without gradients.

Log-probabilities are sums over an answer's tokens (its end-of-turn included) through the chunked
loss, so no [tokens, vocabulary] logits are ever held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qlora_loop.training.loss import default_loss, target_mask


@dataclass(frozen=True)
class Objective:
    """train.objective and its knobs. beta: DPO's and KTO's KL strength, ORPO's odds-ratio weight
    (lambda). nll_weight: DPO's weight of the chosen answer's NLL per token (RPO); ORPO's is 1."""
    name: str = "dpo"  # dpo | orpo | kto
    beta: float = 0.1
    dpo_loss: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # sigmoid DPO: the share of pairs assumed mislabelled (cDPO)
    nll_weight: float = 0.0

    @property
    def needs_reference(self) -> bool:
        return self.name != "orpo"


def sequence_logps(model, batch: dict, loss_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(answer | prompt) summed over each row's trained tokens [N], those tokens' counts [N])."""
    loss_fn = loss_fn or default_loss(model)
    return -loss_fn(model, batch).float(), target_mask(batch["labels"]).sum(dim=1)


def dpo_terms(logps: torch.Tensor, counts: torch.Tensor, ref_logps: torch.Tensor, objective: Objective) -> dict:
    """Per pair: "loss", and "chosen_reward" / "rejected_reward" = beta x (policy - reference) log-prob.
    logps, counts, ref_logps: [2B], chosen rows first."""
    b, beta = logps.shape[0] // 2, objective.beta
    chosen, rejected = logps[:b], logps[b:]
    ratio = (chosen - ref_logps[:b]) - (rejected - ref_logps[b:])
    if objective.dpo_loss == "sigmoid":
        smoothing = objective.label_smoothing
        loss = -F.logsigmoid(beta * ratio) * (1 - smoothing) - F.logsigmoid(-beta * ratio) * smoothing
    elif objective.dpo_loss == "ipo":  # on log-probs per token, towards a margin of 1 / (2 beta)
        per_token = (chosen - ref_logps[:b]) / counts[:b] - (rejected - ref_logps[b:]) / counts[b:]
        loss = (per_token - 1 / (2 * beta)) ** 2
    elif objective.dpo_loss == "hinge":
        loss = torch.relu(1 - beta * ratio)
    else:
        raise ValueError(f"unknown DPO loss {objective.dpo_loss!r}")
    if objective.nll_weight:
        loss = loss + objective.nll_weight * (-chosen / counts[:b])
    return {"loss": loss, "chosen_reward": (beta * (chosen - ref_logps[:b])).detach(),
            "rejected_reward": (beta * (rejected - ref_logps[b:])).detach()}


def orpo_terms(logps: torch.Tensor, counts: torch.Tensor, objective: Objective) -> dict:
    """ORPO, per pair: the chosen answer's NLL per token minus beta x log sigmoid(log odds ratio),
    the odds of each answer taken on its per-token log-prob. Rewards as TRL reports them: beta x
    per-token log-prob."""
    b = logps.shape[0] // 2
    mean = logps / counts
    chosen, rejected = mean[:b], mean[b:]
    # log(p / (1 - p)) = log p - log(1 - p), with log(1 - p) = log1p(-exp(log p)), stable for p < 1
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    loss = -chosen - objective.beta * F.logsigmoid(log_odds)
    return {"loss": loss, "chosen_reward": (objective.beta * chosen).detach(),
            "rejected_reward": (objective.beta * rejected).detach()}


def kto_terms(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, objective: Objective) -> dict:
    """KTO, per judged answer: 1 - sigmoid(beta (log ratio - z)) for a desirable one, 1 - sigmoid(beta
    (z - log ratio)) for an undesirable one. z, the reference point, is the batch's mean log ratio,
    clamped at 0 and detached: an estimate of KL(policy || reference) from the batch itself (TRL
    estimates it on mismatched prompt-answer pairs, at the cost of a second forward)."""
    ratio = logps - ref_logps
    z = ratio.detach().mean().clamp(min=0)
    loss = torch.where(desirable, 1 - torch.sigmoid(objective.beta * (ratio - z)),
                       1 - torch.sigmoid(objective.beta * (z - ratio)))
    return {"loss": loss, "reward": (objective.beta * ratio).detach()}


def pair_terms(logps: torch.Tensor, counts: torch.Tensor, ref_logps: torch.Tensor | None, objective: Objective) -> dict:
    """DPO's or ORPO's per-pair terms of a pair batch's log-probs [2B]."""
    if objective.name == "orpo":
        return orpo_terms(logps, counts, objective)
    return dpo_terms(logps, counts, ref_logps, objective)


def preference_terms(model, batch: dict, objective: Objective, loss_fn=None) -> dict:
    """The objective's per-sample terms for a batch (one forward of the policy)."""
    logps, counts = sequence_logps(model, batch, loss_fn)
    if objective.name == "kto":
        terms = kto_terms(logps, batch["ref_logps"], batch["desirable"], objective)
    else:
        terms = pair_terms(logps, counts, batch.get("ref_logps"), objective)
    b = batch["units"].shape[0]
    if objective.name == "kto":
        terms.update(logp=logps.detach(), desirable=batch["desirable"])
    else:
        terms.update(chosen_logp=logps[:b].detach(), rejected_logp=logps[b:].detach())
    return terms


def preference_loss(model, objective: Objective):
    """The StepRunner's loss_fn for `objective`: (model, batch) -> per-sample loss [B]."""
    inner = default_loss(model)

    def loss_fn(model, batch: dict) -> torch.Tensor:
        if "grad_logps" in batch:  # a piece of split_pairs: per row, loss + d loss / d log-prob x log-prob
            _set_rng_state(batch["rng"])  # dropout as in the pass without gradients that gave the loss
            logps = -inner(model, batch).float()
            return batch["losses"] + batch["grad_logps"] * (logps - logps.detach())
        return preference_terms(model, batch, objective, inner)["loss"]

    return loss_fn


def split_pairs(objective: Objective, loss_fn=None):
    """train.pair_forward=split: the StepRunner's `split`, (model, pair batch) -> the pieces it takes through
    forward/backward one at a time. The pieces' per-row losses add up to the pairs' losses and their
    gradients to the gradient of the concatenated forward; each piece holds at most the chosen side's
    token slots (rows x width), so a step's activations are those of SFT on the chosen answers. Every
    piece first goes through a forward without gradients, the RNG state before it kept, so that its
    forward with gradients draws the same dropout as the one its loss was taken from."""

    def split(model, batch: dict) -> list[dict]:
        if "desirable" in batch:  # KTO: one row per sample already
            return [batch]
        inner = loss_fn or default_loss(model)
        pieces, logps, states = pieces_of(batch), torch.empty(batch["input_ids"].shape[0]), []
        with torch.no_grad():
            for rows in pieces:
                states.append(_rng_state(batch["input_ids"].device))
                logps[rows] = -inner(model, rows_of(batch, rows)).float().cpu()
        logps.requires_grad_(True)
        counts = target_mask(batch["labels"]).sum(dim=1).cpu()
        ref = batch["ref_logps"].cpu() if "ref_logps" in batch else None
        losses = pair_terms(logps, counts, ref, objective)["loss"]
        grad_logps, = torch.autograd.grad(losses.sum(), logps)
        row_losses = torch.cat([losses.detach(), torch.zeros_like(losses)])  # a pair's loss on its chosen row
        device = batch["input_ids"].device
        b = batch["units"].shape[0]  # the runner counts a pair once, on its chosen row
        return [{**rows_of(batch, rows), "losses": row_losses[rows].to(device), "grad_logps": grad_logps[rows].to(device),
                 "units": (rows < b).long().to(device), "logps": logps[rows].detach(), "rng": state}
                for rows, state in zip(pieces, states)]

    return split


def pieces_of(batch: dict) -> list[torch.Tensor]:
    """A pair batch's rows in runs of consecutive rows, each run's rows x its longest row no more than
    the chosen side's (B x its longest chosen row): the chosen side is one run; a row longer than
    that is a run alone."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    b = len(lengths) // 2
    budget = b * max(lengths[:b])
    pieces, start, width = [], 0, 0
    for row, n in enumerate(lengths):
        if row > start and (row - start + 1) * max(width, n) > budget:
            pieces.append(torch.arange(start, row))
            start, width = row, 0
        width = max(width, n)
    pieces.append(torch.arange(start, len(lengths)))
    return pieces


def rows_of(batch: dict, rows: torch.Tensor) -> dict:
    """The given rows of a right-padded batch, cut to their longest."""
    width = int(batch["attention_mask"][rows].sum(dim=1).max())
    return {k: batch[k][rows.to(batch[k].device), :width] for k in ("input_ids", "attention_mask", "labels")}


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None, device


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


# a fall of the chosen answers' mean log-prob (nats per answer) between two evaluations worth a warning
COLLAPSE_NATS = 1.0


def preference_watch(runner, val_dl, objective: Objective, *, warn):
    """fit's `metrics()` for a preference objective, on the validation samples of all processes:
    reward_accuracy (pairs: the chosen answer's reward above the rejected one's; KTO: an answer's reward
    on the side of its label), reward_margin (mean chosen minus mean rejected reward), chosen_logp and
    rejected_logp (mean summed log-probs). A chosen log-prob that falls by more than COLLAPSE_NATS while
    the margin grows, the policy pushing both answers down and the rejected one faster, is `warn`ed about:
    against the previous evaluation, and at the first one against the reference's own log-probs."""
    accelerator, inner = runner.accelerator, default_loss(runner.model)
    last: dict[str, float] = {}

    @torch.no_grad()
    def metrics() -> dict[str, float]:
        model = runner.model
        model.eval()
        keys = ("reward", "logp", "desirable") if objective.name == "kto" else \
            ("chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")
        seen = {k: [] for k in keys}
        start = []  # the reference's log-probs of the chosen answers: where chosen_logp starts from
        for batch in val_dl:
            with accelerator.autocast():
                terms = preference_terms(model, batch, objective, inner)
            gathered = accelerator.gather_for_metrics(tuple(terms[k] for k in keys))
            for key, value in zip(keys, gathered):
                seen[key].append(value)
            if not last and "ref_logps" in batch:
                b = batch["units"].shape[0]
                chosen = batch["ref_logps"][batch["desirable"]] if objective.name == "kto" else batch["ref_logps"][:b]
                start.append(accelerator.gather_for_metrics(chosen.float())
                             if objective.name != "kto" else chosen.float())
        if start:  # before the first evaluation: the reference itself, with no margin
            last.update(chosen_logp=_mean(torch.cat(start)), reward_margin=0.0)
        model.train()
        got = {k: torch.cat(v) for k, v in seen.items()}
        if objective.name == "kto":  # an answer is right when its reward lies on the side of its label
            good = got["desirable"].bool()
            got.update(chosen_reward=got["reward"][good], rejected_reward=got["reward"][~good],
                       chosen_logp=got["logp"][good], rejected_logp=got["logp"][~good])
            right = torch.where(good, got["reward"] > 0, got["reward"] < 0).float()
        else:
            right = (got["chosen_reward"] > got["rejected_reward"]).float()
        scores = {"reward_accuracy": _mean(right),
                  "reward_margin": _mean(got["chosen_reward"]) - _mean(got["rejected_reward"]),
                  "chosen_logp": _mean(got["chosen_logp"]), "rejected_logp": _mean(got["rejected_logp"])}
        if last and last["chosen_logp"] - scores["chosen_logp"] > COLLAPSE_NATS and \
                scores["reward_margin"] > last["reward_margin"]:
            warn(f"[yellow]chosen_logp fell {last['chosen_logp']:.1f} -> {scores['chosen_logp']:.1f} while the reward "
                 f"margin grew {last['reward_margin']:.2f} -> {scores['reward_margin']:.2f}: the policy is pushing both "
                 "answers down, the rejected one faster; watch the samples for degrading answers, and consider a "
                 "higher train.nll_weight or a lower train.lr")
        last.update(scores)
        return scores

    return metrics


def _mean(values: torch.Tensor) -> float:
    return float(values.float().mean()) if values.numel() else float("nan")
