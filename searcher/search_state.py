"""A search's progress on disk, so a search that stopped (a lost machine, a kill) goes on where it was.

One safetensors file holds the network as the search has changed it (channels permuted by the
ranking, then fine-tuned along the path) and, in its metadata, what the search decided so far:

- after the ranking: the ranking's report (the weights are the ranked network);
- after the latency predictor: its coefficients and report;
- after every step of the progressive path: the path, its counts, the fine-tunes' random state,
  and the weights again (a fine-tune may have changed them).

The file is replaced atomically, so it always holds one consistent moment. The phases after the
path (re-scoring, filtering, the final evaluation, the baselines) are not saved: a resumed search
reruns them. A state belongs to one search: its fingerprint (the configuration, the supernet file's
SHA-256, the splits) must match the search being started, or :class:`SearchStateError` says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimserve.models.checkpoint import CheckpointError, load_weights, save_weights
from slimserve.models.registry import Supernet
from slimserve.searcher.latency import LatencyPredictor
from slimserve.searcher.progressive import PathPoint, SearchStats

STATE_FORMAT = "slimserve-search-state/1"


class SearchStateError(RuntimeError):
    """A saved search state that cannot be resumed here (another search's, or not a state at all)."""


@dataclass
class Walked:
    """The progressive path so far, and what its fine-tunes need to go on drawing as before."""

    path: list[PathPoint]
    stats: SearchStats  # stats.finetunes also numbers the next fine-tune's draws
    rng_state: tuple[Any, ...]  # random.Random.getstate() of the fine-tunes' draws
    elapsed_s: float  # time spent walking, over every run that walked


class SearchState:
    """Load, check and save one search's progress (see the module docstring)."""

    def __init__(self, path: Path, fingerprint: dict[str, Any], record: dict[str, Any]) -> None:
        self.path, self.fingerprint, self.record = path, fingerprint, record

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict[str, Any]) -> SearchState:
        """The state at ``path`` if there is one (refused unless it is this search's), else an empty one."""
        path = Path(path)
        fingerprint = json.loads(json.dumps(fingerprint))  # as stored: tuples become lists
        if not path.exists():
            return cls(path, fingerprint, {})
        try:
            _, metadata = load_weights(path)
        except CheckpointError as error:
            raise SearchStateError(f"{error}; remove it to start the search over") from error
        if metadata.get("format") != STATE_FORMAT:
            raise SearchStateError(f"{path}: not a search state (format {metadata.get('format')!r})")
        saved = json.loads(metadata["fingerprint"])
        if saved != fingerprint:
            differs = sorted(k for k in fingerprint.keys() | saved.keys() if saved.get(k) != fingerprint.get(k))
            raise SearchStateError(
                f"{path} holds another search's progress (it differs in {', '.join(differs)}); "
                "remove it, or pass --fresh, to start this one"
            )
        return cls(path, fingerprint, json.loads(metadata["record"]))

    @property
    def ranking(self) -> dict[str, Any] | None:
        return self.record.get("ranking")

    def restore_network(self, network: Supernet) -> None:
        """Load the weights saved with the last step into ``network`` (already on its device)."""
        tensors, _ = load_weights(self.path)
        try:
            network.load_state_dict(tensors)
        except RuntimeError as error:  # the fingerprint matched, so only a damaged file gets here
            raise SearchStateError(f"{self.path}: its weights do not fit the network: {error}") from error

    @property
    def predictor(self) -> tuple[LatencyPredictor, dict[str, Any]] | None:
        saved = self.record.get("predictor")
        if saved is None:
            return None
        coefficients = {int(b): tuple(c) for b, c in saved["coefficients"].items()}
        return LatencyPredictor(tuple(saved["areas"]), coefficients), saved["report"]

    @property
    def walked(self) -> Walked | None:
        saved = self.record.get("walked")
        if saved is None:
            return None
        version, internal, gauss = saved["rng_state"]
        return Walked(
            path=[PathPoint(tuple(p["subnet"]), p["accuracy"], p["cost"], p["finetuned"]) for p in saved["path"]],
            stats=SearchStats(**saved["stats"]),
            rng_state=(version, tuple(internal), gauss),
            elapsed_s=saved["elapsed_s"],
        )

    @property
    def phases(self) -> dict[str, float]:
        return dict(self.record.get("phases_s", {}))

    def save_ranking(self, network: Supernet, ranking: dict[str, Any], phases: dict[str, float]) -> None:
        self._save(network, ranking=ranking, phases_s=phases)

    def save_predictor(
        self, network: Supernet, predictor: LatencyPredictor, report: dict[str, Any], phases: dict[str, float]
    ) -> None:
        saved = {"areas": list(predictor.areas), "coefficients": predictor.coefficients, "report": report}
        self._save(network, predictor=saved, phases_s=phases)

    def save_walk(self, network: Supernet, walked: Walked) -> None:
        self._save(
            network,
            walked={
                "path": [
                    {"subnet": p.subnet, "accuracy": p.accuracy, "cost": p.cost, "finetuned": p.finetuned}
                    for p in walked.path
                ],
                "stats": {"evaluations": walked.stats.evaluations, "finetunes": walked.stats.finetunes},
                "rng_state": walked.rng_state,
                "elapsed_s": round(walked.elapsed_s, 1),
            },
        )

    def _save(self, network: Supernet, **changes: Any) -> None:
        self.record = json.loads(json.dumps({**self.record, **changes}))
        metadata = {
            "format": STATE_FORMAT,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "record": json.dumps(self.record),
        }
        save_weights(self.path, {k: v.cpu() for k, v in network.state_dict().items()}, metadata)

    def remove(self) -> None:
        """The search is done and its bundle written: the progress is of no more use."""
        self.path.unlink(missing_ok=True)
