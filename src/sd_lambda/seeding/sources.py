"""Where weights come from: the Hugging Face Hub or a local diffusers folder.

Either way the result is a :class:`LocalRelease`: release path -> local file, plus its manifest. Only
safetensors weights and OpenVINO IR (an ``.xml`` graph and the ``.bin`` beside it) are taken; pickle
weights are refused. A diffusers source becomes an OpenVINO release in sd_lambda.seeding.openvino_release.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# huggingface_hub's own HTTP client module (httpx2 in 2.x), as the hub exports it for downstream code
# (huggingface_hub.utils.httpx, kept "across major versions"): it is the hub's dependency, not ours.
from huggingface_hub.utils import httpx as hub_http

from sd_lambda.cli import ask_for, option
from sd_lambda.layout import (
    BF16_COPY_COMPONENTS,
    BF16_VARIANT,
    MANIFEST,
    MODEL,
    MODEL_INDEX,
    OPENVINO_GRAPH_SUFFIX,
    OPENVINO_UNET,
    PICKLE_SUFFIXES,
    TINY_DECODER_FOLDER,
    Manifest,
    ManifestEntry,
    bf16_copy_path,
    check_name,
    check_relative_path,
    is_openvino_weights,
    parse_weights_name,
    pickle_paths,
    release_engine,
    release_kind_problem,
    sha256_file,
    single_weights_name,
)
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.pipeline import (
    check_served_class,
    read_model_index,
    served_folders,
    unused_components,
    without_unused,
)

# What the OpenVINO engine reads from every OpenVINO release (sd_lambda.engine.openvino_engine); each
# graph's .bin is required beside it as well.
OPENVINO_REQUIRED = (
    "scheduler/scheduler_config.json",
    "text_encoder/openvino_model.xml",
    "tokenizer/openvino_tokenizer.xml",
    "unet/openvino_model.xml",
    "vae_decoder/openvino_model.xml",
)
# Config and tokenizer files a diffusers component folder may hold (weights are chosen separately).
CONFIG_SUFFIXES = (".json", ".txt", ".model")


@dataclass(frozen=True)
class LocalRelease:
    """A release ready to upload: its files (release path -> local file) and their manifest."""

    files: dict[str, Path]
    manifest: Manifest
    revision: str  # the default release name: content or hub commit derived

    @classmethod
    def from_files(
        cls,
        files: dict[str, Path],
        source: str,
        revision: str | None = None,
        described: LocalRelease | None = None,
        kind: str = MODEL,
    ) -> LocalRelease:
        """``described``: a release whose manifest entries are reused for the same files (not hashed
        again); ``kind``: what the release is (layout.MODEL, or layout.LORA for an adapter)."""
        problems = check_pipeline_files(files) if kind == MODEL else check_release_files(files, kind)
        if problems:
            raise SeedError(problems)
        known = {}
        if described is not None:
            known = {
                e.path: e for e in described.manifest.files if described.files[e.path] == files.get(e.path)
            }
        entries = tuple(
            known.get(path) or ManifestEntry(path, files[path].stat().st_size, sha256_file(files[path]))
            for path in sorted(files)
        )
        manifest = Manifest(files=entries, source=source)
        digest = hashlib.sha256("".join(f"{e.path}\0{e.sha256}\n" for e in entries).encode()).hexdigest()
        return cls(files, manifest, check_name(revision or digest[:12], "revision"))


def check_release_files(files: Collection[str], kind: str) -> str | None:
    """Why these release paths are not a release of ``kind`` (pickles, its required files), or None."""
    pickles = pickle_paths(files)
    if pickles:
        return f"pickle weights are refused (convert them to safetensors): {', '.join(pickles)}"
    return release_kind_problem(files, kind)


def check_pipeline_files(files: Collection[str]) -> str | None:
    """Why these release paths are not a servable diffusers pipeline, or None."""
    if MODEL_INDEX not in files:
        return f"not a diffusers pipeline: no {MODEL_INDEX}"
    pickles = pickle_paths(files)
    if pickles:
        return f"pickle weights are refused (convert them to safetensors): {', '.join(pickles)}"
    if release_engine(files) == "torch" and not any(p.endswith(".safetensors") for p in files):
        return f"no .safetensors weights (or OpenVINO IR: {OPENVINO_UNET}) found"
    if release_engine(files) == "openvino":
        missing = [p for p in OPENVINO_REQUIRED if p not in files]
        missing += [
            f"{p[: -len(OPENVINO_GRAPH_SUFFIX)]}.bin"
            for p in files
            if p.endswith(OPENVINO_GRAPH_SUFFIX) and f"{p[: -len(OPENVINO_GRAPH_SUFFIX)]}.bin" not in files
        ]
        if missing:
            return f"an OpenVINO release the engine cannot load: missing {', '.join(sorted(missing))}"
    return None


def check_dir(folder: Path, *, bf16_copy: bool = False) -> dict[str, Path]:
    """The release files of a local diffusers folder (release path -> file), checked without reading
    the weights: every refusal here costs milliseconds, so the driver asks before anything touches AWS.

    Every regular file but dot-files, dot-folders and an old manifest.json. A bf16 copy in it is
    refused unless ``bf16_copy`` (it is then written again from its weights): a copy that no longer
    matches them would serve other weights to hosts that run bf16."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SeedError(f"{folder} is not a folder")
    if not (folder / MODEL_INDEX).is_file():
        raise SeedError(f"{folder} is not a diffusers pipeline: no {MODEL_INDEX}")
    check_served_class(read_model_index(folder / MODEL_INDEX, str(folder)), str(folder))
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in PurePosixPath(relative).parts) or relative == MANIFEST:
            continue
        if path.is_symlink():
            raise SeedError(f"symlinks are not allowed in a model folder: {relative}")
        if path.is_file():
            files[relative] = path
    problem = check_pipeline_files(files)
    if problem:
        raise SeedError(problem)
    copies = sorted(
        path
        for path in files
        if PurePosixPath(path).parent.as_posix() in BF16_COPY_COMPONENTS
        and (parsed := parse_weights_name(PurePosixPath(path).name)) is not None
        and parsed.variant == BF16_VARIANT
    )
    if copies and not bf16_copy:
        raise SeedError(
            f"{folder} holds a bf16 copy ({', '.join(copies)}): pass --bf16-copy to write it again "
            "from the weights beside it, or remove it"
        )
    if bf16_copy:
        _bf16_sources(files)
    return files


