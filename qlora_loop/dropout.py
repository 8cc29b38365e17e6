"""LoRA dropout drawn by gaps: the same Bernoulli mask as torch's dropout, for a fraction of the random draws.

peft's LoRA layer runs `lora_B(lora_A(dropout(x)))` on the whole input [batch, tokens, in] of every
projection. On a CPU, torch's dropout draws one random number per element (`bernoulli_`), which on
SmolLM2 took 28% of a step. The gaps between dropped elements of an i.i.d. Bernoulli(p) mask are
i.i.d. Geometric(p), so drawing the gaps gives exactly that mask with about p x as many draws
(5% of them at p=0.05); backward keeps only the dropped positions. On a GPU torch's fused kernel
is already cheap, so it is used there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dropped_positions(n: int, p: float, *, device: torch.device | None = None) -> torch.Tensor:
    """Flat indices in [0, n) of an i.i.d. Bernoulli(p) draw, sorted: cumulative Geometric(p) gaps."""
    mean = n * p
    draws = int(mean + 6 * math.sqrt(mean * (1 - p)) + 16)  # enough to pass n but for ~1e-9 of calls
    ends = torch.empty(draws, dtype=torch.int64, device=device).geometric_(p).cumsum(0)
    while ends[-1] < n:  # the gaps fell short of n: draw on (the process is memoryless, so the law holds)
        more = torch.empty(draws, dtype=torch.int64, device=device).geometric_(p).cumsum(0) + ends[-1]
        ends = torch.cat([ends, more])
    return ends[ends <= n] - 1


class _GapDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        dropped = dropped_positions(x.numel(), p, device=x.device)
        ctx.save_for_backward(dropped)  # 8 bytes per dropped element, less than a byte mask for p < 1/8
        ctx.scale = 1 / (1 - p)
        out = (x * ctx.scale).contiguous()
        return out.view(-1).index_fill_(0, dropped, 0).view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dropped,) = ctx.saved_tensors
        grad = (grad * ctx.scale).contiguous()
        return grad.view(-1).index_fill_(0, dropped, 0).view(grad.shape), None


class GapDropout(torch.nn.Dropout):
    """torch.nn.Dropout(p) with the mask drawn by gaps on a CPU: the same distribution (each element
    dropped independently with probability p, kept ones scaled by 1/(1-p)), other random numbers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        return _GapDropout.apply(x, self.p)


def use_gap_dropout(model) -> int:
    """Swap every nn.Dropout that peft's LoRA layers hold in `lora_dropout` for GapDropout of the same p;
    returns how many. Dropout 0 is peft's nn.Identity and stays."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in drops.items():
            if type(drop) is torch.nn.Dropout:
                drops[name] = GapDropout(drop.p)
                swapped += 1
    return swapped
