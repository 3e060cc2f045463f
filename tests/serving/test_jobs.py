"""Jobs end to end through the real Service with the tiny model: S3 is moto, and the asynchronous invoke
is captured (its Payload is fed back to the handler, as Lambda would deliver it)."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import requests
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber
from moto import mock_aws

from sd_lambda.serving.jobs import JOB_EVENT_KEY, JobStore, caller_key
from sd_lambda.serving.service import Service
from sd_lambda.settings import Settings

from .conftest import Context, LoggedService, body_json, url_event

BUCKET = "sd-jobs-test"
REGION = "eu-west-1"
ALICE = "arn:aws:iam::123456789012:role/alice"
BOB = "arn:aws:iam::123456789012:role/bob"
REQUEST = {"prompt": "a red fox", "num_inference_steps": 1, "seed": 5, "width": 64, "height": 64}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class InvokeRecorder:
    """Stands in for the Lambda client: records each Invoke's arguments and accepts it as Lambda does."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail

    def invoke(self, **kwargs: Any) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        self.calls.append(kwargs)
        return {"StatusCode": 202}

    def delivered_event(self, index: int = -1) -> Any:
        return json.loads(self.calls[index]["Payload"])


class TimedContext(Context):
    def __init__(self, remaining_ms: int) -> None:
        super().__init__()
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def as_caller(event: dict[str, Any], arn: str) -> dict[str, Any]:
    """The event as a function URL with AWS_IAM auth hands it over: the signer in authorizer.iam."""
    event["requestContext"]["authorizer"] = {
        "iam": {"accountId": arn.split(":")[4], "userArn": arn, "userId": "AIDAEXAMPLE", "callerId": "x"}
    }
    return event


