"""Continual metrics on hand-made matrices, against hand-computed numbers and Avalanche's own implementations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.continual_metrics import (
    accuracy_matrix,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    continual_summary,
    experience_forgetting,
    experience_rows,
)

R = [
    [0.9],
    [0.6, 0.8],
    [0.5, 0.7, 0.95],
]


def test_hand_computed_values_after_each_experience():
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert average_accuracy(R, after=1) == pytest.approx((0.6 + 0.8) / 2)
    assert average_accuracy(R, after=0) == pytest.approx(0.9)
    assert experience_forgetting(R) == pytest.approx({0: 0.9 - 0.5, 1: 0.8 - 0.7})
    assert average_forgetting(R) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)  # 0.25
    assert backward_transfer(R) == pytest.approx(-0.25)
    assert average_forgetting(R, after=1) == pytest.approx(0.3)
    assert average_forgetting(R, after=0) == 0.0  # Avalanche: an empty mean is 0
    assert backward_transfer(R, after=0) == 0.0


def test_pooled_average_accuracy_weights_by_test_examples():
    # Avalanche's stream accuracy pools examples: (0.5*100 + 0.7*50 + 0.95*50) / 200
    assert average_accuracy(R, test_counts=[100, 50, 50]) == pytest.approx(0.6625)


def test_forgetting_and_bwt_match_avalanche_metric_objects():
    """Replays Avalanche's evaluation protocol on its Forgetting/BWT metric objects."""
    from avalanche.evaluation.functional import forgetting as functional_forgetting
    from avalanche.evaluation.metrics.forgetting_bwt import BWT, Forgetting

    rng = np.random.default_rng(4)
    size = 5
    full = rng.uniform(0.2, 1.0, (size, size))  # after i, on j (also j > i: unseen, ignored by the metrics)
    lower = [list(full[i, : i + 1]) for i in range(size)]
    forgetting, bwt = Forgetting(), BWT()
    for i in range(size):
        forgetting.reset_last()
        bwt.reset_last()
        stream_values, bwt_values = [], []
        for j in range(size):  # the whole evaluation stream, as Avalanche evaluates it
            for metric in (forgetting, bwt):
                metric.update(j, full[i, j], initial=(i == j))
            if forgetting.result_key(j) is not None:
                stream_values.append(forgetting.result_key(j))
                bwt_values.append(bwt.result_key(j))
        assert average_forgetting(lower, after=i) == pytest.approx(np.mean(stream_values) if stream_values else 0.0)
        assert backward_transfer(lower, after=i) == pytest.approx(np.mean(bwt_values) if bwt_values else 0.0)
        assert experience_forgetting(lower, after=i) == pytest.approx(
            {j: functional_forgetting(full)[i, j] for j in range(i)}
        )


def test_federated_matrix_from_counts_and_missing_test_data():
    correct = [[45], [30, 0], [20, 0, 38]]
    total = [[50], [50, 0], [40, 0, 40]]
    matrix = accuracy_matrix(correct, total)
    assert matrix == [[0.9], [0.6, None], [0.5, None, 0.95]]
    assert average_accuracy(matrix) == pytest.approx((0.5 + 0.95) / 2)
    assert experience_forgetting(matrix) == pytest.approx({0: 0.4})  # experience 1 has no test data anywhere


def test_summary_and_rows_are_json_ready():
    summary = continual_summary(R)
    assert set(summary) == {"accuracy_matrix", "average_accuracy", "forgetting", "bwt"}
    assert summary["accuracy_matrix"] == R and summary["forgetting"] == pytest.approx(0.25)
    rows = experience_rows(R)
    assert [row["experience"] for row in rows] == [0, 1, 2]
    assert rows[1]["forgetting"] == pytest.approx(0.3) and rows[2]["experience_forgetting"]["0"] == pytest.approx(0.4)
    json.dumps(summary), json.dumps(rows)


@pytest.mark.parametrize(
    "matrix, message",
    [([], "empty"), ([[0.9], [0.5]], "row 1 has 1 entries"), ([[1.2]], "in \\[0, 1\\]")],
)
def test_malformed_matrices_are_refused(matrix, message):
    with pytest.raises(ValueError, match=message):
        average_forgetting(matrix)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="row 1 must have 2 entries"):
        accuracy_matrix([[1], [1]], [[2], [2]])
    with pytest.raises(ValueError, match="0 <= correct <= total"):
        accuracy_matrix([[3]], [[2]])
    with pytest.raises(ValueError, match="test_counts"):
        average_accuracy(R, test_counts=[1, 2])
    with pytest.raises(ValueError, match="rows 0..2"):
        average_accuracy(R, after=3)
