"""Peak memory: measured the same way for every report, and probed before step 1 so that a run that
cannot fit stops at once, naming what to change, instead of running out of memory hours in.

On a GPU the numbers are CUDA's max allocated bytes. On a CPU they are the process's peak resident
set (VmHWM), which Linux lets a process reset (/proc/self/clear_refs), so a probe's peak is its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_loop.data.batches import collate_any, collate_packed
from qlora_loop.errors import OutOfMemory
from qlora_loop.files import GIB
from qlora_loop.model.load import set_gradient_checkpointing

def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on a GPU; the process's peak resident set on a CPU (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak then counts from start
            Path("/proc/self/clear_refs").write_text("5")


def _vm_hwm() -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


@dataclass
class Probe:
    peak_bytes: int
    budget_bytes: int | None  # None: no limit known (a CPU without train.memory_budget_gib)
    tokens: int  # token slots of the probed batch (its rows x its width)
    out_of_memory: bool = False

    @property
    def fits(self) -> bool:
        return not self.out_of_memory and (self.budget_bytes is None or self.peak_bytes <= self.budget_bytes)

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.peak_bytes


def longest_batch(examples: list[dict], *, batch_size: int, pad_id: int, packing: bool = False) -> dict:
    """The `batch_size` longest rows in one batch (one packed row with `packing`): no batch of any
    epoch holds more token slots. Built from the rows, not by iterating the dataloader, which would
    draw from its generator."""
    longest = sorted(examples, key=lambda e: max(len(e["input_ids"]), len(e.get("rejected_ids", ()))),
                     reverse=True)[:batch_size]
    return collate_packed(longest) if packing else collate_any(longest, pad_id)


def probe_memory(model, batch: dict, loss_fn, accelerator, *, budget_gib: float | None = None, split=None) -> Probe:
    """Forward + backward of `batch` as a training step runs it (in the pieces of the runner's `split`,
    if it has one), gradients then dropped: the peak memory of the heaviest micro-step. Leaves weights,
    gradients, optimizer and RNG as they were, so the run that follows computes exactly what it would
    have without the probe."""
    device = accelerator.device
    budget = int(budget_gib * GIB) if budget_gib else (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None)
    model.train()
    reset_peak(device)
    out_of_memory = False
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            with accelerator.no_sync(model):  # no gradient all-reduce: the gradients are dropped
                with accelerator.autocast():
                    pieces = split(model, batch) if split else [batch]
                for piece in pieces:
                    with accelerator.autocast():
                        loss = loss_fn(model, piece).sum()
                    accelerator.backward(loss)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        finally:
            loss = None
            model.zero_grad(set_to_none=True)
    peak = peak_memory_bytes(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Probe(peak, budget, batch["input_ids"].numel(), out_of_memory)


def advice(probe: Probe, *, batch_size: int, grad_accum: int, max_length: int, checkpointing: bool) -> str:
    """What to change when the probe does not fit, as config keys with suggested values."""
    options = []
    if batch_size > 1:
        options.append(f"train.batch_size={max(1, batch_size // 2)} train.grad_accum={grad_accum * 2} "
                       "(same update, half the activations)")
    if not checkpointing:
        options.append("model.gradient_checkpointing=true")
    options.append(f"data.max_length={max(16, max_length // 2)}")
    need = "more than the device has" if probe.out_of_memory else f"{probe.peak_bytes / GIB:.2f} GiB"
    budget = "" if probe.budget_bytes is None else f" of a {probe.budget_bytes / GIB:.2f} GiB budget"
    return (f"the longest batch ({probe.tokens} token slots) needs {need}{budget} in one forward/backward; "
            f"training would run out of memory. Try: {'; or '.join(options)}; or raise train.memory_budget_gib "
            "if the budget is too low")


def check_memory(runner, batch: dict, *, log, budget_gib: float | None, batch_size: int, grad_accum: int,
                 max_length: int, checkpointing: bool | str) -> Probe:
    """Probe the heaviest micro-step and report it; every rank stops if any rank would run out of memory.
    checkpointing="auto" (the model comes without it): kept off if the probe fits on every rank, else
    turned on and the batch probed again; only a batch that does not fit without it costs a second probe."""
    accelerator = runner.accelerator
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    probe = probe_memory(runner.model, batch, runner.loss_fn, accelerator, budget_gib=budget_gib, split=runner.split)
    log.memory_report(probe)
    misfits = accelerator.reduce(torch.tensor(int(not probe.fits), device=accelerator.device), "sum")
    if checkpointing == "auto":
        checkpointing = bool(misfits)
        log.print(f"gradient checkpointing {'on' if checkpointing else 'off'} (model.gradient_checkpointing=auto): "
                  f"{why(probe, fits=not misfits)}")
        if checkpointing:
            set_gradient_checkpointing(accelerator.unwrap_model(runner.model), True)
            release_freed_memory(accelerator.device)
            probe = probe_memory(runner.model, batch, runner.loss_fn, accelerator, budget_gib=budget_gib,
                                 split=runner.split)
            log.memory_report(probe)
            misfits = accelerator.reduce(torch.tensor(int(not probe.fits), device=accelerator.device), "sum")
    if misfits:
        raise OutOfMemory(advice(probe, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
                                 checkpointing=checkpointing))
    return probe


def choose_pair_forward(runner, batch: dict, split, *, log, budget_gib: float | None) -> None:
    """train.pair_forward=auto: chosen and rejected answers in one forward (the fastest) when the longest
    pair batch fits so, always on a CPU with no limit known; else runner.split = `split` (the activations
    of the chosen side alone, for one more forward without gradients). Before check_memory, which then
    probes what was chosen and decides gradient checkpointing."""
    accelerator = runner.accelerator
    if budget_gib is None and accelerator.device.type != "cuda":
        log.print("pair forward joint (train.pair_forward=auto): no memory limit known on a CPU "
                  "(set train.memory_budget_gib to give one)")
        return
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    probe = probe_memory(runner.model, batch, runner.loss_fn, accelerator, budget_gib=budget_gib)
    misfits = accelerator.reduce(torch.tensor(int(not probe.fits), device=accelerator.device), "sum")
    if misfits:
        runner.split = split
        release_freed_memory(accelerator.device)
    log.print(f"pair forward {'split' if misfits else 'joint'} (train.pair_forward=auto): the longest pair batch in "
              f"one forward {'does not fit' if misfits else 'fits'}, peak {probe.peak_bytes / GIB:.2f} GiB")


def why(probe: Probe, *, fits: bool) -> str:
    """Why gradient_checkpointing=auto chose what it did, from the probe without checkpointing."""
    if fits:
        limit = "no limit known on a CPU (set train.memory_budget_gib to give one)" if probe.budget_bytes is None \
            else f"within the {probe.budget_bytes / GIB:.2f} GiB budget"
        return f"the longest batch fits without it, peak {probe.peak_bytes / GIB:.2f} GiB, {limit}"
    if not probe.fits:
        need = "runs out of memory" if probe.out_of_memory else f"needs {probe.peak_bytes / GIB:.2f} GiB of a " \
            f"{probe.budget_bytes / GIB:.2f} GiB budget"
        return f"without it the longest batch {need}"
    return "without it the longest batch does not fit on another process"


def release_freed_memory(device: torch.device) -> None:
    """Hand freed memory back (CUDA's cache; glibc's heap on a CPU), so that the next probe's peak
    starts from what is in use rather than from what the last probe left allocated."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the next peak may then read high
        ctypes.CDLL("libc.so.6").malloc_trim(0)
