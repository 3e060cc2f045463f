"""Model folders for local runs, always in the EFS layout the Lambda reads (``<root>/<name>/current``).

``serve`` and ``demo`` accept either an EFS-layout model folder (it has ``current``) or any plain
diffusers folder (it has ``model_index.json``). A plain folder is wrapped, not copied: a local layout
under the cache gets ``releases/<folder name>`` -> the folder and ``current`` -> that release, so the
handler resolves it exactly as on EFS.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sd_lambda.devtools.testing.models import build_test_model
from sd_lambda.layout import LayoutError, ModelPaths, install_release, model_slug

DEMO_MODEL = "test--tiny-sd"
DEMO_REVISION = "tiny-seed0"


class ModelDirError(ValueError):
    """A folder that is neither an EFS-layout model folder nor a diffusers folder."""


def as_efs_layout(model_dir: Path, cache_dir: Path) -> ModelPaths:
    """The EFS-layout model folder to serve ``model_dir`` from (``root = .model_dir.parent``)."""
    model_dir = model_dir.expanduser().absolute()
    paths = ModelPaths(model_dir)
    if paths.current.is_symlink():
        return paths
    if not (model_dir / "model_index.json").is_file():
        raise ModelDirError(
            f"{model_dir} is neither a diffusers folder (model_index.json) "
            "nor an EFS-layout model folder (current -> releases/<revision>)"
        )
    try:
        revision = model_slug(model_dir.name)
    except LayoutError as exc:
        raise ModelDirError(f"{exc}; rename the folder or link it under such a name") from None
    wrapped = ModelPaths(cache_dir.absolute() / "local-models" / revision)
    wrapped.releases.mkdir(parents=True, exist_ok=True)
    release = wrapped.releases / revision
    if release.is_symlink() and release.resolve() != model_dir.resolve():
        release.unlink()
    if not release.is_symlink():
        release.symlink_to(model_dir.resolve(), target_is_directory=True)
    wrapped.switch_current(revision)
    return wrapped


def ensure_demo_model(cache_dir: Path) -> ModelPaths:
    """The tiny random-weight model in the EFS layout under ``cache_dir``, built on first use."""
    paths = ModelPaths(cache_dir.absolute() / "demo-models" / DEMO_MODEL)
    if paths.current.is_symlink() and (paths.current / "model_index.json").is_file():
        return paths
    paths.model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=paths.model_dir, prefix=".build-") as build_dir:
        model = build_test_model(Path(build_dir) / "model", "tiny", seed=0)
        install_release(paths, DEMO_REVISION, model, source="sd-lambda make-test-model tiny")
    return paths