def from_dir(
    folder: Path,
    revision: str | None = None,
    *,
    bf16_copy: bool = False,
    checked: dict[str, Path] | None = None,
) -> LocalRelease:
    """A local diffusers folder (see :func:`check_dir`), its files hashed into a manifest. ``checked``:
    what :func:`check_dir` returned for it earlier in the run (the driver checks before AWS), so the
    folder is not walked and its model index read twice."""
    files = checked if checked is not None else check_dir(folder, bf16_copy=bf16_copy)
    return LocalRelease.from_files(files, source=f"dir:{Path(folder).resolve()}", revision=revision)


def _bf16_sources(files: Collection[str]) -> dict[str, str]:
    """component -> the one unsharded weights file a bf16 copy is written from."""
    sources: dict[str, str] = {}
    for component in BF16_COPY_COMPONENTS:
        names = [
            PurePosixPath(path).name for path in files if PurePosixPath(path).parent.as_posix() == component
        ]
        stored = single_weights_name(names)
        if stored is None:
            raise SeedError(f"--bf16-copy: {component}/ needs exactly one unsharded weights file")
        sources[component] = stored
    return sources


def with_bf16_copy(release: LocalRelease, work_dir: Path) -> LocalRelease:
    """``release`` plus a bf16 copy of its text encoder, UNet and VAE weights
    (sd_lambda.engine.accel.bf16_copy), written under ``work_dir``; a copy already in the release is written
    again from its weights. The
    default release name gets a ``-bf16copy`` suffix."""
    from sd_lambda.engine.accel.bf16_copy import (
        write_bf16_copy,  # torch: imported only when a copy is asked for
    )

    files = dict(release.files)
    out_dir = Path(work_dir) / "bf16-copies" / release.revision
    for component, stored in _bf16_sources(files).items():
        copy = f"{component}/{bf16_copy_path(PurePosixPath(stored)).name}"
        written = out_dir / copy
        written.parent.mkdir(parents=True, exist_ok=True)
        files[copy] = write_bf16_copy(files[f"{component}/{stored}"], written)
    source = f"{release.manifest.source} + {BF16_VARIANT} copy"
    revision = f"{release.revision}-{BF16_VARIANT}copy"
    return LocalRelease.from_files(files, source=source, revision=revision, described=release)


