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
from sd_lambda.devtools import bench, bench_openvino, bench_worker
from sd_lambda.engine.accel.bf16_copy import add_bf16_copy
from sd_lambda.engine.accel.prefetch import weight_files
from sd_lambda.engine.model_defaults import DEFAULTS_MARKER
from sd_lambda.layout import OPENVINO_UNET, bf16_copy_files


def test_quick_bench_end_to_end_under_avx2(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--model-dir", str(tiny_model_dir), "--size", "64", "--isa", "avx2"]
    argv += ["--variants", ",".join(bench_worker.TORCH_VARIANTS)]  # the OpenVINO ones: their own test
    assert main([*argv, "-o", str(out), "--cache", str(tmp_path / "cache")]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {f"avx2/{v}" for v in bench_worker.TORCH_VARIANTS}
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


def test_each_speed_target_states_the_most_the_measured_f32_peak_allows() -> None:
    # One GFLOP per UNet call and batch item, 8 per decode: a full image is 4x2 + 8 = 16 GFLOP.
    flops = {"unet": 10**9, "vae_decode": 8 * 10**9, "tiny_decode": 0, "text_encoder": 0}
    flops |= {"unet_reused": 0, "unet_engine": 10**9, "unet_reused_engine": 0, "vae_decode_engine": 8 * 10**9}
    flops |= {"unet_prefix_engine": 0}
    samples = [
        _sample("avx2", "naive", [9.0, 20.0]),
        _sample("avx2", "accel:default", [9.0, 5.0]),  # 4x over naive; at 4 GFLOP/s 16 GFLOP take 4 s
        _sample("avx2", "openvino", [9.0, 8.0], weights="IR fp16"),
        _sample("avx2", "openvino_int8", [9.0, 4.0], weights="IR int8"),
    ]
    peaks = {"avx2": {"threads": 2, "gflops": {"conv3x3": 4.0, "torch_mm": 3.0}, "peak": 4.0}}
    summary = bench.summarize(samples, flops, frozenset({"avx2"}), ghz=2.0, peaks=peaks)
    assert summary["results"]["avx2/openvino"]["measured_peak_gflops_per_second"] == 4.0
    targets = summary["targets"]["avx2"]
    # naive's 20 s over the 4 s the variant's FLOPs need at the peak.
    assert targets["accel:default_speedup"]["bound_at_measured_peak"] == 5.0
    assert targets["accel:default_speedup"]["reachable_in_f32"] is True
    # The torch like-for-like's 5 s over the 4 openvino's FLOPs need: at most 1.25x, short of 1.35x.
    over = targets["openvino_over_accel:default"]
    assert (over["bound_at_measured_peak"], over["target"]) == (1.25, bench.TARGET_OPENVINO_OVER_TORCH)
    assert over["reachable_in_f32"] is False
    # int8 weights are not f32 arithmetic: no bound.
    assert "bound_at_measured_peak" not in targets["openvino_int8_speedup"]
    report = {
        **summary,
        "flops": {"width": 64, "height": 64, **flops},
        "machine": {"cpus": 2, "ghz": 2.0, "cpu_flags": ["avx2"], "loadavg_before": [1, 1, 1]}
        | {"loadavg_after": [1, 1, 1]},
        "wall_seconds": 1.0,
        "measured_peak": peaks,
    }
    printed = bench.format_report(report)
    assert "measured f32 peak (avx2, 2 threads): 4 GFLOP/s, the fastest of conv3x3 4, torch_mm 3" in printed
    assert "| avx2/openvino | float32 | IR fp16 |" in printed
    assert "at most 5.00 with every FLOP at the measured peak\n" in printed
    assert "at most 1.25 with every FLOP at the measured peak: beyond this CPU's f32 arithmetic" in printed


def test_the_peak_probe_times_each_kernel_in_its_own_process() -> None:
    from sd_lambda.devtools import bench_peak

    measured = bench_peak.record_peak(1, bench.ISA_ENV["avx2"])
    assert set(measured["gflops"]) == {"conv3x3", "conv3x3_deep", "fully_connected", "torch_mm"}
    assert all(rate > 0 for rate in measured["gflops"].values())
    assert measured["peak"] == max(measured["gflops"].values())
    assert measured["threads"] == 1


def test_a_failed_peak_probe_leaves_the_run_without_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from sd_lambda.devtools import bench_peak

    def fail(threads: int, env: dict[str, str]) -> dict[str, Any]:
        raise bench_peak.PeakError("the peak probe exited 1 without a result: boom")

    monkeypatch.setattr(bench_peak, "record_peak", fail)
    config = bench.BenchConfig(Path("m"), 64, 64, 1, 0, 1, ("avx2",), ("naive",))
    lines: list[str] = []
    assert bench.record_peaks(config, [_sample("avx2", "naive", [1.0])], lines.append) == {}
    assert lines[-1] == (
        "peak: the peak probe exited 1 without a result: boom; the targets go without their f32 bounds"
    )


def test_stored_weights_names_what_holds_most_of_an_irs_bytes(tmp_path: Path) -> None:
    from sd_lambda.devtools.bench_openvino import stored_weights

    def graph(*constants: tuple[str, int]) -> Path:
        layers = "".join(
            f'<layer id="{i}" type="Const"><data element_type="{kind}" size="{size}"/></layer>'
            for i, (kind, size) in enumerate(constants)
        )
        path = tmp_path / f"graph{len(list(tmp_path.iterdir()))}.xml"
        path.write_text(f'<net><layers>{layers}<layer id="99" type="Convert"/></layers></net>')
        return path

    assert stored_weights(graph(("f16", 1000), ("f32", 10), ("i64", 10_000))) == "fp16"
    assert stored_weights(graph(("u8", 600), ("i8", 600), ("f32", 1000))) == "int8"
    assert stored_weights(graph(("f32", 5))) == "fp32"
    assert stored_weights(graph()) == "none"


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
    known = "known: naive, fast, fast_lcm, openvino, openvino_fast, openvino_int8, accel:<selection>"
    assert known in capsys.readouterr().err
    assert main([*argv, "--variants", "accel:-warp"]) == 1
    assert "unknown acceleration warp; known: prefetch" in capsys.readouterr().err
    assert main([*argv, "--variants", ""]) == 1
    assert "--variants is empty" in capsys.readouterr().err
    monkeypatch.setattr(bench, "DROP_CACHES", tmp_path / "no-such-dir" / "drop_caches")
    assert main([*argv, "--cold"]) == 1
    assert "--cold needs root: cannot write" in capsys.readouterr().err


# ---- the OpenVINO variants ----------------------------------------------------------------------------

CALIBRATION_SAMPLES = 2


@pytest.fixture(scope="module")
def openvino_cache(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bench cache holding the tiny model's f32 and int8 exports (the real export venv). Read-only."""
    cache = tmp_path_factory.mktemp("bench-cache")
    for quantize in (None, "int8"):
        folder = bench_openvino.export_folder(cache, tiny_model_dir, quantize)
        bench_openvino.ensure_export(tiny_model_dir, folder, quantize, CALIBRATION_SAMPLES)
    return cache


def test_openvino_variants_are_known_and_map_to_the_exports(tmp_path: Path) -> None:
    for variant in ("openvino", "openvino_fast", "openvino_int8"):
        bench_worker.check_variant(variant)
        assert variant in bench_worker.VARIANTS  # make bench runs them beside the torch ones
    exported, int8 = tmp_path / "m-openvino", tmp_path / "m-openvino-int8"
    config = bench.BenchConfig(
        tmp_path / "m", 64, 64, 1, 0, 1, ("avx2",), openvino_model_dir=exported, openvino_int8_model_dir=int8
    )
    assert [config.model_for(v) for v in ("openvino", "openvino_fast", "openvino_int8", "naive")] == [
        exported,
        exported,
        int8,
        tmp_path / "m",
    ]
    assert bench_openvino.export_folder(tmp_path, tmp_path / "m", None) == exported
    assert bench_openvino.export_folder(tmp_path, tmp_path / "m", "int8") == int8
    with pytest.raises(ValueError, match="the openvino_int8 variant needs openvino_int8_model_dir"):
        bench.BenchConfig(tmp_path / "m", 64, 64, 1, 0, 1, ("avx2",)).model_for("openvino_int8")


def test_an_export_is_made_once_and_again_when_its_source_changes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "model"
    shutil.copytree(tiny_model_dir, source)
    folder = bench_openvino.export_folder(tmp_path / "cache", source, None)
    lines: list[str] = []
    assert bench_openvino.ensure_export(source, folder, progress=lines.append) == folder
    assert (folder / OPENVINO_UNET).is_file()
    assert (folder / "vae_tiny" / "openvino_model.xml").is_file()
    assert not folder.with_name(folder.name + ".partial").exists()
    first_hash = bench_openvino.source_hash(source)
    assert json.loads((folder / bench_openvino.EXPORT_MARKER).read_text())["source_sha256"] == first_hash
    untouched = folder / "untouched"
    untouched.write_text("x")
    bench_openvino.ensure_export(source, folder, progress=lines.append)
    assert untouched.exists()  # same source, same options: kept
    add_bf16_copy(source)  # the export never reads the bf16 copies: still the same source
    assert bench_openvino.source_hash(source) == first_hash
    config = source / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("{", '{\n  "bench_test_change": 1,', 1))
    bench_openvino.ensure_export(source, folder, progress=lines.append)
    assert not untouched.exists()  # exported again
    assert json.loads((folder / bench_openvino.EXPORT_MARKER).read_text())["source_sha256"] != first_hash
    assert any("exporting again" in line for line in lines)
    stranger = tmp_path / "cache" / "someone-elses"
    stranger.mkdir()
    (stranger / "weights").write_text("x")
    with pytest.raises(bench_openvino.ExportError, match="not a bench export"):
        bench_openvino.ensure_export(source, stranger)
    assert (stranger / "weights").read_text() == "x"
    with pytest.raises(bench_openvino.ExportError, match="run make install-export"):
        bench_openvino.ensure_export(source, tmp_path / "new", python=tmp_path / "no-python")
    # The float export is asked for in the exporter's default format by name, and the marker says which:
    # an export made before fp16 became the default (no weight_format) is made again.
    marker = json.loads((folder / bench_openvino.EXPORT_MARKER).read_text())
    assert marker["weight_format"] == "fp16"
    assert bench_openvino.stored_weights(folder / OPENVINO_UNET) == "fp16"
    marker.pop("weight_format")
    (folder / bench_openvino.EXPORT_MARKER).write_text(json.dumps(marker))
    bench_openvino.ensure_export(source, folder, progress=lines.append)
    assert json.loads((folder / bench_openvino.EXPORT_MARKER).read_text())["weight_format"] == "fp16"


def test_the_int8_exports_marker_and_command_are_those_from_before_weight_formats() -> None:
    # A quantised export's recipe did not change (an fp32 base): its existing exports stay valid.
    assert bench_openvino.export_marker("abc", "int8", 4) == {
        "source_sha256": "abc",
        "quantize": "int8",
        "calibration_samples": 4,
    }
    command = bench_openvino.export_command(Path("s"), Path("o"), "int8", 4, Path("py"))
    assert "--weight-format" not in command
    assert bench_openvino.export_command(Path("s"), Path("o"), None, None, Path("py"))[-2:] == [
        "--weight-format",
        "fp16",
    ]


def test_kernel_record_is_each_layer_types_kernels_from_the_real_profile(
    tiny_model_dir: Path, openvino_cache: Path
) -> None:
    unet = bench_openvino.export_folder(openvino_cache, tiny_model_dir, None) / OPENVINO_UNET
    profile = bench_openvino.profile_unet(unet, 64, 64, 2)
    summary = bench_openvino.summarize_kernels(profile)
    executed = [node for node in profile if node["status"] == "EXECUTED"]
    assert 0 < len(executed) < len(profile)  # fused and optimised-out nodes are left out
    assert sum(kernel["count"] for kernels in summary.values() for kernel in kernels.values()) == len(
        executed
    )
    assert any("conv" in exec_type for exec_type in summary["Convolution"])
    assert "FullyConnected" in summary
    record = bench_openvino.record_kernels(unet, 64, 64, 2, bench.ISA_ENV["avx2"])
    assert record["unet_batch"] == 2
    assert set(record["by_layer_type"]) == set(summary)
    assert record["above_avx2"] == []


def test_kernel_summary_counts_executed_nodes_and_flags_kernels_above_avx2() -> None:
    def node(node_type: str, exec_type: str, ms: float, status: str = "EXECUTED") -> dict[str, Any]:
        return {"node_type": node_type, "exec_type": exec_type, "real_ms": ms, "status": status}

    profile = [
        node("Convolution", "brgconv_avx2_f32", 2.0),
        node("Convolution", "brgconv_avx2_f32", 1.5),
        node("Convolution", "brgconv_avx512_core_f32", 4.0),
        node("FullyConnected", "gemm_mlas_f32", 3.0),
        node("Add", "undef", 0.0, status="NOT_RUN"),
        node("Multiply", "undef", 0.0, status="OPTIMIZED_OUT"),
    ]
    summary = bench_openvino.summarize_kernels(profile)
    assert summary == {
        "Convolution": {
            "brgconv_avx512_core_f32": {"count": 1, "ms": 4.0},
            "brgconv_avx2_f32": {"count": 2, "ms": 3.5},
        },
        "FullyConnected": {"gemm_mlas_f32": {"count": 1, "ms": 3.0}},
    }
    assert list(summary) == ["Convolution", "FullyConnected"]  # the most expensive layer type first
    assert bench_openvino.above_avx2(summary) == ["brgconv_avx512_core_f32"]
    line = bench.format_kernels(
        "avx2/openvino", {"unet_batch": 2, "by_layer_type": summary, "above_avx2": []}
    )
    assert line.startswith("kernels avx2/openvino (UNet batch 2): Convolution (brgconv_avx512_core_f32 38%")
    assert line.endswith("FullyConnected (gemm_mlas_f32 29%); above AVX2: none")


def test_static_shapes_fill_the_batch_and_the_latent_size() -> None:
    inputs = [
        ("sample", [None, 4, None, None]),
        ("timestep", [None]),
        ("encoder_hidden_states", [None, 77, 768]),
    ]
    assert bench_openvino.static_shapes(inputs, 2, (64, 48)) == {
        "sample": [2, 4, 64, 48],
        "timestep": [2],
        "encoder_hidden_states": [2, 77, 768],
    }
    with pytest.raises(ValueError, match="cannot infer"):
        bench_openvino.static_shapes([("tokens", [1, None])], 2, (64, 64))


def test_the_avx2_cap_reaches_every_library_and_openvino_workers_get_an_empty_compile_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, str]] = []

    def fake_run(command: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        cache = env.get("SD_OPENVINO_CACHE_DIR")
        seen.append({**env, "cache_existed": str(cache is not None and Path(cache).is_dir())})
        result = bench_worker.RESULT_PREFIX + json.dumps({"variant": json.loads(command[-1])["variant"]})
        return subprocess.CompletedProcess(command, 0, stdout=result + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.delenv("SD_OPENVINO_CACHE_DIR", raising=False)
    config = bench.BenchConfig(tmp_path, 64, 64, 1, 0, 1, ("avx2",), openvino_model_dir=tmp_path)
    bench.run_worker(config, "openvino", "avx2")
    bench.run_worker(config, "naive", "native")
    capped, native = seen
    for name in ("ONEDNN_MAX_CPU_ISA", "OV_CPU_MAX_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        assert capped[name] == "AVX2"
        assert name not in native or native[name] != "AVX2"
    assert capped["ATEN_CPU_CAPABILITY"] == "avx2"
    assert capped["cache_existed"] == "True"  # a fresh folder per process, removed after it
    assert not Path(capped["SD_OPENVINO_CACHE_DIR"]).exists()
    assert "SD_OPENVINO_CACHE_DIR" not in native


def _plot_report(isas: tuple[str, ...], variants: tuple[str, ...]) -> dict[str, Any]:
    results = {}
    for isa_index, isa in enumerate(isas):
        for index, variant in enumerate(variants):
            seconds = 100.0 / (index + 1) + isa_index
            results[f"{isa}/{variant}"] = {"isa": isa, "variant": variant, "seconds_per_image": seconds}
    return {"results": results, "config": {"width": 512, "height": 512, "steps": 4}}


def test_the_plot_has_one_bar_per_variant_and_isa(tmp_path: Path) -> None:
    from PIL import Image

    from sd_lambda.devtools import bench_plot

    variants = ("naive", "accel:default", "fast", "openvino", "openvino_fast", "openvino_int8")
    report = _plot_report(("avx2", "native"), variants)
    path = tmp_path / "bench.png"
    bars = bench_plot.write_plot(report, path)
    assert [(isa, variant) for isa, variant, _, _ in bars] == [
        (isa, variant) for isa in ("avx2", "native") for variant in variants
    ]
    assert bars[0][3] == 1.0  # speed-ups over each ISA's naive
    assert bars[3][3] == pytest.approx(4.0)
    opened = Image.open(path)
    assert opened.format == "PNG"
    image = opened.convert("RGB")
    # Every bar stands on the axis: the lowest row with a bar colour crosses all of them.
    colours = {
        tuple(int(code[i : i + 2], 16) for i in (1, 3, 5)): isa
        for isa, code in bench_plot.ISA_COLOURS.items()
    }
    width, height = image.size
    pixels = image.load()
    bottom = max(y for y in range(height) for x in range(0, width, 4) if pixels[x, y] in colours)
    runs = {"avx2": 0, "native": 0}
    previous = None
    for x in range(width):
        current = colours.get(pixels[x, bottom])
        if current is not None and current != previous:
            runs[current] += 1
        previous = current
    assert runs == {"avx2": len(variants), "native": len(variants)}


def test_openvino_variants_run_beside_the_torch_ones_end_to_end(
    tiny_model_dir: Path, openvino_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    out = tmp_path / "bench.json"
    variants = "naive,accel:default,fast,openvino,openvino_fast,openvino_int8"
    argv = ["bench", "--quick", "--model-dir", str(tiny_model_dir), "--size", "64", "--isa", "avx2"]
    argv += ["--variants", variants, "--cache", str(openvino_cache), "-o", str(out)]
    assert main([*argv, "--calibration-samples", str(CALIBRATION_SAMPLES)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {f"avx2/{v}" for v in variants.split(",")}
    torch_like, ov_like = results["avx2/accel:default"], results["avx2/openvino"]
    # Like-for-like: the same UNet calls (steps, one call per step), guidance and decoder as the torch
    # engine's. Both replace the model's PNDM; GenAI has no DPM-Solver++, so its replacement is Euler.
    assert (ov_like["unet_calls"], ov_like["unet_batch"], ov_like["decoder"]) == (
        torch_like["unet_calls"],
        2,
        "full",
    )
    assert (torch_like["scheduler"], ov_like["scheduler"]) == ("dpmpp_2m", "euler")
    assert (ov_like["weights"], ov_like["dtype"]) == ("IR fp16", "float32")
    assert results["avx2/openvino_fast"]["decoder"] == "tiny"
    assert results["avx2/openvino_int8"]["weights"] == "IR int8"
    config = report["config"]
    assert config["openvino_model_dir"] == str(
        bench_openvino.export_folder(openvino_cache, tiny_model_dir, None)
    )
    samples = {sample["variant"]: sample for sample in report["samples"]}
    for variant in ("openvino", "openvino_fast", "openvino_int8"):
        assert samples[variant]["torch_after_load"] is False  # the torch-free runtime, import and load
        assert samples[variant]["cached_load_seconds"] > 0
        assert samples[variant]["images"][0]["compile_seconds"] >= 0
        assert report["kernels"][f"avx2/{variant}"]["above_avx2"] == []
    assert samples["accel:default"]["cached_load_seconds"] is None
    assert samples["accel:default"]["torch_after_load"] is True
    assert report["kernels"]["avx2/openvino"] == report["kernels"]["avx2/openvino_fast"]  # one profile
    int8_kernels = report["kernels"]["avx2/openvino_int8"]["by_layer_type"]
    assert any("i8" in exec_type.lower() for exec_type in int8_kernels["Convolution"])
    targets = report["targets"]["avx2"]
    assert targets["openvino_over_accel:default"]["target"] == 1.35
    assert targets["openvino_over_accel:default"]["value"] == pytest.approx(
        torch_like["seconds_per_image"] / ov_like["seconds_per_image"], abs=1e-3
    )
    assert targets["openvino_fast_peak_rss_gb_vs_fast"]["target"] == results["avx2/fast"]["peak_rss_gb"]
    assert targets["openvino_import_load_seconds"]["target"] == 1.5
    assert targets["openvino_fast_speedup"]["target"] == targets["openvino_int8_speedup"]["target"] == 3.0
    plot = Image.open(out.with_suffix(".png"))
    assert plot.size[0] > plot.size[1] > 0
    printed = capsys.readouterr().out
    assert "kernels avx2/openvino (UNet batch 2): " in printed
    assert f"wrote {out} and {out.with_suffix('.png')}" in printed
