import torch
from torch import nn

from convae.data import DeviceBatches
from convae.evaluation.metrics import class_results, evaluate_classifier, evaluate_reconstruction, format_class_table


class Fixed(nn.Module):
    """Predicts class = brightness bucket of the image, so the answer is known."""

    def forward(self, x):
        bucket = (x.mean((1, 2, 3)) * 3).long().clamp(max=2)
        return nn.functional.one_hot(bucket, 3).float() * 10


def test_evaluate_classifier_against_a_hand_count():
    levels = torch.tensor([10, 100, 200, 10, 200, 100, 100], dtype=torch.uint8)
    images = levels.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    labels = torch.tensor([0, 1, 2, 1, 2, 1, 0])  # predictions: 0, 1, 2, 0, 2, 1, 1
    r = evaluate_classifier(Fixed(), DeviceBatches(images, labels, batch_size=3), 3)
    assert r["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 2]]
    assert abs(r["accuracy"] - 5 / 7) < 1e-12


def test_class_results_and_table():
    res = class_results([[3, 1], [0, 4]], ["cat", "dog"])
    assert res["accuracy"] == 7 / 8
    assert res["per_class"]["cat"] == {"accuracy": 0.75, "correct": 3, "total": 4}
    table = format_class_table(res)
    assert "cat" in table and "75.00 %" in table and "87.50 %" in table


def test_reconstruction_error_is_per_pixel():
    images = torch.full((5, 3, 4, 4), 255, dtype=torch.uint8)
    zero = nn.Module()
    zero.forward = lambda x: torch.zeros_like(x)
    assert abs(evaluate_reconstruction(zero, DeviceBatches(images, batch_size=2)) - 1.0) < 1e-9
