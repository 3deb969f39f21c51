"""The loss terms of OuroMamba-Gen and of its baselines. Each returns a scalar to minimise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

OUTPUT_LOSSES = ("ce", "mae")


def patch_contrastive_loss(features: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """L^C: InfoNCE over the patches of each image. For every anchor patch the ``top_k`` patches most similar
    to it (cosine, the anchor excluded) are the positives and all other patches the negatives:
    −log Σ_pos exp(s/τ) / Σ_{all ≠ anchor} exp(s/τ), averaged over anchors and images. features (batch, P, F)."""
    patches = features.shape[1]
    top_k = min(top_k, patches - 1)
    unit = F.normalize(features.float(), dim=-1)
    logits = unit @ unit.transpose(1, 2) / temperature
    self_mask = torch.eye(patches, dtype=torch.bool, device=features.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = logits.detach().topk(top_k, dim=-1).indices
    log_positive = torch.logsumexp(logits.gather(-1, positives), dim=-1)
    return (torch.logsumexp(logits, dim=-1) - log_positive).mean()


def similarity_entropy_loss(tokens: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """PSAQ-ViT's patch-similarity entropy, negated: the cosine similarities between the patch tokens of an
    image, their density estimated with a Gaussian kernel (Scott's bandwidth) on a grid over [−1, 1], and
    the differential entropy of that density. Minimising it spreads the similarities (diverse patches).
    tokens (batch, P, F)."""
    unit = F.normalize(tokens.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    upper = torch.triu_indices(tokens.shape[1], tokens.shape[1], offset=1, device=tokens.device)
    values = similarity[:, upper[0], upper[1]]  # (batch, pairs)
    bandwidth = 1.06 * values.std(dim=1, keepdim=True).clamp_min(1e-3) * values.shape[1] ** -0.2
    grid = torch.linspace(-1, 1, bins, device=tokens.device)
    kernel = torch.exp(-0.5 * ((grid[None, :, None] - values[:, None, :]) / bandwidth[:, :, None]) ** 2)
    density = kernel.mean(-1) / (bandwidth * (2 * torch.pi) ** 0.5)  # (batch, bins)
    step = 2 / (bins - 1)
    density = density / (density.sum(-1, keepdim=True) * step)
    entropy = -(density * torch.log(density.clamp_min(1e-12))).sum(-1) * step
    return -entropy.mean()


def output_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """L^O against the sampled target labels: cross-entropy, or the mean absolute error between the softmax
    and the one-hot target (the paper's note calls its output loss MAE)."""
    if kind == "ce":
        return F.cross_entropy(logits.float(), targets)
    one_hot = F.one_hot(targets, logits.shape[-1]).float()
    return (logits.float().softmax(-1) - one_hot).abs().sum(-1).mean()


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (the usual smoothness prior)."""
    return ((images[..., 1:, :] - images[..., :-1, :]).abs().mean()
            + (images[..., :, 1:] - images[..., :, :-1]).abs().mean())
