import io
import pickle
from pathlib import Path

import pytest
import torch

from slimserve.models.checkpoint import (
    CheckpointError,
    SupernetInfo,
    load_supernet,
    load_weights,
    save_supernet,
    save_weights,
)
from slimserve.models.families import create_supernet


class _Exploit:
    """Unpickling this creates a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_round_trip_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_weights(tmp_path / "w.safetensors", tensors, {"note": "hi"})
    loaded, metadata = load_weights(tmp_path / "w.safetensors")
    assert metadata == {"note": "hi"}
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert not (tmp_path / "w.safetensors.partial").exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".pkl"])
def test_pickle_checkpoints_are_refused_by_name_without_unpickling(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match="refusing"):
        load_weights(path)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "evil": _Exploit(marker)}, buffer)
    path = tmp_path / "model.safetensors"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_weights(path)
    assert not marker.exists()


def test_truncated_and_missing_files_are_named(tmp_path: Path) -> None:
    save_weights(tmp_path / "w.safetensors", {"a": torch.randn(100)})
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 50])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load_weights(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="no such weights file"):
        load_weights(tmp_path / "absent.safetensors")


def test_supernet_round_trip_rebuilds_the_same_function(tmp_path: Path) -> None:
    args = {"depth": 8, "base_channels": 16, "in_channels": 1, "image_size": 28}
    net = create_supernet("cifar_resnet", **args)
    info = SupernetInfo("cifar_resnet", args, (0.5,), (0.25,), tuple("abcdefghij"), "toy", "v1", {"seed": 3})
    save_supernet(tmp_path / "s.safetensors", net, info, {"train.step": torch.tensor(7)})
    loaded, loaded_info, extra = load_supernet(tmp_path / "s.safetensors")
    assert loaded_info == info
    assert int(extra["train.step"]) == 7
    x = torch.randn(4, 1, 28, 28)
    subnet = net.space.uniform(0.5)
    assert torch.equal(loaded(x, subnet), net(x, subnet))


def test_plain_safetensors_is_not_mistaken_for_a_supernet(tmp_path: Path) -> None:
    save_weights(tmp_path / "w.safetensors", {"a": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a slimserve supernet"):
        load_supernet(tmp_path / "w.safetensors")
