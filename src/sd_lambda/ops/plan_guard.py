"""Refuse a saved Terraform plan (``terraform show -json``) that would destroy data the stack holds.

Changing ``name`` or ``kms_key_arn`` replaces the EFS file system today, deleting every seeded model;
the apply driver checks each plan with :func:`data_loss` (and the live function with
:func:`function_removal`, the same walk) before applying it. Resources are matched by
type, not address, so the check holds when the stack is called as a module (``module.<x>.`` prefixes)
and whatever the ``count``/``for_each`` keys are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from sd_lambda.cli import option

# Resource type -> what is lost with it.
PROTECTED_TYPES: Mapping[str, str] = {
    "aws_efs_file_system": "EFS file system: every seeded model",
    "aws_efs_access_point": "EFS access point: the function's view of the models",
    "aws_s3_bucket": "weights bucket",
    "aws_kms_key": "KMS key: what it encrypted becomes unreadable",
    "aws_ecr_repository": "ECR repository: every pushed image",
}


def removals(plan_document: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(verb, change)`` for each managed resource the plan deletes (``"delete"``) or replaces
    (``"replace"``: delete and create, in either order). The one walk both refusals share."""
    for change in plan_document.get("resource_changes", []):
        actions = change.get("change", {}).get("actions", [])
        if change.get("mode", "managed") != "managed" or "delete" not in actions:
            continue
        yield ("replace" if "create" in actions else "delete"), change


def data_loss(plan_document: Mapping[str, Any]) -> list[str]:
    """``"<verb> <address> (<what is lost>)"`` for each protected resource the plan deletes or replaces."""
    return [
        f"{verb} {change.get('address')} ({PROTECTED_TYPES[change.get('type', '')]})"
        for verb, change in removals(plan_document)
        if change.get("type", "") in PROTECTED_TYPES
    ]


def function_removal(plan_document: Mapping[str, Any], address: str) -> str | None:
    """``"delete"`` or ``"replace"`` when the plan removes the resource at ``address``, else None."""
    return next((verb for verb, change in removals(plan_document) if change.get("address") == address), None)


def data_loss_message(losses: list[str]) -> str:
    return (
        f"refusing a plan that would {'; '.join(losses)}. If that is intended (e.g. a new name), "
        f"rerun with {option('--allow-data-loss')}; otherwise revert the variable that causes it"
    )
