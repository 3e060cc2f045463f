"""``sd-lambda seed`` and ``sd-lambda rollback``: put a model on EFS, or switch back to an older revision."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sd_lambda.cli import WORK_DIR, add_json_flag, ask_for, option, report
from sd_lambda.layout import DEFAULT_KEEP, LayoutError, check_name
from sd_lambda.seeding.errors import SeedError


def _stack_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("stack (default: the outputs of the Terraform root in --infra)")
    group.add_argument("--infra", type=Path, default=Path("infra"), help="the Terraform root")
    group.add_argument("--bucket", help="weights bucket (output weights_bucket_name)")
    group.add_argument("--prefix", help="key prefix in the bucket (output weights_prefix, default models/)")
    group.add_argument("--instance-id", help="seeder instance id (output seeder_instance_id)")
    group.add_argument("--mount-path", help="EFS mount on the seeder (output seeder_mount_path)")
    group.add_argument("--region", help="AWS region (output region)")
    run = parser.add_argument_group("seeder run")
    run.add_argument("--keep-running", action="store_true", help="leave the seeder running afterwards")
    run.add_argument(
        "--command-timeout", type=int, default=3600, help="executionTimeout of the SSM command (s)"
    )
    run.add_argument("--online-timeout", type=float, default=600, help="wait for the SSM agent this long (s)")
    run.add_argument(
        "--lock-timeout", type=float, default=0, help="wait this long for another run's lock (s)"
    )
    add_json_flag(parser)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    # The export module's constants, not its converter: it imports only the standard library up front.
    from sd_lambda.seeding.openvino_export import (
        DEFAULT_CALIBRATION_SAMPLES,
        DEFAULT_WEIGHT_FORMAT,
        QUANTIZE_MODES,
        WEIGHT_FORMATS,
    )
    from sd_lambda.seeding.openvino_release import DEFAULT_EXPORT_PYTHON, EXPORT_FORMATS

    group = parser.add_argument_group(
        "OpenVINO export (a diffusers source converted on this machine, in the export venv)"
    )
    group.add_argument(
        "--export",
        choices=EXPORT_FORMATS,
        help="convert the source to OpenVINO IR (optimum-intel) and seed that; needs make install-export",
    )
    group.add_argument(
        "--weight-format",
        choices=WEIGHT_FORMATS,
        help=f"with --export: how the release stores its float weights (default: {DEFAULT_WEIGHT_FORMAT}, "
        "as the hub's OpenVINO repos; the engine computes at its inference precision either way; not "
        "with --quantize)",
    )
    group.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="with --export: hybrid int8 quantisation (NNCF; changes the image)",
    )
    group.add_argument(
        "--export-python",
        type=Path,
        default=DEFAULT_EXPORT_PYTHON,
        metavar="PATH",
        help="the export venv's Python, relative to the current directory (make install-export)",
    )
    group.add_argument(
        "--calibration-prompts",
        type=Path,
        metavar="FILE",
        help="with --quantize: calibration prompts, one a line (default: a built-in list)",
    )
    group.add_argument(
        "--calibration-samples",
        type=int,
        metavar="N",
        help=f"with --quantize: UNet calls calibrated on (default: {DEFAULT_CALIBRATION_SAMPLES})",
    )


def _export_options(args: argparse.Namespace) -> Any:
    """The export asked for, checked before AWS (None: no export)."""
    from sd_lambda.seeding.openvino_release import ExportOptions, check_options

    calibrating = args.calibration_prompts is not None or args.calibration_samples is not None
    for name in ("--quantize", "--weight-format"):
        if getattr(args, name[2:].replace("-", "_")) and not args.export:
            raise SeedError(f"{option(name)} applies to an export: {ask_for('--export', 'openvino')}")
    if calibrating and not args.quantize:
        raise SeedError(f"--calibration-prompts and --calibration-samples apply to {option('--quantize')}")
    if not args.export:
        return None
    if args.from_s3:
        raise SeedError(
            f"{option('--export')} applies to --model and --from-dir (an uploaded revision is as stored)"
        )
    if args.bf16_copy:
        raise SeedError(
            f"{option('--export')} and {option('--bf16-copy')} exclude each other: a bf16 copy is "
            "safetensors for the torch engine"
        )
    options = ExportOptions(
        args.export_python,
        args.quantize,
        args.calibration_prompts,
        args.calibration_samples,
        args.weight_format,
    )
    check_options(options)
    return options


def register(subparsers: argparse._SubParsersAction) -> None:
    seed = subparsers.add_parser(
        "seed",
        help="put a model on EFS: hub/folder/S3 -> S3 -> seeder (SSM) -> new revision, switched atomically",
        description="Put a model on EFS: from the Hugging Face Hub, a local diffusers folder or an uploaded "
        "S3 revision, through the weights bucket and the seeder instance (SSM), as a new revision that "
        "becomes current atomically. The stack's values come from the Terraform outputs in --infra.",
    )
    source = seed.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", metavar="HUB_ID[@REV]", help="Hugging Face Hub pipeline, e.g. segmind/tiny-sd"
    )
    source.add_argument("--from-dir", type=Path, metavar="PATH", help="local diffusers folder")
    source.add_argument(
        "--from-s3", metavar="S3_URL", help="an uploaded revision: s3://bucket/models/NAME/REV/"
    )
    seed.add_argument(
        "--name",
        help="model folder on EFS (default: the model the stack serves, its model_name output; without "
        "stack outputs, the hub id's slug or the S3 URL's model folder)",
    )
    seed.add_argument(
        "--not-served",
        action="store_true",
        help="allow a --name the function does not serve (a second model, e.g. before switching model_name)",
    )
    seed.add_argument("--revision", help="release name (default: hub commit, or a content hash)")
    seed.add_argument("--variant", help="hub weights variant, e.g. fp16 (stored under the plain file names)")
    seed.add_argument(
        "--tiny-decoder", metavar="HUB_ID[@REV]", help="also put this tiny decoder in vae_tiny/"
    )
    seed.add_argument(
        "--bf16-copy",
        action="store_true",
        help="also store a bf16 copy of the weights: hosts with native bf16 load it without a cast",
    )
    seed.add_argument(
        "--work-dir",
        type=Path,
        default=WORK_DIR,
        help="hub downloads, bf16 copies and OpenVINO exports",
    )
    _export_arguments(seed)
    seed.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="releases kept on EFS (current always)")
    seed.add_argument("--upload-only", action="store_true", help="stop after the upload to S3")
    seed.add_argument(
        "--warm", action="store_true", help="afterwards, invoke the function once (loads the model)"
    )
    seed.add_argument("--function-name", help="function to warm (output function_name)")
    seed.add_argument("--no-progress", action="store_true", help="no upload progress bar (on a terminal)")
    _stack_arguments(seed)
    seed.set_defaults(func=run_seed)

    lora = subparsers.add_parser(
        "seed-lora",
        help="put a LoRA adapter for the served model on EFS: hub/folder -> S3 -> seeder (SSM), switched "
        "atomically",
        description="Put a LoRA adapter (one safetensors file) on EFS under the model it adapts "
        "(<model>/loras/<adapter>/), through the weights bucket and the seeder instance (SSM), as a new "
        "revision that becomes current atomically. The model must be seeded first. Requests name the "
        "adapter in loras. The stack's values come from the Terraform outputs in --infra.",
    )
    lora.add_argument(
        "--lora",
        required=True,
        metavar="HUB_ID[@REV]|DIR",
        help="the adapter: a local folder with its .safetensors, or a Hugging Face Hub repo",
    )
    lora.add_argument(
        "--lora-name", help="the adapter's name in requests (default: the folder's or the repo's name)"
    )
    lora.add_argument("--name", help="the model it adapts, its folder on EFS (default: the served model)")
    lora.add_argument("--not-served", action="store_true", help="allow a --name the function does not serve")
    lora.add_argument("--revision", help="release name (default: hub commit, or a content hash)")
    lora.add_argument("--work-dir", type=Path, default=WORK_DIR, help="hub downloads")
    lora.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="releases kept on EFS (current always)")
    lora.add_argument("--no-progress", action="store_true", help="no upload progress bar (on a terminal)")
    _stack_arguments(lora)
    lora.set_defaults(func=run_seed_lora)

    back = subparsers.add_parser(
        "rollback",
        help="point a model's current at an older release on EFS (verified first)",
        description="Switch a model on EFS back to a release it still keeps: the release is verified on the "
        "seeder first, then current points at it. The stack's values come from the Terraform outputs in "
        "--infra.",
    )
    back.add_argument("--name", help="model folder on EFS (default: the stack's model_name)")
    back.add_argument(
        "--not-served",
        action="store_true",
        help="allow a --name the function does not serve (a second model seeded with --not-served)",
    )
    back.add_argument("--revision", required=True, help="release to switch to")
    back.add_argument("--lora-name", help="roll back this LoRA adapter of the model instead (seed-lora)")
    _stack_arguments(back)
    back.set_defaults(func=run_rollback)


def _target(args: argparse.Namespace) -> Any:
    from sd_lambda.seeding.target import resolve_target

    flags = {
        "bucket": args.bucket,
        "prefix": args.prefix,
        "instance_id": args.instance_id,
        "mount_path": args.mount_path,
        "region": args.region,
        "model_name": None,
        "function_name": getattr(args, "function_name", None),
    }
    try:
        return resolve_target(flags, args.infra, read_outputs=_efs_stack_outputs)
    except SeedError as exc:
        from sd_lambda.ops.stack_outputs import WeightsInImageError

        if isinstance(exc.__cause__, WeightsInImageError):  # one line, not "cannot read the outputs"
            raise SeedError(str(exc.__cause__)) from None
        raise


def _efs_stack_outputs(infra_dir: Path) -> dict[str, Any]:
    """The stack's outputs, refused when its model is baked into the image (no EFS to seed)."""
    from sd_lambda.ops.stack_outputs import read_outputs, refuse_weights_in_image

    outputs = read_outputs(infra_dir)
    refuse_weights_in_image(outputs)
    return outputs


