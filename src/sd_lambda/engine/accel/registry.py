"""Every acceleration the engine knows, in the order it applies them, and the ``SD_ACCEL`` switch.

Standard library only: the settings parse ``SD_ACCEL`` against this registry before torch is imported.
Each entry names the object that implements it (imported only when the engine checks or applies it):
``check(target)`` returns None when it applies to the loaded pipeline, or the reason it does not (an
unsupported model or component then runs stock diffusers there); ``apply(target)`` changes the
pipeline and returns a one-line detail for the load log and ``/health``.

Stages run in this order, and ``ACCELERATIONS`` lists its entries stage by stage:
  init      the Lambda handler's init, before torch is imported (the engine only reports it);
  load      how ``from_pretrained`` loads the weights, and the C library before it allocates them;
  pipeline  the loaded pipeline's modules and the tiny decoder, before the engine casts them to the
            runtime dtype (a folded kernel is rounded once, to that dtype).
``docs/performance.md`` has what each one measured and why it is on by default or opt-in.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("init", "load", "pipeline")
# The diffusers releases every hook and module replacement here was tested against.
TESTED_DIFFUSERS = ">=0.42,<0.43"


@dataclass(frozen=True)
class Acceleration:
    name: str
    summary: str
    default: bool
    stage: str
    # "module:object": the object has check(target) and apply(target).
    entry: str
    # The diffusers versions it is tested on; outside them the engine logs it and runs stock diffusers.
    diffusers: str = TESTED_DIFFUSERS
    # Computes something else by design (an approximation): never in the parity test's set.
    changes_image: bool = False

    def implementation(self) -> Any:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)

    def check(self, target: Target) -> str | None:
        return self.implementation().check(target)

    def apply(self, target: Target) -> str:
        return self.implementation().apply(target)


@dataclass
class Target:
    """What checks and applies see. ``dtype`` is the runtime torch dtype; ``pipeline`` is None in the
    load stage. Applies may add ``from_pretrained`` options (load stage) and per-generation objects
    (``state``: each has ``start()`` and ``stop()``, called around every generation)."""

    model_dir: Path
    dtype: Any
    selected: frozenset[str]
    pipeline: Any = None
    tiny_decoder: Any = None
    load_options: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


ACCELERATIONS: tuple[Acceleration, ...] = (
    Acceleration(
        "prefetch",
        "read the current revision's weights into the page cache during init, overlapping the imports",
        default=False,
        stage="init",
        entry="sd_lambda.engine.accel.prefetch:Prefetch",
        diffusers="",  # reads files; no diffusers involved
    ),
    Acceleration(
        "heap_keep",
        "keep freed memory in glibc's heap (never unmap): fewer page faults, more peak RSS;"
        " not with heap_trim",
        default=False,
        stage="load",
        entry="sd_lambda.engine.accel.heap:HeapKeep",
        diffusers="",
    ),
    Acceleration(
        "bf16_copy",
        "in bf16, map the model's bf16 copy (seed --bf16-copy) as stored: half the bytes, no cast",
        default=False,
        stage="load",
        entry="sd_lambda.engine.accel.bf16_copy:Bf16Copy",
    ),
    Acceleration(
        "vae_encoder_drop",
        "free the VAE's encoder half, which only image-to-image runs (init_image is then refused)",
        default=False,
        stage="pipeline",
        entry="sd_lambda.engine.accel.vae_encoder_drop:VaeEncoderDrop",
    ),
    Acceleration(
        "upsample_fold",
        "nearest-2x upsample + 3x3 conv folded into one 2x2 conv per output phase (16 multiply-adds, not 36)",
        default=True,
        stage="pipeline",
        entry="sd_lambda.engine.accel.upsample_fold:UpsampleFold",
    ),
    Acceleration(
        "in_place",
        "the VAE decoder's resnets in place, each full-resolution temporary freed once it is read",
        default=True,
        stage="pipeline",
        entry="sd_lambda.engine.accel.in_place:InPlace",
    ),
    Acceleration(
        "small_map_convs",
        "fp32 UNet convolutions over at most 256 output pixels run as im2col + BLAS, not oneDNN",
        default=True,
        stage="pipeline",
        entry="sd_lambda.engine.accel.small_conv:SmallMapConvs",
    ),
    Acceleration(
        "guidance_prefix",
        "a guided UNet call computes the layers before the first cross-attention once for both halves",
        default=False,
        stage="pipeline",
        entry="sd_lambda.engine.accel.guidance_prefix:GuidancePrefix",
    ),
    Acceleration(
        "feature_reuse",
        "DeepCache-style: every other UNet call reuses the deep features (changes the image)",
        default=False,
        stage="pipeline",
        entry="sd_lambda.engine.accel.feature_reuse:FeatureReuseAcceleration",
        changes_image=True,
    ),
    Acceleration(
        "heap_trim",
        "hand freed heap pages back to the OS before each decode and each full-VAE up block",
        default=True,
        stage="pipeline",
        entry="sd_lambda.engine.accel.heap:HeapTrim",
    ),
    Acceleration(
        "channels_last",
        "decoders' weights and inputs channels_last, so oneDNN skips layout reorders",
        default=True,
        stage="pipeline",
        entry="sd_lambda.engine.accel.weights:ChannelsLast",
        diffusers="",
    ),
    Acceleration(
        "page_release",
        "cast memory-mapped weights releasing each source tensor's pages (no second copy resident)",
        default=True,
        stage="pipeline",
        entry="sd_lambda.engine.accel.weights:PageRelease",
        diffusers="",
    ),
)
BY_NAME = {acceleration.name: acceleration for acceleration in ACCELERATIONS}
DEFAULTS = tuple(acceleration.name for acceleration in ACCELERATIONS if acceleration.default)
# Every acceleration that computes the same thing (up to summation order): the parity test's set.
SAME_IMAGE = tuple(acceleration.name for acceleration in ACCELERATIONS if not acceleration.changes_image)
SWITCH_HELP = (
    "default (the registry's defaults), all (every one that keeps the image: not "
    + ", ".join(name for name in BY_NAME if name not in SAME_IMAGE)
    + ", which only its name selects), none (stock diffusers), a comma list of names (exactly those),"
    " or -name/+name changes to the defaults; names: " + ", ".join(BY_NAME)
)


def resolve(spec: str) -> tuple[str, ...]:
    """``SD_ACCEL``'s value -> the selected names, in registry order; ValueError naming the known ones.

    ``all`` is every acceleration that keeps the image (``SAME_IMAGE``): one that changes it is chosen
    by name. Removing a name the defaults do not select is refused, as is more than one sign: both are
    a typo'd intent that would otherwise change nothing."""
    text = spec.strip()
    if text in ("", "default"):
        return DEFAULTS
    if text == "all":
        return SAME_IMAGE
    if text == "none":
        return ()
    tokens = [token.strip() for token in text.split(",") if token.strip()]
    changes = [(token[0], token[1:].strip()) if token[0] in "+-" else ("", token) for token in tokens]
    relative = [sign != "" for sign, _ in changes]
    if any(relative) and not all(relative):
        raise ValueError(f"SD_ACCEL={spec!r} mixes names with +name/-name changes; use one or the other")
    doubled = [token for token, (_, name) in zip(tokens, changes, strict=True) if name[:1] in ("+", "-")]
    if doubled:
        raise ValueError(
            f"SD_ACCEL={spec!r}: {', '.join(doubled)} has more than one sign; use +name or -name"
        )
    unknown = [name for _, name in changes if name not in BY_NAME]
    if unknown or not tokens:
        raise ValueError(
            f"SD_ACCEL={spec!r}: unknown acceleration {', '.join(unknown) or '(empty)'}; known: "
            f"{', '.join(BY_NAME)} (or default, all, none)"
        )
    removed_unselected = [name for sign, name in changes if sign == "-" and name not in DEFAULTS]
    if removed_unselected:
        raise ValueError(
            f"SD_ACCEL={spec!r}: -{', -'.join(removed_unselected)} removes what the defaults do not select"
            f" (defaults: {', '.join(DEFAULTS)})"
        )
    selected = set(DEFAULTS) if all(relative) else set()
    for sign, name in changes:
        if sign == "-":
            selected.discard(name)
        else:
            selected.add(name)
    return tuple(name for name in BY_NAME if name in selected)


def tested_on(acceleration: Acceleration, version: str) -> bool:
    """Whether ``version`` of diffusers is in the range ``acceleration`` was tested on."""
    if not acceleration.diffusers:
        return True
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(acceleration.diffusers).contains(version, prereleases=True)
