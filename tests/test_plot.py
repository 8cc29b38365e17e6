"""curves.png from a real (short) run: written, non-trivial, and drawing exactly the logged numbers.

Run: python -m pytest tests/test_plot.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import tiny_config

from qlora_loop.data.batches import steps_per_epoch
from qlora_loop.data.mixtures import split_validation
import qlora_loop.observe.plot
from qlora_loop.observe.plot import plot_run

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory, train_main, tiny_qwen2, rows44):
    """Three epochs of a fixed 44-row file on the tiny Qwen2 model, through scripts/train.py."""
    out = tmp_path_factory.mktemp("plot") / "run"
    train_main([f"model.name_or_path={tiny_qwen2}", f"train.epochs={EPOCHS}", f"data.train={rows44}",
                f"output_dir={out}"])
    return out


def epoch_end_steps(rows_file: Path) -> list[float]:
    """The step that ends each epoch, from the row count and the default split and batch size."""
    cfg = tiny_config()
    rows = rows_file.read_text(encoding="utf-8").splitlines()
    train, _ = split_validation(rows, cfg.data.val_split, cfg.train.seed)
    per_epoch = steps_per_epoch(math.ceil(len(train) / cfg.train.batch_size), cfg.train.grad_accum)
    return [float(per_epoch * epoch) for epoch in range(1, EPOCHS + 1)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_curves_png_is_written_and_not_trivial(run):
    drawn = plot_run(run)
    png = run / "curves.png"
    assert drawn["path"] == png
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 60_000  # four panels of lines, legends and labels; an empty figure is ~15 kB
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1430, 935)  # 13 x 8.5 inches at 110 dpi


def test_plotted_series_are_the_logged_numbers(run, rows44):
    steps, history = rows(run / "steps.jsonl"), rows(run / "history.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    drawn = plot_run(run)
    step_x = [float(r["step"]) for r in steps]
    assert drawn["loss"]["train (per step)"] == (step_x, [r["loss"] for r in steps])
    assert drawn["lr"]["lr (per step)"] == (step_x, [r["lr"] for r in steps])
    assert drawn["grad_norm"]["grad norm (per step, before clipping)"] == (step_x, [r["grad_norm"] for r in steps])
    # epoch values sit at the step that ended the epoch
    ends = epoch_end_steps(rows44)
    assert [max(r["step"] for r in steps if r["epoch"] == h["epoch"]) for h in history] == ends
    assert drawn["loss"]["train (epoch mean)"] == (ends, [h["train_loss"] for h in history])
    assert drawn["loss"]["validation (end of epoch)"] == (ends, [h["val_loss"] for h in history])
    assert drawn["grad_norm"]["grad norm (epoch mean)"] == (ends, [h["grad_norm"] for h in history])
    assert drawn["tokens_per_second"]["tokens/s (per epoch, non-padding)"] == (
        ends, [h["tokens_per_second"] for h in history])
    # the best epoch is marked where summary.json says, at its validation loss
    best = summary["best_epoch"]
    assert drawn["best_epoch"] == best
    (label, (x, y)), = [(k, v) for k, v in drawn["loss"].items() if k.startswith("best: ")]
    assert label == f"best: epoch {best} (val_loss {summary['best_metric']:.4g})"
    assert x == [ends[best - 1]] and y == [summary["best_metric"]]
    clip = tiny_config().train.max_grad_norm
    assert drawn["grad_norm"][f"clipped at {clip:g}"][1] == [clip, clip]


def test_a_run_without_steps_jsonl_is_plotted_per_epoch(run, tmp_path):
    for name in ("history.jsonl", "summary.json"):
        (tmp_path / name).write_bytes((run / name).read_bytes())
    history = rows(tmp_path / "history.jsonl")
    drawn = plot_run(tmp_path)
    epochs = [float(e) for e in range(1, EPOCHS + 1)]
    assert drawn["loss"]["validation (end of epoch)"] == (epochs, [h["val_loss"] for h in history])
    assert drawn["lr"]["lr (end of epoch)"][1] == [h["lr"] for h in history]
    assert (tmp_path / "curves.png").stat().st_size > 30_000


def test_epochs_sit_at_their_recorded_end_step_when_steps_are_logged_sparsely(run, rows44, tmp_path):
    ends = epoch_end_steps(rows44)
    steps = [r for r in rows(run / "steps.jsonl") if r["step"] % 4 == 0]  # as train.log_every=4 writes them
    assert [max(r["step"] for r in steps if r["epoch"] == e) for e in range(1, EPOCHS + 1)] != ends
    history = [{**h, "step": end} for h, end in zip(rows(run / "history.jsonl"), ends)]
    for name, table in (("steps.jsonl", steps), ("history.jsonl", history)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in table), encoding="utf-8")
    drawn = plot_run(tmp_path)
    assert drawn["loss"]["validation (end of epoch)"] == (ends, [h["val_loss"] for h in history])


def test_a_series_spanning_orders_of_magnitude_gets_a_log_axis(run, tmp_path):
    steps = rows(run / "steps.jsonl")
    (tmp_path / "history.jsonl").write_bytes((run / "history.jsonl").read_bytes())
    for spread, scale in ((2.0, "linear"), (1000.0, "log")):
        shaped = [{**r, "loss": 1 + (spread - 1) * (k == 0), "grad_norm": 1 + (spread - 1) * (k == 0)}
                  for k, r in enumerate(steps)]
        (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shaped), encoding="utf-8")
        yscale = plot_run(tmp_path)["yscale"]
        assert (yscale["loss"], yscale["grad_norm"], yscale["lr"]) == (scale, scale, "linear")


def test_skipped_nonfinite_steps_are_left_out_and_counted(run, tmp_path):
    steps = rows(run / "steps.jsonl")
    steps[4] = {**steps[4], "loss": math.nan, "grad_norm": math.inf, "finite": False}
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps), encoding="utf-8")
    (tmp_path / "history.jsonl").write_bytes((run / "history.jsonl").read_bytes())
    drawn = plot_run(tmp_path)
    x, y = drawn["loss"]["train (per step)"]
    assert 5.0 not in x and len(x) == len(steps) - 1 and all(math.isfinite(v) for v in y)
    assert "skipped non-finite steps (1)" in drawn["legends"]["loss"]


def test_plot_script_writes_where_told(run, tmp_path, capsys):
    script = qlora_loop.observe.plot
    out = tmp_path / "elsewhere.png"
    assert script.main([str(run), "--out", str(out)]) == out
    assert out.stat().st_size > 60_000 and capsys.readouterr().out.strip() == str(out)
    assert (ROOT / "scripts" / "plot.py").read_text().splitlines()[0] == "# python scripts/plot.py OUTPUT_DIR"
    with pytest.raises(FileNotFoundError, match="no steps.jsonl or history.jsonl"):
        script.main([str(tmp_path / "empty")])
