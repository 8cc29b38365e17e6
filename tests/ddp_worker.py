# python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py RECORD_DIR [--config FILE] [--nan RANK:CALL] [--sigterm RANK:CALL] [key.path=value ...]
"""qlora_loop.run.train() on every rank, unchanged, except that its StepRunner also notes which
examples each step trained on. --nan RANK:CALL gives rank RANK alone a NaN loss in its CALL-th
step; --sigterm RANK:CALL sends SIGTERM to rank RANK alone just before its CALL-th step.
Each rank then writes what it saw and how the run ended to RECORD_DIR/rank{N}.json, and the adapter
weights it holds to RECORD_DIR/rank{N}.safetensors, for tests/test_distributed.py to compare."""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from qlora_loop import run
from qlora_loop.config import load_config
from qlora_loop.errors import Interrupted, NonFiniteError
from qlora_loop.training.loss import causal_lm_loss
from qlora_loop.training.step import StepRunner


def nan_loss(model, batch):
    """causal_lm_loss, but NaN: what a diverging step looks like to the StepRunner."""
    return causal_lm_loss(model, batch) * float("nan")


class RecordingStepRunner(StepRunner):
    """The real StepRunner; it notes the example indices of each step's micro-batches and whether
    the step was finite. On its `nan_on_call`-th step it uses nan_loss; before its
    `sigterm_on_call`-th it sends itself SIGTERM."""
    last = None
    nan_on_call = sigterm_on_call = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []
        self.skipped = 0
        RecordingStepRunner.last = self

    def __call__(self, micro_batches):
        self.seen.append([i for batch in micro_batches for i in batch["index"].tolist()])
        if len(self.seen) == self.sigterm_on_call:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; train.py's handler sets the trigger
        loss_fn = self.loss_fn
        if len(self.seen) == self.nan_on_call:
            self.loss_fn = nan_loss
        try:
            result = super().__call__(micro_batches)
        finally:
            self.loss_fn = loss_fn
        self.skipped += not result.finite
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("record_dir", type=Path)
    parser.add_argument("--nan", help="RANK:CALL")
    parser.add_argument("--sigterm", help="RANK:CALL")
    parser.add_argument("--config", help="YAML file, as for scripts/train.py")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    run.StepRunner = RecordingStepRunner  # train() builds its runner from this module-level name
    rank = int(os.environ["RANK"])  # set by torchrun; read here, in the test's launcher, not in the code under test
    for option, attribute in ((args.nan, "nan_on_call"), (args.sigterm, "sigterm_on_call")):
        if option and int(option.split(":")[0]) == rank:
            setattr(RecordingStepRunner, attribute, int(option.split(":")[1]))
    try:
        run.train(load_config(args.config, args.overrides))
        outcome = "finished"
    except (Interrupted, NonFiniteError) as e:
        outcome = f"{type(e).__name__}: {e}"

    runner = RecordingStepRunner.last
    weights = get_peft_model_state_dict(runner.accelerator.unwrap_model(runner.model))
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
              args.record_dir / f"rank{rank}.safetensors")
    record = {"rank": runner.accelerator.process_index, "num_processes": runner.accelerator.num_processes,
              "seen": runner.seen, "skipped": runner.skipped, "steps": runner.step, "outcome": outcome}
    (args.record_dir / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main()