# --- the Hub -------------------------------------------------------------------------------------


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """``segmind/tiny-sd@abc123`` -> (``segmind/tiny-sd``, ``abc123``)."""
    repo, _, revision = ref.strip().partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", repo):
        raise SeedError(f"invalid hub model id {repo!r} (expected owner/name[@revision])")
    return repo, revision or None


def select_hub_files(filenames: list[str], components: list[str], variant: str | None) -> dict[str, str]:
    """Which repo files make the release, and under which release path (repo path -> release path).

    ``model_index.json`` and each component folder's configs, plus its weights: in a diffusers repo its
    safetensors, the ``variant`` ones when the component has them (renamed to the plain names, so the
    pipeline loads without a variant), else the plain ones; in an OpenVINO repo (layout.release_engine)
    its IR, each ``.xml`` and the ``.bin`` of the same stem. Top-level single-file checkpoints and pickles
    are never taken; a component with pickles and no other weights is refused.
    """
    openvino = release_engine(filenames) == "openvino"
    chosen: dict[str, str] = {MODEL_INDEX: MODEL_INDEX}
    for component in components:
        in_dir = [f for f in filenames if f.startswith(component + "/") and f.count("/") == 1]
        names = [f.split("/", 1)[1] for f in in_dir]
        weights = _openvino_ir(names) if openvino else _safetensors(names, variant)
        chosen.update({f"{component}/{name}": f"{component}/{plain}" for name, plain in weights.items()})
        for name in names:
            if name.endswith(CONFIG_SUFFIXES) and parse_weights_name(name) is None:
                chosen[f"{component}/{name}"] = f"{component}/{name}"
        if not weights and any(PurePosixPath(n).suffix in PICKLE_SUFFIXES for n in names):
            wanted = "OpenVINO IR" if openvino else ".safetensors"
            raise SeedError(f"{component}/ has only pickle weights on the hub: refused (no {wanted})")
    return chosen


def _safetensors(names: list[str], variant: str | None) -> dict[str, str]:
    """A diffusers component folder's safetensors weights to take: file name -> plain name."""
    weights = {name: parsed for name in names if (parsed := parse_weights_name(name))}
    offered = {parsed.variant for parsed in weights.values() if not parsed.index}
    wanted = variant if variant in offered else None
    picked = {name: parsed for name, parsed in weights.items() if parsed.variant == wanted}
    # As diffusers loads them: weights in the current spelling make any legacy-spelled ones ignored,
    # and where both spell one file (an index, say) the current spelling is taken.
    if any(not parsed.legacy and not parsed.index for parsed in picked.values()):
        picked = {name: parsed for name, parsed in picked.items() if not parsed.legacy}
    renamed: dict[str, str] = {}
    for name, parsed in sorted(picked.items(), key=lambda item: item[1].legacy):
        renamed.setdefault(parsed.plain_name, name)
    return {name: plain for plain, name in renamed.items()}


def _openvino_ir(names: list[str]) -> dict[str, str]:
    """An OpenVINO component folder's IR: every graph (``.xml``) and the weights (``.bin``) beside one."""
    return {
        name: name
        for name in names
        if name.endswith(OPENVINO_GRAPH_SUFFIX) or is_openvino_weights(name, names)
    }


