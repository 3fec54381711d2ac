"""The registry builds each composition and refuses the ones that do not compose, with the fix."""

from __future__ import annotations

import pytest

from strategies.exact import ExactAggregator
from strategies.fedavg import FedAvgAggregator
from strategies.ffa import FFAAggregator
from strategies.registry import build_aggregator, build_compression
from strategies.robust import RobustAggregator
from strategies.server_optimizer import ServerOptimizer


def test_names_build_their_aggregators() -> None:
    assert isinstance(build_aggregator("fedavg"), FedAvgAggregator)
    assert isinstance(build_aggregator("ffa"), FFAAggregator)
    assert isinstance(build_aggregator("exact", residual="drop"), ExactAggregator)
    robust = build_aggregator("ffa", robust="median", server_optimizer="yogi", known_sites=["a", "b"])
    assert isinstance(robust, RobustAggregator) and isinstance(robust.inner, ServerOptimizer)
    assert isinstance(robust.inner.inner, FFAAggregator) and robust.known_sites == {"a", "b"}
    assert build_aggregator("exact", robust="clip", clip_norm=1.0).clip_norm == 1.0
    assert build_compression("int8").codec == "int8"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "fedprox"}, "use one of fedavg, ffa, exact"),
        ({"name": "fedavg", "robust": "krum"}, "use one of"),
        ({"name": "fedavg", "server_optimizer": "sgd"}, "use one of"),
        ({"name": "exact", "robust": "median"}, "use robust='validate' or 'clip'"),
        ({"name": "exact", "server_optimizer": "adam"}, "server_optimizer='none'"),
        ({"name": "fedavg", "robust": "clip"}, "needs clip_norm"),
        ({"name": "fedavg", "robust": "trimmed-mean", "trim_fraction": 0.6}, r"\[0, 0.5\)"),
    ],
)
def test_refusals_say_what_to_do(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_aggregator(**kwargs)
    with pytest.raises(ValueError, match="use one of"):
        build_compression("zip")
