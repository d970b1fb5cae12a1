"""A search's saved progress: what goes in comes back, and a state that is not this search's is refused."""

import random
from pathlib import Path

import pytest
import torch

from slimserve.models.checkpoint import save_weights
from slimserve.models.families import create_supernet
from slimserve.searcher.latency import LatencyPredictor
from slimserve.searcher.progressive import PathPoint, SearchStats
from slimserve.searcher.search_state import SearchState, SearchStateError, Walked

FINGERPRINT = {"config": {"k": 8, "resolutions": (28, 14)}, "supernet_sha256": "ab" * 32}


def network(seed: int):
    torch.manual_seed(seed)
    return create_supernet("cifar_resnet", depth=8, base_channels=16, in_channels=1, image_size=28, num_classes=10)


def test_what_is_saved_comes_back_and_the_weights_are_the_last_saved(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    state = SearchState.open(path, FINGERPRINT)
    assert state.ranking is None and state.predictor is None and state.walked is None
    ranked, tuned = network(1), network(2)
    state.save_ranking(ranked, {"chosen": "noise"}, {"ranking": 12.5})
    predictor = LatencyPredictor((16, 4), {1: (0.1, 0.01, 2.0, 3.0), 8: (0.2, 0.02, 9.0, 8.0)})
    state.save_predictor(ranked, predictor, {"fitted_on": 32}, {"ranking": 12.5, "latency predictor": 3.0})
    rng = random.Random(7)
    rng.random()
    path_so_far = [PathPoint((32, 16, 3), 0.93, 4.0), PathPoint((32, 8, 3), 0.92, 3.5, finetuned=True)]
    state.save_walk(tuned, Walked(path_so_far, SearchStats(9, 1), rng.getstate(), 61.0))

    again = SearchState.open(path, FINGERPRINT)
    assert again.ranking == {"chosen": "noise"}
    assert again.phases == {"ranking": 12.5, "latency predictor": 3.0}
    assert again.predictor is not None and again.predictor[0] == predictor
    walked = again.walked
    assert walked is not None
    assert walked.path == path_so_far and walked.stats == SearchStats(9, 1)
    resumed = random.Random()
    resumed.setstate(walked.rng_state)
    assert resumed.random() == rng.random() and walked.elapsed_s == 61.0
    fresh = network(3)
    again.restore_network(fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), tuned.state_dict().values(), strict=True))
    again.remove()
    assert not path.exists()


def test_another_searchs_progress_is_refused_naming_what_differs(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    SearchState.open(path, FINGERPRINT).save_ranking(network(1), {"chosen": "identity"}, {})
    with pytest.raises(SearchStateError, match=r"another search's progress \(it differs in config\)"):
        SearchState.open(path, {**FINGERPRINT, "config": {"k": 6, "resolutions": (28, 14)}})


def test_a_file_that_is_not_a_search_state_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "weights.safetensors"
    save_weights(weights, {"w": torch.zeros(2)}, {"format": "slimserve-supernet/1"})
    with pytest.raises(SearchStateError, match="not a search state"):
        SearchState.open(weights, FINGERPRINT)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(SearchStateError, match="remove it to start the search over"):
        SearchState.open(garbage, FINGERPRINT)
