"""What this CPU runs fast: the compute dtype `model.compute_dtype=auto` picks, and the threads a process uses.

bfloat16 is native only with AMX or AVX512-BF16 (and oneDNN's AVX-512 path); on an AVX2-only CPU torch
emulates it at ~1/10 to 1/80 of float32's matmul speed, so auto takes float32 there. Where oneDNN says
it has a bfloat16 path, one short matmul in each dtype decides (AVX-512 without BF16 has a path that is
not always faster); the result is cached per CPU, torch version and oneDNN/ATen ISA setting.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlora_loop.files import write_atomic
from qlora_loop.paths import cache_dir

# The launchers' own variables: in a process that has one, OMP_NUM_THREADS was set by the launcher
# (accelerate launch sets it to 1 unless --cpu; torchrun to 1 for several processes), not by the user.
LAUNCHER_VARIABLES = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION", "LOCAL_WORLD_SIZE",
                      "TORCHELASTIC_RUN_ID")
# The matmul the check times: SmolLM2-135M's MLP up-projection at 256 tokens, a typical CPU step's shape.
CHECK_SHAPE = (256, 576, 1536)


@dataclass(frozen=True)
class Bf16Check:
    """Whether bfloat16 matmuls run at least as fast as float32 ones on this CPU, and why."""
    fast: bool
    reason: str


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def vector_units(flags: set[str]) -> str:
    """The units that decide a CPU's float32 and bfloat16 matmul speed, e.g. 'AVX-512, AVX512-BF16, no AMX'."""
    if not flags:  # no /proc/cpuinfo (macOS, Windows): what torch dispatches to
        return torch.backends.cpu.get_cpu_capability()
    units = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"]
    if "avx512_bf16" in flags:
        units.append("AVX512-BF16")
    units.append("AMX" if "amx_bf16" in flags else "no AMX")
    return ", ".join(units)


def describe_cpu() -> str:
    """One line for a timing: model, physical cores and vector units, e.g. 'AMD EPYC (2 cores; AVX2, no AMX)'."""
    return f"{cpu_name()} ({physical_cores()} cores; {vector_units(cpu_flags())})"


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share one core's matmul units)."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = os.cpu_count() or 1
    return max(1, min(physical, allowed))


# --- compute dtype ----------------------------------------------------------------------------------

def matmul_seconds(dtype: torch.dtype, *, repeats: int = 3) -> float:
    """The fastest of `repeats` timings of the check's matmul in `dtype`, after one warm-up."""
    m, k, n = CHECK_SHAPE
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator).to(dtype), torch.randn(k, n, generator=generator).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def measure_bf16() -> Bf16Check:
    """Time the check's matmul in both dtypes (about 20 ms where bfloat16 is native, 1 s where emulated)."""
    gflops = {dtype: 2 * CHECK_SHAPE[0] * CHECK_SHAPE[1] * CHECK_SHAPE[2] / matmul_seconds(dtype) / 1e9
              for dtype in (torch.float32, torch.bfloat16)}
    bf16, fp32 = gflops[torch.bfloat16], gflops[torch.float32]
    verdict = "at least as fast as" if bf16 >= fp32 else "slower than"
    return Bf16Check(bf16 >= fp32, f"bfloat16 matmuls ran {verdict} float32 on this CPU "
                                   f"({bf16:.0f} against {fp32:.0f} GFLOP/s, measured once and cached)")


def check_cpu_bf16(cache: Path | None = None) -> Bf16Check:
    """Whether this CPU runs bfloat16 matmuls fast. Without oneDNN's bfloat16 path (AVX2-only CPUs) the
    answer is no, with nothing to measure; with it, measured once per machine and kept in `cache`
    (None = the user cache's cpu.json)."""
    cache = cache or cache_dir() / "cpu.json"
    units = vector_units(cpu_flags())
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
        kernels = torch.backends.cpu.get_cpu_capability() + (f", ONEDNN_MAX_CPU_ISA={limit}" if limit else "")
        return Bf16Check(False, f"torch has no native bfloat16 path on this CPU ({units}; torch's kernels: "
                                f"{kernels}): it would emulate bfloat16, far slower than float32")
    key = "|".join([cpu_name(), units, torch.__version__, os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
                    os.environ.get("ATEN_CPU_CAPABILITY", "")])
    known = read_json(cache)
    if key in known:
        return Bf16Check(**known[key])
    check = measure_bf16()
    write_json(cache, {**read_json(cache), key: asdict(check)})
    return check


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def write_json(path: Path, data: dict) -> None:
    """Atomically, and quietly: a cache that cannot be written only costs the measurement next time."""
    try:
        write_atomic(path, json.dumps(data, indent=1))
    except OSError:
        pass


def resolve_compute_dtype(name: str, device: torch.device, *, cpu_bf16: Bf16Check | None = None,
                          cache: Path | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why) for model.compute_dtype=`name` on `device`. An explicit dtype is obeyed. auto: on a
    GPU bfloat16 where supported, else float16; on a CPU bfloat16 only where `cpu_bf16` (the check's
    result; None = check_cpu_bf16(cache)) says it is fast, else float32."""
    if name != "auto":
        return getattr(torch, name), f"model.compute_dtype={name}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "model.compute_dtype=auto: this GPU supports bfloat16"
        return torch.float16, ("model.compute_dtype=auto: this GPU has no bfloat16, so float16, which can "
                               "overflow in long or large-activation runs; watch for non-finite losses")
    if device.type != "cpu":
        return torch.bfloat16, f"model.compute_dtype=auto on {device.type}"
    check = cpu_bf16 or check_cpu_bf16(cache)
    return (torch.bfloat16 if check.fast else torch.float32), f"model.compute_dtype=auto: {check.reason}"


# --- threads ----------------------------------------------------------------------------------------

def cpu_threads(setting: str | int, *, processes: int, cores: int, env: dict[str, str]) -> tuple[int, str]:
    """(threads, why) for one of `processes` training processes on a machine of `cores` physical cores.
    train.cpu_threads (a number) wins; then an OMP_NUM_THREADS the user set on a plain `python` run;
    else cores / processes, at least 1 (accelerate launch's OMP_NUM_THREADS=1 is its default, not
    the user's choice: with it a single process would use one core of many)."""
    if setting != "auto":
        return int(setting), f"train.cpu_threads={setting}"
    launched = any(env.get(name) for name in LAUNCHER_VARIABLES)
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if not launched and omp.isdigit() and int(omp) > 0:
        return int(omp), f"OMP_NUM_THREADS={omp} as set"
    threads = max(1, cores // processes)
    why = f"train.cpu_threads=auto: {cores} physical cores / {processes} process{'es' if processes > 1 else ''}"
    if launched and omp and omp != str(threads):
        why += f"; the launcher's OMP_NUM_THREADS={omp} replaced"
    return threads, why


def local_processes(world_size: int, env: dict[str, str]) -> int:
    """Training processes on this machine: torchrun's LOCAL_WORLD_SIZE (accelerate launch passes
    through torchrun for several processes), else all of them."""
    local = env.get("LOCAL_WORLD_SIZE", "")
    return int(local) if local.isdigit() and int(local) > 0 else world_size
