"""The embedded default model: its card is complete and its accuracy is what the card says."""

import pytest

from core.data import load_fashion_mnist
from core.default_model import load_default_model
from core.eval import evaluate


@pytest.fixture(scope="module")
def default():
    return load_default_model()


def test_card_records_how_the_model_was_made(default):
    model, card = default
    for key in ("config", "training_command", "reproduce_command", "seed", "data", "date", "test_top1",
                "val_top1", "train_device", "grid_choice"):
        assert key in card, key
    assert card["config"] == model.cfg.to_dict()
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.cfg.seq_len == 50 and model.cfg.cls_position == 24


def test_accuracy_on_fixed_1000_image_subset_matches_the_card(default):
    """The first 1,000 test images (the file's order): at least 90 %, and within ±3 points of the card's
    test_top1 over all 10,000 (binomial sd of a 1,000-image subset ≈ 1 point)."""
    model, card = default
    result = evaluate(model, load_fashion_mnist("test").subset(1000))
    assert result.total == 1000
    assert result.top1 >= 90.0
    assert abs(result.top1 - card["test_top1"]) < 3.0
    # each image's five most probable classes: the prediction first, probabilities falling, the rest below them
    assert result.top_classes.shape == result.top_probabilities.shape == (1000, 5)
    assert result.top_classes[:, 0].tolist() == result.predictions
    assert (result.top_probabilities.diff(dim=1) <= 0).all() and (result.top_probabilities.sum(1) <= 1 + 1e-6).all()
    assert result.top(0)[0] == (result.predictions[0], float(result.top_probabilities[0, 0]))
    assert "top_classes" not in result.to_dict() and "predictions" not in result.to_dict()
