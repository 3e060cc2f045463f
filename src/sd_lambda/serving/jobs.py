"""Jobs for long work: ``POST /jobs`` stores the request and starts an asynchronous invocation of this
same function; that invocation generates and stores the images; ``GET /jobs/{id}`` reports the status
and, once done, a presigned URL per image.

Objects live in ``SD_JOBS_BUCKET`` under ``SD_JOBS_PREFIX``, one folder per caller and job::

    <prefix><caller>/<job id>/request.json   the request as the caller sent it
    <prefix><caller>/<job id>/status.json    queued -> running -> done | failed, with the result or error
    <prefix><caller>/<job id>/image-<n>.<ext>

``<caller>`` is a hash of the function URL caller's IAM identity, so a job id is only ever looked up
under its own caller's folder: another caller's id is simply not found there (404, nothing leaks).

The asynchronous event carries only ``{"sd_lambda_job": {"caller", "id"}}``: Lambda caps an
asynchronous invocation's payload at 1 MB, a request may be up to 6 MB (an init image), so the request
itself is read back from S3. https://docs.aws.amazon.com/lambda/latest/api/API_Invoke.html
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sd_lambda.serving.errors import ApiError
from sd_lambda.settings import Settings

JOB_EVENT_KEY = "sd_lambda_job"
JOB_ID = re.compile(r"[0-9a-f]{32}")
CALLER_KEY = re.compile(r"[0-9a-f]{32}")
JOBS_PATH = "/jobs"
# How long past its deadline a running job may stay silent before it is reported lost (the invocation
# writes its outcome within milliseconds of finishing).
LOST_GRACE_S = 60
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
# An assumed role's session name is picked by whoever assumes it: the role is the identity that owns jobs.
ASSUMED_ROLE = re.compile(r"^(arn:[^:]+:sts::\d{12}:assumed-role/[^/]+)/.+$")


@dataclass(frozen=True)
class JobRef:
    caller: str  # CALLER_KEY: the hash of the caller's identity
    job_id: str

    def event(self) -> dict[str, Any]:
        return {JOB_EVENT_KEY: {"caller": self.caller, "id": self.job_id}}


def is_job_event(event: Any) -> bool:
    return isinstance(event, dict) and set(event) == {JOB_EVENT_KEY}


def job_ref_from_event(event: dict[str, Any]) -> JobRef:
    body = event[JOB_EVENT_KEY]
    caller, job_id = (body.get("caller"), body.get("id")) if isinstance(body, dict) else (None, None)
    if not (isinstance(caller, str) and CALLER_KEY.fullmatch(caller)):
        raise ApiError(400, "invalid_job_event", "the job event's caller is not a caller key")
    if not (isinstance(job_id, str) and JOB_ID.fullmatch(job_id)):
        raise ApiError(400, "invalid_job_event", "the job event's id is not a job id")
    return JobRef(caller, job_id)


def caller_key(event: dict[str, Any]) -> str:
    """The hash that names the caller's folder, from the function URL event's IAM identity.

    With ``AWS_IAM`` auth Lambda puts the signer in ``requestContext.authorizer.iam`` (``userArn``,
    ``accountId``, ...). https://docs.aws.amazon.com/lambda/latest/dg/urls-invocation.html#urls-payloads
    """
    iam = ((event.get("requestContext") or {}).get("authorizer") or {}).get("iam") or {}
    arn = iam.get("userArn") if isinstance(iam, dict) else None
    if not isinstance(arn, str) or not arn.startswith("arn:"):
        raise ApiError(
            403,
            "caller_unknown",
            "jobs need the caller's IAM identity, which a function URL with AWS_IAM auth provides",
        )
    match = ASSUMED_ROLE.match(arn)
    identity = match.group(1) if match else arn
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def parse_job_id(text: str) -> str:
    if not JOB_ID.fullmatch(text):
        raise ApiError(
            400, "invalid_job_id", f"{text[:80]!r} is not a job id (32 lowercase hex digits, from POST /jobs)"
        )
    return text


def jobs_disabled() -> ApiError:
    return ApiError(
        404,
        "jobs_disabled",
        "jobs are off on this function: deploy it with the Terraform variable jobs_enabled = true "
        "(which sets SD_JOBS_BUCKET), or call POST / synchronously",
    )


def images_of(document: dict[str, Any]) -> list[tuple[bytes, int]]:
    """(image bytes, seed) of each image of a generation's JSON answer, one image or a list of them."""
    if isinstance(document.get("images"), list):
        return [(base64.b64decode(item["image"]), int(item["seed"])) for item in document["images"]]
    return [(base64.b64decode(document["image"]), int(document["seed"]))]


