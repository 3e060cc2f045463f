"""The seeder's side of seeding: S3 -> ``.staging-<revision>`` -> verified release -> ``current``.

Runs on the seeder instance (Amazon Linux 2023: ``python3`` 3.9, standard library only), shipped there
inside the SSM command as a zip application together with ``sd_lambda/layout.py`` verbatim (see
``sd_lambda.seeding.payload``), so the layout logic is one piece of code on both sides.

    python3 program.pyz sync --mount /mnt/models --name N --revision R --bucket B --s3-prefix P
    python3 program.pyz rollback --mount /mnt/models --name N --revision R

``sync`` holds ``<name>/.lock`` throughout, downloads every manifest file into the staging folder
(files already there and verified are kept, ``.part`` files resume with a ranged GET), then hands over to
``layout.publish_release``: verify -> fix ownership -> rename into releases/ -> switch -> prune. Any
failure exits non-zero before ``current`` changes. The last stdout line is ``RESULT {json}``.

S3 is read with a small SigV4 GET client: the instance has no boto3. Credentials come from the
environment, else from the instance profile through IMDSv2; ``AWS_ENDPOINT_URL(_S3)`` overrides the
endpoint (tests point it at a local S3).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sd_lambda.layout import (
    DEFAULT_KEEP,
    LAMBDA_OWNER,
    MANIFEST,
    MODEL_INDEX,
    PICKLE_SUFFIXES,
    LayoutError,
    LockBusyError,
    Manifest,
    ManifestEntry,
    ModelPaths,
    activate_release,
    check_name,
    publish_release,
    safe_join,
    sha256_file,
)

RESULT_PREFIX = "RESULT "
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
IMDS_ENDPOINT = "http://169.254.169.254"
CHUNK = 1 << 20
ATTEMPTS = 4
BACKOFF_S = 2.0  # doubled per retry
# Refresh instance-profile credentials this long before they expire (downloads can take a while).
REFRESH_MARGIN_S = 300
HTTP_TIMEOUT_S = 60


class SyncError(Exception):
    """A failure reported as one line; ``current`` has not been touched."""


class TransientS3Error(SyncError):
    """S3 answered 500/503 (SlowDown): worth another try."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None
    expires_at: float | None = None  # epoch seconds


def _imds(endpoint: str, path: str, token: str | None = None, method: str = "GET") -> str:
    headers = (
        {"X-aws-ec2-metadata-token": token} if token else {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}
    )
    request = urllib.request.Request(endpoint.rstrip("/") + path, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


class CredentialChain:
    """The environment's keys, else the instance profile's (IMDSv2 only), refreshed before expiry."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.imds_endpoint = self.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", IMDS_ENDPOINT)
        self._cached: Credentials | None = None

    def get(self) -> Credentials:
        key, secret = self.environ.get("AWS_ACCESS_KEY_ID"), self.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            return Credentials(key, secret, self.environ.get("AWS_SESSION_TOKEN") or None)
        cached = self._cached
        if cached is None or (cached.expires_at or 0) - time.time() < REFRESH_MARGIN_S:
            self._cached = cached = self._from_instance_profile()
        return cached

    def _from_instance_profile(self) -> Credentials:
        base = "/latest/meta-data/iam/security-credentials/"
        try:
            token = _imds(self.imds_endpoint, "/latest/api/token", method="PUT")
            role = _imds(self.imds_endpoint, base, token).split()[0]
            data = json.loads(_imds(self.imds_endpoint, base + role, token))
        except (OSError, ValueError, IndexError) as exc:
            raise SyncError(
                f"no AWS credentials: none in the environment and no instance profile ({exc})"
            ) from None
        expires = datetime.strptime(data["Expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)  # noqa: UP017
        return Credentials(
            data["AccessKeyId"], data["SecretAccessKey"], data.get("Token"), expires.timestamp()
        )

    def region(self) -> str:
        for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            if self.environ.get(name):
                return self.environ[name]
        try:
            token = _imds(self.imds_endpoint, "/latest/api/token", method="PUT")
            return _imds(self.imds_endpoint, "/latest/meta-data/placement/region", token)
        except OSError as exc:
            raise SyncError(f"no AWS region: pass --region ({exc})") from None


# --- SigV4 for S3 GET --------------------------------------------------------------------------


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def sign_s3_get(
    url: str, credentials: Credentials, region: str, now: datetime, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Headers that authorize ``GET url`` with Signature Version 4 (service ``s3``, empty body)."""
    parts = urllib.parse.urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    headers = {"host": parts.netloc, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date}
    if credentials.token:
        headers["x-amz-security-token"] = credentials.token
    signed = sorted(headers)
    query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
        for k, v in sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    )
    canonical = "\n".join(
        [
            "GET",
            parts.path or "/",
            query,
            "".join(f"{name}:{headers[name].strip()}\n" for name in signed),
            ";".join(signed),
            EMPTY_SHA256,
        ]
    )
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + credentials.secret_key).encode(), amz_date[:8])
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    del headers["host"]  # urllib sends it from the URL
    headers.update(extra or {})
    return headers


