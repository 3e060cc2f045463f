"""The generation request: ONE declaration of every field, its limits, default source and description.

``GenerationRequest`` is the single source of truth. Validation (strict types, unknown fields refused),
the error each bad value gets, the defaults applied once the model is loaded, and docs/api.md's request
table (``sd_lambda.devtools.docs``) are all derived from it, so they cannot drift apart.

Limits that an operator may tune are declared as ``SettingMax("<Settings attribute>")`` and read from
``Settings`` at validation time: pass ``context={"settings": settings}`` (``parse_request`` does).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Annotated, Any, Literal

import annotated_types
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from sd_lambda.engine.generation import (
    DECODERS,
    DEFAULT_STRENGTH,
    MEDIA_TYPES,
    SCHEDULERS,
    SEED_SPACE,
    GenerationParams,
    LoraChoice,
    ModelDefaults,
)
from sd_lambda.layout import LayoutError, check_name
from sd_lambda.serving.errors import ApiError
from sd_lambda.settings import Settings

if TYPE_CHECKING:
    from PIL import Image

    from sd_lambda.engine.backend import Engine

UINT32_MAX = SEED_SPACE - 1


@dataclass(frozen=True)
class SettingMax:
    """Inclusive upper bound (a length, for strings) read from ``Settings.<setting>`` when validating."""

    setting: str

    def limit(self, settings: Settings) -> int:
        return int(getattr(settings, self.setting))

    @property
    def env(self) -> str:
        return next(f.metadata["env"] for f in fields(Settings) if f.name == self.setting)


@dataclass(frozen=True)
class DecodedMax:
    """Upper bound on the bytes a base64 string decodes to, read from ``Settings.<setting>``; enforced
    where the string is decoded (sd_lambda.serving.init_image), documented from here."""

    setting: str

    def limit(self, settings: Settings) -> int:
        return int(getattr(settings, self.setting))

    @property
    def env(self) -> str:
        return SettingMax(self.setting).env


@dataclass(frozen=True)
class FromModel:
    """Missing -> the loaded model's own value (``ModelDefaults.<attribute>``)."""

    attribute: str

    @property
    def doc(self) -> str:
        return "the model's own"


@dataclass(frozen=True)
class RandomSeed:
    """Missing -> a fresh random seed (always returned, so any image can be reproduced)."""

    @property
    def doc(self) -> str:
        return "random (returned)"


@dataclass(frozen=True)
class EngineChoice:
    """Missing -> passed on as ``None``; the engine decides (documented by ``doc``)."""

    doc: str


@dataclass(frozen=True)
class WithInitImage:
    """Missing -> ``value`` when the request has an init_image; refused without one."""

    value: float

    @property
    def doc(self) -> str:
        return f"`{number(self.value)}` with `init_image`"


DefaultSource = FromModel | RandomSeed | EngineChoice | WithInitImage
# width x height, checked in the request when both are given and again once defaults fill the gaps.
PIXEL_BUDGET = SettingMax("max_pixels")
# An init image may have this many times the pixel budget (it is scaled down to fit): a 12 MP phone
# photo passes with the default budget, a canvas claiming gigapixels (a decompression bomb) does not.
INIT_IMAGE_PIXELS_PER_BUDGET = 25
SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]
DecoderName = Literal[DECODERS]  # type: ignore[valid-type]
OutputFormat = Literal[tuple(MEDIA_TYPES)]  # type: ignore[valid-type]


