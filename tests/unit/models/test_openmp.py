"""The OpenMP wait setting: the server's default, the user's choice otherwise."""

from __future__ import annotations

from slimserve.models import openmp


def test_passive_waiting_is_set_when_nothing_is_chosen() -> None:
    environ: dict[str, str] = {"PATH": "/bin"}
    openmp.configure(environ)
    assert environ == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp.wait_environment(environ) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_the_users_choice_is_left_alone() -> None:
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        environ = dict(chosen)
        openmp.configure(environ)
        assert environ == chosen
        assert openmp.wait_environment(environ) == chosen