@dataclasses.dataclass
class JobsRig:
    service: LoggedService
    s3: Any
    invoker: InvokeRecorder
    clock: Clock
    store: JobStore

    def call(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        return self.service.service.handle(event, context or Context())

    def submit(self, request: Any = REQUEST, caller: str = ALICE) -> dict[str, Any]:
        return self.call(as_caller(url_event(path="/jobs", body=request), caller))

    def status(self, job_id: str, caller: str = ALICE) -> dict[str, Any]:
        return self.call(as_caller(url_event(method="GET", path=f"/jobs/{job_id}"), caller))

    def deliver(self, index: int = -1, context: Any = None) -> dict[str, Any]:
        return self.call(self.invoker.delivered_event(index), context)

    def object_keys(self) -> list[str]:
        return [item["Key"] for item in self.s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield s3


def make_rig(settings: Settings, s3: Any, invoker: InvokeRecorder | None = None) -> JobsRig:
    jobs_settings = dataclasses.replace(settings, jobs_bucket=BUCKET, jobs_url_ttl=300)
    clock = Clock()
    invoker = invoker or InvokeRecorder()
    # The store makes its own S3 client (moto answers it): the one the function signs URLs with.
    store = JobStore(jobs_settings, lambda_client=invoker, clock=clock)
    service = LoggedService(jobs_settings)
    service.service.jobs = store
    return JobsRig(service, s3, invoker, clock, store)


@pytest.fixture
def rig(settings: Settings, aws: Any) -> JobsRig:
    return make_rig(settings, aws)


def test_submit_run_status_and_presigned_download(rig: JobsRig) -> None:
    submitted = rig.submit()
    assert submitted["statusCode"] == 202
    body = body_json(submitted)
    job_id = body["job_id"]
    assert (body["status"], body["status_url"]) == ("queued", f"/jobs/{job_id}")
    assert submitted["headers"]["location"] == f"/jobs/{job_id}"

    # One asynchronous invoke of this same function, carrying only the reference (the request is in S3).
    (call,) = rig.invoker.calls
    assert (call["FunctionName"], call["InvocationType"]) == (Context.function_name, "Event")
    event = rig.invoker.delivered_event()
    assert event == {JOB_EVENT_KEY: {"caller": caller_key(as_caller(url_event(), ALICE)), "id": job_id}}
    assert len(call["Payload"]) < 1024
    prefix = f"jobs/{event[JOB_EVENT_KEY]['caller']}/{job_id}/"
    assert sorted(rig.object_keys()) == [prefix + "request.json", prefix + "status.json"]
    stored = rig.s3.get_object(Bucket=BUCKET, Key=prefix + "request.json")["Body"].read()
    assert json.loads(stored) == REQUEST

    assert body_json(rig.status(job_id))["status"] == "queued"
    assert rig.deliver() == {"job_id": job_id, "status": "done"}

    done = rig.status(job_id)
    assert done["statusCode"] == 200
    result = body_json(done)
    assert result["status"] == "done"
    assert result["model"]["name"]
    assert {"inference", "encode"} <= set(result["timings"])
    assert (result["width"], result["height"], result["content_type"]) == (64, 64, "image/png")
    assert result["url_expires_at"] == rig.clock.now + 300
    (image,) = result["images"]
    assert image["seed"] == 5
    # SigV4 (SSE-KMS objects refuse anything else) on the bucket's regional virtual-hosted name.
    assert image["url"].startswith(f"https://{BUCKET}.s3.{REGION}.amazonaws.com/jobs/")
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in image["url"]
    assert "X-Amz-Expires=300" in image["url"]
    downloaded = requests.get(image["url"], timeout=30)
    assert downloaded.status_code == 200
    assert downloaded.content.startswith(b"\x89PNG")
    assert len(downloaded.content) == image["bytes"]

    # The same generation code as POST /: the same request answers the same image synchronously.
    sync = rig.call(url_event(body=REQUEST, headers={"accept": "application/json"}))
    sync_body = body_json(sync)
    sync_images = sync_body.get("images") or [sync_body]
    assert base64.b64decode(sync_images[0]["image"]) == downloaded.content


def test_a_failed_job_reports_the_error_code_post_would_have_answered(
    settings: Settings, aws: Any, tmp_path: Any
) -> None:
    rig = make_rig(dataclasses.replace(settings, model_root=tmp_path / "no-models"), aws)
    sync = rig.call(url_event(body=REQUEST))
    job_id = body_json(rig.submit())["job_id"]
    assert rig.deliver() == {"job_id": job_id, "status": "failed"}
    failed = body_json(rig.status(job_id))
    assert failed["status"] == "failed"
    assert failed["http_status"] == sync["statusCode"] == 503
    assert failed["error"]["code"] == body_json(sync)["error"]["code"]
    assert not [key for key in rig.object_keys() if "/image-" in key]


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": "a fox", "num_inference_steps": 0},  # a field
        {"prompt": "a fox", "init_image": "not base64!"},  # the start image, decoded before the model
        {"prompt": "a fox", "init_image": base64.b64encode(b"GIF89a" + bytes(64)).decode()},
        {"prompt": "a fox", "loras": [{"name": "no-such-style", "scale": 1}]},  # an adapter name
    ],
    ids=["field", "base64", "not-an-image", "unknown-adapter"],
)
def test_bad_input_is_refused_at_once_like_post_and_nothing_is_stored(rig: JobsRig, bad: dict) -> None:
    sync = rig.call(url_event(body=bad))
    refused = rig.submit(bad)
    assert refused["statusCode"] == sync["statusCode"]
    assert 400 <= refused["statusCode"] < 500
    assert body_json(refused)["error"] == body_json(sync)["error"]
    assert rig.object_keys() == []
    assert rig.invoker.calls == []


def test_another_callers_job_is_not_found_and_looks_like_an_unknown_id(rig: JobsRig) -> None:
    job_id = body_json(rig.submit(caller=ALICE))["job_id"]
    rig.deliver()
    theirs = rig.status(job_id, caller=BOB)
    unknown = rig.status("0" * 32, caller=BOB)
    assert theirs["statusCode"] == unknown["statusCode"] == 404
    assert body_json(theirs)["error"]["code"] == body_json(unknown)["error"]["code"] == "job_not_found"
    assert "images" not in body_json(theirs)
    assert body_json(rig.status(job_id, caller=ALICE))["status"] == "done"


