"""Which image manifests Lambda runs, as ECR reports them (``imageManifestMediaType``).

Lambda supports Docker image manifest V2 schema 2 and OCI image manifests, for one architecture only
(https://docs.aws.amazon.com/lambda/latest/dg/images-create.html); an index or manifest list, which
BuildKit pushes when it attaches attestations, is refused at CreateFunction. ECR reports the stored
format per digest (https://docs.aws.amazon.com/AmazonECR/latest/APIReference/API_ImageDetail.html).
"""

from __future__ import annotations

LAMBDA_MANIFEST_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    }
)
MULTI_MANIFEST_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)


def lambda_manifest_problem(reference: str, media_type: str | None) -> str | None:
    """One line saying why Lambda would refuse ``reference`` stored as ``media_type``, or None."""
    if media_type in LAMBDA_MANIFEST_MEDIA_TYPES:
        return None
    if media_type in MULTI_MANIFEST_MEDIA_TYPES:
        what = "an image index (attestations or several platforms)"
    else:
        what = f"manifest type {media_type or 'unknown'}"
    return (
        f"{reference} is {what}, which Lambda refuses: rebuild with `make build-image` (buildx "
        "--provenance=false --sbom=false, one platform) and push again"
    )
