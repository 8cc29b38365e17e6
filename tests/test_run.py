"""qlora_loop.run.train (what scripts/train.py runs) end to end on the tiny demo, through the real 4-bit path on CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import CPU_DTYPE, tiny_config

from qlora_loop.config import DataConfig
from qlora_loop.cpu import physical_cores, resolve_compute_dtype
from qlora_loop.data.batches import build_dataloaders
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.model.builtin import resolve_model_path
from qlora_loop.model.load import load_base_model, load_tokenizer
from qlora_loop.model.tiny import build_tiny_model
from qlora_loop.training.fit import evaluate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny-demo.yaml"]  # the tiny demo, as the README runs it from the checkout


def test_tiny_run_learns_the_identity_answers(tiny_run):
    out, summary, _ = tiny_run
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == summary["epochs_run"] <= tiny_config().train.epochs
    if summary["stopped_early"]:  # patience evaluations without a new best, after the best one
        assert summary["epochs_run"] == summary["best_epoch"] + tiny_config().train.patience
    assert history[0]["val_loss"] > 2.0  # starts from a random base
    assert summary["best_metric"] < 0.3  # 0.047 when pinned; a broken mask or loop stays above 2
    assert summary["best_metric"] == min(row["val_loss"] for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 10
    for key in ("best_epoch", "best_metric", "epochs_run", "stopped_early", "train_tokens", "train_seconds",
                "tokens_per_second", "peak_memory_bytes"):
        assert key in summary
    assert summary["train_tokens"] == sum(row["train_tokens"] for row in history) > 0
    assert summary["peak_memory_bytes"] > 0 and summary["tokens_per_second"] > 0


def test_steps_jsonl_has_a_row_per_step_that_adds_up_to_history(tiny_run):
    out, summary, _ = tiny_run
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps] == list(range(1, summary["steps"] + 1))
    assert set(steps[0]) == {"step", "epoch", "loss", "grad_norm", "lr", "tokens", "target_tokens", "positions"}
    for epoch in history:
        rows = [r for r in steps if r["epoch"] == epoch["epoch"]]
        weighted = sum(r["loss"] * r["target_tokens"] for r in rows) / sum(r["target_tokens"] for r in rows)
        assert epoch["train_loss"] == pytest.approx(weighted, rel=1e-9)
        assert epoch["train_tokens"] == sum(r["tokens"] for r in rows) and epoch["lr"] == rows[-1]["lr"]


def test_only_the_adapter_is_written_and_as_safetensors(tiny_run):
    out, _, _ = tiny_run
    best = out / "best"
    assert (best / "adapter_model.safetensors").is_file() and (best / "adapter_config.json").is_file()
    assert (best / "tokenizer.json").is_file()
    manifest = json.loads((best / "manifest.json").read_text())  # what it was trained with, for chat and merge
    assert manifest["base"]["model_type"] == "qwen2" and list(manifest["data"]) == [tiny_config().data.train]
    assert len(manifest["chat_template_hash"]) == 16
    dtype = str(resolve_compute_dtype(tiny_config().model.compute_dtype, torch.device("cpu"))[0]).removeprefix("torch.")
    assert manifest["quantization"] == {"quant_type": "nf4", "double_quant": True, "quant_storage": "uint8",
                                        "compute_dtype": dtype}  # the weights merge and export rebuild
    assert all((p / "manifest.json").is_file() for p in (out / "checkpoints").glob("step-*"))
    assert {p.name for p in out.iterdir()} == {"best", "checkpoints", "steps.jsonl", "history.jsonl", "summary.json",
                                               "samples.jsonl", "curves.png", "config.yaml", ".qlora_loop-run"}
    assert {p.suffix for p in out.rglob("*") if p.is_file()} <= {".safetensors", ".json", ".jsonl", ".yaml", ".jinja",
                                                                   ".md", ".png", ""}  # no pickle anywhere
    tensors = load_file(best / "adapter_model.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) < 100_000  # adapter-sized, no base weights


def test_reloaded_adapter_reproduces_val_loss_and_answers(tiny_run):
    out, summary, cache = tiny_run
    cfg = tiny_config()
    base_path = str(cache / "qlora_loop" / Path(resolve_model_path(cfg.model.name_or_path)).name)
    tokenizer = load_tokenizer(str(out / "best"))
    _, val_rows, _ = build_datasets(tokenizer, cfg.data, seed=cfg.train.seed)
    _, val_dl = build_dataloaders(val_rows, val_rows, DataConfig(group_by_length=False),
                                  batch_size=cfg.train.batch_size, pad_id=tokenizer.pad_token_id)
    from accelerate import Accelerator
    model = PeftModel.from_pretrained(load_base_model(base_path, torch.device("cpu"), CPU_DTYPE), out / "best")
    assert evaluate(model, val_dl, Accelerator(mixed_precision="no")) == pytest.approx(summary["best_metric"],
                                                                                      rel=1e-4)
    # Every question that opens a training row gets its trained answer back, verbatim, greedy.
    model.eval()
    train_rows, _, _ = build_datasets(tokenizer, cfg.data, seed=cfg.train.seed)
    firsts = {}
    for line in Path(cfg.data.train).read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        firsts[messages[0]["content"]] = messages[1]["content"]
    trained = {q: a for q, a in firsts.items() if any(_opens(row, q, tokenizer) for row in train_rows)}
    assert len(trained) >= 25  # of 32 questions; the rest open only held-out rows
    wrong = {q: reply for q, a in trained.items() if (reply := greedy(model, tokenizer, q)) != a}
    assert not wrong


def _opens(row: dict, question: str, tokenizer) -> bool:
    prefix = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    return row["input_ids"][:len(ids)] == ids


def greedy(model, tokenizer, question: str) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=48, do_sample=False, use_cache=True,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_samples_before_training_and_after_every_epoch(tiny_run):
    out, summary, _ = tiny_run
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    n = tiny_config().eval.num_samples
    assert [row["epoch"] for row in samples] == [e for e in range(summary["epochs_run"] + 1) for _ in range(n)]
    first, last = samples[:n], samples[-n:]
    assert [r["prompt"] for r in first] == [r["prompt"] for r in last] and all(r["reference"] for r in last)
    answers = {m["content"] for line in Path(tiny_config().data.train).read_text(encoding="utf-8").splitlines()
               for m in json.loads(line)["messages"] if m["role"] == "assistant"}
    assert not any(r["response"] in answers for r in first)  # the random base knows none of them
    assert all(r["response"] in answers for r in last)  # the trained adapter answers with one of them


def test_every_run_reports_throughput_padding_and_memory(tiny_run):
    out, summary, _ = tiny_run
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    tokens, targets, positions = (sum(r[k] for r in steps) for k in ("tokens", "target_tokens", "positions"))
    assert summary["padding_share"] == pytest.approx(1 - tokens / positions)
    assert summary["padding_share"] < 0.1  # batches grouped by length; 0.043 when pinned
    assert summary["loss_tokens_per_second"] == pytest.approx(targets / summary["step_seconds"])
    assert summary["tokens_per_second"] == pytest.approx(tokens / summary["step_seconds"])
    for row in history:
        assert row["loss_tokens_per_second"] < row["tokens_per_second"] and 0 <= row["padding_share"] < 1
        assert row["peak_memory_bytes"] > 0


def test_memory_probe_reports_and_stops_a_run_that_cannot_fit(tiny_qwen2, tmp_path):
    args = [f"model.name_or_path={tiny_qwen2}", "train.epochs=1", f"output_dir={tmp_path / 'out'}"]
    proc = run_script(sys.executable, "scripts/train.py", *TINY, *args, "train.memory_budget_gib=0.01")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the longest batch (") and "of a 0.01 GiB budget" in message
    assert "train.batch_size=2 train.grad_accum=2" in message and "data.max_length=256" in message
    assert not (tmp_path / "out" / "steps.jsonl").exists()  # stopped before step 1
    shown = re.search(r"memory probe \(longest batch, (\d+) token slots\): peak ([\d.]+) GiB", proc.stdout)
    assert shown and int(shown[1]) > 0 and float(shown[2]) > 0.01


def test_finished_run_is_not_overwritten(tiny_run, train_main):
    out, _, _ = tiny_run
    before = (out / "summary.json").read_bytes()
    with pytest.raises(ValueError, match="holds a finished run; pass --overwrite"):
        train_main([f"output_dir={out}"])
    assert (out / "summary.json").read_bytes() == before


def run_script(*args, env=None, timeout=300):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_accelerate_launch_entry_point_uses_every_core(tmp_path):
    """The README's command, without --cpu: accelerate launch sets OMP_NUM_THREADS=1, the run uses all cores."""
    accelerate = str(Path(sys.executable).parent / "accelerate")  # the venv's, whether or not it is on PATH
    proc = run_script(accelerate, "launch", "--num_processes", "1", "scripts/train.py", *TINY,
                      f"output_dir={tmp_path / 'out'}", "train.epochs=1", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = physical_cores()
    assert f"CPU threads {cores} per process (train.cpu_threads=auto: {cores} physical cores / 1 process" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and (tmp_path / "out" / "best" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("args, says", [
    (["--config", "no/such.yaml"], "config file no/such.yaml does not exist"),
    (["train.lrr=1"], "override 'train.lrr=1': unknown config key 'train.lrr'; did you mean train.lr?"),
    (["data.train=missing.jsonl"], "missing.jsonl: data file does not exist"),
    (["model.name_or_path=./no/such/model"], "model.name_or_path='./no/such/model': no such folder; give a model "
                                             "folder (with config.json) or a hub id such as Qwen/Qwen2.5-7B-Instruct"),
])
def test_bad_input_is_one_clear_line_and_exit_2(args, says, tmp_path):
    proc = run_script(sys.executable, "scripts/train.py", *TINY, *args, f"output_dir={tmp_path / 'out'}",
                      env={"XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {says}"  # the last line, whole
    assert proc.stderr.count("error: ") == 1 and "Traceback" not in proc.stderr


def latin1_config(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes("train:\n  lr: 1.0e-4  # café\n".encode("latin-1"))  # é is byte 0xe9, offset 26, line 2
    return ["--config", str(path)], re.escape(f"{path}:2: not UTF-8 text (byte 0xe9 at offset 26); re-save the "
                                              "file as UTF-8")


def truncated_model(tmp_path):
    weights = build_tiny_model(tmp_path / "model", arch="qwen2") / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])  # a download cut short
    return [f"model.name_or_path={weights.parent}"], (  # safetensors' reason in the middle, in its own words
        re.escape(f"{weights}: truncated or corrupt (") + ".+" +
        re.escape(f"; {len(whole) // 2:,} bytes); download the model again, or save it again with save_pretrained"))


def one_line_array(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)]
    del rows[5]["output"]
    path = tmp_path / "arr.json"
    path.write_text(json.dumps(rows), encoding="utf-8")  # every row on line 1
    return [f"data.train={path}"], re.escape(f"{path}: row 5 (line 1): missing field 'output'")


@pytest.mark.parametrize("bad_file", [latin1_config, truncated_model, one_line_array])
def test_a_file_that_cannot_be_read_is_one_line_naming_it_and_exit_2(bad_file, tmp_path):
    """Each file a run reads, damaged as files are in practice: one `error:` line with the file, where in it,
    and the fix; exit 2; no traceback."""
    args, says = bad_file(tmp_path)
    proc = run_script(sys.executable, "scripts/train.py", *TINY, *args, f"output_dir={tmp_path / 'out'}",
                      env={"XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.fullmatch(f"error: {says}", proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_the_run_says_where_it_writes_at_start_and_end(train_main, tmp_path, capsys):
    out = tmp_path / "out"
    train_main([f"output_dir={out}", "train.epochs=1", "train.patience=0", "eval.num_samples=0"])
    printed = capsys.readouterr().out
    assert f"writing the run to {out.resolve()}" in printed
    assert f"the adapter in {out.resolve() / 'best'}; logs, curves.png and summary.json in {out.resolve()}" in printed
