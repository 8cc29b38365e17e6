"""Examples (SFT rows, preference pairs, judged answers) -> padded or packed batches, the epoch's order of them, and the check that a model can
be given packed rows."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Sampler

from qlora_loop.config import DataConfig
from qlora_loop.data.examples import IGNORE
from qlora_loop.errors import ModelError


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding is masked by position (attention_mask), never by
    token id, so a tokenizer whose pad token is its EOS still trains the EOS that ends an answer."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    index = torch.tensor([e["index"] for e in examples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B rows, the chosen ones first, right-padded to the longest of all;
    `units` counts the pairs, `ref_logps` [2B] the reference's log-probs where computed."""
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"], "index": e["index"]} for e in examples] + \
           [{"input_ids": e["rejected_ids"], "labels": e["rejected_labels"], "index": e["index"]} for e in examples]
    batch = collate(rows, pad_id)
    batch["index"], batch["units"] = batch["index"][:len(examples)], torch.ones(len(examples), dtype=torch.long)
    if all("ref_logps" in e for e in examples):
        batch["ref_logps"] = torch.tensor([e["ref_logps"][0] for e in examples] + [e["ref_logps"][1] for e in examples])
    return batch


def collate_judged(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """KTO: one row per judged answer, with `desirable` [B], `units` and `ref_logps` [B] where computed."""
    batch = collate(examples, pad_id)
    batch["desirable"] = torch.tensor([e["desirable"] for e in examples])
    batch["units"] = torch.ones(len(examples), dtype=torch.long)
    if all("ref_logps" in e for e in examples):
        batch["ref_logps"] = torch.tensor([e["ref_logps"][0] for e in examples])
    return batch


def collate_any(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The collate an example's kind takes: pairs, judged answers, or SFT rows."""
    if "rejected_ids" in examples[0]:
        return collate_pairs(examples, pad_id)
    if "desirable" in examples[0]:
        return collate_judged(examples, pad_id)
    return collate(examples, pad_id)


def collate_packed(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Padding-free (data.packing): the examples end to end in one row, with position_ids that
    restart at 0 for each. Given position_ids and no attention mask, transformers' attention keeps
    each example to itself (check_packing proves it for the model at hand). Each example's
    first label is -100, so no example learns to predict the start of the next one. attention_mask
    is all ones, for counting tokens only; model_inputs does not pass it to the model."""
    input_ids = torch.tensor([[t for e in examples for t in e["input_ids"]]])
    labels = torch.tensor([[label for e in examples for label in [IGNORE, *e["labels"][1:]]]])
    position_ids = torch.tensor([[p for e in examples for p in range(len(e["input_ids"]))]])
    index = torch.tensor([e["index"] for e in examples])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "position_ids": position_ids, "index": index}


def model_inputs(batch: dict) -> dict:
    """What the model's forward is given. A packed batch (collate_packed) passes position_ids and
    no attention mask, which is how transformers recognises packed rows, and use_cache=False, as a
    cache (the config's use_cache, if set) would also turn that recognition off."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class EpochSampler(Sampler):
    """A shuffled order that depends only on (seed, epoch), so a resumed run rebuilds any epoch's
    order without replaying the epochs before it. Accelerate's dataloader calls set_epoch().

    With `lengths`, the order is grouped by length: shuffle, cut into mega-batches of `mega` batches,
    sort each by length (longest first), then shuffle the order of the full batches. Each batch then
    holds rows of similar length, so little of it is padding, and which batch comes when stays random.
    A short last batch stays last, so it never shifts the batches after it."""

    def __init__(self, size: int, seed: int = 0, *, lengths: list[int] | None = None, batch_size: int = 1,
                 mega: int = 50):
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths, self.batch_size, self.mega = lengths, batch_size, mega

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        span = self.batch_size * self.mega
        order = [i for start in range(0, self.size, span)
                 for i in sorted(order[start:start + span], key=lambda i: -self.lengths[i])]
        full = self.size // self.batch_size * self.batch_size
        batches = [order[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter([i for batch in shuffled for i in batch] + order[full:])

    def __len__(self) -> int:
        return self.size


def build_dataloaders(train_examples: list[dict], val_examples: list[dict], data: DataConfig, *, batch_size: int,
                      pad_id: int, seed: int = 0, processes: int = 1) -> tuple[DataLoader, DataLoader | None]:
    """The training and validation loaders, shaped by data.group_by_length, data.packing and
    data.num_workers. Under `processes` ranks Accelerate deals consecutive batches out to the ranks
    in turn, so the rows are grouped by the global micro-batch (batch_size x processes): N ranks then
    see exactly the rows one process would see in a batch N times as large.

    With data.packing, training batches are packed rows (collate_packed) in plain shuffled order, as
    packing leaves no padding for grouping to remove; validation batches stay padded."""
    packing, num_workers = data.packing, data.num_workers
    def collate_fn(batch):
        return collate_any(batch, pad_id)

    lengths = [max(len(e["input_ids"]), len(e.get("rejected_ids", ()))) for e in train_examples] \
        if data.group_by_length and not packing else None
    sampler = EpochSampler(len(train_examples), seed, lengths=lengths, batch_size=batch_size * processes)
    # Each loader gets its own generator: creating an iterator draws a seed from it, and without one
    # that draw comes from the global RNG, which dropout uses, so a resumed epoch would shift it.
    train = DataLoader(train_examples, batch_size=batch_size, sampler=sampler,
                       collate_fn=collate_packed if packing else collate_fn,
                       num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(val_examples, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                     num_workers=num_workers, generator=torch.Generator().manual_seed(seed)) if val_examples else None
    return train, val


def steps_per_epoch(num_micro_batches: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch; the last window may hold fewer than grad_accum micro-batches."""
    return math.ceil(num_micro_batches / grad_accum)


@torch.no_grad()
def check_packing(model, examples: list[dict], tokens: int = 24, tolerance: float = 0.25) -> float | None:
    """data.packing needs a model whose attention reads restarting position_ids as row boundaries:
    transformers' own models do (sdpa, eager, flash_attention_2, flex), remote code often does not.
    Runs two short rows apart, packed, and joined as one plain sequence (a control in which the rows
    do see each other), and returns how far packed is from apart as a share of how far the
    control is: ~0 when packing works, ~1 when the model mixes the rows. A share rather than an
    absolute bound, so that bf16 kernel noise over a large vocabulary cannot trip it. Raises
    ModelError above `tolerance`; None with fewer than two rows. Dropout off; the RNG is not drawn."""
    rows = [{"input_ids": e["input_ids"][:tokens], "labels": e["labels"][:tokens], "index": e["index"]}
            for e in examples[:2]]
    if len(rows) < 2:
        return None
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_packed(rows).items()}
    training = model.training
    model.eval()
    try:
        apart = torch.cat([model(input_ids=torch.tensor([r["input_ids"]], device=device)).logits[0]
                           for r in rows]).float()
        # the control: the joined rows as one plain sequence, in any attention implementation
        mixed = model(input_ids=batch["input_ids"]).logits[0].float()
        try:
            packed = model(**model_inputs(batch)).logits[0].float()
        except TypeError as e:  # e.g. remote code whose forward takes no position_ids
            raise ModelError(f"data.packing=true: this model's forward cannot be given packed rows ({e}); "
                             "set data.packing=false") from None
    finally:
        model.train(training)
    share = float((packed - apart).abs().max() / (mixed - apart).abs().max().clamp_min(1e-6))
    if share > tolerance:
        raise ModelError(f"data.packing=true: this model's attention does not keep packed rows apart (packed "
                         f"logits are {share:.0%} as far from unpacked ones as when the rows see each other); set "
                         "data.packing=false, or use a model transformers implements natively (no trust_remote_code)")
    return share