# A refused connection, a DNS failure or a timeout raises the hub's HTTP client's transport errors, which
# are not OSErrors; HfHubHTTPError (401/404/gated) subclasses its HTTPError.
HUB_ERRORS = (hub_http.HTTPError, HfHubHTTPError, OSError)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Hub:
    """The two hub calls seeding makes (``model_info``, ``snapshot_download``), errors made one-line."""

    def __init__(self, repo: str, revision: str | None) -> None:
        self.repo = repo
        self.revision = revision

    def _explain(self, exc: Exception) -> SeedError:
        where = f"{self.repo}@{self.revision}" if self.revision else self.repo
        if isinstance(exc, GatedRepoError):
            return SeedError(f"model {self.repo} is gated: accept its terms on the hub and set HF_TOKEN")
        if isinstance(exc, RevisionNotFoundError):
            return SeedError(f"revision {self.revision!r} of {self.repo} does not exist on the hub")
        if isinstance(exc, RepositoryNotFoundError):  # the hub answers 401 and 404 alike for these
            return SeedError(f"model {self.repo} not found on the hub (private? set HF_TOKEN)")
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return SeedError(f"the hub refused access to {where} (HTTP {status}): check HF_TOKEN")
        if isinstance(exc, hub_http.TimeoutException):
            cause = _first_line(exc)
            return SeedError(f"the hub did not answer in time for {where}: {cause} (network/proxy?)")
        if isinstance(exc, hub_http.TransportError):  # connection refused, DNS, TLS, proxy
            cause = _first_line(exc)
            return SeedError(f"cannot reach the hub for {where}: {cause} (network, proxy or HF_ENDPOINT?)")
        return SeedError(f"the hub could not serve {where}: {_first_line(exc)}")

    def info(self) -> tuple[str, list[str]]:
        """(commit sha, every file name) of the requested revision."""
        try:
            info = HfApi().model_info(self.repo, revision=self.revision)
        except HUB_ERRORS as exc:
            raise self._explain(exc) from exc
        return str(info.sha), [sibling.rfilename for sibling in info.siblings or []]

    def download(self, commit: str, filenames: list[str], local_dir: Path) -> Path:
        try:
            return Path(
                snapshot_download(self.repo, revision=commit, allow_patterns=filenames, local_dir=local_dir)
            )
        except HUB_ERRORS as exc:
            raise self._explain(exc) from exc


def _served_index(local_dir: Path, repo: str, engine: str) -> tuple[list[str], Path]:
    """From the downloaded model_index.json alone: refuse a pipeline the engine cannot serve, and return
    the folders to fetch for ``engine`` plus the model_index.json the release carries (the unused
    components marked absent, so the folder loads without them)."""
    where = f"{repo} on the hub"
    index = read_model_index(local_dir / MODEL_INDEX, where)
    check_served_class(index, where)
    components = served_folders(index, engine)
    if not unused_components(index):
        return components, local_dir / MODEL_INDEX
    rewritten = local_dir.parent / f"{local_dir.name}.rewritten" / MODEL_INDEX
    rewritten.parent.mkdir(parents=True, exist_ok=True)
    rewritten.write_text(json.dumps(without_unused(index), indent=2, sort_keys=True))
    return components, rewritten


