"""Training: augmentation, schedule and one optimisation step that really changes the model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.data.fashion_mnist import VALIDATION_SIZE
from core.models import create_vim
from core.train import _without_budget, augment, epochs_within_budget, lr_at, main, train_step
from tests.test_data import small_set


def test_one_training_step_reduces_loss_on_its_batch():
    torch.manual_seed(0)
    model = create_vim("vim_fmnist_patch4_28_midclstok", embed_dim=16, depth=1).train()
    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = train_step(model, optimizer, images, labels)
    for _ in range(4):
        last = train_step(model, optimizer, images, labels)
    assert last < first
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "layers.0.mixer.A_b_log" in changed and "layers.0.mixer.dt_proj_b.bias" in changed


def test_augment_shifts_and_flips_within_bounds():
    """Every output is one of the 9 one-pixel shifts (filled with the batch minimum, 0 here) of the image,
    flipped or not; 64 draws show shifted and flipped ones besides the image itself."""
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = augment(x, torch.Generator().manual_seed(0), pad=1)
    assert out.shape == x.shape
    assert set(out.unique().tolist()) <= set(range(16))  # zero-fill uses the batch minimum (0 here)
    assert any(torch.equal(o, x[0].flip(-1)) for o in out) and any(torch.equal(o, x[0]) for o in out)
    padded = torch.zeros(1, 6, 6)
    padded[:, 1:5, 1:5] = x[0]
    shifts = {(dy, dx): padded[:, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)}
    drawn = [next((key, flipped) for key, shifted in shifts.items() for flipped in (False, True)
                  if torch.equal(o, shifted.flip(-1) if flipped else shifted)) for o in out]
    assert len({key for key, _ in drawn}) > 5 and {flipped for _, flipped in drawn} == {False, True}
    unflipped = augment(x, torch.Generator().manual_seed(0), pad=0, flip=False)
    assert torch.equal(unflipped, x)


def test_continued_training_starts_from_init_and_keeps_its_card(tmp_path: Path):
    """Stage 2 (`--init`) starts from stage 1's weights, changes them, and carries stage 1's card as provenance."""
    small_set(tmp_path / "data", n=VALIDATION_SIZE + 16)
    common = ["--data", str(tmp_path / "data"), "--embed-dim", "16", "--depth", "1", "--batch-size", "8",
              "--epochs", "1", "--warmup-epochs", "1"]
    main([*common, "--out", str(tmp_path / "stage1")])
    main([*common, "--out", str(tmp_path / "stage2"), "--init", str(tmp_path / "stage1" / "model.safetensors"),
          "--lr", "1e-2", "--shift", "0", "--no-flip"])
    first, second = (json.loads((tmp_path / s / "card.json").read_text()) for s in ("stage1", "stage2"))
    assert second["init_card"] == first and "status" not in second and len(second["history"]) == 1
    assert "--init" in second["reproduce_command"] and second["config"]["embed_dim"] == 16
    w1, w2 = (load_file(str(tmp_path / s / "model.safetensors")) for s in ("stage1", "stage2"))
    assert w1.keys() == w2.keys() and not torch.equal(w1["layers.0.mixer.in_proj.weight"],
                                                       w2["layers.0.mixer.in_proj.weight"])


def test_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0) == 0.1 and lr_at(9, 100, 10, 1.0) == 1.0
    assert abs(lr_at(55, 100, 10, 1.0) - 0.5) < 1e-9 and lr_at(100, 100, 10, 1.0) < 1e-9


def test_time_budget_uses_the_latest_epochs_pace_and_reproduces_as_an_epoch_count():
    """Epoch 1 paid 30 s of kernel compilation: the pace is epoch 2's 10 s, so 5 minutes hold 2 + 25 epochs
    (epoch 1's 40 s alone would have said 7). The card's command replaces the budget by the count."""
    history = [{"epoch": 1, "seconds": 40.0}, {"epoch": 2, "seconds": 50.0}]
    assert epochs_within_budget(history, 5.0) == 27
    assert epochs_within_budget(history[:1], 5.0) == 7
    assert epochs_within_budget(history, 0.5) == 2  # already over budget: what ran
    argv = ["--data", "d", "--time-budget-min", "5", "--epochs=60", "--seed", "0"]
    assert _without_budget(argv, 30) == ["--data", "d", "--seed", "0", "--epochs", "30"]


def test_a_count_that_trains_nothing_is_one_line_before_any_work(tmp_path: Path, capsys):
    """--epochs 0 used to load the data, make the folder and end in an IndexError traceback; a batch of 0
    divided by zero."""
    for option, value in (("--epochs", "0"), ("--batch-size", "0"), ("--epochs", "1.5")):
        with pytest.raises(SystemExit) as exit_info:
            main([option, value, "--out", str(tmp_path / "model")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and option in err and "whole number" in err
    assert not (tmp_path / "model").exists()
