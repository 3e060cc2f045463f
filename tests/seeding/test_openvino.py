"""OpenVINO releases: ``seed --export openvino [--weight-format fp32 | --quantize int8]`` converts in the
export venv, a ready-made OpenVINO repo seeds as it is, and either way the release is staged, verified and
switched like any other; an OpenVINO IR's ``.bin`` beside its ``.xml`` is weights, any other ``.bin`` is a
refused pickle."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from sd_lambda.cli import main
from sd_lambda.devtools.bench_openvino import constant_bytes
from sd_lambda.layout import OPENVINO_UNET, Manifest, ModelPaths, release_engine, verify_release
from sd_lambda.seeding import flow, openvino_export
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.openvino_release import ExportOptions, _export_key, check_options, export_openvino
from sd_lambda.seeding.sources import check_dir, from_dir, from_hub, select_hub_files

from .conftest import (
    EXPORT_PYTHON,
    TEST_CALIBRATION_SAMPLES,
    Bucket,
    LocalAgent,
    OpenVINOExport,
    SeederProgram,
    make_model,
)
from .test_sources import COMMIT, FakeHub, install_fake_hub

NAME = "acme--tiny-sd"
# What optimum-intel's export writes for the tiny test model, plus the tiny decoder's IR.
IR_FOLDERS = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "vae_tiny")


def export_seed(source: Path, export: OpenVINOExport) -> list[str]:
    """``seed --export openvino`` of ``source``, reusing the session's export of it."""
    seed = ["seed", "--from-dir", str(source), "--export", "openvino", "--name", NAME]
    return [*seed, "--export-python", str(EXPORT_PYTHON), "--work-dir", str(export.work_dir)]


