"""``sd-lambda generate --job``: submit to ``POST /jobs``, poll ``GET /jobs/{id}``, download the images.

For work longer than a synchronous call should wait for (many steps, several images). The submit and
every poll are SigV4-signed like ``POST /`` and retried the same way (``ops.client``); the polls back
off exponentially up to a cap, and give up after a total timeout with the job id, so nothing is lost:
the job keeps running and its result stays in the bucket until it expires. Images are downloaded
through the presigned URLs the status carries (no credentials needed for those).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from sd_lambda.ops.client import (
    RETRYABLE_STATUS,
    FunctionUrlClient,
    GenerationResponse,
    InvokeError,
    RetryPolicy,
    error_from_response,
    sign,
)

DOWNLOAD_TIMEOUT_S = (10.0, 120.0)


@dataclass(frozen=True)
class PollPolicy:
    """How to wait for a job: delays double from ``first_delay_s`` up to ``max_delay_s``; after
    ``timeout_s`` in total the client stops waiting. ``sleep`` and ``clock`` are injectable for tests."""

    first_delay_s: float = 2.0
    max_delay_s: float = 30.0
    timeout_s: float = 3600.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def delays(self) -> Iterator[float]:
        delay = self.first_delay_s
        while True:
            yield delay
            delay = min(self.max_delay_s, delay * 2)


def signed_get(client: FunctionUrlClient, url: str) -> tuple[bytes, dict[str, str]]:
    """GET ``url`` signed as ``client`` signs, retried on what ``client.post`` retries."""
    import requests

    last_failure = ""
    for attempt in range(1, client.retry.attempts + 1):
        headers = sign(
            url, b"", {"Accept": "application/json"}, client.credentials, str(client.region), "GET"
        )
        try:
            response = client.session.get(url, headers=headers, timeout=client.timeout, allow_redirects=False)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            last_failure = f"connection failed: {_first_line(exc)}"
        else:
            response_headers = {name.lower(): value for name, value in response.headers.items()}
            if response.status_code < 300:
                return response.content, response_headers
            if response.status_code not in RETRYABLE_STATUS:
                raise error_from_response(response.status_code, response.content, response_headers)
            last_failure = f"HTTP {response.status_code}"
        if attempt < client.retry.attempts:
            client.retry.sleep(client.retry.delay(attempt))
    raise InvokeError(f"gave up after {client.retry.attempts} attempts; last: {last_failure}")


def run_job(
    url: str,
    payload: Mapping[str, Any],
    *,
    region: str | None = None,
    credentials: Any = None,
    retry: RetryPolicy | None = None,
    poll: PollPolicy | None = None,
    session: Any = None,
    progress: Callable[[str], None] = lambda line: None,
) -> GenerationResponse:
    """Submit ``payload`` as a job, wait for it, download its images; InvokeError if it failed."""
    poll = poll or PollPolicy()
    client = FunctionUrlClient(
        urljoin(url, "/jobs"),
        region=region,
        credentials=credentials,
        retry=retry or RetryPolicy(),
        session=session,
    )
    body, _, attempts = client.post(payload, accept="application/json")
    queued = _json(body, "POST /jobs")
    job_id = str(queued["job_id"])
    status_url = urljoin(url, str(queued.get("status_url") or f"/jobs/{job_id}"))
    progress(f"job {job_id} queued; polling {status_url}")
    started = poll.clock()
    delays = poll.delays()
    while True:
        status = _json(signed_get(client, status_url)[0], f"GET /jobs/{job_id}")
        state = status.get("status")
        elapsed = poll.clock() - started
        progress(f"job {job_id}: {state} after {elapsed:.0f} s")
        if state == "done":
            break
        if state == "failed":
            error = status.get("error") or {}
            raise InvokeError(
                f"job {job_id} failed: {error.get('code', 'error')}: {error.get('message', '')}",
                status.get("http_status"),
            )
        delay = next(delays)
        if elapsed + delay > poll.timeout_s:
            raise InvokeError(
                f"job {job_id} is still {state} after {elapsed:.0f} s (--job-timeout {poll.timeout_s:g}); "
                f"it keeps running: GET {status_url} later"
            )
        poll.sleep(delay)
    images = tuple(_download(client.session, image["url"]) for image in status["images"])
    model = status.get("model") or {}
    return GenerationResponse(
        images=images,
        content_type=str(status.get("content_type") or "application/octet-stream"),
        seeds=tuple(image.get("seed") for image in status["images"]),
        timings_ms={str(k): float(v) for k, v in (status.get("timings") or {}).items()},
        request_id=status.get("run_request_id") or status.get("request_id"),
        model=model.get("name"),
        revision=model.get("revision"),
        fallback=f"{status['fallback_from']}->{status.get('format')}"
        if status.get("fallback_from")
        else None,
        attempts=attempts,
    )


def _download(session: Any, url: str) -> bytes:
    """One result image through its presigned URL (time-limited; a fresh GET /jobs/{id} signs anew)."""
    import requests

    try:
        response = session.get(url, timeout=DOWNLOAD_TIMEOUT_S)
    except requests.exceptions.RequestException as exc:
        raise InvokeError(f"downloading a job image failed: {_first_line(exc)}") from None
    if response.status_code != 200:
        raise InvokeError(
            f"downloading a job image failed: HTTP {response.status_code} (an expired URL answers 403: "
            "ask GET /jobs/{id} again for fresh ones)"
        )
    return bytes(response.content)


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise InvokeError(f"{what} did not answer JSON: {body[:200]!r}") from None
    if not isinstance(data, dict):
        raise InvokeError(f"{what} answered {type(data).__name__}, not an object")
    return data


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
