"""What the benchmarks share: the machine (its description, copy bandwidth and GEMM rate, measured in the same run as
the numbers they put in context), the median timer, and writing a report."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch
import torch.utils.benchmark as tb

import lrsparse


def median_ms(fn, min_run_time: float) -> float:
    fn()  # warm-up (first-call allocations, lazy init)
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def software() -> dict:
    """The package versions a run's numbers depend on besides torch and the machine (with :func:`vector_isa`):
    rows that name them let a difference between two runs of the same code, seed and checkpoint be traced."""
    versions = {"lrsparse_extension": dict(lrsparse.BUILD_INFO)}
    for package in ("transformers", "tokenizers", "numpy", "scipy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


# Environment variables that override which vector ISA oneDNN, MKL and ATen run (e.g. AVX2 on an AVX-512 host).
ISA_OVERRIDES = ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def vector_isa() -> str:
    """The vector ISA the CPU kernels run, e.g. "ATen CPU AVX512" or "ATen CPU AVX2 (DNNL_MAX_CPU_ISA=AVX2, ...)".

    It changes the numbers: oneDNN's AVX2 and AVX-512 GEMM kernels (nn.Linear's forward and backward) round
    differently, and a fine-tuning run from the same seed ends with other weights (CoLA lpaf seed 0 on an AVX-512
    host reproduced the AVX2 host's run to the last digit only with these overrides set to AVX2, 2026-12-02). ATen's
    dispatch follows the CPU as oneDNN's does unless one of them is overridden, so the overrides are named too."""
    overrides = [f"{name}={os.environ[name]}" for name in ISA_OVERRIDES if os.environ.get(name)]
    return f"ATen CPU {torch.backends.cpu.get_cpu_capability()}" + (f" ({', '.join(overrides)})" if overrides else "")


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA ATen's CPU kernels run
        "vector_isa": vector_isa(),
        "lrsparse_build": dict(lrsparse.BUILD_INFO),
        "software": software(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        model = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        info["cpu_model"] = model[0].split(":", 1)[1].strip() if model else ""
    except OSError:
        pass
    return info


def measure_bandwidth_gbps(min_run_time: float) -> float:
    """Large tensor copy: bytes read + bytes written per second."""
    src = torch.randn(64 * 1024 * 1024 // 4 * 4)  # 256 MiB, far beyond the caches
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), min_run_time)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def measure_gemm_gflops(min_run_time: float, dtype: torch.dtype = torch.float32, size: int = 2048) -> float:
    """Square ``size`` x ``size`` matrix product rate (a GPU needs a larger size than a CPU to reach its peak)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b), min_run_time)
    return 2 * size**3 / (ms * 1e-3) / 1e9


def save_report(report: dict, text: str, json_path: Path | None, markdown_path: Path | None) -> None:
    """Prints the markdown ``text`` and writes the report as JSON and markdown where asked."""
    print(text)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown_path:
        markdown_path.write_text(text)