def from_hub(
    ref: str,
    work_dir: Path,
    *,
    variant: str | None = None,
    tiny_decoder: str | None = None,
    revision: str | None = None,
    for_export: bool = False,
) -> LocalRelease:
    """Download a diffusers pipeline (safetensors only) and, optionally, a tiny decoder into ``vae_tiny/``;
    or a ready-made OpenVINO one (optimum-intel's layout), as it is. ``for_export``: the download is
    converted to OpenVINO next, so an OpenVINO repo is refused (it has nothing to convert)."""
    repo, hub_revision = parse_model_ref(ref)
    hub = Hub(repo, hub_revision)
    commit, filenames = hub.info()
    if MODEL_INDEX not in filenames:
        raise SeedError(f"{repo} is not a diffusers pipeline: no {MODEL_INDEX} on the hub")
    engine = release_engine(filenames)
    if engine == "openvino":
        _check_openvino_repo(
            repo, filenames, variant=variant, tiny_decoder=tiny_decoder, for_export=for_export
        )
    local_dir = Path(work_dir) / "hub" / repo.replace("/", "--") / commit
    hub.download(commit, [MODEL_INDEX], local_dir)  # a few hundred bytes, before any weights
    components, model_index = _served_index(local_dir, repo, engine)
    selected = select_hub_files(filenames, components, variant)
    hub.download(commit, sorted(selected), local_dir)
    files = {release: _materialize(local_dir, repo_path, release) for repo_path, release in selected.items()}
    files[MODEL_INDEX] = model_index
    source = f"hf://{repo}@{commit}" + (f" variant={variant}" if variant else "")
    name = commit[:12] + (f"-{variant}" if variant else "")
    if tiny_decoder:
        decoder_repo, decoder_revision = parse_model_ref(tiny_decoder)
        decoder_hub = Hub(decoder_repo, decoder_revision)
        decoder_commit, decoder_files = decoder_hub.info()
        wanted = ["config.json", "diffusion_pytorch_model.safetensors"]
        if not set(wanted) <= set(decoder_files):
            raise SeedError(f"{decoder_repo} has no {' + '.join(wanted)}: not a safetensors tiny decoder")
        decoder_dir = Path(work_dir) / "hub" / decoder_repo.replace("/", "--") / decoder_commit
        decoder_hub.download(decoder_commit, wanted, decoder_dir)
        files.update({f"{TINY_DECODER_FOLDER}/{f}": decoder_dir / f for f in wanted})
        source += f" + {TINY_DECODER_FOLDER}=hf://{decoder_repo}@{decoder_commit}"
        name += f"-tiny{decoder_commit[:7]}"
    return LocalRelease.from_files(files, source=source, revision=revision or name)


def refuse_openvino_source(files: Collection[str], where: str) -> None:
    """``--export`` converts a diffusers source; an OpenVINO one has nothing to convert. An error rather
    than a no-op: ``--quantize int8`` would otherwise be dropped without a word."""
    if release_engine(files) == "openvino":
        raise SeedError(
            f"{where} is an OpenVINO release already ({OPENVINO_UNET}): it seeds as it is, "
            f"without {option('--export')}"
        )


def _check_openvino_repo(
    repo: str, filenames: list[str], *, variant: str | None, tiny_decoder: str | None, for_export: bool
) -> None:
    """A ready-made OpenVINO repo seeds as it is: the options that change a diffusers download are refused."""
    if for_export:
        refuse_openvino_source(filenames, f"{repo} on the hub")
    where = f"{repo} is an OpenVINO repo ({OPENVINO_UNET})"
    if variant:
        raise SeedError(f"{where}: --variant picks safetensors weights; drop it")
    if tiny_decoder:
        raise SeedError(
            f"{where}: a --tiny-decoder is safetensors, which its engine cannot load; seed the diffusers "
            f"repo with --tiny-decoder and {ask_for('--export', 'openvino')} instead"
        )


def _materialize(local_dir: Path, repo_path: str, release_path: str) -> Path:
    """The local file for ``release_path``; a renamed variant's shard index gets its map rewritten."""
    path = local_dir / check_relative_path(repo_path)
    if not path.is_file():
        raise SeedError(f"the hub download lacks {repo_path}")
    if repo_path == release_path or not release_path.endswith(".index.json"):
        return path
    try:
        index = json.loads(path.read_text())
        index["weight_map"] = {
            key: parsed.plain_name if (parsed := parse_weights_name(file)) else file
            for key, file in index["weight_map"].items()
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise SeedError(f"{repo_path} is not a shard index: {exc}") from exc
    rewritten = local_dir.parent / f"{local_dir.name}.rewritten" / release_path
    rewritten.parent.mkdir(parents=True, exist_ok=True)
    rewritten.write_text(json.dumps(index, indent=2, sort_keys=True))
    return rewritten
