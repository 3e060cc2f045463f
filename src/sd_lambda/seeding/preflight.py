"""What seeding checks on AWS before anything is downloaded or uploaded: who is calling, and the bucket.

The seeder's side (instance, SSM agent, EFS mount) is checked by ``flow.seeder_session`` as it opens,
still before the hub is asked for a byte.
"""

from __future__ import annotations

from typing import Any

from sd_lambda.aws_identity import CredentialsError, caller_identity
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.upload import check_bucket


def check_caller(sts: Any) -> str:
    """The caller's ARN: credentials resolve and AWS accepts them."""
    try:
        return caller_identity(sts)["Arn"]
    except CredentialsError as exc:
        raise SeedError(str(exc)) from None


def check_aws(clients: Any, bucket: str) -> str:
    """Credentials, then the bucket (exists, and this caller may list it); the caller's ARN."""
    caller = check_caller(clients.sts)
    check_bucket(clients.s3, bucket)
    return caller