class LoraRequest(BaseModel):
    """One LoRA adapter to apply: ``{"name": ..., "scale": ...}``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Annotated[str, Field(description="An adapter seeded for this model (GET /health lists them).")]
    scale: Annotated[
        float,
        Field(ge=-2, le=2, allow_inf_nan=False, description="How strongly it applies; 0 = not at all."),
    ]

    @field_validator("name")
    @classmethod
    def _a_seeded_name(cls, value: str) -> str:
        try:
            return check_name(value, "adapter name")
        except LayoutError as exc:
            raise PydanticCustomError("invalid_name", str(exc)) from None


class GenerationRequest(BaseModel):
    """A text-to-image (or image-to-image) request. ``null`` and absent mean the same: use the default."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: Annotated[
        str,
        Field(min_length=1, description="What to draw (must not be blank)."),
        SettingMax("max_prompt_chars"),
    ]
    negative_prompt: Annotated[
        str | None,
        Field(description="What to steer away from."),
        SettingMax("max_prompt_chars"),
        EngineChoice("none"),
    ] = None
    num_inference_steps: Annotated[
        int | None,
        Field(ge=1, description="Denoising steps: more is slower and usually finer."),
        SettingMax("max_steps"),
        FromModel("num_inference_steps"),
    ] = None
    guidance_scale: Annotated[
        float | None,
        Field(ge=0, le=20, allow_inf_nan=False, description="How strongly to follow the prompt."),
        FromModel("guidance_scale"),
    ] = None
    width: Annotated[
        int | None,
        Field(
            ge=8, multiple_of=8, description=f"Image width in pixels; width x height <= {PIXEL_BUDGET.env}."
        ),
        SettingMax("max_side"),
        FromModel("width"),
    ] = None
    height: Annotated[
        int | None,
        Field(
            ge=8, multiple_of=8, description=f"Image height in pixels; width x height <= {PIXEL_BUDGET.env}."
        ),
        SettingMax("max_side"),
        FromModel("height"),
    ] = None
    seed: Annotated[
        int | None,
        Field(ge=0, le=UINT32_MAX, description="Same seed + same request = the same image."),
        RandomSeed(),
    ] = None
    output_format: Annotated[OutputFormat, Field(description="Image encoding of the response.")] = "png"
    quality: Annotated[int, Field(ge=1, le=100, description="JPEG/WebP quality; ignored for PNG.")] = 90
    scheduler: Annotated[
        SchedulerName | None,
        Field(
            description="Sampler; when absent, `SD_DEFAULT_SCHEDULER` decides (auto: the model's own, "
            "except PNDM, which becomes dpmpp_2m on torch and euler on OpenVINO). The OpenVINO engine "
            "offers no dpmpp_2m (a 400 lists what it runs; so does GET /health)."
        ),
        EngineChoice("`SD_DEFAULT_SCHEDULER`"),
    ] = None
    decoder: Annotated[
        DecoderName | None,
        Field(description="VAE decoder: tiny is much faster, full is the model's own (finer detail)."),
        EngineChoice("`SD_DEFAULT_DECODER`"),
    ] = None
    num_images: Annotated[
        int,
        Field(
            ge=1,
            description="Images to generate, seeded `seed`, `seed`+1, ...; more than 1 needs the JSON "
            "response (`accept: application/json`).",
        ),
        SettingMax("max_images"),
    ] = 1
    init_image: Annotated[
        str | None,
        Field(
            description="Image-to-image: the image to start from, base64 (a `data:image/...;base64,` "
            "prefix is allowed) of a PNG, JPEG or WebP; EXIF rotation applied. It is resized to width x "
            "height; one of them given keeps its aspect ratio; neither: its own size, scaled down within "
            f"SD_MAX_SIDE and {PIXEL_BUDGET.env} (multiples of 8). At most {INIT_IMAGE_PIXELS_PER_BUDGET} x "
            f"{PIXEL_BUDGET.env} pixels are read."
        ),
        DecodedMax("max_init_image_bytes"),
        EngineChoice("none (text-to-image)"),
    ] = None
    strength: Annotated[
        float | None,
        Field(
            ge=0,
            le=1,
            allow_inf_nan=False,
            description="With init_image: how far to move from it (0: the image as the VAE returns it, "
            "no step runs; 1: almost only the prompt). Runs int(strength x steps) steps.",
        ),
        WithInitImage(DEFAULT_STRENGTH),
    ] = None
    loras: Annotated[
        list[LoraRequest] | None,
        Field(
            description='LoRA adapters to apply, `[{"name": ..., "scale": -2 to 2}]`, each name once; '
            "GET /health lists what is available."
        ),
        SettingMax("max_loras"),
        EngineChoice("none"),
    ] = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        # JSON clients write null for "not set": every optional field then takes its declared default,
        # including those whose type has no None (output_format, quality). A required field stays
        # null, so it is refused as the wrong type.
        if not isinstance(data, dict):
            return data
        return {
            name: value
            for name, value in data.items()
            if value is not None or name not in cls.model_fields or cls.model_fields[name].is_required()
        }

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("blank", "must not be blank")
        return value

    @field_validator("*")
    @classmethod
    def _within_settings(cls, value: Any, info: ValidationInfo) -> Any:
        settings = _settings(info)
        bound = setting_max(cls.model_fields[info.field_name or ""])
        if bound is None or value is None:
            return value
        limit = bound.limit(settings)
        if isinstance(value, str) and len(value) > limit:
            raise PydanticCustomError("too_long_for_setting", "too long", {"limit": limit, "env": bound.env})
        if isinstance(value, list):
            if len(value) > limit:
                raise PydanticCustomError("too_many", "too many", {"limit": limit, "env": bound.env})
            return value
        if not isinstance(value, str) and value > limit:
            raise PydanticCustomError("above_setting", "too large", {"limit": limit, "env": bound.env})
        return value

    @field_validator("loras")
    @classmethod
    def _each_adapter_once(cls, value: list[LoraRequest] | None) -> list[LoraRequest] | None:
        names = [lora.name for lora in value or ()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise PydanticCustomError("duplicate_adapter", "named twice", {"names": ", ".join(repeated)})
        return value

    @model_validator(mode="after")
    def _strength_needs_init_image(self) -> GenerationRequest:
        if self.strength is not None and self.init_image is None:
            raise PydanticCustomError("strength_without_init_image", "strength without init_image")
        return self

    @model_validator(mode="after")
    def _within_pixel_budget(self, info: ValidationInfo) -> GenerationRequest:
        # Both given: refuse now, before any model is loaded. One missing: resolve() checks with the default.
        width, height = self.width, self.height
        if width is not None and height is not None and width * height > PIXEL_BUDGET.limit(_settings(info)):
            raise PydanticCustomError(
                "too_many_pixels", "over the pixel budget", {"width": width, "height": height}
            )
        return self


def _settings(info: ValidationInfo) -> Settings:
    settings = (info.context or {}).get("settings")
    if not isinstance(settings, Settings):
        # Validating against made-up limits would accept what the operator forbade: refuse instead.
        raise TypeError("GenerationRequest needs context={'settings': Settings}; use parse_request()")
    return settings


def pixel_budget_error(width: int, height: int, settings: Settings, field: str) -> ApiError:
    budget = PIXEL_BUDGET.limit(settings)
    return ApiError(
        400,
        "too_many_pixels",
        f"{width}x{height} is {width * height} pixels; the budget is {budget} "
        f"({PIXEL_BUDGET.env}, about {math.isqrt(budget)} squared)",
        field,
    )


# ---- reading the declaration ----------------------------------------------------------------------


def _metadata(field: FieldInfo, kind: type) -> Any:
    return next((m for m in field.metadata if isinstance(m, kind)), None)


def setting_max(field: FieldInfo) -> SettingMax | None:
    return _metadata(field, SettingMax)


def default_source(field: FieldInfo) -> DefaultSource | None:
    return next((m for m in field.metadata if isinstance(m, DefaultSource)), None)


def decoded_max(field: FieldInfo) -> DecodedMax | None:
    return _metadata(field, DecodedMax)


def bounds(field: FieldInfo, settings: Settings) -> tuple[float | None, float | None]:
    """(lowest, highest) allowed value, or length for strings, with the operator's limits applied."""
    low = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
    low = next((m.min_length for m in field.metadata if isinstance(m, annotated_types.MinLen)), low)
    high = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    bound = setting_max(field)
    if bound is not None:
        high = bound.limit(settings)
    return low, high


def multiple_of(field: FieldInfo) -> int | None:
    return next((m.multiple_of for m in field.metadata if isinstance(m, annotated_types.MultipleOf)), None)


def choices(field: FieldInfo) -> tuple[str, ...] | None:
    """The allowed strings of a Literal field (optional or not)."""
    annotation = field.annotation
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if getattr(candidate, "__origin__", None) is Literal:
            return tuple(candidate.__args__)
    return None


def type_name(field: FieldInfo) -> str:
    if choices(field):
        return "string"
    names = {str: "string", int: "integer", float: "number", list: "array"}
    annotation = field.annotation
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        candidate = getattr(candidate, "__origin__", candidate)
        if candidate in names:
            return names[candidate]
    return "value"


# ---- validation -> ApiError ----------------------------------------------------------------------

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "list_type": "an array",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def number(value: float | None) -> str:
    """``50`` rather than ``50.0`` or ``4.29497e+09``."""
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else str(value)


def _describe(value: Any) -> str:
    text = (
        repr(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )
    return text if len(text) <= 40 else text[:37] + "..."


def _field_at(loc: tuple[int | str, ...]) -> tuple[str, FieldInfo | None, type[BaseModel]]:
    """The display name (``loras[1].scale``), declaration (None: not declared) and model of the field
    at a pydantic ``loc``; an entry of ``loras`` itself is the ``loras`` field."""
    name = str(loc[0])
    field = GenerationRequest.model_fields.get(name)
    if name == "loras" and len(loc) >= 2:
        name = f"loras[{loc[1]}]"
        if len(loc) >= 3:
            return f"{name}.{loc[2]}", LoraRequest.model_fields.get(str(loc[2])), LoraRequest
    return name, field, GenerationRequest


def _to_api_error(exc: ValidationError, settings: Settings) -> ApiError:
    errors = exc.errors()
    unknown = [_field_at(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        names = [name for name, _, _ in unknown]
        known = ", ".join(unknown[0][2].model_fields)
        return ApiError(
            400,
            "unknown_field",
            f"unknown field{'s' if len(names) > 1 else ''}: {', '.join(names)} (known: {known})",
            names[0],
        )
    error = errors[0]
    kind = error["type"]
    value = error.get("input")
    context = error.get("ctx") or {}
    if kind == "too_many_pixels":
        return pixel_budget_error(context["width"], context["height"], settings, "width")
    if kind == "strength_without_init_image":
        return ApiError(
            400,
            "strength_without_init_image",
            "strength applies to image-to-image only: send init_image with it, or leave strength out",
            "strength",
        )
    if not error["loc"]:  # the whole body: not an object
        return ApiError(400, "not_an_object", f"the request must be a JSON object, got {_json_type(value)}")
    name, declared, _ = _field_at(error["loc"])
    field = declared or GenerationRequest.model_fields[str(error["loc"][0])]
    low, high = bounds(field, settings)
    if kind == "too_many":
        return ApiError(
            400,
            "too_many",
            f"{name} has {len(value)} entries; the limit is {context['limit']} ({context['env']})",
            name,
        )
    if kind == "duplicate_adapter":
        return ApiError(
            400, "duplicate_adapter", f"{name} names {context['names']} more than once; name each once", name
        )
    if kind == "invalid_name":
        return ApiError(400, "invalid_name", f"{name}: {error['msg']}", name)
    if kind == "missing":
        return ApiError(400, "missing_field", f"{name} is required", name)
    if (
        kind in _EXPECTED
        or kind.endswith("_type")
        or (kind == "literal_error" and not isinstance(value, str))
    ):
        expected = _EXPECTED.get(kind, f"a {type_name(field)}")
        return ApiError(400, "wrong_type", f"{name} must be {expected}, got {_json_type(value)}", name)
    if kind == "finite_number":
        return ApiError(400, "not_finite", f"{name} must be a finite number, got {value}", name)
    if kind in ("blank", "string_too_short"):
        return ApiError(400, "empty", f"{name} must not be empty or blank", name)
    if kind in ("string_too_long", "too_long_for_setting"):
        return ApiError(
            400, "too_long", f"{name} is {len(value)} characters; the limit is {number(high)}", name
        )
    if kind == "multiple_of":
        step = multiple_of(field)
        return ApiError(
            400, "not_multiple", f"{name} must be a multiple of {step}, got {_describe(value)}", name
        )
    if kind == "literal_error":
        allowed = ", ".join(choices(field) or ())
        return ApiError(
            400, "invalid_choice", f"{name} must be one of {allowed}; got {_describe(value)}", name
        )
    if kind in ("greater_than_equal", "less_than_equal", "above_setting"):
        return ApiError(
            400,
            "out_of_range",
            f"{name} must be between {number(low)} and {number(high)}, got {_describe(value)}",
            name,
        )
    return ApiError(400, "invalid_value", f"{name}: {error['msg']}", name)


def parse_request(data: Any, settings: Settings) -> GenerationRequest:
    """Validate a decoded JSON value; raises ``ApiError`` (400) naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, "not_an_object", f"the request must be a JSON object, got {_json_type(data)}")
    try:
        return GenerationRequest.model_validate(data, strict=True, context={"settings": settings})
    except ValidationError as exc:
        raise _to_api_error(exc, settings) from None


# ---- defaults ------------------------------------------------------------------------------------


def model_default_problems(model_defaults: ModelDefaults, settings: Settings) -> dict[str, str]:
    """Field -> why the model's own default for it breaks this function's limits (checked once, at load)."""
    from_model = {
        name: getattr(model_defaults, source.attribute)
        for name, field in GenerationRequest.model_fields.items()
        if isinstance(source := default_source(field), FromModel)
    }
    problems: dict[str, str] = {}
    for name, value in from_model.items():
        try:
            parse_request({"prompt": "x", name: value}, settings)
        except ApiError as error:
            problems[name] = error.message
    size = {name: from_model[name] for name in ("width", "height") if name in from_model}
    if len(size) == 2 and not problems.keys() & size.keys():  # each fits alone; together (the budget)?
        try:
            parse_request({"prompt": "x", **size}, settings)
        except ApiError as error:
            problems.update({name: error.message for name in size})
    return problems


def resolve(
    request: GenerationRequest,
    engine: Engine,
    settings: Settings,
    default_problems: Mapping[str, str] | None = None,
    init_image: Image.Image | None = None,
) -> GenerationParams:
    """Fill every absent field from its declared source; check what only the loaded engine can tell.

    ``default_problems`` (from ``model_default_problems``) are model defaults this function's limits
    refuse: a request that relies on one gets 503 ``model_config``, since only an operator can fix it.
    ``init_image``: the request's init_image decoded (sd_lambda.serving.init_image.decode_init_image);
    it is resized here to the request's size, and sets the size the request leaves out.
    """
    _refuse_unsupported(request, engine)
    values: dict[str, Any] = {}
    start_size = None
    if init_image is not None:
        from sd_lambda.serving.init_image import fit_to, start_image_size  # Pillow: not for the client

        start_size = start_image_size(init_image, request, settings)
    for name, field in GenerationRequest.model_fields.items():
        value = getattr(request, name)
        source = default_source(field)
        if value is None and start_size is not None and name in ("width", "height"):
            value = start_size[0 if name == "width" else 1]
        elif value is None and isinstance(source, FromModel):
            problem = (default_problems or {}).get(name)
            if problem is not None:
                raise ApiError(
                    503,
                    "model_config",
                    f"the model's default {name} does not fit this function's limits ({problem}); "
                    f"the operator must raise the limit or change the model's defaults. Meanwhile, "
                    f"pass {name} explicitly",
                    name,
                )
            value = getattr(engine.defaults, source.attribute)
        elif value is None and isinstance(source, RandomSeed):
            value = secrets.randbelow(UINT32_MAX + 1)
        elif value is None and isinstance(source, WithInitImage) and init_image is not None:
            value = source.value
        values[name] = value
    width, height = values["width"], values["height"]
    if width * height > PIXEL_BUDGET.limit(settings):
        raise pixel_budget_error(width, height, settings, "width" if request.width is not None else "height")
    for name, available in (("scheduler", engine.schedulers), ("decoder", engine.decoders)):
        if values[name] is not None and values[name] not in available:
            raise ApiError(
                400,
                "unavailable",
                f"{name} {values[name]!r} is not available for this model; available: {', '.join(available)}",
                name,
            )
    values["loras"] = tuple(LoraChoice(lora.name, lora.scale) for lora in request.loras or ())
    values["init_image"] = None if init_image is None else fit_to(init_image, width, height)
    params = {f.name for f in fields(GenerationParams)}
    return GenerationParams(**{k: v for k, v in values.items() if k in params})


def _refuse_unsupported(request: GenerationRequest, engine: Engine) -> None:
    """A 400 for what the loaded engine cannot do: a feature it lacks, an adapter it does not hold."""
    features = engine.features
    wanted = {"init_image": request.init_image is not None, "loras": bool(request.loras)}
    for feature, asked in wanted.items():
        if asked and feature not in features:
            described = engine.describe()
            why = described.get("unavailable_features", {}).get(feature)
            raise ApiError(
                400,
                "unsupported",
                f"the {described.get('engine', 'loaded')} engine serving this model does not support "
                f"{feature}{f' ({why})' if why else ''}: send the request without it (GET /health lists "
                f"this environment's features: {', '.join(sorted(features)) or 'none'})",
                feature,
            )
    if not request.loras:
        return  # listing the adapters reads EFS: only for requests that name one
    refuse_unknown_adapters(request, engine.adapters)


def refuse_unknown_adapters(request: GenerationRequest, available: Sequence[str]) -> None:
    """A 400 naming the first adapter of ``request`` that is not in ``available``."""
    for index, lora in enumerate(request.loras or ()):
        if lora.name not in available:
            raise ApiError(
                400,
                "unknown_adapter",
                f"no LoRA adapter {lora.name!r} for this model; available: {', '.join(available) or 'none'} "
                "(GET /health lists them)",
                f"loras[{index}].name",
            )
