"""Continual-learning metrics from the accuracy matrix, with Avalanche 0.6's definitions (torch-free).

``R[i][j]`` is the accuracy after training experience ``i`` on the test data
of experience ``j`` (``j <= i``); row ``i`` may hold ``None`` where no site has
test data for ``j``. After experience ``i``:

- Average accuracy: Avalanche's ``StreamAccuracy`` on the evaluation stream
  of the experiences seen so far (``avalanche/evaluation/metrics/accuracy.py``)
  is the accuracy over all their test examples pooled, i.e.
  ``sum_j n_j R[i][j] / sum_j n_j`` with ``n_j`` the test examples of
  experience ``j``. Without counts, the plain mean ``1/(i+1) sum_j R[i][j]``
  (the same when the experiences' test sets are equally large; Lopez-Paz &
  Ranzato 2017, "ACC").
- Forgetting of experience ``j < i``: ``R[j][j] - R[i][j]``, the accuracy just
  after training on ``j`` minus the current one (Avalanche's ``Forgetting``:
  ``initial[k] - last[k]``, with ``initial`` recorded when the evaluated
  experience is the one just trained, ``avalanche/evaluation/metrics/
  forgetting_bwt.py``; also ``avalanche/evaluation/functional.py``
  ``forgetting``). Not the maximum over earlier rows (Chaudhry et al. 2018):
  Avalanche takes the first value.
- Average forgetting: Avalanche's ``StreamForgetting``: the unweighted mean of
  the forgetting of the experiences ``j < i`` (the current one and unseen ones
  have no forgetting and are left out); ``0.0`` after the first experience
  (Avalanche's empty ``Mean`` returns 0).
- Backward transfer: Avalanche's ``forgetting_to_bwt``: ``BWT = -forgetting``,
  i.e. ``1/i sum_{j<i} (R[i][j] - R[j][j])`` (Lopez-Paz & Ranzato's BWT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Matrix = Sequence[Sequence[float | None]]


def accuracy_matrix(correct: Sequence[Sequence[int]], total: Sequence[Sequence[int]]) -> list[list[float | None]]:
    """Federated ``R`` from counts summed over sites: ``R[i][j] = correct[i][j] / total[i][j]``.

    Row ``i`` must have ``i + 1`` entries (experiences ``0..i``); an entry with
    ``total == 0`` (no site has test data for that experience) is ``None``.
    """
    if len(correct) != len(total):
        raise ValueError(
            f"{len(correct)} rows of correct counts but {len(total)} rows of totals; give both per experience"
        )
    matrix = []
    for i, (hits, counts) in enumerate(zip(correct, total)):
        if len(hits) != i + 1 or len(counts) != i + 1:
            raise ValueError(
                f"row {i} must have {i + 1} entries (experiences 0..{i}); got {len(hits)} and {len(counts)}"
            )
        row: list[float | None] = []
        for j, (h, n) in enumerate(zip(hits, counts)):
            if n < 0 or h < 0 or h > n:
                raise ValueError(f"entry [{i}][{j}]: {h} correct of {n}; counts must satisfy 0 <= correct <= total")
            row.append(h / n if n else None)
        matrix.append(row)
    return matrix


def average_accuracy(
    matrix: Matrix, after: int | None = None, test_counts: Sequence[int] | None = None
) -> float | None:
    """Average accuracy after experience ``after`` (default: the last row); see the module docstring.

    ``test_counts[j]`` (test examples of experience ``j``) makes it
    Avalanche's pooled stream accuracy; ``None`` entries are left out. Returns
    ``None`` if no experience has test data.
    """
    row = _row(matrix, after)
    if test_counts is not None and (len(test_counts) < len(row) or any(n < 0 for n in test_counts)):
        raise ValueError(
            f"test_counts needs a count >= 0 for each of experiences 0..{len(row) - 1}; got {list(test_counts)}"
        )
    pairs = [(r, 1 if test_counts is None else test_counts[j]) for j, r in enumerate(row) if r is not None]
    weight = sum(w for _, w in pairs)
    return sum(r * w for r, w in pairs) / weight if weight else None


def experience_forgetting(matrix: Matrix, after: int | None = None) -> dict[int, float]:
    """Forgetting ``R[j][j] - R[i][j]`` of every experience ``j < i`` with both values, ``i = after``."""
    i = _index(matrix, after)
    row = _row(matrix, i)
    return {j: matrix[j][j] - row[j] for j in range(i) if matrix[j][j] is not None and row[j] is not None}


def average_forgetting(matrix: Matrix, after: int | None = None) -> float:
    """Avalanche's stream forgetting: mean of :func:`experience_forgetting`, 0.0 when there is none."""
    values = list(experience_forgetting(matrix, after).values())
    return sum(values) / len(values) if values else 0.0


def backward_transfer(matrix: Matrix, after: int | None = None) -> float:
    """Avalanche's stream BWT: minus the average forgetting."""
    return -average_forgetting(matrix, after)


def continual_summary(matrix: Matrix, test_counts: Sequence[int] | None = None) -> dict[str, Any]:
    """The ``continual`` object of ``summary.json``: the matrix and the metrics after the last experience."""
    return {
        "accuracy_matrix": [list(row) for row in matrix],
        "average_accuracy": average_accuracy(matrix, test_counts=test_counts),
        "forgetting": average_forgetting(matrix),
        "bwt": backward_transfer(matrix),
    }


def experience_rows(matrix: Matrix, test_counts: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One ``metrics.jsonl`` row per experience ``i``: its accuracies on ``0..i`` and the metrics after it."""
    return [
        {
            "experience": i,
            "accuracy": list(matrix[i]),
            "average_accuracy": average_accuracy(matrix, i, test_counts),
            "forgetting": average_forgetting(matrix, i),
            "bwt": backward_transfer(matrix, i),
            "experience_forgetting": {str(j): f for j, f in experience_forgetting(matrix, i).items()},
        }
        for i in range(len(matrix))
    ]


def _index(matrix: Matrix, after: int | None) -> int:
    _check(matrix)
    i = len(matrix) - 1 if after is None else after
    if not 0 <= i < len(matrix):
        raise ValueError(f"after = {after}: the matrix has rows 0..{len(matrix) - 1}")
    return i


def _row(matrix: Matrix, after: int | None) -> Sequence[float | None]:
    i = _index(matrix, after)
    return matrix[i][: i + 1]


def _check(matrix: Matrix) -> None:
    if not matrix:
        raise ValueError("the accuracy matrix is empty; evaluate after at least one experience")
    for i, row in enumerate(matrix):
        if len(row) < i + 1:
            raise ValueError(f"row {i} has {len(row)} entries; it needs experiences 0..{i}")
        for j, value in enumerate(row[: i + 1]):
            if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"R[{i}][{j}] = {value!r}: accuracies must be in [0, 1] (or None for no test data)")
