"""`sd-lambda bench` machinery end to end on the tiny model (subprocess workers), and its arithmetic."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sd_lambda.cli import CommandError, main
from sd_lambda.devtools import bench, bench_worker
from sd_lambda.engine.accel.prefetch import weight_files
from sd_lambda.engine.torch_engine import DEFAULTS_MARKER
from sd_lambda.layout import bf16_copy_files


def test_quick_bench_end_to_end_under_avx2(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--model-dir", str(tiny_model_dir), "--size", "64", "--isa", "avx2"]
    assert main([*argv, "-o", str(out), "--cache", str(tmp_path / "cache")]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {f"avx2/{v}" for v in bench_worker.VARIANTS}
    for entry in results.values():
        # The ISA cap reached each worker: ATen ran AVX2 kernels and the engine chose fp32.
        assert entry["cpu_capability"] == "AVX2"
        assert entry["dtype"] == "float32"
        assert entry["seconds_per_image"] > 0
        assert entry["import_seconds"] > 0
        assert entry["load_seconds"] > 0
        assert entry["peak_rss_gb"] > 0
        assert 0 < entry["gflops_per_second"] <= entry["peak_gflops_per_second"]
    naive, project, fast = results["avx2/naive"], results["avx2/accel:default"], results["avx2/fast"]
    assert (naive["scheduler"], naive["unet_calls"], naive["unet_batch"]) == ("PNDMScheduler", 3, 2)
    assert (project["decoder"], project["unet_calls"], project["unet_batch"]) == ("full", 2, 2)
    # Stock diffusers modules in the engine: the stock FLOPs, and no acceleration.
    stock = results["avx2/accel:none"]
    assert (stock["decoder"], stock["accelerations"]) == ("full", [])
    assert stock["image_gflop"] > project["image_gflop"]
    assert (fast["decoder"], fast["unet_batch"]) == ("tiny", 2)  # the tiny SD 1.5 model needs guidance
    # Same weights with an LCM scheduler: the model allows no guidance, so one batch item per call.
    lcm = results["avx2/fast_lcm"]
    assert (lcm["scheduler"], lcm["decoder"], lcm["unet_calls"], lcm["unet_batch"]) == (
        "LCMScheduler",
        "tiny",
        2,
        1,
    )
    lcm_dir = Path(report["config"]["lcm_model_dir"])
    assert (lcm_dir / "unet").resolve() == (tiny_model_dir / "unet").resolve()  # shared, not copied
    assert "PNDMScheduler" in (tiny_model_dir / "model_index.json").read_text()  # the original is untouched
    reuse = results["avx2/accel:+feature_reuse"]
    assert reuse["image_gflop"] < project["image_gflop"]  # its second UNet call reused the deep features
    assert report["samples"][3]["images"][0]["reused_calls"] == 1
    # Each opt-in or dropped default against accel:default: here feature reuse, the one opt-in variant.
    assert set(report["accelerations"]) == {"avx2/feature_reuse"}
    assert report["accelerations"]["avx2/feature_reuse"]["variant"] == "accel:+feature_reuse"
    ratios = report["ratios"]["avx2"]
    assert ratios["accel:default_speedup"] == pytest.approx(
        naive["seconds_per_image"] / project["seconds_per_image"]
    )
    assert ratios["fast_speedup"] == pytest.approx(naive["seconds_per_image"] / fast["seconds_per_image"])
    assert ratios["fast_lcm_speedup"] == pytest.approx(naive["seconds_per_image"] / lcm["seconds_per_image"])
    assert report["targets"]["avx2"]["fast_lcm_speedup"]["target"] == 3.0
    assert report["targets"]["avx2"]["accel:default_speedup"]["target"] == 1.3
    assert len(report["machine"]["loadavg_before"]) == len(report["machine"]["loadavg_after"]) == 3
    assert len(report["samples"]) == 6
    # The weight prefetch is opt-in (accel:+prefetch): none of these variants starts it.
    assert [sample["prefetch_at_load"] for sample in report["samples"]] == [None] * 6
    assert naive["start_to_image_seconds"] == pytest.approx(
        naive["import_seconds"] + naive["load_seconds"] + naive["first_image_seconds"]
    )
    assert report["flops"]["unet"] > report["flops"]["unet_reused"] > 0
    flops = report["flops"]
    assert flops["unet"] > flops["unet_engine"] > flops["unet_reused_engine"] > 0
    assert flops["unet_engine"] > flops["unet_prefix_engine"] > 0
    # Guided engine calls compute the layers before the first cross-attention once; LCM's are not guided.
    images = {sample["variant"]: sample["images"][0] for sample in report["samples"]}
    assert images["accel:default"]["prefix_shared_calls"] == 0  # guidance_prefix is opt-in
    assert images["accel:none"]["prefix_shared_calls"] == 0
    assert images["fast_lcm"]["prefix_shared_calls"] == 0
    assert "prefix_shared_calls" not in images["naive"]
    assert report["flops"]["vae_decode"] > report["flops"]["vae_decode_engine"] > 0
    assert report["flops"]["tiny_decode"] > 0
    printed = capsys.readouterr().out
    assert "| avx2/naive |" in printed
    assert "speed-up vs naive (avx2): accel:none" in printed
    assert "| avx2/feature_reuse | opt-in | accel:+feature_reuse |" in printed


def _sample(
    isa: str,
    variant: str,
    seconds: list[float],
    prefix_shared_calls: int = 0,
    rss: int = 5_000_000_000,
    **extra: Any,
) -> dict[str, Any]:
    images = [
        {"seconds": s, "unet_seconds": s / 2, "unet_calls": 4, "unet_batch": 2, "decode_seconds": s / 4}
        | {"text_encoder_calls": 1, "cpu_seconds": 2 * s, "prefix_shared_calls": prefix_shared_calls}
        for s in seconds
    ]
    return {
        "isa": isa,
        "variant": variant,
        "images": images,
        "import_seconds": 1.0,
        "load_seconds": 2.0,
        "first_image_seconds": seconds[0],
        "peak_rss_bytes": rss,
        "threads": 2,
        "cpu_capability": "AVX512",
        "dtype": "float32",
        "decoder": "full",
        "scheduler": "X",
        **extra,
    }


FOLDED = ["upsample_fold", "guidance_prefix"]


def test_summary_uses_warm_medians_and_checks_targets() -> None:
    flops = {
        "unet": 10**9,
        "unet_reused": 4 * 10**8,
        "vae_decode": 4 * 10**9,
        "tiny_decode": 10**8,
        "text_encoder": 10**7,
        "unet_engine": 9 * 10**8,
        "unet_reused_engine": 3 * 10**8,
        "vae_decode_engine": 3 * 10**9,
        "unet_prefix_engine": 10**8,
    }
    samples = [
        _sample("native", "naive", [99.0, 10.0, 12.0]),  # the first (cold) image is left out of s/image
        _sample("native", "accel:default", [50.0, 5.0, 4.0], prefix_shared_calls=4, accelerations=FOLDED),
        _sample(
            "native", "fast", [50.0, 2.0, 2.0], decoder="tiny", weights="bf16 copy", accelerations=FOLDED
        ),
    ]
    summary = bench.summarize(samples, flops, frozenset({"avx2", "avx512f"}), ghz=2.0)
    naive = summary["results"]["native/naive"]
    assert naive["seconds_per_image"] == 11.0
    assert naive["first_image_seconds"] == 99.0
    assert naive["seconds_per_unet_call"] == pytest.approx(11.0 / 2 / 4)
    assert naive["peak_gflops_per_second"] == pytest.approx(2 * 2.0 * 64)
    assert naive["cpu_seconds_per_image"] == 22.0
    assert naive["start_to_image_seconds"] == 1.0 + 2.0 + 99.0  # import + load + the cold first image
    # 4 calls x batch 2 x 1 GFLOP over each warm image's UNet seconds (5 and 6), median of the two
    assert naive["unet_gflops_per_second"] == pytest.approx((8 / 5 + 8 / 6) / 2)
    assert naive["image_gflop"] == pytest.approx((4 * 2 * 10**9 + 4 * 10**9 + 10**7) / 1e9)
    # The engine's variants are counted with the engine's FLOPs (folded upsamplers, each guided call's
    # shared prefix computed once), not the stock modules'.
    project = summary["results"]["native/accel:default"]
    assert project["image_gflop"] == pytest.approx((4 * 2 * 9 * 10**8 - 4 * 10**8 + 3 * 10**9 + 10**7) / 1e9)
    assert summary["ratios"]["native"] == {"accel:default_speedup": 11.0 / 4.5, "fast_speedup": 5.5}
    targets = summary["targets"]["native"]
    assert targets["accel:default_speedup"]["met"] is True  # 2.44 >= 1.8
    assert targets["fast_speedup"]["met"] is True
    assert targets["accel:default_peak_rss_gb"]["met"] is True  # 5.0 <= 5.5
    assert targets["accel:default_import_load_seconds"] == {"value": 3.0, "target": 4.0, "met": True}
    table = bench.format_report(
        {
            **summary,
            "flops": {"width": 64, "height": 64, **flops},
            "machine": {"cpus": 2, "ghz": 2.0, "cpu_flags": ["avx2"], "loadavg_before": [1, 1, 1]}
            | {"loadavg_after": [2, 2, 2]},
            "wall_seconds": 3.0,
        }
    )
    assert "| native/fast | float32 | bf16 copy | tiny | 4x b2 | 2.00 | 4.0 |" in table
    assert "| native/naive | float32 | stored | full |" in table  # workers that do not say: stored


def test_bf16_copy_runs_from_the_copy_and_the_defaults_from_the_stored_weights(
    tiny_model_with_bf16_copy: Path,
) -> None:
    model = tiny_model_with_bf16_copy
    config = bench.BenchConfig(
        model, 64, 64, 1, 0, 1, ("native",), extra_env={"SD_DTYPE": "bfloat16", "SD_THREADS": "1"}
    )
    copy = bench.run_worker(config, "accel:+bf16_copy+prefetch", "native")
    stored = bench.run_worker(config, "accel:+prefetch", "native")
    assert (copy["dtype"], copy["weights"]) == ("bfloat16", "bf16 copy")
    assert (stored["dtype"], stored["weights"]) == ("bfloat16", "stored")
    assert "bf16_copy" in copy["accelerations"]
    assert "bf16_copy" not in stored["accelerations"]
    # Each one's prefetch read the files its engine mapped.
    copy_bytes = sum(path.stat().st_size for path in weight_files(model, bf16=True))
    stored_bytes = sum(path.stat().st_size for path in weight_files(model))
    assert copy["prefetch_at_load"]["bytes"] == copy_bytes < stored_bytes
    assert stored["prefetch_at_load"]["bytes"] == stored_bytes


def test_an_accel_variant_runs_the_engine_with_that_selection(tiny_model_dir: Path) -> None:
    config = bench.BenchConfig(
        tiny_model_dir, 64, 64, 1, 0, 1, ("native",), extra_env={"SD_DTYPE": "float32", "SD_THREADS": "1"}
    )
    changed = bench.run_worker(config, "accel:-in_place+feature_reuse", "native")
    assert "in_place" not in changed["accelerations"]
    assert "feature_reuse" in changed["accelerations"]
    assert "upsample_fold" in changed["accelerations"]  # the other defaults stay
    assert changed["decoder"] == "full"  # like-for-like with naive


def test_variant_names_map_to_the_switch() -> None:
    assert bench_worker.accel_switch("accel:-in_place+feature_reuse") == "-in_place,+feature_reuse"
    assert bench_worker.accel_switch("accel:none") == "none"
    assert bench_worker.accel_switch("fast") is None
    each = bench.each_acceleration()
    assert each[:2] == ("accel:none", "accel:default")
    assert "accel:-upsample_fold" in each
    assert "accel:+feature_reuse" in each
    for variant in each:
        bench_worker.check_variant(variant)
    with pytest.raises(ValueError, match="unknown acceleration warp"):
        bench_worker.check_variant("accel:+warp")
    with pytest.raises(ValueError, match="unknown variant 'project'"):
        bench_worker.check_variant("project")


def test_each_accelerations_gain_is_against_the_defaults_with_the_spread_of_the_rounds() -> None:
    samples = []
    for round_index, (default, without, opt_in) in enumerate([(10.0, 12.0, 9.0), (11.0, 12.5, 10.9)]):
        samples += [
            _sample("avx2", "accel:default", [99.0, default], rss=5_000_000_000),
            _sample("avx2", "accel:-in_place", [99.0, without], rss=5_400_000_000),
            _sample("avx2", "accel:+feature_reuse", [99.0, opt_in], rss=5_000_000_000 + round_index),
        ]
    gains = bench.acceleration_gains(samples)
    in_place = gains["avx2/in_place"]
    # Without it: 12.25 s median against 10.5; the defaults' own rounds differ by 1.0, its by 0.5.
    assert in_place["seconds_per_image_saved"] == pytest.approx(1.75)
    assert in_place["seconds_spread"] == pytest.approx(1.0)
    assert in_place["peak_rss_gb_saved"] == pytest.approx(0.4)
    assert in_place["pays"] is True
    reuse = gains["avx2/feature_reuse"]
    assert reuse["seconds_per_image_saved"] == pytest.approx(10.5 - 9.95)  # inside the 1.9 s spread
    assert reuse["seconds_spread"] == pytest.approx(1.9)
    assert reuse["pays"] is False
    assert reuse["rounds"] == 2
    table = bench.format_gains(gains)
    assert "| avx2/in_place | on | accel:-in_place | +1.75 (1.00) |" in table
    assert table.splitlines()[-1].endswith("| no |")


def test_a_workers_peak_rss_is_its_own_not_its_parents(tmp_path: Path) -> None:
    ballast = b"\x01" * (400 << 20)  # touched pages: this process's peak RSS is now above 400 MB
    probe = (
        "import resource; from sd_lambda.devtools.bench_worker import peak_rss_bytes;"
        "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    own, inherited = (int(value) for value in done.stdout.split())
    assert own < 200 << 20 < 400 << 20 <= inherited  # ru_maxrss carried the parent's peak over
    assert len(ballast) == 400 << 20
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  123 kB\nVmRSS:\t  100 kB\n")
    assert bench_worker.peak_rss_bytes(status) == 123 * 1024
    assert bench_worker.peak_rss_bytes(tmp_path / "missing") > 0  # falls back to ru_maxrss


def test_avx2_cap_removes_avx512_and_bf16_flags() -> None:
    flags = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma"})
    assert bench.isa_flags(flags, "avx2") == {"avx2", "fma"}
    assert bench.isa_flags(flags, "native") == flags


def test_bench_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model-dir", str(tmp_path), "-o", str(tmp_path / "b.json")]) == 1
    assert "is not a diffusers folder" in capsys.readouterr().err
    assert main(["bench", "--size", "100", "--model-dir", str(tmp_path)]) == 1
    assert "multiple of 8" in capsys.readouterr().err


def test_test_model_is_built_once_with_its_bf16_copy(tmp_path: Path) -> None:
    folder = bench.ensure_test_model(tmp_path / "tiny", size="tiny")
    assert (folder / "model_index.json").is_file()
    copies = bf16_copy_files(folder)
    assert copies is not None
    marker = folder / "untouched"
    marker.write_text("x")
    assert bench.ensure_test_model(folder, size="tiny") == folder
    assert marker.exists()
    assert not (tmp_path / "tiny.partial").exists()
    # A model cached before the bench used copies gets one, and keeps everything else.
    for copy in copies:
        copy.unlink()
    assert bench.ensure_test_model(folder, size="tiny") == folder
    assert bf16_copy_files(folder) == copies
    assert marker.exists()


def test_each_round_starts_one_variant_later() -> None:
    config = bench.BenchConfig(Path("m"), 64, 64, 1, 0, 3, ("native", "avx2"), variants=("a", "b", "c"))
    order = bench.run_order(config)
    assert len(order) == 3 * 2 * 3
    firsts = [variant for (round_index, isa, variant) in order[::3]]
    assert firsts == ["a", "a", "b", "b", "c", "c"]
    for round_index in range(3):
        for isa in ("native", "avx2"):
            ran = [v for (r, i, v) in order if (r, i) == (round_index, isa)]
            assert sorted(ran) == ["a", "b", "c"]


def test_lcm_view_drops_the_defaults_marker_and_replaces_only_views(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / DEFAULTS_MARKER).write_text(json.dumps({"guidance_scale": 7.5}))
    view = bench.lcm_view(model, tmp_path / "views" / "model")
    assert not (view / DEFAULTS_MARKER).exists()  # the model's CFG defaults would override LCM's
    assert json.loads((view / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]
    assert bench.lcm_view(model, view) == view  # a view is rebuilt in place
    keep = tmp_path / "someone-elses"
    keep.mkdir()
    (keep / "weights").write_text("x")
    with pytest.raises(CommandError, match="not a bench LCM view"):
        bench.lcm_view(model, keep)
    assert (keep / "weights").read_text() == "x"


def test_cold_bench_drops_the_page_cache_before_every_process(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    monkeypatch.setattr(bench, "drop_page_cache", lambda: events.append("drop"))

    def worker(config: bench.BenchConfig, variant: str, isa: str) -> dict[str, Any]:
        events.append(variant)
        return _sample(isa, variant, [3.0, 2.0 if variant == "naive" else 1.0])

    monkeypatch.setattr(bench, "run_worker", worker)
    config = bench.BenchConfig(tiny_model_dir, 64, 64, 1, 1, 1, ("avx2",), bench.COLD_VARIANTS, cold=True)
    report = bench.run_bench(config)
    assert events == ["drop", "naive", "drop", "accel:default", "drop", "accel:+prefetch"]
    assert report["ratios"]["avx2"] == {"accel:default_speedup": 2.0, "accel:+prefetch_speedup": 2.0}
    assert report["config"]["cold"] is True
    assert "cold: the page cache was dropped before each process" in bench.format_report(report)


def test_drop_page_cache_writes_1_after_syncing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    control = tmp_path / "drop_caches"
    monkeypatch.setattr(bench, "DROP_CACHES", control)
    bench.drop_page_cache()
    assert control.read_text() == "1\n"  # the page cache only, not dentries and inodes


def test_bench_variants_and_cold_are_checked_before_any_worker_runs(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "run_worker", lambda *args: pytest.fail("no worker may run"))
    argv = ["bench", "--quick", "--model-dir", str(tiny_model_dir), "-o", str(tmp_path / "b.json")]
    assert main([*argv, "--variants", "naive,fastest"]) == 1
    assert "known: naive, fast, fast_lcm, accel:<selection>" in capsys.readouterr().err
    assert main([*argv, "--variants", "accel:-warp"]) == 1
    assert "unknown acceleration warp; known: prefetch" in capsys.readouterr().err
    assert main([*argv, "--variants", ""]) == 1
    assert "--variants is empty" in capsys.readouterr().err
    monkeypatch.setattr(bench, "DROP_CACHES", tmp_path / "no-such-dir" / "drop_caches")
    assert main([*argv, "--cold"]) == 1
    assert "--cold needs root: cannot write" in capsys.readouterr().err
