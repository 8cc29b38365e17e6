"""What a CPU runs fast: model.compute_dtype=auto's choice from the bfloat16 check, and the thread rule.

Run: python -m pytest tests/test_cpu.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qlora_loop.cpu import (Bf16Check, check_cpu_bf16, cpu_threads, describe_cpu, local_processes, physical_cores,
                            resolve_compute_dtype)

CPU = torch.device("cpu")
SLOW = Bf16Check(False, "torch has no native bfloat16 path on this CPU (AVX2, no AMX; torch's kernels: AVX2): it "
                        "would emulate bfloat16, far slower than float32")
FAST = Bf16Check(True, "bfloat16 matmuls ran at least as fast as float32 on this CPU (400 against 180 GFLOP/s)")


def test_auto_is_float32_where_the_check_says_bfloat16_is_slow_and_bfloat16_where_it_is_fast():
    assert resolve_compute_dtype("auto", CPU, cpu_bf16=SLOW) == (torch.float32, f"model.compute_dtype=auto: {SLOW.reason}")
    assert resolve_compute_dtype("auto", CPU, cpu_bf16=FAST) == (torch.bfloat16, f"model.compute_dtype=auto: {FAST.reason}")


@pytest.mark.parametrize("name", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize("check", [SLOW, FAST])
def test_an_explicit_dtype_is_obeyed_whatever_the_check_says(name, check):
    assert resolve_compute_dtype(name, CPU, cpu_bf16=check) == (getattr(torch, name), f"model.compute_dtype={name}")


def test_the_check_on_this_cpu_is_cached_and_read_back(tmp_path):
    cache = tmp_path / "cpu.json"
    first = check_cpu_bf16(cache)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # an AVX2-only CPU: nothing is measured or cached
        assert not first.fast and first.reason.startswith("torch has no native bfloat16 path on this CPU (")
        assert not cache.exists()
        return
    assert "GFLOP/s, measured once and cached" in first.reason
    [key] = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: {"fast": not first.fast, "reason": "as cached"}}))  # read back, not measured
    assert check_cpu_bf16(cache) == Bf16Check(not first.fast, "as cached")
    assert resolve_compute_dtype("auto", CPU, cache=cache)[0] == (torch.float32 if first.fast else torch.bfloat16)


def test_a_cpu_is_described_with_its_vector_units():
    line = describe_cpu()
    assert f"({physical_cores()} cores; " in line
    assert any(unit in line for unit in ("AVX2", "AVX-512", "no AVX2")) and ("AMX" in line)


@pytest.mark.parametrize("processes, env, expected", [
    (1, {}, (8, "train.cpu_threads=auto: 8 physical cores / 1 process")),  # plain python
    (4, {"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"},  # torchrun's 4 ranks: the cores shared out
     (2, "train.cpu_threads=auto: 8 physical cores / 4 processes; the launcher's OMP_NUM_THREADS=1 replaced")),
    (1, {"OMP_NUM_THREADS": "3"}, (3, "OMP_NUM_THREADS=3 as set")),  # the user's own, on a plain python run
    (1, {"OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"},  # accelerate launch
     (8, "train.cpu_threads=auto: 8 physical cores / 1 process; the launcher's OMP_NUM_THREADS=1 replaced")),
    (16, {"LOCAL_WORLD_SIZE": "16"}, (1, "train.cpu_threads=auto: 8 physical cores / 16 processes")),  # never 0
])
def test_threads_are_the_physical_cores_shared_among_the_processes(processes, env, expected):
    assert cpu_threads("auto", processes=processes, cores=8, env=env) == expected


def test_two_ranks_on_two_cores_get_one_thread_each():
    env = {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    assert cpu_threads("auto", processes=local_processes(2, env), cores=2, env=env)[0] == 1


def test_train_cpu_threads_wins_over_everything():
    env = {"OMP_NUM_THREADS": "3", "ACCELERATE_MIXED_PRECISION": "no"}
    assert cpu_threads(5, processes=2, cores=8, env=env) == (5, "train.cpu_threads=5")


def test_local_processes_are_torchruns_local_world_size_else_all():
    assert local_processes(8, {"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_processes(3, {}) == 3


def test_the_first_lines_name_the_dtype_and_the_threads(train_main, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        train_main([f"output_dir={tmp_path / 'out'}", "train.epochs=1", "train.patience=0", "eval.num_samples=0",
                    "model.compute_dtype=float32", "train.cpu_threads=1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "compute dtype float32 (model.compute_dtype=float32)"
    assert lines[1] == "CPU threads 1 per process (train.cpu_threads=1)"


def test_where_onednn_has_no_bfloat16_path_auto_is_float32_without_measuring(tmp_path):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes any x86 CPU compute as an AVX2-only one does (bfloat16 emulated)."""
    code = ("import torch; from qlora_loop.cpu import resolve_compute_dtype; "
            "print(*resolve_compute_dtype('auto', torch.device('cpu')), sep='\\n')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    dtype, why = done.stdout.strip().splitlines()
    assert dtype == "torch.float32"
    assert why.startswith("model.compute_dtype=auto: torch has no native bfloat16 path on this CPU (")
    assert "ONEDNN_MAX_CPU_ISA=AVX2): it would emulate bfloat16" in why
    assert not (tmp_path / "qlora_loop" / "cpu.json").exists()  # decided by the capability alone