def _now() -> float:
    return time.time()


class JobStore:
    """The jobs' S3 objects and the asynchronous start; clients are injectable (tests, moto)."""

    def __init__(
        self,
        settings: Settings,
        s3: Any = None,
        lambda_client: Any = None,
        clock: Callable[[], float] = _now,
    ) -> None:
        self.bucket = settings.jobs_bucket
        self.prefix = settings.jobs_prefix
        self.url_ttl = settings.jobs_url_ttl
        self.max_event_age = settings.jobs_max_event_age
        self.lambda_endpoint = settings.jobs_lambda_endpoint or None
        self._s3 = s3
        self._lambda = lambda_client
        self.clock = clock

    # ---- clients (created on first use: a function without jobs never imports boto3) ----------------

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            import boto3
            from botocore.config import Config

            # SigV4 and the virtual-hosted regional name: presigned GETs of SSE-KMS objects need SigV4.
            # https://docs.aws.amazon.com/AmazonS3/latest/userguide/UsingKMSEncryption.html#aws-signature-version-4-sse-kms
            self._s3 = boto3.client(
                "s3",
                config=Config(
                    signature_version="s3v4",
                    s3={"addressing_style": "virtual"},
                    connect_timeout=5,
                    read_timeout=30,
                    retries={"mode": "standard"},
                ),
            )
        return self._s3

    @property
    def lambda_client(self) -> Any:
        if self._lambda is None:
            import boto3
            from botocore.config import Config

            # The function has no NAT: it reaches the Lambda API through the stack's interface endpoint,
            # by that endpoint's own DNS name (SD_JOBS_LAMBDA_ENDPOINT), so the VPC's DNS stays untouched.
            # https://docs.aws.amazon.com/lambda/latest/dg/configuration-vpc-endpoints.html
            self._lambda = boto3.client(
                "lambda",
                endpoint_url=self.lambda_endpoint,
                config=Config(connect_timeout=5, read_timeout=15, retries={"mode": "standard"}),
            )
        return self._lambda

    # ---- keys and objects ----------------------------------------------------------------------------

    def key(self, ref: JobRef, name: str) -> str:
        return f"{self.prefix}{ref.caller}/{ref.job_id}/{name}"

    def _put_json(self, ref: JobRef, name: str, document: dict[str, Any]) -> None:
        body = json.dumps(document, separators=(",", ":")).encode("utf-8")
        self.s3.put_object(
            Bucket=self.bucket, Key=self.key(ref, name), Body=body, ContentType="application/json"
        )

    def _get_json(self, ref: JobRef, name: str) -> dict[str, Any] | None:
        """The object as JSON, or None when there is no such object."""
        from botocore.exceptions import ClientError

        key = self.key(ref, name)
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                return None
            # Without a matching s3:ListBucket grant S3 answers a missing key with 403: tell the two apart
            # with a listing the role may make (its grant is limited to the jobs prefix).
            # https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html#API_GetObject_RequestSyntax
            if code in ("AccessDenied", "403") and not self._exists(key):
                return None
            raise
        return json.loads(body)

    def _exists(self, key: str) -> bool:
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        return any(item["Key"] == key for item in listed.get("Contents", []))

    # ---- the three steps -----------------------------------------------------------------------------

    def submit(self, caller: str, request: Any, function_name: str, request_id: str) -> dict[str, Any]:
        """Store ``request`` (already validated), start the asynchronous run, return the queued status."""
        ref = JobRef(caller, uuid.uuid4().hex)
        status = {
            "job_id": ref.job_id,
            "status": "queued",
            "submitted_at": self.clock(),
            "request_id": request_id,
        }
        try:
            self._put_json(ref, "request.json", request)
            self._put_json(ref, "status.json", status)
        except Exception as exc:
            raise ApiError(
                503, "job_store_unavailable", f"the job could not be stored: {_reason(exc)}"
            ) from exc
        try:
            # Event: Lambda queues the event and answers 202 at once; the run is another invocation.
            # https://docs.aws.amazon.com/lambda/latest/dg/invocation-async.html
            self.lambda_client.invoke(
                FunctionName=function_name,
                InvocationType="Event",
                Payload=json.dumps(ref.event()).encode("utf-8"),
            )
        except Exception as exc:
            error = ApiError(503, "job_start_failed", f"the job could not be started: {_reason(exc)}")
            self._put_json(ref, "status.json", {**status, **_failed(error, self.clock())})
            raise error from exc
        return status

    def run(
        self,
        ref: JobRef,
        generate: Callable[[Any], dict[str, Any]],
        deadline: float | None,
        request_id: str,
    ) -> dict[str, Any]:
        """Generate the job's images and record the outcome; returns the final status document.

        Lambda may deliver an asynchronous event more than once: a job that is no longer queued is left
        alone. ``generate`` is the synchronous path's generation (its JSON answer); an ``ApiError`` it
        raises becomes the job's error, with the status code ``POST /`` would have answered.
        """
        status = self._get_json(ref, "status.json")
        if status is None or status.get("status") != "queued":
            return status or {"job_id": ref.job_id, "status": "unknown"}
        status = {
            **status,
            "status": "running",
            "started_at": self.clock(),
            "deadline": deadline,
            "run_request_id": request_id,
        }
        self._put_json(ref, "status.json", status)
        request = self._get_json(ref, "request.json")
        try:
            if request is None:
                raise ApiError(410, "job_request_missing", "the job's request is gone (expired?)")
            answer = generate(request)
        except ApiError as error:
            status = {**status, **_failed(error, self.clock())}
            self._put_json(ref, "status.json", status)
            return status
        extension = EXTENSIONS.get(str(answer.get("format")), "bin")
        images = []
        for index, (data, seed) in enumerate(images_of(answer)):
            name = f"image-{index}.{extension}"
            self.s3.put_object(
                Bucket=self.bucket,
                Key=self.key(ref, name),
                Body=data,
                ContentType=str(answer.get("content_type") or "application/octet-stream"),
            )
            images.append({"key": name, "seed": seed, "bytes": len(data)})
        metadata = {k: v for k, v in answer.items() if k not in ("image", "images", "seed")}
        status = {
            **status,
            "status": "done",
            "finished_at": self.clock(),
            "result": {**metadata, "images": images},
        }
        self._put_json(ref, "status.json", status)
        return status

    def fail(self, ref: JobRef, error: ApiError) -> None:
        """Record ``error`` as the job's outcome (a bug in the run: the service logged it)."""
        status = self._get_json(ref, "status.json") or {"job_id": ref.job_id}
        self._put_json(ref, "status.json", {**status, **_failed(error, self.clock())})

    def status(self, caller: str, job_id: str) -> dict[str, Any]:
        """What ``GET /jobs/{id}`` answers: the status, and once done a presigned URL per image."""
        ref = JobRef(caller, parse_job_id(job_id))
        status = self._get_json(ref, "status.json")
        if status is None:
            raise ApiError(404, "job_not_found", f"no job {job_id} for this caller (jobs expire)")
        now = self.clock()
        public = {k: v for k, v in status.items() if k not in ("result", "deadline")}
        state = status.get("status")
        if state == "queued" and now > float(status["submitted_at"]) + self.max_event_age + LOST_GRACE_S:
            error = ApiError(
                504, "job_expired", f"the job waited in Lambda's queue longer than {self.max_event_age} s"
            )
            return {**public, **_failed(error, now)}
        deadline = status.get("deadline")
        if state == "running" and deadline is not None and now > float(deadline) + LOST_GRACE_S:
            error = ApiError(
                500,
                "job_lost",
                "the job's invocation ended without a result (timeout or out of memory); its log has "
                f"request id {status.get('run_request_id')}",
            )
            return {**public, **_failed(error, now)}
        if state != "done":
            return public
        result = status["result"]
        images = [
            {
                "url": self.s3.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": self.key(ref, image["key"])},
                    ExpiresIn=self.url_ttl,
                ),
                "seed": image["seed"],
                "bytes": image["bytes"],
            }
            for image in result["images"]
        ]
        return {**public, **result, "images": images, "url_expires_at": now + self.url_ttl}


def _failed(error: ApiError, when: float) -> dict[str, Any]:
    return {"status": "failed", "finished_at": when, "http_status": error.status, **error.body()}


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
