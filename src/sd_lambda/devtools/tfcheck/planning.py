"""What the stub answers for a resource plan: Terraform's proposed state, with computed gaps unknown.

Terraform core hands the provider a *proposed new state* (config merged with prior state). A real
provider then fills in what only the cloud knows; offline we mark every computed attribute the
configuration left null as unknown, which is what ``terraform plan`` shows as ``(known after apply)``.
Two values the real aws provider derives from its own configuration are derived the same way here:
``tags_all`` (provider ``default_tags`` merged with the resource's ``tags``) and ``region``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sd_lambda.devtools.tfcheck.cty import UNKNOWN, Unknown, is_known
from sd_lambda.devtools.tfcheck.schema import Block

# (attribute path, attribute schema) -> value for a computed attribute the config left null.
Filler = Callable[[tuple[str, ...], dict[str, Any]], Any]


@dataclass(frozen=True)
class ProviderSettings:
    """The parts of the ``provider "aws"`` block that shape planned values."""

    region: str | None = None
    default_tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(
        cls, config: dict[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> ProviderSettings:
        """Settings from the provider block; ``environ`` (the plugin's environment) supplies the region
        the block leaves unset, in the aws provider's order: ``AWS_REGION``, then ``AWS_DEFAULT_REGION``
        (https://registry.terraform.io/providers/hashicorp/aws/latest/docs#region).
        """
        config = config or {}
        environ = environ or {}
        region = config.get("region") or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
        tags: dict[str, str] = {}
        for default_tags in config.get("default_tags") or []:
            if isinstance(default_tags, dict) and isinstance(default_tags.get("tags"), dict):
                tags.update(default_tags["tags"])
        return cls(region=region if isinstance(region, str) else None, default_tags=tags)


def fill_computed(block: Block, value: Any, filler: Filler, path: tuple[str, ...] = ()) -> Any:
    """Copy of ``value`` (an object of ``block``) with null computed attributes replaced by ``filler``."""
    if value is None or isinstance(value, Unknown):
        return value
    result = dict(value)
    for name, attribute in block.get("attributes", {}).items():
        current = result.get(name)
        if current is None:
            if attribute.get("computed"):
                result[name] = filler((*path, name), attribute)
        elif "nested_type" in attribute:
            nested = attribute["nested_type"]
            result[name] = _map_nested(
                nested["nesting_mode"],
                current,
                lambda obj, n=name, nt=nested: fill_computed(nt, obj, filler, (*path, n)),
            )
    for name, nested in block.get("block_types", {}).items():
        if result.get(name) is not None:
            result[name] = _map_nested(
                nested["nesting_mode"],
                result[name],
                lambda obj, n=name, nb=nested: fill_computed(nb["block"], obj, filler, (*path, n)),
            )
    return result


def _map_nested(nesting_mode: str, value: Any, function: Callable[[Any], Any]) -> Any:
    if isinstance(value, Unknown):
        return value
    if nesting_mode in ("single", "group"):
        return function(value)
    if nesting_mode in ("list", "set"):
        return [function(item) for item in value]
    if nesting_mode == "map":
        return {key: function(item) for key, item in value.items()}
    raise ValueError(f"unknown nesting mode {nesting_mode!r}")


def plan_change(
    block: Block,
    prior: dict[str, Any] | None,
    proposed: dict[str, Any],
    config: dict[str, Any],
    settings: ProviderSettings,
) -> dict[str, Any]:
    """Planned state for creating (``prior is None``) or updating a resource.

    Terraform's proposal already carries prior values of computed attributes into an update; what
    changes with the configuration (``tags_all``, the default ``region``) is derived again here.
    """
    planned = dict(proposed)
    attributes = block.get("attributes", {})
    if attributes.get("tags_all", {}).get("computed") and config.get("tags_all") is None:
        tags = planned.get("tags")
        known = tags is None or is_known(tags)
        planned["tags_all"] = {**settings.default_tags, **(tags or {})} if known else UNKNOWN
    if attributes.get("region", {}).get("computed") and config.get("region") is None and settings.region:
        planned["region"] = settings.region
    if prior is not None:
        return planned
    return fill_computed(block, planned, lambda _path, _attribute: UNKNOWN)


def conform(block: Block, value: Any) -> Any:
    """Shape a JSON state object to ``block``: missing attributes become null, unknown keys are dropped.

    Used for state upgrades, where stored JSON may predate attributes the schema has now.
    """
    if not isinstance(value, dict):
        return None
    result: dict[str, Any] = {name: value.get(name) for name in block.get("attributes", {})}
    for name, nested in block.get("block_types", {}).items():
        current = value.get(name)
        mode = nested["nesting_mode"]
        if current is None:
            result[name] = [] if mode in ("list", "set") else ({} if mode == "map" else None)
        else:
            result[name] = _map_nested(mode, current, lambda obj, nb=nested: conform(nb["block"], obj))
    return result
