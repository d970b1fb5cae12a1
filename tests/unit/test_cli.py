"""One `slimserve` command: every subcommand exists and every option explains itself."""

import argparse
import json
import socket
from pathlib import Path

import pytest

from slimserve.cli import _SERVING_LIKE, build_parser, main, subcommand
from slimserve.loadtest.runner import free_port

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


def test_every_command_given_the_servers_openmp_setting_exists() -> None:
    # A renamed command would silently run with OpenMP's own waiting and profile what is not served.
    assert set(_SERVING_LIKE) <= set(subcommands(build_parser()))


def test_the_subcommand_is_found_past_the_global_options_value() -> None:
    # As the load test starts a peer: the OpenMP wait setting is made for serving-like commands only,
    # so reading "WARNING" as the command left peers on OpenMP's default spinning.
    assert subcommand(["--log-level", "WARNING", "peer", "litserve", "--subnet", "s7"]) == "peer"
    assert subcommand(["--log-level=DEBUG", "bench", "table"]) == "bench"
    assert subcommand(["serve", "--port", "9000"]) == "serve"
    assert subcommand(["--help"]) is None and subcommand([]) is None


def test_every_option_of_every_command_has_help() -> None:
    for name, parser in subcommands(build_parser()).items():
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help and len(action.help) > 10, f"slimserve {name} {action.option_strings[0]}"


