"""The seeding run end to end: source -> S3 -> seeder (SSM) -> new EFS revision; and rollback."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sd_lambda.layout import DEFAULT_KEEP, LAMBDA_OWNER, MANIFEST, MODEL_INDEX, check_name, model_slug
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.payload import ShippedProgram, ship_program
from sd_lambda.seeding.pipeline import check_served_class, parse_model_index
from sd_lambda.seeding.remote import (
    Probe,
    mount_check_script,
    progress_file,
    run_command,
    shell_script,
    sync_probe,
)
from sd_lambda.seeding.seeder import Seeder
from sd_lambda.seeding.sources import LocalRelease, check_pipeline_files
from sd_lambda.seeding.target import Target, seed_name
from sd_lambda.seeding.upload import read_manifest, read_object, upload_release

# How long the seeder's program waits for EFS to be mounted (first boot: user data may still run).
MOUNT_WAIT_S = 300
# The mount check's executionTimeout: the setup unit it may start bounds itself at 20 minutes
# (TimeoutStartSec in infra/modules/seeder/user_data.sh.tftpl), then the mount is awaited.
MOUNT_CHECK_TIMEOUT_S = 20 * 60 + MOUNT_WAIT_S + 60


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class AwsClients:
    s3: Any
    ec2: Any
    ssm: Any
    lambda_: Any = None  # only for --warm
    sts: Any = None  # only for the credentials check

    @classmethod
    def create(cls, region: str | None) -> AwsClients:
        import boto3

        session = boto3.Session(region_name=region)
        clients = [session.client(name) for name in ("s3", "ec2", "ssm", "lambda", "sts")]
        return cls(*clients)


@dataclass(frozen=True)
class RunOptions:
    keep: int = DEFAULT_KEEP
    keep_running: bool = False
    execution_timeout: int = 3600  # seconds the sync may run on the instance
    start_timeout: float = 300
    online_timeout: float = 600
    lock_timeout: float = 0  # seconds the sync waits for another run's lock
    poll_interval: float = 5.0
    sleep: Callable[[float], None] | None = None  # tests: a fake clock
    clock: Callable[[], float] | None = None

    def timing(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"poll_interval": self.poll_interval}
        if self.sleep is not None:
            extra["sleep"] = self.sleep
        if self.clock is not None:
            extra["clock"] = self.clock
        return extra


@dataclass(frozen=True)
class S3Release:
    """A revision already in S3 (``--from-s3``): where it is and its manifest's sha256."""

    bucket: str
    key_prefix: str
    name: str
    revision: str
    manifest_sha256: str
    uploaded: dict[str, int] = field(default_factory=dict)
    total_bytes: int = 0  # the release's size, as its manifest lists it
    adapter: str | None = None  # a LoRA adapter of model ``name`` (seeding.adapters), not the model


def parse_s3_url(url: str) -> tuple[str, str, str, str]:
    """``s3://bucket/models/<name>/<revision>/`` -> (bucket, key prefix, name, revision)."""
    if not url.startswith("s3://"):
        raise SeedError(f"{url!r} is not an s3:// URL")
    bucket, _, key = url[len("s3://") :].partition("/")
    parts = [p for p in key.split("/") if p]
    if not bucket or len(parts) < 2:
        raise SeedError(f"{url!r}: expected s3://<bucket>/<prefix>/<name>/<revision>/")
    return (
        bucket,
        "/".join(parts) + "/",
        check_name(parts[-2], "model name"),
        check_name(parts[-1], "revision"),
    )


def stage_local(
    clients: AwsClients,
    target: Target,
    release: LocalRelease,
    name: str,
    revision: str | None,
    progress: bool,
    adapter: str | None = None,
) -> S3Release:
    """Upload ``release`` to the target's bucket (checked by ``preflight.check_aws`` before the run);
    ``adapter``: the release is that LoRA adapter of model ``name``."""
    revision = check_name(revision or release.revision, "revision")
    if adapter is None:
        key_prefix = target.revision_prefix(name, revision)
    else:
        key_prefix = target.adapter_prefix(name, adapter, revision)
    log(
        f"uploading {len(release.files)} files ({release.manifest.total_bytes} bytes) to s3://{target.bucket}/{key_prefix}"
    )
    report = upload_release(clients.s3, target.bucket, key_prefix, release, progress=progress)
    log(
        f"uploaded {report.uploaded_files} files ({report.uploaded_bytes} bytes), "
        f"{report.skipped_files} unchanged"
    )
    counts = {"uploaded_files": report.uploaded_files, "skipped_files": report.skipped_files}
    return S3Release(
        target.bucket,
        key_prefix,
        name,
        revision,
        report.manifest_sha256,
        counts,
        release.manifest.total_bytes,
        adapter,
    )


