"""The playground page that ``make serve``'s front door answers ``GET /`` with.

``playground.html`` (package data next to this module) is plain HTML with one inline ``<style>`` and one
inline ``<script>``: no build step, no external assets. It is the front door's, never the function's:
the handler still answers ``GET /`` with 405, so the deployed function URL has no page.

Its Content-Security-Policy allows exactly those two inline blocks (by their SHA-256), ``data:`` images
(the results and the image to start from), and requests to the page's own origin; any other script,
style, font, image, frame or form target is refused by the browser.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

PAGE = "playground.html"
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@cache
def page() -> bytes:
    return files(__package__).joinpath(PAGE).read_bytes()


def content_security_policy(html: bytes) -> str:
    """A policy that admits the page's own inline ``<script>`` and ``<style>`` blocks and nothing external."""
    sources: dict[str, list[str]] = {"script": [], "style": []}
    for kind, text in _INLINE.findall(html.decode("utf-8")):
        digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
        sources[kind].append(f"'sha256-{digest}'")
    allowed = {kind: " ".join(hashes) or "'none'" for kind, hashes in sources.items()}
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {allowed['script']}",
            f"style-src {allowed['style']}",
            "img-src data:",
            "connect-src 'self'",
            "form-action 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ]
    )


def headers() -> list[tuple[str, str]]:
    return [
        ("content-type", "text/html; charset=utf-8"),
        ("content-security-policy", content_security_policy(page())),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        # Edited pages show on reload while developing; nothing here is worth caching.
        ("cache-control", "no-store"),
    ]
