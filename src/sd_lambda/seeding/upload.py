"""Local release -> ``s3://<bucket>/<prefix><name>/<revision>/`` with its manifest.json, uploaded last.

Multipart through boto3's transfer manager; each object carries its sha256 in metadata, so a re-run
skips what is already there; a progress bar shows bytes and rate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from tqdm import tqdm

from sd_lambda.layout import MANIFEST, LayoutError, Manifest
from sd_lambda.seeding.errors import SeedError, aws_error
from sd_lambda.seeding.sources import LocalRelease

SHA256_METADATA = "sha256"  # x-amz-meta-sha256
MiB = 1024 * 1024
TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8, use_threads=True
)


@dataclass(frozen=True)
class UploadReport:
    key_prefix: str
    manifest_sha256: str
    uploaded_files: int
    uploaded_bytes: int
    skipped_files: int


def _not_found(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}


def check_bucket(s3: Any, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _not_found(exc) or exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            raise SeedError(
                f"bucket {bucket} does not exist (stack not applied, or wrong --bucket?)"
            ) from exc
        raise aws_error(exc, "s3", f"arn:aws:s3:::{bucket}") from exc


def read_object(s3: Any, bucket: str, key: str) -> bytes | None:
    """A small object's bytes, or None when it does not exist."""
    try:
        return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as exc:
        if _not_found(exc):
            return None
        raise aws_error(exc, "s3", f"s3://{bucket}/{key}") from exc


def read_manifest(s3: Any, bucket: str, key_prefix: str) -> tuple[bytes, Manifest] | None:
    """The manifest already at ``key_prefix`` (raw bytes and parsed), or None."""
    key = key_prefix + MANIFEST
    raw = read_object(s3, bucket, key)
    if raw is None:
        return None
    try:
        return raw, Manifest.from_json(raw.decode())
    except (LayoutError, UnicodeDecodeError) as exc:
        raise SeedError(f"s3://{bucket}/{key}: {exc}") from exc


def _remote_sha256(s3: Any, bucket: str, key: str) -> tuple[str | None, int] | None:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _not_found(exc):
            return None
        raise aws_error(exc, "s3", f"s3://{bucket}/{key}") from exc
    return head.get("Metadata", {}).get(SHA256_METADATA), int(head["ContentLength"])


def is_unchanged(s3: Any, bucket: str, key: str, sha256: str, size: int) -> bool:
    """The object at ``key`` has this size and carries this sha256 (so it need not be uploaded again)."""
    return _remote_sha256(s3, bucket, key) == (sha256, size)


def put_if_changed(s3: Any, bucket: str, key: str, body: bytes, content_type: str) -> bool:
    """Put ``body`` (with its sha256 in metadata) unless the object is already this; True if it was put."""
    sha256 = hashlib.sha256(body).hexdigest()
    if is_unchanged(s3, bucket, key, sha256, len(body)):
        return False
    try:
        s3.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType=content_type, Metadata={SHA256_METADATA: sha256}
        )
    except ClientError as exc:
        raise aws_error(exc, "s3", f"s3://{bucket}/{key}") from exc
    return True


def upload_release(
    s3: Any,
    bucket: str,
    key_prefix: str,
    release: LocalRelease,
    *,
    progress: bool = True,
    transfer_config: TransferConfig = TRANSFER_CONFIG,
) -> UploadReport:
    """Upload every file whose object is missing or differs, then the manifest.

    A revision whose manifest already lists other content is never overwritten: the seeder may have it.
    """
    existing = read_manifest(s3, bucket, key_prefix)
    if existing is not None and existing[1].files != release.manifest.files:
        raise SeedError(
            f"s3://{bucket}/{key_prefix} already holds a different revision with this name: "
            "choose another --revision"
        )
    todo = [
        entry
        for entry in release.manifest.files
        if not is_unchanged(s3, bucket, key_prefix + entry.path, entry.sha256, entry.size)
    ]
    total = sum(entry.size for entry in todo)
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="upload", disable=not progress
    ) as bar:
        for entry in todo:
            key = key_prefix + entry.path
            try:
                s3.upload_file(
                    str(release.files[entry.path]),
                    bucket,
                    key,
                    ExtraArgs={"Metadata": {SHA256_METADATA: entry.sha256}},
                    Config=transfer_config,
                    Callback=bar.update,
                )
            except ClientError as exc:
                raise aws_error(exc, "s3", f"s3://{bucket}/{key}") from exc
            except Exception as exc:  # boto3's S3UploadFailedError wraps the ClientError
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, ClientError):
                    raise aws_error(cause, "s3", f"s3://{bucket}/{key}") from exc
                raise SeedError(f"uploading {entry.path} to s3://{bucket}/{key} failed: {exc}") from exc
    if existing is not None:  # same content: keep its bytes (and sha256), the seeder may have verified them
        raw = existing[0]
    else:
        raw = release.manifest.to_json().encode()
        try:
            s3.put_object(Bucket=bucket, Key=key_prefix + MANIFEST, Body=raw, ContentType="application/json")
        except ClientError as exc:
            raise aws_error(exc, "s3", f"s3://{bucket}/{key_prefix}{MANIFEST}") from exc
    return UploadReport(
        key_prefix=key_prefix,
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        uploaded_files=len(todo),
        uploaded_bytes=total,
        skipped_files=len(release.manifest.files) - len(todo),
    )
