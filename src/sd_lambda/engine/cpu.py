"""What the CPU under this process can do: usable cores, native bf16, peak FLOP/s.

Lambda (and containers generally) report the host's CPU count in ``os.cpu_count()``; the work a
process can actually run in parallel is bounded by its affinity mask and its cgroup CPU quota.
Every path is injectable so tests can feed fixture files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sd_lambda.settings import Settings

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
PROC_CPUINFO = Path("/proc/cpuinfo")

# Any one of these flags means the CPU multiplies bf16 natively; without them bf16 is emulated and
# slower than fp32 (AWS Lambda documents AVX2 only).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) that still include native bf16 instructions.
ONEDNN_BF16_ISAS = frozenset({"avx512_core_bf16", "avx512_core_fp16", "avx512_core_amx", "avx10_1_512_amx"})


@dataclass(frozen=True)
class CpuBudget:
    """How many CPUs this process may use, and what limited it."""

    cpus: int
    affinity: int
    quota: float | None  # CPUs allowed by the cgroup quota; None = unlimited
    source: str  # "affinity" or the quota file that set the limit


def read_cpu_flags(cpuinfo: Path = PROC_CPUINFO) -> frozenset[str]:
    """The ``flags`` of the first processor in a /proc/cpuinfo text (all cores of a VM share them)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    return parse_cpu_flags(text)


def parse_cpu_flags(text: str) -> frozenset[str]:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: frozenset[str], environ: Mapping[str, str] | None = None) -> bool:
    """bf16 runs natively: the CPU has the instructions and neither ATen nor oneDNN is capped below them."""
    environ = os.environ if environ is None else environ
    if not flags & NATIVE_BF16_FLAGS:
        return False
    aten_cap = environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if aten_cap and not aten_cap.startswith("avx512"):
        return False
    onednn_cap = environ.get("ONEDNN_MAX_CPU_ISA", environ.get("DNNL_MAX_CPU_ISA", "")).lower()
    return not onednn_cap or onednn_cap == "all" or onednn_cap in ONEDNN_BF16_ISAS


def cgroup_quota(
    proc_self_cgroup: Path = PROC_SELF_CGROUP, cgroup_root: Path = CGROUP_ROOT
) -> tuple[float | None, str]:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), and the file read."""
    v2_path, v1_path = "", ""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    candidates = [cgroup_root / v2_path.lstrip("/") / "cpu.max", cgroup_root / "cpu.max"]
    for cpu_max in candidates:
        quota = _read_cpu_max(cpu_max)
        if quota is not None:
            return quota, str(cpu_max)
    for folder in (cgroup_root / "cpu" / v1_path.lstrip("/"), cgroup_root / "cpu"):
        quota = _read_cfs(folder)
        if quota is not None:
            return quota, str(folder / "cpu.cfs_quota_us")
    return None, ""


def _read_cpu_max(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def _read_cfs(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_budget(
    affinity: int | None = None, proc_self_cgroup: Path = PROC_SELF_CGROUP, cgroup_root: Path = CGROUP_ROOT
) -> CpuBudget:
    """The CPUs this process may keep busy: its affinity mask, capped by the cgroup quota (rounded up)."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota, quota_file = cgroup_quota(proc_self_cgroup, cgroup_root)
    if quota is not None and math.ceil(quota) < affinity:
        return CpuBudget(max(1, math.ceil(quota)), affinity, quota, quota_file)
    return CpuBudget(affinity, affinity, quota, "affinity")


def peak_gflops(flags: frozenset[str], cores: int, ghz: float, dtype: str = "float32") -> float:
    """Theoretical peak GFLOP/s: cores x GHz x FLOPs per cycle per core (two FMA pipes assumed).

    fp32: 16 lanes per AVX-512 FMA (8 per AVX2 FMA) x 2 FLOPs x 2 pipes. bf16 dot products
    (vdpbf16ps) do twice the fp32 FLOPs per instruction.
    """
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = lanes * 2 * 2
    if dtype == "bfloat16" and flags & NATIVE_BF16_FLAGS:
        per_cycle *= 2
    return cores * ghz * per_cycle


def cpu_ghz(cpuinfo: Path = PROC_CPUINFO) -> float | None:
    """The first ``cpu MHz`` in /proc/cpuinfo, in GHz (the nominal clock a VM reports)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "cpu MHz":
                return float(value) / 1000
    except (OSError, ValueError):
        return None
    return None


def choose_threads(settings: Settings) -> tuple[int, str]:
    """The engine's intra-op threads and why: SD_THREADS, else the CPUs this process may use."""
    if settings.threads > 0:
        return settings.threads, "SD_THREADS"
    budget = cpu_budget()
    if budget.source == "affinity":
        return budget.cpus, f"affinity mask ({budget.affinity} CPUs, no lower cgroup quota)"
    return budget.cpus, f"cgroup quota {budget.quota:g} CPUs ({budget.source}); affinity {budget.affinity}"
