"""CPU detection: /proc/cpuinfo flags, native bf16 under ISA caps, cgroup CPU quotas (fixture files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_lambda.engine import cpu

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
cpu MHz\t\t: 2400.000
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
LAMBDA_LIKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor @ 2.50GHz
cpu MHz\t\t: 2500.000
flags\t\t: fpu sse2 avx avx2 fma f16c
"""
ICE_LAKE = "processor\t: 0\nflags\t\t: avx avx2 avx512f avx512bw avx512_vnni\n"
ZEN4 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    ("text", "native"),
    [(SAPPHIRE_RAPIDS, True), (ZEN4, True), (LAMBDA_LIKE, False), (ICE_LAKE, False), ("", False)],
)
def test_native_bf16_comes_from_the_flags(text: str, native: bool) -> None:
    assert cpu.has_native_bf16(cpu.parse_cpu_flags(text), environ={}) is native


def test_flags_are_the_first_processors() -> None:
    flags = cpu.parse_cpu_flags(SAPPHIRE_RAPIDS)
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= flags
    assert "processor" not in flags
    assert "bf16" in cpu.parse_cpu_flags(GRAVITON)  # ARM spells them "Features"


@pytest.mark.parametrize(
    ("environ", "native"),
    [
        ({"ATEN_CPU_CAPABILITY": "avx2"}, False),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, False),
        ({"DNNL_MAX_CPU_ISA": "AVX2"}, False),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),
        ({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "ALL"}, True),
    ],
)
def test_isa_caps_disable_native_bf16(environ: dict[str, str], native: bool) -> None:
    assert cpu.has_native_bf16(cpu.parse_cpu_flags(ZEN4), environ=environ) is native


def test_cpuinfo_file_and_clock(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(LAMBDA_LIKE)
    assert "avx2" in cpu.read_cpu_flags(cpuinfo)
    assert cpu.cpu_ghz(cpuinfo) == pytest.approx(2.5)
    assert cpu.read_cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu.cpu_ghz(tmp_path / "missing") is None


def _cgroup_v2(tmp_path: Path, cpu_max: str) -> tuple[Path, Path]:
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/sandbox/lambda\n")
    folder = tmp_path / "cgroup" / "sandbox" / "lambda"
    folder.mkdir(parents=True)
    (folder / "cpu.max").write_text(cpu_max)
    return proc, tmp_path / "cgroup"


def test_cgroup_v2_quota_caps_the_affinity(tmp_path: Path) -> None:
    proc, root = _cgroup_v2(tmp_path, "600000 100000\n")
    budget = cpu.cpu_budget(affinity=16, proc_self_cgroup=proc, cgroup_root=root)
    assert budget.cpus == 6
    assert budget.quota == pytest.approx(6.0)
    assert budget.source.endswith("sandbox/lambda/cpu.max")


def test_fractional_quota_rounds_up(tmp_path: Path) -> None:
    proc, root = _cgroup_v2(tmp_path, "150000 100000\n")
    assert cpu.cpu_budget(affinity=8, proc_self_cgroup=proc, cgroup_root=root).cpus == 2


def test_unlimited_or_larger_quota_keeps_the_affinity(tmp_path: Path) -> None:
    proc, root = _cgroup_v2(tmp_path, "max 100000\n")
    budget = cpu.cpu_budget(affinity=4, proc_self_cgroup=proc, cgroup_root=root)
    assert (budget.cpus, budget.quota, budget.source) == (4, None, "affinity")
    (root / "sandbox" / "lambda" / "cpu.max").write_text("800000 100000\n")
    assert cpu.cpu_budget(affinity=4, proc_self_cgroup=proc, cgroup_root=root).cpus == 4


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    folder = tmp_path / "cgroup" / "cpu" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    budget = cpu.cpu_budget(affinity=32, proc_self_cgroup=proc, cgroup_root=tmp_path / "cgroup")
    assert budget.cpus == 3
    assert budget.source.endswith("docker/abc/cpu.cfs_quota_us")
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu.cpu_budget(affinity=32, proc_self_cgroup=proc, cgroup_root=tmp_path / "cgroup").cpus == 32


def test_no_cgroup_files_means_affinity(tmp_path: Path) -> None:
    budget = cpu.cpu_budget(affinity=2, proc_self_cgroup=tmp_path / "none", cgroup_root=tmp_path)
    assert (budget.cpus, budget.source) == (2, "affinity")


def test_peak_gflops_follows_the_isa() -> None:
    avx512 = cpu.parse_cpu_flags(ZEN4)
    assert cpu.peak_gflops(avx512, cores=2, ghz=2.5) == pytest.approx(2 * 2.5 * 64)
    assert cpu.peak_gflops(avx512, cores=2, ghz=2.5, dtype="bfloat16") == pytest.approx(2 * 2.5 * 128)
    assert cpu.peak_gflops(cpu.parse_cpu_flags(LAMBDA_LIKE), cores=6, ghz=2.5) == pytest.approx(6 * 2.5 * 32)