def stage_s3(clients: AwsClients, url: str, name: str | None = None) -> S3Release:
    """An uploaded revision, checked (manifest, files, pipeline class) before the seeder starts; its
    bucket was checked by ``preflight.check_aws``."""
    bucket, key_prefix, url_name, revision = parse_s3_url(url)
    name = model_slug(name) if name else url_name
    found = read_manifest(clients.s3, bucket, key_prefix)
    if found is None:
        raise SeedError(
            f"s3://{bucket}/{key_prefix}{MANIFEST} does not exist: upload with --model or --from-dir"
        )
    raw, manifest = found
    problem = check_pipeline_files([entry.path for entry in manifest.files])
    if problem:
        raise SeedError(f"s3://{bucket}/{key_prefix}: {problem}")
    where = f"s3://{bucket}/{key_prefix}"
    index = read_object(clients.s3, bucket, key_prefix + MODEL_INDEX)
    if index is None:
        raise SeedError(f"{where}{MODEL_INDEX} is listed in the manifest but missing")
    check_served_class(parse_model_index(index, where), where)
    digest = hashlib.sha256(raw).hexdigest()
    return S3Release(bucket, key_prefix, name, revision, digest, total_bytes=manifest.total_bytes)


@dataclass(frozen=True)
class SeederRun:
    """The seeder for one run, ready (running, agent Online, EFS mounted), and the program it runs."""

    seeder: Seeder
    program: ShippedProgram


@contextmanager
def seeder_session(clients: AwsClients, target: Target, options: RunOptions) -> Iterator[SeederRun]:
    """The seeder, ready for the block; afterwards stopped unless ``--keep-running`` or another run's
    command still runs on it (the last run out stops it, also one that found it running)."""
    # Before the seeder starts: a bucket this operator cannot write fails fast, with nothing to stop.
    program = ship_program(clients.s3, target.bucket, target.key_prefix)
    log(f"sync program {program.url} ({'uploaded' if program.uploaded else 'already there'})")
    seeder = Seeder(clients.ec2, clients.ssm, target.instance_id, log=log, **options.timing())
    seeder.start_if_stopped(options.start_timeout)  # a missing or terminated seeder: nothing to stop
    try:
        seeder.wait_ready(options.start_timeout, options.online_timeout)
        check_mount(seeder, target, options)
        yield SeederRun(seeder, program)
    except BaseException:  # KeyboardInterrupt too: run_command has cancelled this run's command
        try:
            _leave(seeder, options)
        except SeedError as exc:  # the run's own error is the one worth reporting
            log(f"could not stop the seeder: {exc}")
        raise
    _leave(seeder, options)


def _leave(seeder: Seeder, options: RunOptions) -> None:
    if options.keep_running:
        log(f"seeder {seeder.instance_id} left running (--keep-running)")
    else:
        seeder.stop_unless_busy()


def check_mount(seeder: Seeder, target: Target, options: RunOptions) -> None:
    """EFS is mounted on the seeder (waiting for a first boot's user data), before anything is fetched."""
    invocation = run_command(
        seeder.ssm,
        target.instance_id,
        mount_check_script(target.mount_path, MOUNT_WAIT_S),
        execution_timeout=MOUNT_CHECK_TIMEOUT_S,
        comment=f"sd-lambda mount check {target.mount_path}",
        sent=seeder.sent,
        log=log,
        **options.timing(),
    )
    if invocation.status != "Success":
        raise SeedError(f"the seeder's mount check {invocation.status}: {invocation.error_line()}")


def bucket_region(clients: AwsClients, target: Target) -> str | None:
    """The region the seeder's AWS CLI talks to: the stack's, else this session's (the CLI on an instance
    does not reliably infer it)."""
    return target.region or clients.s3.meta.region_name


def _run(
    clients: AwsClients,
    target: Target,
    argv: list[str],
    comment: str,
    options: RunOptions,
    run: SeederRun | None = None,
    probe: Probe | None = None,
) -> dict[str, Any]:
    if run is None:
        with seeder_session(clients, target, options) as run:  # ready: nothing to check again
            return _send(clients, target, argv, comment, options, run, probe)
    # The session was opened before the download: another run that ended meanwhile may have stopped
    # the seeder. Only then is it started and awaited again; a running one was checked by the session.
    if run.seeder.state() != "running":
        run.seeder.start_if_stopped(options.start_timeout)
        run.seeder.wait_ready(options.start_timeout, options.online_timeout)
    return _send(clients, target, argv, comment, options, run, probe)


def _send(
    clients: AwsClients,
    target: Target,
    argv: list[str],
    comment: str,
    options: RunOptions,
    run: SeederRun,
    probe: Probe | None,
) -> dict[str, Any]:
    log(f"running on {target.instance_id} via SSM: {comment}")
    invocation = run_command(
        clients.ssm,
        target.instance_id,
        shell_script(run.program, argv, bucket_region(clients, target)),
        execution_timeout=options.execution_timeout,
        comment=comment,
        sent=run.seeder.sent,
        log=log,
        probe=probe,
        **options.timing(),
    )
    if invocation.status != "Success":
        for line in invocation.tail():
            log(f"  | {line}")
        raise SeedError(
            f"the seeder's run {invocation.status} (exit {invocation.exit_code}): {invocation.error_line()}"
        )
    return invocation.result()


