"""The machine a bench ran on, its measured dense-matmul peak, and peak memory of a measured span."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The vector/matrix extensions the fp32 and bf16 peaks depend on (x86 flags; [] elsewhere)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    return []


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, threads, torch, accelerator, and the load when measured."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: str, device: torch.device, n: int, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s for ``n x n @ n x n`` in ``dtype`` (best of ``repeats``): the
    machine's practical limit that MFU divides by (not a datasheet number)."""
    if device.type == "cuda":
        n = max(n, 8192)  # a GPU needs large tiles to reach its peak
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=DTYPES[dtype])
    a @ b  # warm-up: oneDNN/cuBLAS kernel selection
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def dtype_supported(dtype: str, device: torch.device) -> bool:
    if dtype == "fp32":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True  # CPU autocast runs bf16 everywhere; fast only with AVX512-BF16/AMX (the peak shows it)


def _rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory while the block runs. CUDA: ``torch.cuda.max_memory_allocated`` after a reset.
    CPU: resident set size sampled every few ms from /proc (the process-wide ``ru_maxrss`` cannot be
    reset between configs); where /proc is missing, ``ru_maxrss`` (a high-water mark since start)."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.start_bytes = 0  # resident/allocated when the block began: peak - start is what it added
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() or 0)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        elif _rss_bytes() is not None:
            self.start_bytes = _rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() or 0)
        else:  # kilobytes on Linux, bytes on macOS; only reached where /proc is missing
            scale = 1 if platform.system() == "Darwin" else 1024
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "rss"