def test_assumed_role_sessions_share_the_role_and_roles_do_not() -> None:
    def key(arn: str) -> str:
        return caller_key(as_caller(url_event(), arn))

    session_a = "arn:aws:sts::123456789012:assumed-role/alice/session-1"
    session_b = "arn:aws:sts::123456789012:assumed-role/alice/session-2"
    assert key(session_a) == key(session_b)
    assert key(session_a) != key("arn:aws:sts::123456789012:assumed-role/bob/session-1")
    assert key(ALICE) != key(BOB)
    assert len(key(ALICE)) == 32


def test_a_request_without_an_iam_identity_is_refused(rig: JobsRig) -> None:
    response = rig.call(url_event(path="/jobs", body=REQUEST))
    assert response["statusCode"] == 403
    assert body_json(response)["error"]["code"] == "caller_unknown"


@pytest.mark.parametrize("job_id", ["xyz", "A" * 32, "0" * 31, "", "0" * 32 + "/image-0.png"])
def test_malformed_job_ids_are_400(rig: JobsRig, job_id: str) -> None:
    response = rig.status(job_id)
    assert response["statusCode"] == 400
    assert body_json(response)["error"]["code"] == "invalid_job_id"


def test_job_routes_allow_only_their_methods(rig: JobsRig) -> None:
    listing = rig.call(as_caller(url_event(method="GET", path="/jobs"), ALICE))
    assert (listing["statusCode"], listing["headers"]["allow"]) == (405, "POST")
    posted = rig.call(as_caller(url_event(path="/jobs/" + "0" * 32, body=REQUEST), ALICE))
    assert (posted["statusCode"], posted["headers"]["allow"]) == (405, "GET")


def test_jobs_disabled_is_a_clear_4xx_naming_the_terraform_variable(settings: Settings) -> None:
    service = LoggedService(settings)  # SD_JOBS_BUCKET unset
    assert service.service.jobs is None
    for event in (
        url_event(path="/jobs", body=REQUEST),
        url_event(method="GET", path="/jobs/" + "0" * 32),
    ):
        response = service(as_caller(event, ALICE))
        assert response["statusCode"] == 404
        error = body_json(response)["error"]
        assert error["code"] == "jobs_disabled"
        assert "jobs_enabled" in error["message"]


def test_a_redelivered_event_does_not_run_the_job_again(rig: JobsRig) -> None:
    job_id = body_json(rig.submit())["job_id"]
    rig.deliver()
    first = body_json(rig.status(job_id))
    rig.clock.now += 100
    assert rig.deliver() == {"job_id": job_id, "status": "done"}
    again = body_json(rig.status(job_id))
    assert again["finished_at"] == first["finished_at"]


def test_a_job_whose_invocation_died_is_reported_lost_after_its_deadline(rig: JobsRig) -> None:
    job_id = body_json(rig.submit())["job_id"]
    ref_caller = rig.invoker.delivered_event()[JOB_EVENT_KEY]["caller"]
    # What a run that timed out leaves behind: the running status with its deadline, nothing after it.
    key = f"jobs/{ref_caller}/{job_id}/status.json"
    status = json.loads(rig.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    status.update(
        status="running", started_at=rig.clock.now, deadline=rig.clock.now + 900, run_request_id="r-1"
    )
    rig.s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(status).encode())
    rig.clock.now += 900
    assert body_json(rig.status(job_id))["status"] == "running"
    rig.clock.now += 61
    lost = body_json(rig.status(job_id))
    assert (lost["status"], lost["error"]["code"], lost["http_status"]) == ("failed", "job_lost", 500)
    assert "r-1" in lost["error"]["message"]


