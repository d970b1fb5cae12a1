"""A comparison's checkpoint: finished runs survive a failure and --resume makes only the rest."""

import json
from pathlib import Path
from typing import Any

import pytest

from slimserve.loadtest.checkpoint import Checkpoint, ResumeError, RunKey
from slimserve.loadtest.compare import CompareConfig, RunFailed, identity, plan, run_all

POLICIES = ("adaptive", "static:s0", "static:s7")
IDENTITY = identity(CompareConfig(bundle=Path("models/demo"), trace="poisson"), POLICIES)


def test_the_plan_interleaves_repeats_and_rotates_the_policies_per_repeat() -> None:
    keys = plan(POLICIES, (10.0, 30.0), 2)
    assert len(keys) == len(set(keys)) == 3 * 2 * 2
    assert [p for p, rate, repeat in keys if repeat == 0 and rate == 30.0] == list(POLICIES)
    assert [p for p, rate, repeat in keys if repeat == 1 and rate == 10.0] == ["static:s0", "static:s7", "adaptive"]
    assert [repeat for _, _, repeat in keys] == [0] * 6 + [1] * 6  # a repeat is finished before the next starts


class FailingAt:
    """An ``execute`` that fails on one run and records what it was asked to make."""

    def __init__(self, failing: RunKey | None) -> None:
        self.failing, self.made = failing, []

    def __call__(self, key: RunKey) -> dict[str, Any]:
        if key == self.failing:
            raise RuntimeError("locust wrote no results (exit 1)")
        self.made.append(key)
        return {"slo_attainment": 1.0, "run": list(key)}


def test_a_failed_run_keeps_the_runs_before_it_and_a_resume_makes_only_the_rest(tmp_path: Path) -> None:
    path, keys = tmp_path / "progress.json", plan(POLICIES, (10.0, 30.0), 2)
    first = FailingAt(keys[4])
    with pytest.raises(RunFailed, match=r"static:s0 at 30 req/s, repeat 0: locust wrote no results.*4 of 12.*--resume"):
        run_all(keys, Checkpoint.open(path, IDENTITY, resume=False), first)
    assert first.made == keys[:4]

    resumed = Checkpoint.open(path, IDENTITY, resume=True)
    assert sorted(resumed.runs) == sorted(keys[:4]) and resumed.runs[keys[1]]["run"] == list(keys[1])
    second = FailingAt(None)
    run_all(keys, resumed, second)
    assert second.made == keys[4:]  # in the planned order, none twice
    assert sorted(Checkpoint.open(path, IDENTITY, resume=True).runs) == sorted(keys)

    # More repeats later: only the new ones run.
    more, third = plan(POLICIES, (10.0, 30.0), 3), FailingAt(None)
    run_all(more, Checkpoint.open(path, IDENTITY, resume=True), third)
    assert third.made == more[12:]


def test_the_setup_measured_at_the_first_start_is_kept_for_the_resumed_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "progress.json"
    Checkpoint.open(path, IDENTITY, resume=False).remember_setup(overhead_ms=3.01, margin_ms=3.0, budget_mix="100:60")
    assert Checkpoint.open(path, IDENTITY, resume=True).setup == {
        "overhead_ms": 3.01,
        "margin_ms": 3.0,
        "budget_mix": "100:60",
    }
    assert Checkpoint.open(path, IDENTITY, resume=False).setup == {}  # without --resume it starts over
    assert "starting over" in caplog.text and "--resume would have kept its runs" in caplog.text


def test_a_resume_refuses_a_checkpoint_of_another_comparison_and_says_what_differs(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    Checkpoint.open(path, IDENTITY, resume=False).save()
    other = identity(CompareConfig(bundle=Path("models/demo"), trace="poisson", duration=15.0), POLICIES)
    with pytest.raises(ResumeError, match=r"another comparison \(duration: 120.0 there, 15.0 now\)"):
        Checkpoint.open(path, other, resume=True)
    more_frontends = identity(CompareConfig(bundle=Path("models/demo"), trace="poisson", frontends=3), POLICIES)
    with pytest.raises(ResumeError, match=r"frontends: None there, 3 now"):
        Checkpoint.open(path, more_frontends, resume=True)


@pytest.mark.parametrize(
    "content", ["", "{not json", json.dumps({"identity": IDENTITY}), json.dumps({"runs": [{"policy": 1}]})]
)
def test_a_resume_from_a_missing_or_damaged_checkpoint_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "progress.json"
    with pytest.raises(ResumeError, match="nothing to resume"):
        Checkpoint.open(path, IDENTITY, resume=True)
    path.write_text(content)
    with pytest.raises(ResumeError, match="not a readable checkpoint"):
        Checkpoint.open(path, IDENTITY, resume=True)


def test_saving_replaces_the_file_whole_and_leaves_no_temporary_behind(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    checkpoint = Checkpoint.open(path, IDENTITY, resume=False)
    checkpoint.record(("adaptive", 10.0, 0), {"slo_attainment": 0.99})
    checkpoint.record(("adaptive", 10.0, 1), {"slo_attainment": 0.98})
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]
    assert len(json.loads(path.read_text())["runs"]) == 2
