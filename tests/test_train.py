"""Training: augmentation, schedule and one optimisation step that really changes the model."""

import torch

from core.models import create_vim
from core.train import _without_budget, augment, epochs_within_budget, lr_at, train_step


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
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = augment(x, torch.Generator().manual_seed(0), pad=1)
    assert out.shape == x.shape
    assert set(out.unique().tolist()) <= set(range(16))  # zero-fill uses the batch minimum (0 here)
    assert any(torch.equal(o, x[0].flip(-1)) for o in out) and any(torch.equal(o, x[0]) for o in out)


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