def test_an_exported_release_seeds_verifies_and_switches(
    local_aws: tuple[LocalAgent, list[str]],
    seeder: SeederProgram,
    tiny_model_dir: Path,
    openvino_export: OpenVINOExport,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent, stack = local_aws
    # The conversion (and the upload) come before the seeder starts, so it never idles through an export.
    events: list[str] = []
    stage_local, seeder_session = flow.stage_local, flow.seeder_session
    monkeypatch.setattr(flow, "stage_local", lambda *a, **k: events.append("upload") or stage_local(*a, **k))
    monkeypatch.setattr(flow, "seeder_session", lambda *a: events.append("seeder") or seeder_session(*a))
    seed = export_seed(tiny_model_dir, openvino_export)
    assert main([*seed, "--no-progress", "--json", *stack]) == 0, capsys.readouterr().err
    assert events == ["upload", "seeder"]
    out, err = capsys.readouterr()
    seeded = json.loads(out)
    source_revision = from_dir(tiny_model_dir).revision
    assert seeded["revision"] == seeded["current"] == f"{source_revision}-openvino"
    # The session's export under --work-dir is the one this run seeds: converted once, reused.
    assert f"reusing the OpenVINO export in {openvino_export.folder}" in err

    paths = ModelPaths(seeder.mount / NAME)
    release = paths.resolve_current()
    manifest = verify_release(release)
    assert manifest.problems(release) == []
    assert manifest.source == f"dir:{tiny_model_dir.resolve()} -> openvino fp16"
    listed = {entry.path for entry in manifest.files}
    assert release_engine(listed) == "openvino"
    for folder in IR_FOLDERS:
        assert {f"{folder}/openvino_model.xml", f"{folder}/openvino_model.bin"} <= listed, folder
    assert {"tokenizer/openvino_tokenizer.xml", "tokenizer/openvino_tokenizer.bin"} <= listed
    assert not [path for path in listed if path.endswith(".safetensors")]
    assert len(agent.scripts) == 1  # one sync, nothing else ran on the seeder


@pytest.mark.parametrize("pickle", ["unet/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin"])
def test_a_pickle_inside_an_openvino_release_is_refused_everywhere(
    openvino_export: OpenVINOExport,
    seeder: SeederProgram,
    bucket: Bucket,
    tmp_path: Path,
    pickle: str,
) -> None:
    folder = tmp_path / "release"
    shutil.copytree(openvino_export.folder, folder)
    (folder / pickle).write_bytes(b"pickle")

    with pytest.raises(SeedError, match=f"pickle weights are refused .*: {re.escape(pickle)}$"):
        check_dir(folder)
    assert Manifest.build(folder, "test").problems(folder) == [f"{pickle}: pickle weights are refused"]
    bucket.put_folder(folder, NAME, "r1")
    outcome = seeder.run("sync", NAME, "r1")
    assert outcome.returncode == 1
    assert f"pickle weights are refused: {pickle}" in outcome.stderr
    assert ModelPaths(seeder.mount / NAME).current_revision() is None


def test_the_weights_beside_their_graphs_are_accepted_and_sync(
    openvino_export: OpenVINOExport, seeder: SeederProgram, bucket: Bucket
) -> None:
    folder = openvino_export.folder
    assert set(check_dir(folder)) == set(openvino_export.release.files)
    assert Manifest.build(folder, "test").problems(folder) == []
    bucket.put_folder(folder, NAME, "r1")
    outcome = seeder.run("sync", NAME, "r1")
    assert outcome.returncode == 0, outcome.stderr
    assert ModelPaths(seeder.mount / NAME).current_revision() == "r1"


def test_a_bin_without_its_xml_is_a_pickle(openvino_export: OpenVINOExport, tmp_path: Path) -> None:
    folder = tmp_path / "release"
    shutil.copytree(openvino_export.folder, folder)
    (folder / "text_encoder" / "openvino_model.xml").unlink()
    with pytest.raises(SeedError, match=r"pickle weights are refused .*: text_encoder/openvino_model\.bin$"):
        check_dir(folder)
    problems = Manifest.build(folder, "test").problems(folder)
    assert problems == ["text_encoder/openvino_model.bin: pickle weights are refused"]


# --- ready-made OpenVINO repos on the hub -------------------------------------------------------------

OPENVINO_REPO = [
    "model_index.json",
    "README.md",
    "openvino_config.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/openvino_model.xml",
    "text_encoder/openvino_model.bin",
    "text_encoder/pytorch_model.bin",  # a pickle beside the IR: never taken
    "tokenizer/openvino_tokenizer.xml",
    "tokenizer/openvino_tokenizer.bin",
    "tokenizer/openvino_detokenizer.xml",
    "tokenizer/openvino_detokenizer.bin",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "unet/config.json",
    "unet/openvino_model.xml",
    "unet/openvino_model.bin",
    "unet/diffusion_pytorch_model.bin",
    "vae_decoder/config.json",
    "vae_decoder/openvino_model.xml",
    "vae_decoder/openvino_model.bin",
    "vae_encoder/config.json",
    "vae_encoder/openvino_model.xml",
    "vae_encoder/openvino_model.bin",
    "safety_checker/openvino_model.xml",  # not a component the engine loads
    "safety_checker/openvino_model.bin",
]
# What pipeline.served_folders asks for in an OpenVINO repo.
OPENVINO_FOLDERS = [
    "scheduler",
    "text_encoder",
    "tokenizer",
    "unet",
    "vae_decoder",
    "vae_encoder",
    "vae_tiny",
]


def test_hub_selection_takes_an_openvino_repos_ir_and_configs() -> None:
    chosen = select_hub_files(OPENVINO_REPO, OPENVINO_FOLDERS, variant=None)
    assert chosen == {path: path for path in OPENVINO_REPO if _taken(path)}
    assert all(release == repo for repo, release in chosen.items())


def _taken(path: str) -> bool:
    folder = path.split("/")[0] if "/" in path else None
    if folder is None:
        return path == "model_index.json"
    return folder != "safety_checker" and not path.endswith(("pytorch_model.bin",))


def test_hub_selection_refuses_an_openvino_component_of_pickles_only() -> None:
    listing = [*OPENVINO_REPO, "text_encoder_2/config.json", "text_encoder_2/pytorch_model.bin"]
    with pytest.raises(SeedError, match=r"text_encoder_2/ has only pickle weights on the hub: .*OpenVINO IR"):
        select_hub_files(listing, [*OPENVINO_FOLDERS, "text_encoder_2"], variant=None)


@pytest.fixture
def openvino_hub(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, openvino_export: OpenVINOExport, tmp_path: Path
) -> FakeHub:
    """The fake hub of test_sources, plus ``acme/tiny-sd-ov``: the exported tiny model as a ready-made
    OpenVINO repo (no vae_tiny, as on the hub), with a pickle and a safety checker's IR beside it."""
    fake = install_fake_hub(monkeypatch, tiny_model_dir, tmp_path)
    repo = tmp_path / "ov-repo"
    shutil.copytree(openvino_export.folder, repo, ignore=shutil.ignore_patterns("vae_tiny"))
    (repo / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (repo / "safety_checker").mkdir()
    (repo / "safety_checker" / "openvino_model.xml").write_text("<net/>")
    fake.repos["acme/tiny-sd-ov"] = repo
    return fake


def test_a_ready_made_openvino_repo_seeds_as_it_is(openvino_hub: FakeHub, tmp_path: Path) -> None:
    release = from_hub("acme/tiny-sd-ov", tmp_path / "work")
    downloaded = {name for _, _, names in openvino_hub.downloads for name in names}
    assert not [name for name in downloaded if name.endswith("diffusion_pytorch_model.bin")]
    assert not [name for name in downloaded if name.startswith("safety_checker/")]
    expected = set(openvino_export_files(openvino_hub.repos["acme/tiny-sd-ov"])) - {
        "unet/diffusion_pytorch_model.bin",
        "safety_checker/openvino_model.xml",
    }
    assert set(release.files) == expected
    assert release_engine(release.files) == "openvino"
    assert release.revision == COMMIT[:12]
    # model_index.json lists vae (served as vae_decoder/ + vae_encoder/) and is kept as the repo has it.
    assert json.loads(release.files["model_index.json"].read_text())["vae"] == ["diffusers", "AutoencoderKL"]


def openvino_export_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"for_export": True},
            "acme/tiny-sd-ov on the hub is an OpenVINO release already (unet/openvino_model.xml): it seeds "
            "as it is, without --export",
        ),
        ({"variant": "fp16"}, "--variant picks safetensors weights; drop it"),
        (
            {"tiny_decoder": "acme/taesd"},
            "seed the diffusers repo with --tiny-decoder and pass --export openvino",
        ),
    ],
)
def test_an_openvino_repo_refuses_what_would_change_it(
    openvino_hub: FakeHub, tmp_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(SeedError) as caught:
        from_hub("acme/tiny-sd-ov", tmp_path / "work", **options)  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert openvino_hub.downloads == []  # refused from the listing: not a byte downloaded


# --- the int8 export -----------------------------------------------------------------------------------


def _ir_layers(xml: Path) -> list[ElementTree.Element]:
    return ElementTree.parse(xml).getroot().findall("./layers/layer")


def _int8_constants(xml: Path) -> int:
    return sum(
        1
        for layer in _ir_layers(xml)
        if layer.get("type") == "Const"
        and (data := layer.find("data")) is not None
        and data.get("element_type") in ("u8", "i8")
    )


def _float_constants(xml: Path) -> dict[str, int]:
    """Bytes of the IR's floating-point constants, by element type."""
    return {kind: size for kind, size in constant_bytes(xml).items() if kind in ("f16", "f32")}


def test_the_float_export_stores_fp16_weights_unless_asked_for_fp32(
    openvino_export: OpenVINOExport, openvino_fp32_export: OpenVINOExport, tiny_model_dir: Path
) -> None:
    source_revision = from_dir(tiny_model_dir).revision
    assert openvino_export.release.revision == f"{source_revision}-openvino"
    assert openvino_fp32_export.release.revision == f"{source_revision}-openvino-fp32"
    assert openvino_fp32_export.release.manifest.source == f"dir:{tiny_model_dir.resolve()} -> openvino fp32"
    for component in IR_FOLDERS:
        graph = f"{component}/openvino_model.xml"
        half = _float_constants(openvino_export.folder / graph)
        full = _float_constants(openvino_fp32_export.folder / graph)
        # Every weight of the default export is fp16 (widened by a Convert when compiled); fp32 holds none.
        assert half.get("f16", 0) > 0.99 * sum(half.values()), component
        assert "f16" not in full, component
        assert sum(half.values()) * 2 == pytest.approx(sum(full.values()), rel=0.01), component


def test_the_export_key_tells_the_formats_apart_and_keeps_int8_exports_reusable(tiny_model_dir: Path) -> None:
    import hashlib

    release = from_dir(tiny_model_dir)

    def key(**options: object) -> str:
        return _export_key(release, ExportOptions(EXPORT_PYTHON, **options))  # type: ignore[arg-type]

    assert key() == key(weight_format="fp16")
    assert len({key(), key(weight_format="fp32"), key(quantize="int8")}) == 3
    # An int8 export's key is the one it had before weight formats (its recipe did not change), so an
    # int8 export made then is still reused instead of calibrated again under the same release name.
    before = {
        "files": [[entry.path, entry.sha256] for entry in release.manifest.files],
        "quantize": "int8",
        "samples": openvino_export.DEFAULT_CALIBRATION_SAMPLES,
        "prompts": None,
    }
    assert key(quantize="int8") == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()


def test_the_exporter_refuses_a_weight_format_for_a_quantised_export(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    both = ["--weight-format", "fp16", "--quantize", "int8"]
    module = "sd_lambda.seeding.openvino_export"
    completed = subprocess.run(
        [str(EXPORT_PYTHON), "-m", module, str(tiny_model_dir), str(tmp_path / "o"), *both],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    assert (
        completed.stderr.strip()
        .splitlines()[-1]
        .endswith("error: --weight-format applies to a float export: --quantize stores int8 weights")
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(SeedError, match=r"^--weight-format applies to a float export and --quantize stores"):
        check_options(ExportOptions(EXPORT_PYTHON, quantize="int8", weight_format="fp32"))


def test_the_int8_export_quantizes_the_unet_and_compresses_the_other_weights(
    openvino_int8_export: OpenVINOExport, openvino_export: OpenVINOExport, tiny_model_dir: Path
) -> None:
    release = openvino_int8_export.release
    assert release.revision == f"{from_dir(tiny_model_dir).revision}-openvino-int8"
    assert release.manifest.source == (
        f"dir:{tiny_model_dir.resolve()} -> openvino int8 "
        f"(hybrid, {TEST_CALIBRATION_SAMPLES} calibration samples, built-in prompts)"
    )
    folder = openvino_int8_export.folder
    unet = folder / OPENVINO_UNET
    # Activations: FakeQuantize (int8) or FakeConvert (fp8) nodes calibrated on the prompts; weights: int8.
    quantizers = [layer for layer in _ir_layers(unet) if layer.get("type") in ("FakeQuantize", "FakeConvert")]
    assert quantizers
    assert _int8_constants(unet) > 0
    for component in ("text_encoder", "vae_decoder", "vae_encoder", "vae_tiny"):
        assert _int8_constants(folder / component / "openvino_model.xml") > 0, component
    # The floating-point export has neither.
    float_unet = openvino_export.folder / OPENVINO_UNET
    assert not [layer for layer in _ir_layers(float_unet) if layer.get("type") == "FakeQuantize"]
    assert _int8_constants(float_unet) == 0
    assert (folder / "tokenizer" / "openvino_tokenizer.xml").is_file()


def test_openvino_genai_generates_from_the_int8_release(openvino_int8_export: OpenVINOExport) -> None:
    import numpy as np
    import openvino_genai

    pipeline = openvino_genai.Text2ImagePipeline(str(openvino_int8_export.folder), "CPU")
    image = np.asarray(pipeline.generate("a red fox", width=64, height=64, num_inference_steps=2).data)
    assert image.shape == (1, 64, 64, 3)
    assert image.std() > 0  # an image, not a blank


# --- export failures and the CLI's refusals, before AWS ------------------------------------------------


def test_an_export_failure_is_one_line_with_the_exporters_last_words(tmp_path: Path) -> None:
    """A folder that passes the seeding checks but is no loadable pipeline (no configs): the exporter
    fails, and its error comes back on one line; nothing is left to be reused."""
    folder = make_model(tmp_path / "not-loadable", "v1")
    with pytest.raises(SeedError) as caught:
        export_openvino(from_dir(folder), tmp_path / "work", ExportOptions(EXPORT_PYTHON))
    message = str(caught.value)
    assert message.startswith("the OpenVINO export failed (exit 1): ")
    assert "\n" not in message
    log = Path(message.rsplit("(log: ", 1)[1].rstrip(")"))
    assert log.is_file()
    assert message.split(": ", 1)[1].split(" (log: ")[0].split(" | ")[-1] in log.read_text()
    assert [p.name for p in (tmp_path / "work" / "openvino-exports").iterdir()] == [log.name]


STACK = ["--bucket", "b", "--instance-id", "i-1", "--region", "eu-west-1"]


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(region: str | None) -> flow.AwsClients:
        raise AssertionError("AWS must not be asked")

    monkeypatch.setattr(flow.AwsClients, "create", refuse)


def _refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(["seed", *argv, *STACK]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sd-lambda seed: error: ")
    return err


def test_every_export_refusal_is_one_line_before_aws(
    no_aws: None,
    capsys: pytest.CaptureFixture[str],
    tiny_model_dir: Path,
    openvino_export: OpenVINOExport,
    tmp_path: Path,
) -> None:
    source = ["--from-dir", str(tiny_model_dir)]
    export = ["--export", "openvino", "--export-python", str(EXPORT_PYTHON)]
    assert "--quantize applies to an export: pass --export openvino" in _refusal(
        capsys, [*source, "--quantize", "int8"]
    )
    assert "--weight-format applies to an export: pass --export openvino" in _refusal(
        capsys, [*source, "--weight-format", "fp32"]
    )
    assert (
        "--weight-format applies to a float export and --quantize stores int8 weights: drop one"
        in _refusal(capsys, [*source, *export, "--weight-format", "fp16", "--quantize", "int8"])
    )
    assert "--calibration-prompts and --calibration-samples apply to --quantize" in _refusal(
        capsys, [*source, *export, "--calibration-samples", "5"]
    )
    assert "--export applies to --model and --from-dir" in _refusal(
        capsys, ["--from-s3", "s3://b/models/m/r1/", *export]
    )
    both = [*source, *export, "--bf16-copy"]
    assert "--export and --bf16-copy exclude each other" in _refusal(capsys, both)
    missing = tmp_path / "no-venv" / "bin" / "python"
    assert f"no export Python at {missing}: run make install-export" in _refusal(
        capsys, [*source, "--export", "openvino", "--export-python", str(missing)]
    )
    # This test's own Python is the dev venv's: it has no optimum-intel.
    assert f"{sys.executable} cannot import optimum.intel (" in _refusal(
        capsys, [*source, "--export", "openvino", "--export-python", sys.executable]
    )
    assert "): run make install-export" in _refusal(
        capsys, [*source, "--export", "openvino", "--export-python", sys.executable]
    )
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    assert f"--calibration-prompts: {empty} holds no prompt (one a line)" in _refusal(
        capsys, [*source, *export, "--quantize", "int8", "--calibration-prompts", str(empty)]
    )
    assert "--calibration-samples must be at least 1" in _refusal(
        capsys, [*source, *export, "--quantize", "int8", "--calibration-samples", "0"]
    )
    converted = ["--from-dir", str(openvino_export.folder)]
    assert (
        f"{openvino_export.folder} is an OpenVINO release already (unet/openvino_model.xml): it seeds as it "
        "is, without --export"
    ) in _refusal(capsys, [*converted, *export])


def test_the_export_refuses_a_checkpoint_it_would_load_as_random_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Tensor names as a newer transformers writes them (no text_model. prefix): the export venv's
    # transformers would initialise the whole text encoder at random, and the release would be noise.
    from safetensors.torch import load_file, save_file

    source = shutil.copytree(tiny_model_dir, tmp_path / "source")
    weights = source / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    save_file({name.removeprefix("text_model."): t for name, t in tensors.items()}, weights)
    completed = subprocess.run(
        [str(EXPORT_PYTHON), "-m", "sd_lambda.seeding.openvino_export", str(source), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 1
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("openvino_export: text_encoder: 36 weights transformers ")
    assert "exporting would write random weights" in last
    assert not (tmp_path / "out").exists()


def test_upload_only_then_from_s3_switches_the_openvino_release(
    local_aws: tuple[LocalAgent, list[str]],
    seeder: SeederProgram,
    tiny_model_dir: Path,
    openvino_export: OpenVINOExport,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """README's switch to the OpenVINO image: convert and upload first, switch after the image is deployed."""
    agent, stack = local_aws
    seed = export_seed(tiny_model_dir, openvino_export)
    assert main([*seed, "--upload-only", "--no-progress", "--json", *stack]) == 0, capsys.readouterr().err
    uploaded = json.loads(capsys.readouterr().out)
    assert agent.scripts == []  # nothing ran on the seeder, nothing switched
    assert ModelPaths(seeder.mount / NAME).current_revision() is None
    switch = ["seed", "--from-s3", uploaded["uploaded"], "--name", NAME, "--no-progress", "--json", *stack]
    assert main(switch) == 0, capsys.readouterr().err
    seeded = json.loads(capsys.readouterr().out)
    assert seeded["current"] == uploaded["revision"]
    release = ModelPaths(seeder.mount / NAME).resolve_current()
    assert (release / OPENVINO_UNET).is_file()
    assert verify_release(release).problems(release) == []


@pytest.mark.parametrize(
    ("removed", "named"),
    [
        (["unet/openvino_model.bin"], "unet/openvino_model.bin"),
        (
            ["tokenizer/openvino_tokenizer.xml", "tokenizer/openvino_tokenizer.bin"],
            "tokenizer/openvino_tokenizer.xml",
        ),
    ],
)
def test_an_openvino_release_the_engine_cannot_load_is_refused_before_upload(
    openvino_export: OpenVINOExport, tmp_path: Path, removed: list[str], named: str
) -> None:
    folder = shutil.copytree(openvino_export.folder, tmp_path / "release")
    for path in removed:
        (folder / path).unlink()
    with pytest.raises(
        SeedError, match=f"an OpenVINO release the engine cannot load: missing .*{re.escape(named)}"
    ):
        check_dir(folder)
