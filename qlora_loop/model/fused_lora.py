"""LoRA on a CPU with fewer copies: one A matmul and one dropout per input the projections share.

peft's LoRA layer runs `base(x).clone() + lora_B(lora_A(dropout(x))) * scaling` in every projection.
On a CPU the elementwise parts of that cost a good share of a step: `dropout` writes a new
[tokens, in] tensor in each of q, k and v (torch's draws a random number per element), and the clone,
the `* scaling` and the `+` each write a [tokens, out] one. Here, for the projections that read the
same input tensor (q/k/v, gate/up; o and down alone), found by tracing one short forward:

- dropout is applied to that input once: one mask, drawn as Geometric(p) gaps between dropped
  elements (the same Bernoulli(p) law per element as torch's, for about p x as many random draws),
  and one masked copy, which the projections share. Each element is dropped with probability p,
  independently of the others, as before; what changes is that q, k and v see the same mask, as if
  dropout sat on the block's input rather than inside each projection's adapter;
- one matmul `dropout(x) @ [A_q; A_k; A_v]^T` gives the three A outputs;
- peft's `scaling` and dropout's 1/(1-p) are applied to that [tokens, sum r] output, and B is
  added to the base output in one addmm.

The adapter's parameters, state dict, merge and saving stay peft's. The path runs for plain LoRA
on a CPU without autocast; anything else (a GPU, DoRA, several adapters, merged weights, AdaLoRA)
runs peft's own forward. With dropout 0 it computes what peft computes (losses and gradients equal to
float tolerance, tested); with dropout the masks differ from peft's, by their random numbers and by
being shared.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit


def dropped_positions(n: int, p: float, *, device: torch.device | None = None) -> torch.Tensor:
    """Flat indices in [0, n) of an i.i.d. Bernoulli(p) draw, sorted: cumulative Geometric(p) gaps."""
    mean = n * p
    draws = int(mean + 6 * math.sqrt(mean * (1 - p)) + 16)  # enough to pass n but for ~1e-9 of calls
    ends = torch.empty(draws, dtype=torch.int64, device=device).geometric_(p).cumsum(0)
    while ends[-1] < n:  # the gaps fell short of n: draw on (the process is memoryless, so the law holds)
        more = torch.empty(draws, dtype=torch.int64, device=device).geometric_(p).cumsum(0) + ends[-1]
        ends = torch.cat([ends, more])
    return ends[ends <= n] - 1


class SharedInputLoraA(torch.autograd.Function):
    """x [..., in], weights A_j [r_j, in] -> [..., sum r_j]: column block j is dropout(x) @ A_j^T * scales[j],
    with one Bernoulli(p) mask for all j (none when p is 0)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, scales: tuple[float, ...], *weights: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        dropped = dropped_positions(flat.numel(), p, device=x.device) if p > 0 else None
        if dropped is not None:  # the one copy of x dropout needs, shared by every projection reading x
            flat = flat.clone()
            flat.view(-1).index_fill_(0, dropped, 0)
        fused = torch.cat(weights) if len(weights) > 1 else weights[0]
        # scaling and dropout's 1 / (1 - p) on the [tokens, sum r] output, not on the [tokens, in] input
        ctx.column_scale = torch.cat([torch.full((w.shape[0],), s / (1 - p), dtype=flat.dtype, device=flat.device)
                                      for w, s in zip(weights, scales)])
        z = (flat @ fused.t()).mul_(ctx.column_scale)
        ctx.sizes, ctx.shape = [w.shape[0] for w in weights], x.shape
        ctx.save_for_backward(flat, fused, *([] if dropped is None else [dropped]))
        return z.view(*x.shape[:-1], z.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dropped_input, fused, *dropped = ctx.saved_tensors
        g = grad.reshape(-1, fused.shape[0]) * ctx.column_scale
        grad_x = grad_ws = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ fused
            if dropped:  # a dropped element passed nothing forward, so it gets no gradient
                grad_x.view(-1).index_fill_(0, dropped[0], 0)
            grad_x = grad_x.view(ctx.shape)
        if any(ctx.needs_input_grad[3:]):
            grad_ws = (g.t() @ dropped_input).split(ctx.sizes)
        return grad_x, None, None, *(grad_ws or [None] * len(ctx.sizes))


def blocks(weights) -> list[slice]:
    """The column block of each weight's output in the fused A output."""
    out, start = [], 0
    for w in weights:
        size = w.shape[0]
        out.append(slice(start, start + size))
        start += size
    return out


class SharedInput:
    """The LoRA layers that read one input tensor, and the A outputs of the last input until each
    layer has taken its own (then nothing is held)."""

    def __init__(self, layers: list[LoraLinear4bit], adapter: str):
        self.layers, self.adapter = layers, adapter
        self.input, self.version, self.pending = None, -1, {}

    def usable(self, layer: LoraLinear4bit, x: torch.Tensor) -> bool:
        """The fused path computes what peft's would: plain LoRA, this adapter alone, not merged, a CPU
        tensor of the adapter's dtype without autocast. Otherwise peft's own forward runs."""
        return (not layer.disable_adapters and not layer.merged and layer.active_adapters == [self.adapter]
                and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
                and x.dtype == layer.lora_A[self.adapter].weight.dtype)

    def a_output(self, layer: LoraLinear4bit, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s dropout(x) @ A^T * scaling; the first layer of the group to see x computes all of them."""
        if self.input is not x or self.version != x._version or id(layer) not in self.pending:
            a = self.adapter
            drop = layer.lora_dropout[a]  # nn.Dropout, or peft's nn.Identity for dropout 0
            p = drop.p if layer.training and isinstance(drop, torch.nn.Dropout) else 0.0
            weights = [m.lora_A[a].weight for m in self.layers]
            z = SharedInputLoraA.apply(x, p, tuple(m.scaling[a] for m in self.layers), *weights)
            self.pending = {id(m): z[..., b] for m, b in zip(self.layers, blocks(weights))}
            self.input, self.version = x, x._version
        out = self.pending.pop(id(layer))
        if not self.pending:
            self.input = None
        return out


class SharedInputLinear4bit(LoraLinear4bit):
    """peft's LoRA Linear4bit whose A output comes from its SharedInput group; B is added in one addmm."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        group = self.shared_input
        if args or kwargs or not group.usable(self, x):
            return super().forward(x, *args, **kwargs)
        z = group.a_output(self, x)
        result = self.base_layer(x)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), z.reshape(-1, z.shape[-1]),
                          self.lora_B[group.adapter].weight.t())
        return out.view(result.shape)


