"""Exact resume: a run interrupted at an epoch boundary, in the middle of an epoch, and inside an
accumulation window, then resumed with train.resume=auto, reproduces the uninterrupted run's
per-step losses, learning rates and final adapter exactly (LoRA dropout > 0, so RNG matters)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from qlora_loop.config import ConfigError
from qlora_loop.training.checkpoint import CheckpointError
from qlora_loop.training.loss import chunked_lm_loss

# 40 train rows / batch 4 = 10 micro-batches, grad_accum 2 -> 5 steps an epoch; checkpoints at even steps
# and at each epoch end
SETTINGS = ["train.epochs=3", "train.batch_size=4", "train.grad_accum=2", "train.save_every=2", "train.keep_last=0",
            "adapter.dropout=0.2", "adapter.r=4", "data.val_split=0.1", "train.patience=0"]


class Crash(Exception):
    pass


def crash_on_call(n):
    """The default loss (chunked, for the tiny Qwen2), except that its n-th call raises: a kill at an
    exact point of the loop. Call 1 is the memory probe; then per epoch 10 training micro-batches
    and 1 validation batch."""
    calls = [0]

    def loss(model, batch):
        calls[0] += 1
        if calls[0] == n:
            raise Crash(f"killed at loss call {n}")
        return chunked_lm_loss(model, batch)
    return loss


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_qwen2, rows44, train_main):
    out = tmp_path_factory.mktemp("full") / "out"
    train_main([f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", f"output_dir={out}", *SETTINGS])
    return out


@pytest.mark.parametrize("call, resumes_at", [
    (13, 5),  # first micro-batch of epoch 2: resumes from the epoch-end checkpoint
    (17, 6),  # first micro-batch of step 8 (epoch 2): resumes mid-epoch from step 6, replays step 7
    (18, 6),  # second micro-batch of step 8: killed inside an accumulation window
])
def test_resume_reproduces_the_uninterrupted_run(call, resumes_at, uninterrupted, tiny_qwen2, rows44, train_main,
                                                 tmp_path):
    out = tmp_path / "out"
    args = [f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", f"output_dir={out}", *SETTINGS]
    with pytest.raises(Crash):
        train_main(args, loss_fn=crash_on_call(call))
    assert max(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*")) == resumes_at
    with pytest.raises(ConfigError, match="holds checkpoints of an unfinished run; continue it with train.resume=auto"):
        train_main(args)  # a fresh start would overwrite them
    summary = train_main(args + ["train.resume=auto"])

    expected = rows(uninterrupted / "steps.jsonl")
    assert len(expected) == 15
    assert rows(out / "steps.jsonl") == expected  # loss, lr, grad norm, tokens of every step, bit for bit
    history, expected_history = rows(out / "history.jsonl"), rows(uninterrupted / "history.jsonl")
    timing = {"seconds", "tokens_per_second", "loss_tokens_per_second", "peak_memory_bytes"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in history] == \
           [{k: v for k, v in r.items() if k not in timing} for r in expected_history]
    for name in ("best/adapter_model.safetensors", "checkpoints/step-000015/adapter.safetensors"):
        got, want = load_file(out / name), load_file(uninterrupted / name)
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    assert summary["steps"] == 15 and summary["best_metric"] == json.loads(
        (uninterrupted / "summary.json").read_text())["best_metric"]


def test_resume_refuses_a_changed_setup(uninterrupted, tiny_qwen2, rows44, train_main, tmp_path):
    checkpoint = uninterrupted / "checkpoints" / "step-000006"
    args = [f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", f"output_dir={tmp_path / 'out'}", *SETTINGS,
            f"train.resume={checkpoint}"]
    with pytest.raises(CheckpointError, match=r"batch_size was 4, is now 2.*train.force_resume=true"):
        train_main(args + ["train.batch_size=2"])
    data = tmp_path / "data.jsonl"
    data.write_text(rows44.read_text(encoding="utf-8").replace("Loopy", "Lupe"),
                    encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"data_hash was '\w+', is now '\w+'"):
        train_main(args + [f"data.train={data}"])
    with pytest.raises(CheckpointError, match=r"batching was 'grouped', is now 'packed'"):
        train_main(args + ["data.packing=true"])  # another order of rows: not the same run
    summary = train_main(args + ["train.batch_size=2", "train.force_resume=true"])
    assert summary["steps"] > 6


def test_resume_from_an_incomplete_checkpoint_is_refused(uninterrupted, tiny_qwen2, rows44, train_main, tmp_path):
    import shutil
    partial = tmp_path / "step-000006"
    shutil.copytree(uninterrupted / "checkpoints" / "step-000006", partial)
    (partial / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        train_main([f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", f"output_dir={tmp_path / 'out'}",
                    *SETTINGS, f"train.resume={partial}"])


def test_resuming_a_checkpoint_of_another_template_warns(uninterrupted, tiny_qwen2, rows44, train_main, tmp_path):
    import shutil
    checkpoint = tmp_path / "step-000006"
    shutil.copytree(uninterrupted / "checkpoints" / "step-000006", checkpoint)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["chat_template_hash"] = "0" * 16  # as if written by a run with another chat template
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"the chat template differs from the one the adapter in .*step-000006"):
        train_main([f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", f"output_dir={tmp_path / 'out'}",
                    *SETTINGS, f"train.resume={checkpoint}"])


def test_packed_run_resumes_exactly_and_trains_without_padding(tiny_qwen2, rows44, train_main, tmp_path):
    args = [f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", *SETTINGS, "data.packing=true"]
    full = train_main(args + [f"output_dir={tmp_path / 'full'}"])
    out = tmp_path / "out"
    with pytest.raises(Crash):
        train_main(args + [f"output_dir={out}"], loss_fn=crash_on_call(18))  # inside step 8's window
    train_main(args + [f"output_dir={out}", "train.resume=auto"])
    steps = rows(tmp_path / "full" / "steps.jsonl")
    assert len(steps) == 15 and rows(out / "steps.jsonl") == steps
    assert all(r["positions"] == r["tokens"] for r in steps) and full["padding_share"] == 0
    assert steps[-1]["loss"] < steps[0]["loss"] - 3  # it learns: 7.35 -> 3.35 when pinned


def test_a_checkpoint_of_another_format_or_loop_state_is_one_clear_error(uninterrupted, tiny_qwen2, rows44,
                                                                          train_main, tmp_path):
    import shutil
    args = [f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", *SETTINGS]
    for name, edit, says in (
            ("format", lambda state: state.update(format=99),
             r"checkpoint of format 99; this qlora_loop reads format 1"),
            ("field", lambda state: state["loop"].update(batches_seen=3),
             r"loop state has fields this qlora_loop does not know \(\['batches_seen'\]\)")):
        old = tmp_path / name / "step-000006"
        shutil.copytree(uninterrupted / "checkpoints" / "step-000006", old)
        state = json.loads((old / "state.json").read_text())
        edit(state)
        (old / "state.json").write_text(json.dumps(state))
        with pytest.raises(CheckpointError, match=says):
            train_main(args + [f"output_dir={tmp_path / name / 'out'}", f"train.resume={old}"])

