"""One `slimserve` command: every subcommand exists and every option explains itself."""

import argparse
import socket

import pytest

from slimserve.cli import build_parser, main

COMMANDS = {"train", "families", "search", "profile", "serve", "loadtest", "bench"}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in subcommands(sub).items()})
    return found


def test_every_stage_has_its_command() -> None:
    assert set(subcommands(build_parser())) >= COMMANDS


def test_every_option_of_every_command_has_help() -> None:
    for name, parser in subcommands(build_parser()).items():
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help and len(action.help) > 10, f"slimserve {name} {action.option_strings[0]}"


def test_serve_exposes_every_setting_as_a_flag() -> None:
    from slimserve.server.settings import Settings

    serve = subcommands(build_parser())["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    assert {"--" + name.replace("_", "-") for name in Settings.model_fields} <= flags


def test_invalid_settings_exit_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-batch", "64", "--max-queue", "8"]) == 1
    assert "max_queue" in capsys.readouterr().err


def test_a_taken_port_exits_1_naming_the_port_before_the_bundle_is_read(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the bundle does not exist: reaching it would print a bundle error instead
        assert main(["serve", "--port", str(port), "--bundle", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err == f"slimserve serve: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_missing_bundle_exits_with_a_message(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["serve", "--bundle", str(tmp_path / "nothing")]) == 1
    assert "bundle directory not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["loadtest", "compare", "--trace", "poisson", "--rates", "10", "--duration", "1"],
        ["loadtest", "run", "--rate", "5", "--duration", "1"],
        ["bench", "table"],
        ["bench", "switch"],
    ],
)
def test_load_tests_and_benchmarks_on_a_missing_bundle_exit_1_naming_the_file(
    command: list[str], capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    assert main([*command, "--bundle", str(tmp_path / "nothing")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{tmp_path / 'nothing' / 'subnets.json'}: missing" in error


def test_a_closed_output_pipe_ends_with_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimserve.models import cli as models_cli

    def closed(_args: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(models_cli, "run_families", closed)
    assert main(["families"]) == 1
    assert capsys.readouterr().err == "slimserve: output closed before the command finished (broken pipe)\n"
