"""What seeding checks on AWS before anything is downloaded or uploaded: who is calling, and the bucket.

The seeder's side (instance, SSM agent, EFS mount) is checked by ``flow.seeder_session`` as it opens,
still before the hub is asked for a byte.
"""

from __future__ import annotations

from typing import Any

from sd_lambda.ops.aws_identity import CredentialsError, caller_identity
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.upload import check_bucket


def check_caller(sts: Any) -> str:
    """The caller's ARN: credentials resolve and AWS accepts them."""
    try:
        return caller_identity(sts)["Arn"]
    except CredentialsError as exc:
        raise SeedError(str(exc)) from None


def check_aws(clients: Any, *buckets: str) -> str:
    """Credentials, then each bucket once (exists, and this caller may list it): the stack's, and a
    ``--from-s3`` URL's when it is another one; the caller's ARN. Staging relies on it and does not ask
    again."""
    caller = check_caller(clients.sts)
    for bucket in dict.fromkeys(buckets):
        check_bucket(clients.s3, bucket)
    return caller
