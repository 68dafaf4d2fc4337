"""Classification metrics against an independent computation on fixed confusion matrices."""

from __future__ import annotations

import pytest
import torch

from fedrank.tasks import classification_metrics


def f1_by_hand(confusion: list[list[int]]) -> float:
    """Macro-F1 over the classes that occur in the labels: F1_c = 2TP / (2TP + FP + FN); rows are true labels."""
    k = len(confusion)
    scores = []
    for c in range(k):
        tp = confusion[c][c]
        fn = sum(confusion[c]) - tp
        fp = sum(confusion[r][c] for r in range(k)) - tp
        if sum(confusion[c]) > 0:
            scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


CASES = {
    # F1 = 10/13, 6/10, 8/9
    "three classes": ([[5, 1, 0], [2, 3, 1], [0, 0, 4]], (10 / 13 + 6 / 10 + 8 / 9) / 3, 12 / 16),
    # class 2 occurs but is never predicted (F1 0, counted); class 3 is predicted but never occurs (not counted)
    "absent and never predicted": ([[3, 0, 0, 1], [1, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]],
                                   (6 / 9 + 4 / 6 + 0.0) / 3, 5 / 9),
    "perfect": ([[2, 0], [0, 7]], 1.0, 1.0),
}


@pytest.mark.parametrize("name", CASES)
def test_macro_f1_and_accuracy_on_fixed_confusion_matrices(name: str) -> None:
    confusion, expected_f1, expected_accuracy = CASES[name]
    n = sum(map(sum, confusion))
    got = classification_metrics(torch.tensor(confusion), loss_sum=2.5 * n, n=n)
    assert got["macro_f1"] == pytest.approx(expected_f1, abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_by_hand(confusion), abs=1e-12)
    assert got["accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)
    assert got["loss"] == pytest.approx(2.5)


def test_macro_f1_agrees_with_scikit_learn_on_labels_that_all_occur() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 5, (300,), generator=gen)
    pred = torch.where(torch.rand(300, generator=gen) < 0.6, truth, torch.randint(0, 5, (300,), generator=gen))
    confusion = torch.zeros(5, 5, dtype=torch.long).index_put_((truth, pred), torch.ones_like(pred), accumulate=True)
    got = classification_metrics(confusion, 0.0, 300)
    assert got["macro_f1"] == pytest.approx(metrics.f1_score(truth, pred, average="macro"), abs=1e-12)
    assert got["accuracy"] == pytest.approx(metrics.accuracy_score(truth, pred), abs=1e-12)
