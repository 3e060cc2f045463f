"""What seeding checks on AWS before anything is downloaded or uploaded: who is calling, and the bucket.

The seeder's side (instance, SSM agent, EFS mount) is checked by ``flow.seeder_session`` as it opens,
still before the hub is asked for a byte.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError, NoCredentialsError

from sd_lambda.seeding.errors import SeedError, aws_error
from sd_lambda.seeding.upload import check_bucket


def check_caller(sts: Any) -> str:
    """The caller's ARN: credentials resolve and AWS accepts them. GetCallerIdentity needs no IAM
    permission, so a failure here is about the credentials themselves, never a policy
    (https://docs.aws.amazon.com/STS/latest/APIReference/API_GetCallerIdentity.html)."""
    try:
        return str(sts.get_caller_identity()["Arn"])
    except NoCredentialsError as exc:
        raise SeedError(
            "no AWS credentials: set AWS_PROFILE (or run aws configure / aws sso login) and retry"
        ) from exc
    except ClientError as exc:  # expired or invalid keys, a token for another partition
        raise aws_error(exc, "sts", "your credentials") from exc


def check_aws(clients: Any, bucket: str) -> str:
    """Credentials, then the bucket (exists, and this caller may list it); the caller's ARN."""
    caller = check_caller(clients.sts)
    check_bucket(clients.s3, bucket)
    return caller