def _options(args: argparse.Namespace) -> Any:
    from sd_lambda.seeding.flow import RunOptions

    return RunOptions(
        keep=getattr(args, "keep", DEFAULT_KEEP),
        keep_running=args.keep_running,
        execution_timeout=args.command_timeout,
        online_timeout=args.online_timeout,
        lock_timeout=args.lock_timeout,
    )


def _guarded(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        from botocore.exceptions import BotoCoreError

        from sd_lambda.cli import CommandError

        try:
            return int(func(args))
        except (SeedError, LayoutError) as exc:
            raise CommandError(str(exc)) from exc
        except BotoCoreError as exc:  # no credentials, no endpoint, ...: botocore's message is one line
            raise CommandError(f"AWS: {exc}") from exc

    return run


@_guarded
def run_seed(args: argparse.Namespace) -> int:
    from sd_lambda.layout import model_slug
    from sd_lambda.seeding import flow, preflight, sources
    from sd_lambda.seeding.target import seed_name

    # Cheap, local checks first; then every AWS check; only then the hub and the weights.
    if args.keep < 1:
        raise SeedError("--keep must be at least 1")
    if not args.model and (args.variant or args.tiny_decoder):
        raise SeedError("--variant and --tiny-decoder apply to --model (hub downloads) only")
    if args.from_s3 and args.bf16_copy:
        raise SeedError("--bf16-copy applies to --model and --from-dir (an uploaded revision is as stored)")
    if args.bf16_copy:
        from importlib.util import find_spec

        if find_spec("torch") is None:  # before any download: an operator install has no torch
            # `make install` takes torch's CPU build; a plain pip install of the runtime extra pulls CUDA.
            raise SeedError(
                f"{option('--bf16-copy')} needs torch: make install (the full install, CPU torch), "
                f"or drop {option('--bf16-copy')}"
            )
    if args.from_s3 and args.revision:
        raise SeedError("--from-s3 names the revision itself (s3://bucket/models/NAME/REVISION/)")
    export = _export_options(args)
    hub_repo = sources.parse_model_ref(args.model)[0] if args.model else None
    target = _target(args)
    if args.warm and not target.function_name:
        raise SeedError("--warm needs --function-name (the stack has no function_name output)")
    checked = sources.check_dir(args.from_dir, bf16_copy=args.bf16_copy) if args.from_dir else None
    if export and checked:
        sources.refuse_openvino_source(checked, str(args.from_dir))
    s3_url = flow.parse_s3_url(args.from_s3) if args.from_s3 else None
    source_name = hub_repo or (s3_url[2] if s3_url else None)
    name = seed_name(target, args.name, source_name, not_served=args.not_served)
    served = model_slug(target.model_name) if target.model_name else None
    if args.warm and served and name != served:
        raise SeedError(f"--warm loads the served model ({served}), not {name}: drop --warm")
    if hub_repo and name == served != model_slug(hub_repo):
        flow.log(f"seeding {hub_repo} as {name}, the model the function serves (model_name)")
    clients = flow.AwsClients.create(target.region)
    buckets = [target.bucket, *([s3_url[0]] if s3_url else [])]
    flow.log(f"AWS: {preflight.check_aws(clients, *buckets)}, bucket {', '.join(dict.fromkeys(buckets))}")
    # An uploaded revision is checked (manifest, pipeline class) before the seeder starts.
    staged = flow.stage_s3(clients, args.from_s3, name) if args.from_s3 else None
    if args.upload_only:
        staged = staged or _stage(args, clients, target, name, checked, export)
        uploaded = f"s3://{staged.bucket}/{staged.key_prefix}"
        document = {"uploaded": uploaded, "model": staged.name, "revision": staged.revision}
        report(args, {**document, "total_bytes": staged.total_bytes}, [f"uploaded {uploaded} (not seeded)"])
        return 0
    options = _options(args)
    if export and staged is None:
        # A conversion takes minutes (int8 calibration runs the pipeline): done before the seeder starts,
        # so the instance never idles through it; a rerun after a seeder problem reuses the export.
        staged = _stage(args, clients, target, name, checked, export)
    # Otherwise the seeder is ready (running, agent Online, EFS mounted) before the hub is asked for a byte.
    with flow.seeder_session(clients, target, options) as run:
        staged = staged or _stage(args, clients, target, name, checked, export)
        result = flow.sync_on_seeder(clients, target, staged, options, run)
    result = {"model": staged.name, "revision": staged.revision, "total_bytes": staged.total_bytes, **result}
    result["current"] = result["revision"]
    if args.warm:
        result.update(flow.warm_function(clients.lambda_, target.function_name))
    report(args, result, [_switched(result, f"{result.get('downloaded_bytes', 0)} bytes downloaded")])
    return 0


def _switched(result: dict[str, Any], detail: str) -> str:
    previous = result.get("previous") or "nothing"
    return f"{result['model']}: current -> {result['revision']} (was {previous}); {detail}"


def _stage(args: argparse.Namespace, clients: Any, target: Any, name: str, checked: Any, export: Any) -> Any:
    """A hub or folder source in S3 (downloaded, copied, converted and uploaded as asked): an
    ``S3Release``."""
    from sd_lambda.seeding import flow, sources

    if args.model:
        release = sources.from_hub(
            args.model,
            args.work_dir,
            variant=args.variant,
            tiny_decoder=args.tiny_decoder,
            for_export=export is not None,
        )
    else:
        release = sources.from_dir(args.from_dir, bf16_copy=args.bf16_copy, checked=checked)
    if args.bf16_copy:
        release = sources.with_bf16_copy(release, args.work_dir)
    if export is not None:
        from sd_lambda.seeding.openvino_release import export_openvino

        release = export_openvino(release, args.work_dir, export)
    return flow.stage_local(clients, target, release, name, args.revision, progress=not args.no_progress)


@_guarded
def run_seed_lora(args: argparse.Namespace) -> int:
    from sd_lambda.seeding import adapters, flow, preflight
    from sd_lambda.seeding.target import seed_name

    # Local checks (the folder's weights, names), then AWS, then the model on EFS: only then the hub.
    if args.keep < 1:
        raise SeedError("--keep must be at least 1")
    source = adapters.AdapterSource.parse(args.lora)
    adapter = check_name(args.lora_name, "adapter name") if args.lora_name else source.default_name()
    checked = adapters.check_adapter_dir(source.folder) if source.folder else None
    target = _target(args)
    name = seed_name(target, args.name, None, not_served=args.not_served)
    clients = flow.AwsClients.create(target.region)
    flow.log(f"AWS: {preflight.check_aws(clients, target.bucket)}, bucket {target.bucket}")
    options = _options(args)
    with flow.seeder_session(clients, target, options) as run:
        model = flow.check_model(clients, target, name, options, run)
        seeded = ", ".join(model["adapters"]) or "none"
        flow.log(f"{name} is seeded (current {model['revision']}); its adapters: {seeded}")
        if source.folder:
            release = adapters.from_dir(source.folder, checked)
        else:
            release = adapters.from_hub(str(source.hub_ref), args.work_dir)
        staged = flow.stage_local(
            clients, target, release, name, args.revision, progress=not args.no_progress, adapter=adapter
        )
        result = flow.sync_on_seeder(clients, target, staged, options, run)
    result = {
        "model": name,
        "adapter": adapter,
        "revision": staged.revision,
        "total_bytes": staged.total_bytes,
        **result,
    }
    result["current"] = result["revision"]
    previous = result.get("previous") or "nothing"
    line = (
        f"{name} lora {adapter}: current -> {result['revision']} (was {previous}); requests name it in loras"
    )
    report(args, result, [line])
    return 0


@_guarded
def run_rollback(args: argparse.Namespace) -> int:
    from sd_lambda.cli import ask_for
    from sd_lambda.seeding import flow

    if not args.revision.strip():
        raise SeedError(f"no release to switch to: {ask_for('--revision', '<release>')}")
    target = _target(args)
    name = flow.rollback_name(args.name, target, not_served=args.not_served)
    adapter = check_name(args.lora_name, "adapter name") if args.lora_name else None
    clients = flow.AwsClients.create(target.region)
    result = flow.rollback(clients, target, name, args.revision, _options(args), adapter)
    result = {"model": name, "revision": args.revision, **result, "current": args.revision}
    switched = _switched(result, f"releases: {', '.join(result.get('releases', []))}")
    report(args, result, [f"lora {adapter} of {switched}" if adapter else switched])
    return 0
