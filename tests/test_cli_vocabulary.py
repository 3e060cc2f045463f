"""One vocabulary for every ``sd-lambda`` command: the same flag names, defaults shown in ``--help``, and
errors that name the make variable when make runs the command."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterator

import pytest

from sd_lambda.cli import FROM_MAKE_ENV, MAKE_VARIABLES, ask_for, build_parser, main, option


def parsers(
    parser: argparse.ArgumentParser, path: str = "sd-lambda"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


ALL = list(parsers(build_parser()))


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_one_name_per_meaning() -> None:
    every_flag = set().union(*(_flags(parser) for _, parser in ALL))
    assert {"--infra-dir", "--out", "--out-dir"} & every_flag == set()
    assert "--infra" in every_flag
    assert "--json" in every_flag
    for path, parser in ALL:
        if "--output" in _flags(parser):  # every file a command writes: -o/--output where it is the result
            action = next(a for a in parser._actions if "--output" in a.option_strings)
            assert "-o" in action.option_strings or path.endswith("requirements"), path


@pytest.mark.parametrize(
    "command", ["generate", "deploy apply", "deploy plan", "deploy destroy", "seed", "rollback"]
)
def test_every_command_a_script_calls_has_json(command: str) -> None:
    parser = dict(ALL)[f"sd-lambda {command}"]
    assert "--json" in _flags(parser)


@pytest.mark.parametrize(("path", "parser"), ALL, ids=[path for path, _ in ALL])
def test_help_shows_every_default(path: str, parser: argparse.ArgumentParser) -> None:
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.default in (None, False, [], argparse.SUPPRESS):
            continue
        assert f"(default: {action.default})" in text, f"{path} {action.option_strings or action.dest}"


def test_the_make_table_names_real_flags() -> None:
    every_flag = set().union(*(_flags(parser) for _, parser in ALL))
    assert set(MAKE_VARIABLES) <= every_flag


def test_messages_name_the_flag_outside_make(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FROM_MAKE_ENV, raising=False)
    assert option("--prompt") == "--prompt"
    assert option("--yes") == "--yes"
    assert ask_for("--prompt", "a red fox") == 'pass --prompt "a red fox"'
    assert ask_for("--region", "<region>") == "pass --region <region>"
    assert ask_for("--url", "") == "pass --url"


def test_messages_name_the_make_variable_under_make(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FROM_MAKE_ENV, "1")
    assert option("--prompt") == "PROMPT="
    assert option("--yes") == "CONFIRM=1"
    assert option("--attempts") == "--attempts"  # no make variable: the flag (through ARGS=)
    assert ask_for("--prompt", "a red fox") == 'set PROMPT="a red fox"'
    assert ask_for("--url", "") == "set URL="


@pytest.mark.parametrize(("path", "parser"), ALL, ids=[path for path, _ in ALL])
def test_help_is_plain_text(path: str, parser: argparse.ArgumentParser) -> None:
    assert "``" not in parser.format_help(), f"{path} --help shows reStructuredText markup"


def test_each_command_describes_itself() -> None:
    described = {path: parser.description for path, parser in ALL if parser.description}
    assert {"sd-lambda", "sd-lambda seed", "sd-lambda rollback", "sd-lambda deploy"} <= set(described)
    shared = {text for text in described.values() if list(described.values()).count(text) > 1}
    assert shared == set()


def test_seed_bf16_copy_without_torch_names_the_install_and_the_make_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *rest: None if name == "torch" else real_find_spec(name, *rest),
    )
    monkeypatch.setenv(FROM_MAKE_ENV, "1")
    assert main(["seed", "--model", "owner/model", "--bf16-copy"]) == 1
    assert capsys.readouterr().err == (
        "sd-lambda seed: error: BF16_COPY=1 needs torch: make install (the full install, CPU torch), "
        "or drop BF16_COPY=1\n"
    )