def sync_on_seeder(
    clients: AwsClients,
    target: Target,
    staged: S3Release,
    options: RunOptions,
    run: SeederRun | None = None,
) -> dict[str, Any]:
    argv = [
        "sync",
        "--mount", target.mount_path,
        "--require-mount", "--mount-wait", str(MOUNT_WAIT_S),
        "--name", staged.name,
        "--revision", staged.revision,
        "--bucket", staged.bucket,
        "--s3-prefix", staged.key_prefix,
        "--manifest-sha256", staged.manifest_sha256,
        "--keep", str(options.keep),
        "--owner", "{}:{}".format(*LAMBDA_OWNER),
        "--lock-timeout", str(options.lock_timeout),
    ]  # fmt: skip
    if staged.adapter is not None:
        argv += ["--adapter", staged.adapter]
    region = bucket_region(clients, target)
    if region:
        argv += ["--region", region]
    # The sync's output comes back only when it has ended: a probe reads its progress file meanwhile.
    progress = progress_file()
    argv += ["--progress-file", progress]
    what = staged.name if staged.adapter is None else f"{staged.name} lora {staged.adapter}"
    comment = f"sd-lambda seed {what}@{staged.revision}"
    result = _run(clients, target, argv, comment, options, run, sync_probe(progress))
    log(
        f"the seeder copied {result.get('downloaded_bytes', 0)} of {staged.total_bytes} bytes "
        f"({result.get('reused_files', 0)} files were there already)"
    )
    return result


def rollback(
    clients: AwsClients,
    target: Target,
    name: str,
    revision: str,
    options: RunOptions,
    adapter: str | None = None,
) -> dict[str, Any]:
    """Switch model ``name`` (or its LoRA ``adapter``) back to ``revision``, verified on the seeder."""
    argv = [
        "rollback",
        "--mount", target.mount_path,
        "--require-mount", "--mount-wait", str(MOUNT_WAIT_S),
        "--name", check_name(name, "model name"),
        "--revision", check_name(revision, "revision"),
        "--lock-timeout", str(options.lock_timeout),
    ]  # fmt: skip
    what = name
    if adapter is not None:
        argv += ["--adapter", check_name(adapter, "adapter name")]
        what = f"{name} lora {adapter}"
    return _run(clients, target, argv, f"sd-lambda rollback {what}@{revision}", options)


def check_model(
    clients: AwsClients, target: Target, name: str, options: RunOptions, run: SeederRun
) -> dict[str, Any]:
    """The model ``name`` is seeded on EFS (its current revision and adapters); SeedError, before
    anything is downloaded or uploaded, when it is not."""
    argv = [
        "check-model",
        "--mount", target.mount_path,
        "--require-mount", "--mount-wait", str(MOUNT_WAIT_S),
        "--name", check_name(name, "model name"),
    ]  # fmt: skip
    return _run(clients, target, argv, f"sd-lambda check {name}", options, run)


def rollback_name(explicit: str | None, target: Target, *, not_served: bool = False) -> str:
    """The model to roll back: --name, else the model the stack's function serves; a --name the function
    does not serve is refused as seed refuses it, unless ``not_served``."""
    return seed_name(target, explicit, None, not_served=not_served, command="rollback")


# The smallest request the handler accepts as a direct invoke: loads the new revision, one step.
WARM_REQUEST = {"prompt": "warm-up", "num_inference_steps": 1, "width": 64, "height": 64, "seed": 0}


def warm_function(lambda_client: Any, function_name: str) -> dict[str, Any]:
    """One direct invoke, so one execution environment has loaded the new revision before users come."""
    from botocore.exceptions import ClientError

    from sd_lambda.seeding.errors import aws_error

    log(f"warming {function_name} with one direct invoke")
    try:
        response = lambda_client.invoke(
            FunctionName=function_name,
            InvocationType="RequestResponse",
            Payload=json.dumps(WARM_REQUEST).encode(),
        )
    except ClientError as exc:
        raise aws_error(exc, "lambda", function_name) from exc
    raw = response["Payload"].read()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        payload = {"errorMessage": raw[:200].decode(errors="replace")}
    error = payload.get("error") or payload.get("errorMessage")  # the handler's / Lambda's own shape
    if response.get("FunctionError") or error:
        detail = error.get("message", error) if isinstance(error, dict) else error
        raise SeedError(f"the revision is live, but the warm-up invoke of {function_name} failed: {detail}")
    return {"warm_timings": payload.get("timings")}