def test_every_commands_help_renders() -> None:
    """argparse %-formats help texts when it prints them: a stray '%' only fails at `--help`."""
    for name, parser in subcommands(build_parser()).items():
        assert parser.format_help().startswith("usage: "), f"slimserve {name} --help"


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
    # a free port: serve binds before it loads, and another server may hold the default 8000
    assert main(["serve", "--bundle", str(tmp_path / "nothing"), "--port", str(free_port())]) == 1
    assert "bundle directory not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["loadtest", "compare", "--trace", "poisson", "--rates", "10", "--duration", "1"],
        ["loadtest", "run", "--rate", "5", "--duration", "1"],
        ["bench", "table"],
        ["bench", "switch"],
        ["bench", "steps"],
        ["bench", "decide"],
        ["bench", "simulate", "--rate", "5"],
    ],
)
def test_load_tests_and_benchmarks_on_a_missing_bundle_exit_1_naming_the_file(
    command: list[str], capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    assert main([*command, "--bundle", str(tmp_path / "nothing")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{tmp_path / 'nothing' / 'subnets.json'}: missing" in error


def test_the_decision_benchmark_names_the_columns_when_asked_for_one_the_table_lacks(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["bench", "decide", "--column", "tpu", "--out", str(tmp_path / "decide.json")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no latency column 'tpu' (columns: cpu-2t, cuda0)" in error
    assert not (tmp_path / "decide.json").exists()


def test_a_simulation_writes_its_result_and_refuses_an_unknown_setting_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "simulate.json"
    assert main(["bench", "simulate", "--rate", "20", "--seconds", "1", "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["medians"]) == {"adaptive", "adaptive+split-batches=true"}
    capsys.readouterr()
    bad = ["bench", "simulate", "--rate", "20", "--policies", "adaptive+turbo=on", "--out", str(out)]
    assert main(bad) == 1
    assert capsys.readouterr().err == (
        "slimserve bench: policy 'adaptive+turbo=on': 'turbo=on' is not name=value of a server setting\n"
    )


def test_a_closed_output_pipe_ends_with_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimserve.models import cli as models_cli

    def closed(_args: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(models_cli, "run_families", closed)
    assert main(["families"]) == 1
    assert capsys.readouterr().err == "slimserve: output closed before the command finished (broken pipe)\n"


def save_tiny_supernet(path: Path, train_config: dict) -> None:
    from slimserve.models.checkpoint import SupernetInfo, save_supernet
    from slimserve.models.families import create_supernet

    args = {"depth": 8, "base_channels": 16, "in_channels": 1, "image_size": 28, "num_classes": 10}
    info = SupernetInfo("cifar_resnet", args, (0.5,), (0.25,), tuple("abcdefghij"), "fashion-mnist", "test",
                        {"train_config": train_config})  # fmt: skip
    save_supernet(path, create_supernet("cifar_resnet", **args), info)


@pytest.mark.parametrize(
    ("train_config", "flags", "message"),
    [
        ({"static_width": 0.5}, [], "a static network of width 0.5"),
        ({"resolutions": [28, 14]}, ["--resolutions", "28,40"], "--resolutions: resolutions must be between 4"),
        ({}, ["--k", "1", "--data", "/nowhere"], "slimserve search: k must be at least 2"),  # before the data
        ({}, ["--step-fraction", "0.9"], "slimserve search: step_fraction must be in (0, 0.5]"),
        ({}, ["--search-images", "0"], "slimserve search: search_images must be >= 1, finetune_steps and"),
        ({}, ["--finetune-steps", "-1"], "slimserve search: search_images must be >= 1, finetune_steps and"),
    ],
)
def test_search_refuses_a_start_it_cannot_use_in_one_line(
    train_config: dict, flags: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    save_tiny_supernet(tmp_path / "net.safetensors", train_config)
    assert main(["search", "--supernet", str(tmp_path / "net.safetensors"), "--out", str(tmp_path / "b"), *flags]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_search_refuses_another_searchs_saved_progress_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from slimserve.models.checkpoint import load_supernet
    from slimserve.searcher.search_state import SearchState

    save_tiny_supernet(tmp_path / "net.safetensors", {})
    network, _, _ = load_supernet(tmp_path / "net.safetensors")
    left_behind = tmp_path / "b.search-state.safetensors"  # beside --out, where the search looks by default
    SearchState.open(left_behind, {"another": "search"}).save_ranking(network, {"chosen": "identity"}, {})
    assert main(["search", "--supernet", str(tmp_path / "net.safetensors"), "--out", str(tmp_path / "b")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds another search's progress" in error and "--fresh" in error
    assert left_behind.exists()  # refused, not overwritten


def test_train_refuses_bad_resolutions_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["train", "--out", str(tmp_path), "--resolutions", "28,14,14"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "distinct" in error


def test_a_missing_dataset_is_one_line_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert code == 1
    assert capsys.readouterr().err == (
        f"slimserve train: Fashion-MNIST not found at {tmp_path / 'nowhere'}. Install it with `sudo apt-get "
        "install -y dataset-fashion-mnist`, or pass the directory holding the IDX files.\n"
    )


def test_a_file_that_is_not_a_supernet_checkpoint_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["search", "--supernet", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err == f"slimserve search: {tmp_path / 'none.safetensors'}: no such weights file\n"
    # a served bundle's weights are not a training checkpoint
    assert main(["s2dnas", "--static", "models/demo/weights.safetensors", "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("slimserve s2dnas: models/demo/weights.safetensors: not a slimserve supernet checkpoint")
    assert err.count("\n") == 1


def test_a_load_test_without_its_test_images_stops_before_starting_a_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimserve.loadtest import runner, workload

    monkeypatch.setattr(workload, "FASHION_MNIST_DIR", tmp_path)
    monkeypatch.setattr(runner.ServerProcess, "start", lambda self: pytest.fail("a server was started"))
    code = main(["loadtest", "compare", "--rates", "5", "--duration", "1", "--policies", "static:s0",
                 "--out-dir", str(tmp_path / "out"), "--raw-dir", str(tmp_path / "raw")])  # fmt: skip
    assert code == 1
    assert capsys.readouterr().err == (
        f"slimserve loadtest: t10k-images-idx3-ubyte[.gz] not found in {tmp_path}: install Fashion-MNIST "
        "(apt-get install -y dataset-fashion-mnist)\n"
    )


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["loadtest", "compare", "--rates", "-5"], "argument --rates: expected comma-separated rates > 0, got '-5'"),
        (["loadtest", "compare", "--rates", "10,0"], "argument --rates"),
        (["loadtest", "compare", "--repeats", "0"], "argument --repeats: expected a whole number >= 1"),
        (["loadtest", "compare", "--budget-mix", "garbage"], "argument --budget-mix: budget mix 'garbage'"),
        (["loadtest", "run", "--rate", "nan"], "argument --rate: expected a number > 0, got 'nan'"),
        (["loadtest", "run", "--duration", "-1"], "argument --duration"),
        (
            ["bench", "soak", "--rate", "5", "--malformed", "2"],
            "argument --malformed: expected a share between 0 and 1",
        ),
        (["profile", "--threads", "0"], "argument --threads: expected a whole number >= 1, got '0'"),
        (["profile", "--repeats", "0"], "argument --repeats: expected a whole number >= 1, got '0'"),
        (["profile", "--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
        (["train", "--device", "cuda:64"], "argument --device: cuda:64: this machine's torch"),
        (["bench", "steps", "--device", "banana"], "argument --device: expected cpu, cuda or cuda:N"),
        (["peer", "litserve", "--subnet", "s0", "--device", "cuda:64"], "argument --device: cuda:64: this machine"),
        (["peer", "litserve", "--subnet", "s0", "--threads", "0"], "argument --threads: expected a whole number >= 1"),
    ],
)
def test_arguments_that_cannot_work_are_refused_by_name(
    arguments: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # each used to fail late or from deep inside: a negative rate started a whole default comparison
    # of nothing; torch raised an AssertionError for CUDA on a CPU-only build, an IndexError for zero
    # repeats
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_a_trace_that_cannot_be_read_is_refused_before_the_load_test(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "trace.csv"
    bad.write_text("second,requests\n0,5\n")
    code = main(["loadtest", "run", "--arrival", "trace", "--trace-csv", str(bad), "--host", "http://127.0.0.1:9"])
    assert code == 1
    assert capsys.readouterr().err == (
        f"slimserve loadtest run: --trace-csv: {bad}: expected a CSV with a 'rate' column (requests per second, "
        "one row per second)\n"
    )


def test_an_unknown_family_to_profile_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--family", "no_such_family"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("slimserve profile: --family no_such_family: unknown supernet family 'no_such_family'")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["s2dnas", "--stages", "1"], "slimserve s2dnas: stages must be 2 to 7 (one stage has no early exit"),
        (["s2dnas", "--candidates", "0"], "slimserve s2dnas: candidates must be >= 1"),
        (["s2dnas", "--target-drop", "5"], "slimserve s2dnas: target drop is a share of accuracy in [0, 1), got 5.0"),
        (["lcnet", "--steps", "0"], "slimserve lcnet: steps must be >= 1, got 0"),
        (["lcnet", "--thresholds", "0.1,1.5"], "slimserve lcnet: thresholds must be one or more gate values in [0, 1)"),
        (["lcnet", "--target-drop", "1"], "slimserve lcnet: target drop is a share of accuracy in [0, 1), got 1.0"),
    ],
)
def test_searches_that_cannot_work_stop_before_reading_a_file(
    arguments: list[str], named: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # the inputs do not exist: a check made after reading them would name them instead. `lcnet --steps
    # 0` used to train and time for minutes and `s2dnas --stages 1` to fail deep in the search.
    source = ["--static", str(tmp_path / "none.safetensors")] if arguments[0] == "s2dnas" else ["--from", str(tmp_path)]
    assert main([*arguments, *source, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(named) and err.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--lr", "0"], "slimserve train: the learning rate must be > 0, weight decay >= 0 and momentum in [0, 1)"),
        (["--weight-decay", "-1"], "slimserve train: the learning rate must be > 0, weight decay >= 0"),
        (["--checkpoint-every", "0"], "slimserve train: warmup steps must be >= 0 and checkpoint_every >= 1"),
    ],
)
def test_training_settings_that_cannot_work_stop_before_the_data_is_read(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(named) and err.count("\n") == 1
