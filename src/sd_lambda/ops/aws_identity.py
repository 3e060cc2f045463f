"""Who is calling AWS: the credentials check every operator command runs before anything else.

``sts:GetCallerIdentity`` needs no IAM permission, so a failure here is about the credentials themselves
(none found, expired, invalid), never a policy
(https://docs.aws.amazon.com/STS/latest/APIReference/API_GetCallerIdentity.html).
"""

from __future__ import annotations

from typing import Any


class CredentialsError(Exception):
    """No usable AWS credentials, as one line that says what to do."""


def caller_identity(sts: Any) -> dict[str, str]:
    """``GetCallerIdentity``'s answer (``Account``, ``Arn``, ``UserId``), or :class:`CredentialsError`."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    from sd_lambda.cli import ask_for

    try:
        answer = sts.get_caller_identity()
    except NoCredentialsError:
        raise CredentialsError(
            "no AWS credentials found: configure a profile, SSO (aws sso login) or environment credentials"
        ) from None
    except NoRegionError:
        raise CredentialsError(
            f"no AWS region: {ask_for('--region', '<region>')} (or set AWS_REGION)"
        ) from None
    except ClientError as exc:  # expired or invalid keys, a token for another partition
        error = exc.response.get("Error", {})
        reason = f"{error.get('Code', 'error')}: {_first_line(error.get('Message', ''))}"
        raise CredentialsError(f"AWS credentials do not work (sts:GetCallerIdentity): {reason}") from None
    except BotoCoreError as exc:  # the endpoint cannot be reached, a profile that does not parse, ...
        raise CredentialsError(
            f"AWS credentials do not work (sts:GetCallerIdentity): {_first_line(str(exc))}"
        ) from None
    return {key: str(answer[key]) for key in ("Account", "Arn", "UserId")}


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
