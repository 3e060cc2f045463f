"""One-line seeding errors, and AWS errors turned into them (naming the IAM permission that is missing)."""

from __future__ import annotations

from botocore.exceptions import ClientError

ACCESS_DENIED_CODES = frozenset(
    {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "403", "AllAccessDisabled"}
)
# API operation -> the IAM action that authorizes it, where the two differ.
IAM_ACTIONS: dict[str, str] = {
    "s3:HeadBucket": "s3:ListBucket",
    # Without s3:ListBucket a missing object answers 403 instead of 404.
    "s3:HeadObject": "s3:GetObject (and s3:ListBucket)",
    "s3:GetObject": "s3:GetObject (and s3:ListBucket)",
    "s3:ListObjectsV2": "s3:ListBucket",
    "s3:CreateMultipartUpload": "s3:PutObject",
    "s3:UploadPart": "s3:PutObject",
    "s3:CompleteMultipartUpload": "s3:PutObject",
    "s3:AbortMultipartUpload": "s3:AbortMultipartUpload",
}


class SeedError(Exception):
    """A seeding failure the operator can act on, as one line. ``current`` on EFS is untouched."""


def iam_action(service: str, operation: str) -> str:
    action = f"{service}:{operation}"
    return IAM_ACTIONS.get(action, action)


def aws_error(exc: ClientError, service: str, resource: str) -> SeedError:
    """``exc`` as a SeedError; AccessDenied names the permission (and resource) the caller lacks."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    message = str(error.get("Message") or "").splitlines()[0:1]
    detail = f": {message[0]}" if message else ""
    if code in ACCESS_DENIED_CODES or code.startswith("KMS.") or "AccessDenied" in code:
        needed = "kms:Decrypt / kms:GenerateDataKey on the bucket's key" if "KMS" in code else None
        needed = needed or iam_action(service, exc.operation_name)
        return SeedError(f"AccessDenied: you need {needed} on {resource} ({code}{detail})")
    return SeedError(f"{service}:{exc.operation_name} on {resource} failed: {code}{detail}")