def share_lora_inputs(model) -> list[list[str]]:
    """Turn the plain LoRA Linear4bit layers of `model` (on a CPU) into SharedInputLinear4bit, grouped
    by the input tensor they read in one 4-token forward (q/k/v, gate/up; o and down alone); returns
    the groups' layer names. A layer called more than once in that forward is left as it is."""
    layers = {name: m for name, m in model.named_modules() if type(m) is LoraLinear4bit and plain_lora(m)}
    if not layers:
        return []
    adapter = next(iter(next(iter(layers.values())).lora_A))  # plain_lora: each layer has this one adapter
    if next(iter(layers.values())).lora_A[adapter].weight.device.type != "cpu":
        return []
    seen: list[tuple[torch.Tensor, str]] = []
    hooks = [m.register_forward_pre_hook(lambda _, args, name=name: seen.append((args[0], name)))
             for name, m in layers.items()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the trace draws no random number of the run's
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    except (TypeError, ValueError, RuntimeError):  # a forward that needs more than input_ids: peft's path stays
        return []
    finally:
        for hook in hooks:
            hook.remove()
    calls = [name for _, name in seen]
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for tensor, name in seen:
        if calls.count(name) > 1:
            continue
        same = next((g for t, g in groups if t is tensor), None)
        if same is None:
            groups.append((tensor, [name]))
        else:
            same.append(name)
    for _, names in groups:
        group = SharedInput([layers[n] for n in names], adapter)
        for n in names:
            layers[n].__class__ = SharedInputLinear4bit
            layers[n].shared_input = group
    return [names for _, names in groups]


def plain_lora(layer: LoraLinear4bit) -> bool:
    """One adapter, no variant (DoRA), dropout torch's or none: what SharedInputLinear4bit computes."""
    return (len(layer.lora_A) == 1 and not layer.lora_variant and not layer.merged
            and all(type(d) in (torch.nn.Dropout, torch.nn.Identity) for d in layer.lora_dropout.values()))