def test_the_run_records_its_deadline_from_the_invocation_context(rig: JobsRig) -> None:
    job_id = body_json(rig.submit())["job_id"]
    caller = rig.invoker.delivered_event()[JOB_EVENT_KEY]["caller"]
    context = TimedContext(remaining_ms=120_000)
    rig.deliver(context=context)
    key = f"jobs/{caller}/{job_id}/status.json"
    stored = json.loads(rig.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert stored["deadline"] == rig.clock.now + 120
    assert stored["run_request_id"] == context.aws_request_id
    public = body_json(rig.status(job_id))
    assert "deadline" not in public


def test_a_job_queued_past_the_event_age_is_reported_expired(rig: JobsRig) -> None:
    job_id = body_json(rig.submit())["job_id"]
    rig.clock.now += 3600 + 61
    expired = body_json(rig.status(job_id))
    assert (expired["status"], expired["error"]["code"]) == ("failed", "job_expired")


def test_a_failed_start_is_503_and_recorded(settings: Settings, aws: Any) -> None:
    rig = make_rig(settings, aws, InvokeRecorder(fail=RuntimeError("endpoint unreachable")))
    response = rig.submit()
    assert response["statusCode"] == 503
    assert body_json(response)["error"]["code"] == "job_start_failed"
    (status_key,) = [key for key in rig.object_keys() if key.endswith("status.json")]
    status = json.loads(rig.s3.get_object(Bucket=BUCKET, Key=status_key)["Body"].read())
    assert (status["status"], status["error"]["code"]) == ("failed", "job_start_failed")


def test_the_invoke_call_matches_lambdas_api_model(settings: Settings) -> None:
    """botocore's Stubber checks the parameters against the Invoke operation's model."""
    client = boto3.client("lambda", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="y")
    s3 = FakeS3()
    store = JobStore(dataclasses.replace(settings, jobs_bucket=BUCKET), s3=s3, lambda_client=client)
    with Stubber(client) as stubber:
        stubber.add_response(
            "invoke",
            {"StatusCode": 202},
            {"FunctionName": "sd-lambda-test", "InvocationType": "Event", "Payload": ANY},
        )
        status = store.submit("a" * 32, REQUEST, "sd-lambda-test", "req-1")
        stubber.assert_no_pending_responses()
    assert status["status"] == "queued"


class FakeS3:
    """An S3 client whose GetObject answers AccessDenied for a missing key, as S3 does for a role
    without s3:ListBucket on it."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_object(self, Bucket: str, Key: str, Body: bytes, ContentType: str) -> None:
        self.objects[Key] = Body

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        if Key not in self.objects:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "GetObject")
        raise AssertionError("not used")

    def list_objects_v2(self, Bucket: str, Prefix: str, MaxKeys: int) -> dict[str, Any]:
        return {"Contents": [{"Key": key} for key in self.objects if key.startswith(Prefix)][:MaxKeys]}


def test_access_denied_for_a_missing_status_is_not_found(settings: Settings) -> None:
    store = JobStore(dataclasses.replace(settings, jobs_bucket=BUCKET), s3=FakeS3(), lambda_client=None)
    service = LoggedService(settings)
    service.service = Service(service.service.settings, service.predictor, service.service.logger, jobs=store)
    response = service(as_caller(url_event(method="GET", path="/jobs/" + "0" * 32), ALICE))
    assert response["statusCode"] == 404
    assert body_json(response)["error"]["code"] == "job_not_found"


def test_a_job_of_several_images_stores_and_signs_each(rig: JobsRig) -> None:
    job_id = body_json(rig.submit({**REQUEST, "num_images": 2}))["job_id"]
    assert rig.deliver() == {"job_id": job_id, "status": "done"}
    result = body_json(rig.status(job_id))
    assert [image["seed"] for image in result["images"]] == [5, 6]
    downloads = [requests.get(image["url"], timeout=30).content for image in result["images"]]
    assert all(data.startswith(b"\x89PNG") for data in downloads)
    assert downloads[0] != downloads[1]
    assert len([key for key in rig.object_keys() if "/image-" in key]) == 2


@pytest.mark.parametrize("prefix", ["jobs", "/jobs/", "jobs//", "", "jobs/*"])
def test_a_malformed_jobs_prefix_fails_init_naming_the_variable(prefix: str) -> None:
    with pytest.raises(ValueError, match="SD_JOBS_PREFIX"):
        Settings.from_env({"SD_JOBS_BUCKET": BUCKET, "SD_JOBS_PREFIX": prefix or "/"})


def test_the_jobs_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {"SD_JOBS_BUCKET": BUCKET, "SD_JOBS_PREFIX": "work/jobs/", "SD_JOBS_URL_TTL": "120"}
    )
    assert (settings.jobs_bucket, settings.jobs_prefix, settings.jobs_url_ttl) == (BUCKET, "work/jobs/", 120)
    with pytest.raises(ValueError, match="SD_JOBS_URL_TTL"):
        Settings.from_env({"SD_JOBS_URL_TTL": "7200"})
