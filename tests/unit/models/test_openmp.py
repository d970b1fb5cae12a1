"""The OpenMP wait setting: the server's default, the user's choice otherwise."""

from __future__ import annotations

from slimserve.models import openmp


def test_passive_waiting_is_set_when_nothing_is_chosen() -> None:
    environ: dict[str, str] = {"PATH": "/bin"}
    openmp.configure(environ)
    assert environ == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE", openmp.DEFAULTED: "1"}
    assert openmp.wait_environment(environ) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_the_users_choice_is_left_alone() -> None:
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        environ = dict(chosen)
        openmp.configure(environ)
        assert environ == chosen
        assert openmp.wait_environment(environ) == chosen


def test_the_inference_process_spins_only_where_the_wait_setting_is_ours() -> None:
    ours: dict[str, str] = {"PATH": "/bin"}
    openmp.configure(ours)
    child = openmp.inference_environment(ours, 10000)
    assert openmp.wait_environment(child) == {"GOMP_SPINCOUNT": "10000"}
    assert child["OMP_PROC_BIND"] == "true" and child["PATH"] == "/bin"
    assert openmp.wait_environment(ours) == {"OMP_WAIT_POLICY": "PASSIVE"}  # the front end's own is unchanged
    assert openmp.inference_environment(ours, 0) == ours  # 0: sleep at once, as the front end
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "50"}):
        users = dict(chosen)
        openmp.configure(users)
        assert openmp.inference_environment(users, 10000) == chosen


def test_a_users_thread_binding_is_kept_under_the_spin() -> None:
    environ = {"OMP_PROC_BIND": "false"}
    openmp.configure(environ)
    assert openmp.inference_environment(environ, 10000)["OMP_PROC_BIND"] == "false"