class S3Reader:
    """Just enough S3 for the seeder: signed GETs of whole objects or their tails."""

    def __init__(self, bucket: str, region: str, credentials: CredentialChain, endpoint_url: str | None):
        self.bucket = bucket
        self.region = region
        self.credentials = credentials
        if endpoint_url:  # a custom endpoint (tests): path-style, like the SDKs do
            self.base = endpoint_url.rstrip("/") + "/" + urllib.parse.quote(bucket)
        elif "." in bucket:  # dots break virtual-hosted TLS names
            self.base = f"https://s3.{region}.amazonaws.com/{urllib.parse.quote(bucket)}"
        else:
            self.base = f"https://{bucket}.s3.{region}.amazonaws.com"

    def url(self, key: str) -> str:
        return self.base + "/" + urllib.parse.quote(key, safe="/-_.~")

    def open(self, key: str, offset: int = 0) -> http.client.HTTPResponse:
        extra = {"range": f"bytes={offset}-"} if offset else {}
        url = self.url(key)
        headers = sign_s3_get(url, self.credentials.get(), self.region, datetime.now(timezone.utc), extra)  # noqa: UP017
        try:
            return urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT_S
            )
        except urllib.error.HTTPError as exc:
            raise self._explain(exc, key) from None

    def _explain(self, exc: urllib.error.HTTPError, key: str) -> SyncError:
        body = exc.read(4096)
        try:
            code = ElementTree.fromstring(body).findtext("Code") or str(exc.code)
        except ElementTree.ParseError:
            code = str(exc.code)
        where = f"s3://{self.bucket}/{key}"
        if exc.code == 403:
            needed = (
                "kms:Decrypt on the bucket's key"
                if code.startswith("KMS")
                else "s3:GetObject (and s3:ListBucket, without which a missing object reads as 403)"
            )
            return SyncError(f"{code} reading {where}: the seeder's role needs {needed}")
        if exc.code == 404:
            return SyncError(f"{code}: {where} does not exist (was the upload finished?)")
        if exc.code in (500, 502, 503, 504):
            return TransientS3Error(f"HTTP {exc.code} {code} reading {where}")
        return SyncError(f"HTTP {exc.code} {code} reading {where}")

    def read(self, key: str) -> bytes:
        with self.open(key) as response:
            return response.read()

    def download(self, key: str, target: Path, entry: ManifestEntry) -> int:
        """Fetch ``key`` into ``target`` through ``target.part``; returns the bytes transferred."""
        part = target.with_name(target.name + ".part")
        digest, offset = hashlib.sha256(), 0
        if part.is_file() and not part.is_symlink() and part.stat().st_size <= entry.size:
            with part.open("rb") as existing:
                while chunk := existing.read(CHUNK):
                    digest.update(chunk)
                    offset += len(chunk)
        else:
            part.unlink(missing_ok=True)
        transferred = 0
        for attempt in range(1, ATTEMPTS + 1):
            if offset == entry.size:
                break
            try:
                with self.open(key, offset) as response:
                    if offset and response.status != 206:  # no range support: start over
                        digest, offset = hashlib.sha256(), 0
                    announced, received = response.headers.get("Content-Length"), 0
                    with part.open("ab" if offset else "wb") as out:
                        while chunk := response.read(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            offset += len(chunk)
                            received += len(chunk)
                            transferred += len(chunk)
                if announced is not None and received < int(announced):  # cut short: resume from here
                    raise ConnectionError(f"the connection closed after {received} of {announced} bytes")
                break
            except (OSError, http.client.HTTPException, TransientS3Error) as exc:  # 403/404: not retried
                if attempt == ATTEMPTS:
                    raise SyncError(f"reading s3://{self.bucket}/{key} failed: {exc}") from None
                log(f"  retrying {entry.path} from byte {offset} ({exc})")
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        if offset != entry.size or digest.hexdigest() != entry.sha256:
            part.unlink(missing_ok=True)
            raise SyncError(
                f"manifest mismatch: s3://{self.bucket}/{key} has "
                f"{'sha256 ' + digest.hexdigest()[:12] if offset == entry.size else f'{offset} bytes'}"
                f", the manifest says {entry.sha256[:12] if offset == entry.size else entry.size}"
                " (corrupted or replaced object); nothing was switched"
            )
        os.replace(part, target)
        return transferred


# --- commands ----------------------------------------------------------------------------------


def _matches(path: Path, entry: ManifestEntry) -> bool:
    return (
        path.is_file()
        and not path.is_symlink()
        and path.stat().st_size == entry.size
        and sha256_file(path) == entry.sha256
    )


def _tidy_staging(staging: Path, manifest: Manifest) -> None:
    """Refuse symlinks; drop files neither listed nor a resumable ``.part`` of a listed file."""
    keep = {MANIFEST} | {e.path for e in manifest.files} | {e.path + ".part" for e in manifest.files}
    for directory, dirs, files in os.walk(staging):
        for name in dirs + files:
            path = Path(directory) / name
            if path.is_symlink():
                raise SyncError(f"refusing symlink in staging: {path}")
            relative = path.relative_to(staging).as_posix()
            if name in files and relative not in keep:
                path.unlink()


def _check_manifest(manifest: Manifest) -> None:
    pickles = [e.path for e in manifest.files if Path(e.path).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise SyncError(f"pickle weights are refused: {', '.join(pickles)}")
    if MODEL_INDEX not in {e.path for e in manifest.files}:
        raise SyncError(f"the manifest lists no {MODEL_INDEX}: not a diffusers pipeline")


def _wait_for_mount(args: argparse.Namespace) -> None:
    """Never fill the instance's root volume because EFS is not (yet) mounted: on a first boot the
    SSM agent can be Online before user data has mounted it."""
    deadline = time.monotonic() + args.mount_wait
    while not (os.path.isdir(args.mount) and (not args.require_mount or os.path.ismount(args.mount))):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SyncError(
                f"{args.mount} is not a mounted file system after waiting {args.mount_wait:g}s "
                "(is EFS mounted? see /var/log/cloud-init-output.log on the seeder)"
            )
        time.sleep(min(5.0, remaining))


def sync(args: argparse.Namespace) -> dict[str, Any]:
    paths = ModelPaths(Path(args.mount) / check_name(args.name, "model name"))
    revision = check_name(args.revision, "revision")
    _wait_for_mount(args)
    with paths.locked(args.lock_timeout, on_wait=lambda: log(f"waiting for {paths.lock} ...")) as lock:
        downloaded, reused = 0, 0
        if not (paths.release(revision).exists() or paths.release(revision).is_symlink()):
            chain = CredentialChain()
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            s3 = S3Reader(args.bucket, args.region or chain.region(), chain, endpoint)
            prefix = args.s3_prefix.rstrip("/") + "/"
            raw = s3.read(prefix + MANIFEST)
            if args.manifest_sha256 and hashlib.sha256(raw).hexdigest() != args.manifest_sha256:
                raise SyncError(
                    f"manifest mismatch: s3://{args.bucket}/{prefix}{MANIFEST} is not the manifest "
                    "that was uploaded (replaced meanwhile?)"
                )
            manifest = Manifest.from_json(raw.decode())
            _check_manifest(manifest)
            staging = paths.staging(revision)
            if staging.is_symlink():
                raise SyncError(f"refusing symlink: {staging}")
            staging.mkdir(mode=0o755, exist_ok=True)
            _tidy_staging(staging, manifest)
            safe_join(staging, MANIFEST).write_bytes(raw)
            log(f"syncing {len(manifest.files)} files ({manifest.total_bytes} bytes) into {staging}")
            for entry in manifest.files:
                target = safe_join(staging, entry.path)
                if _matches(target, entry):
                    reused += 1
                    continue
                downloaded += s3.download(prefix + entry.path, target, entry)
                log(f"  {entry.path} ({entry.size} bytes)")
        result = publish_release(
            paths, revision, lock, keep=args.keep, owner=args.owner, manifest_sha256=args.manifest_sha256
        )
    return {
        "model": args.name,
        "revision": result.revision,
        "previous": result.previous,
        "already_present": result.reused,
        "downloaded_bytes": downloaded,
        "reused_files": reused,
        "pruned": list(result.pruned),
        "releases": paths.revisions(),
    }


def rollback(args: argparse.Namespace) -> dict[str, Any]:
    paths = ModelPaths(Path(args.mount) / check_name(args.name, "model name"))
    _wait_for_mount(args)
    if not paths.model_dir.is_dir():
        raise SyncError(f"no model {args.name!r} under {args.mount}")
    with paths.locked(args.lock_timeout, on_wait=lambda: log(f"waiting for {paths.lock} ...")) as lock:
        previous = activate_release(paths, check_name(args.revision, "revision"), lock)
    return {
        "model": args.name,
        "revision": args.revision,
        "previous": previous,
        "releases": paths.revisions(),
    }


def _owner(value: str) -> tuple[int, int] | None:
    if value == "none":
        return None
    uid, _, gid = value.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected UID:GID or 'none', not {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-lambda-efs-sync", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func in (("sync", sync), ("rollback", rollback)):
        sub = commands.add_parser(name)
        sub.set_defaults(func=func)
        sub.add_argument("--mount", required=True, help="where the EFS access point is mounted")
        sub.add_argument("--name", required=True, help="model folder (slug)")
        sub.add_argument("--revision", required=True)
        sub.add_argument("--lock-timeout", type=float, default=0.0, help="seconds to wait for .lock")
        sub.add_argument("--require-mount", action="store_true", help="fail unless --mount is a mount point")
        sub.add_argument("--mount-wait", type=float, default=0.0, help="seconds to wait for the mount")
    sync_parser = commands.choices["sync"]
    sync_parser.add_argument("--bucket", required=True)
    sync_parser.add_argument("--s3-prefix", required=True, help="key prefix of this revision's objects")
    sync_parser.add_argument("--region", default=None)
    sync_parser.add_argument("--manifest-sha256", default=None, help="sha256 of the uploaded manifest.json")
    sync_parser.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="releases kept when pruning")
    sync_parser.add_argument(
        "--owner", type=_owner, default=LAMBDA_OWNER, help="UID:GID for every file, or 'none'"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except LockBusyError as exc:
        log(f"error: {exc}")
        return 3
    except (SyncError, LayoutError, OSError) as exc:
        log(f"error: {exc}")
        return 1
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
