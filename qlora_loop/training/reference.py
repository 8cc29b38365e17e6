"""The reference of DPO and KTO, for free: the log-probabilities of every answer under the 4-bit base
with the adapter disabled (peft's disable_adapter: no second model), or, for a run that continues an
adapter (adapter.init_from), under base + that adapter as it starts: computed once before step 1, in
eval mode, and cached beside the tokenized data, keyed by the reference and the rows. Each step is then
one forward/backward of the policy alone."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from qlora_loop.data.batches import collate_any
from qlora_loop.files import write_atomic
from qlora_loop.model.generate import generation_state
from qlora_loop.training.preference import sequence_logps


BATCH = 8  # rows (pairs) per forward; no gradients are kept, so memory is the forward's alone


def reference_key(examples: list[dict], identity: dict) -> str:
    """A hash of what the reference is (`identity`: base, starting adapter, compute dtype) and of the rows."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for e in examples:
        digest.update(json.dumps([e["input_ids"], e["labels"], e.get("rejected_ids"), e.get("rejected_labels")])
                      .encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def reference_logps(model, examples: list[dict], *, pad_id: int, identity: dict, adapter_on: bool, autocast,
                    cache: Path | None = None, progress=None) -> bool:
    """Set each example's "ref_logps" ([chosen, rejected] for a pair, [answer] for a judged one):
    log p(answer | prompt) summed over its tokens, by `model` (the unwrapped PeftModel) with its adapter
    disabled unless `adapter_on`. From `cache` (a folder) when it holds these; returns whether it did.
    progress: a callable(done, total) for a progress bar."""
    path = cache / "reference" / f"{reference_key(examples, identity)}.json" if cache is not None else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if len(saved) == len(examples):
            for e, logps in zip(examples, saved):
                e["ref_logps"] = logps
            return True
    off = contextlib.nullcontext() if adapter_on else model.disable_adapter()
    with generation_state(model), off, autocast():
        for start in range(0, len(examples), BATCH):
            chunk = examples[start:start + BATCH]
            batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                     for k, v in collate_any([{k: v for k, v in e.items() if k != "ref_logps"} for e in chunk],
                                             pad_id).items()}
            logps = sequence_logps(model, batch)[0].cpu().tolist()
            pairs = "rejected_ids" in chunk[0]
            for k, e in enumerate(chunk):
                e["ref_logps"] = [logps[k], logps[len(chunk) + k]] if pairs else [logps[k]]
            if progress is not None:
                progress(min(start + BATCH, len(examples)), len(examples))
    if path is not None:
        write_atomic(path, json.dumps([e["ref_logps"] for e in examples]))
    return False
