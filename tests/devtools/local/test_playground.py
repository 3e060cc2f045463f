"""The playground page: the front door serves it, the function never does, and it loads nothing external.

The page in a real browser against the real handler: test_playground_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import tomllib
from html.parser import HTMLParser
from pathlib import Path

from helpers import REPOSITORY

from sd_lambda.devtools.local import playground
from sd_lambda.devtools.local.frontdoor import FrontDoor
from sd_lambda.devtools.local.httpio import fetch
from sd_lambda.devtools.local.runtime import InvocationResult
from sd_lambda.serving.request import GenerationRequest

WAIT = 30  # seconds; an upper bound for a local round trip, never a pace


class RecordingInvoke:
    """Answers every invocation with a 200 JSON result and remembers each event's method and path."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, payload: bytes) -> InvocationResult:
        event = json.loads(payload)
        self.calls.append((event["requestContext"]["http"]["method"], event["rawPath"]))
        result = {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": "{}"}
        return InvocationResult("r-1", json.dumps(result).encode())


class PageParts(HTMLParser):
    """The request fields the form sends (its controls' names) and every URL-valued attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("input", "textarea", "select") and values.get("name"):
            self.names.add(str(values["name"]))
        self.urls += [str(value) for name, value in attrs if name in ("src", "href", "action") and value]


def test_the_front_door_answers_get_slash_with_the_page_without_invoking_the_function() -> None:
    invoke = RecordingInvoke()
    with FrontDoor(invoke) as door:
        status, headers, body = fetch("GET", f"{door.url}/", headers={"accept": "text/html"}, timeout=WAIT)
        head_status, head_headers, head_body = fetch("HEAD", f"{door.url}/?from=bookmark", timeout=WAIT)
        assert invoke.calls == []  # the function never saw either
        assert fetch("GET", f"{door.url}/health", timeout=WAIT)[0] == 200
        assert fetch("POST", f"{door.url}/", b'{"prompt": "x"}', timeout=WAIT)[0] == 200
        assert fetch("GET", f"{door.url}/other", timeout=WAIT)[0] == 200
    assert invoke.calls == [("GET", "/health"), ("POST", "/"), ("GET", "/other")]
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert body == playground.page()
    assert body.startswith(b"<!doctype html>")
    assert (head_status, head_body) == (200, b"")
    assert head_headers["content-length"] == str(len(body))
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-security-policy"] == playground.content_security_policy(body)


def test_the_policy_admits_the_inline_blocks_by_hash_and_nothing_external() -> None:
    html = playground.page()
    policy = dict(
        directive.strip().split(" ", 1) for directive in playground.content_security_policy(html).split(";")
    )
    assert policy["default-src"] == "'none'"
    assert (policy["img-src"], policy["connect-src"]) == ("data:", "'self'")
    assert policy["form-action"] == policy["base-uri"] == policy["frame-ancestors"] == "'none'"
    text = html.decode("utf-8")
    for kind in ("script", "style"):
        blocks = re.findall(rf"<{kind}>(.*?)</{kind}>", text, re.DOTALL)
        assert len(blocks) == 1
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
        assert policy[f"{kind}-src"] == f"'sha256-{digest}'"
    assert "unsafe" not in "".join(policy.values())
    # Nothing to fetch from anywhere: no external script, stylesheet, font or image reference.
    parts = PageParts()
    parts.feed(text)
    assert all(url.startswith("data:") for url in parts.urls), parts.urls
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*stylesheet|@import|url\(|https?://", text)


def test_every_field_the_page_sends_is_a_request_field() -> None:
    parts = PageParts()
    parts.feed(playground.page().decode("utf-8"))
    # init_image is read from a file input and added by the script, under the field's name.
    sent = parts.names | {"init_image"}
    assert "body.init_image" in playground.page().decode("utf-8")
    assert sent <= set(GenerationRequest.model_fields), sent - set(GenerationRequest.model_fields)
    assert {"prompt", "num_images", "strength", "scheduler", "decoder", "seed"} <= sent


def test_the_page_ships_as_package_data() -> None:
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["sd_lambda"]
    package = REPOSITORY / "src" / "sd_lambda"
    page = Path(playground.__file__).with_name(playground.PAGE)
    assert any(page in package.glob(pattern) for pattern in patterns), patterns


def _tool(directory: Path, name: str, script: str) -> None:
    tool = directory / name
    tool.write_text(f"#!/bin/sh\n{script}\n")
    tool.chmod(0o755)


def _make(*args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``make`` in the repository; with ``path``, that is the whole ``PATH`` its recipes see."""
    make = shutil.which("make")
    assert make, "make is required"
    return subprocess.run(
        [make, "--no-print-directory", *args],
        cwd=REPOSITORY,
        env={"PATH": str(path), "HOME": str(path)} if path else None,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def _make_install_browser(binaries: list[Path], path: Path) -> subprocess.CompletedProcess[str]:
    return _make("-s", "install-browser", f"BROWSER_BINARIES={_words(binaries)}", path=path)


def _words(paths: list[Path]) -> str:
    return " ".join(map(str, paths))


def test_make_installs_the_browser_with_apt_get_once_and_says_so_when_it_cannot(tmp_path: Path) -> None:
    binaries = [tmp_path / "chromium", tmp_path / "chromedriver"]
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("sed", "id", "env"):  # what the Makefile and the recipe call, and nothing else
        (tools / name).symlink_to(shutil.which(name) or name)
    calls = tmp_path / "apt-get.calls"
    # apt-get as a stand-in that records its arguments and installs the two binaries; sudo (used when the
    # test does not run as root) just runs its command.
    _tool(tools, "sudo", 'exec "$@"')
    install = f'for f in {_words(binaries)}; do echo > "$f"; {shutil.which("chmod")} +x "$f"; done'
    _tool(tools, "apt-get", f'echo "$DEBIAN_FRONTEND $*" >> {calls}\n[ "$1" != install ] || {{ {install}; }}')
    binaries[0].write_text("")
    binaries[0].chmod(0o755)  # one of the two present is not enough
    installed = _make_install_browser(binaries, tools)
    assert installed.returncode == 0, installed.stderr
    assert calls.read_text().splitlines() == [
        "noninteractive update -qq",
        "noninteractive install -y -qq --no-install-recommends chromium chromium-driver",
    ]
    assert _make_install_browser(binaries, tools).returncode == 0
    assert len(calls.read_text().splitlines()) == 2  # both present: nothing to do

    (tools / "apt-get").unlink()
    binaries[1].unlink()
    refused = _make_install_browser(binaries, tools)
    assert refused.returncode != 0
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("make install-browser:")]
    assert "no apt-get here: install Chromium and its chromedriver" in line


def test_make_test_installs_the_browser_first() -> None:
    database = _make("-p", "-n", "help").stdout.splitlines()
    rule = next(line for line in database if line.startswith("test: "))
    assert {"/usr/bin/chromium", "/usr/bin/chromedriver"} <= set(rule.split(":", 1)[1].split())
