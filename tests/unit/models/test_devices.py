"""A device name is checked where it is given: syntax first, then whether this machine has it."""

import pytest

from slimserve.models.devices import device_problem


def test_the_cpu_is_always_there() -> None:
    assert device_problem("cpu") is None


@pytest.mark.parametrize("name", ["gpu", "banana", "cuda:", "cuda:x", "CPU", "cuda:0:1", ""])
def test_a_name_that_is_not_a_device_says_what_is_expected(name: str) -> None:
    assert device_problem(name) == f"expected cpu, cuda or cuda:N, got {name!r}"


def test_a_cuda_device_this_machine_lacks_is_named_with_the_count_it_has() -> None:
    import torch

    count = torch.cuda.device_count()
    assert device_problem(f"cuda:{count}") == (
        f"cuda:{count}: this machine's torch ({torch.__version__}) sees {count} CUDA device(s)"
    )
    assert (device_problem("cuda") is None) == (count > 0)


def test_the_server_refuses_a_device_it_lacks_before_reading_the_bundle(tmp_path) -> None:
    import torch

    from slimserve.server.engine import Engine
    from slimserve.server.settings import Settings

    missing = f"cuda:{torch.cuda.device_count()}"
    # the bundle does not exist either: reading it first would raise a BundleError instead
    with pytest.raises(ValueError, match=rf"^SLIMSERVE_DEVICE: {missing}: this machine's torch"):
        Engine.open(Settings(bundle=tmp_path / "nothing", device=missing))
