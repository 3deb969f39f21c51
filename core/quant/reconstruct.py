"""Block-wise reconstruction: learn the quantization scales of each block so that its output matches FP.

Block by block, in order (method doc §3.2, §7.7): the quantized block takes the *quantized* model's inputs
(so error from earlier blocks is seen and compensated) and is trained to reproduce the FP block's output
on the FP model's inputs. The loss is 1 − cosine similarity over the hidden dimension of the residual
stream after the block (residual + block output, what the next block normalises), averaged over tokens and
images. Every scale of the block's quantizers (weights and static activation scales) is a parameter and
learns through the straight-through rounding; the release learned only out_proj's (we test that all move).
With ``ReconstructionConfig.max_learned_bits`` the scales of finer grids keep their calibrated values instead
(off by default: docs/method-decisions.md says why).
"""

from __future__ import annotations

from dataclasses import asdict
from threading import Event

import torch
import torch.nn.functional as F

from core.eval import Cancelled
from core.models import VisionMamba
from core.quant.config import Progress, ReconstructionConfig
from core.quant.model import QuantizedVim


def block_parameters(qmodel: QuantizedVim, layer: int) -> dict[str, torch.nn.Parameter]:
    """The learnable quantization scales of one block, by name."""
    prefix = f"layers:{layer}:"
    return {name: p for name, p in qmodel.quantizers.named_parameters() if name.startswith(prefix)}


def grid_bits(quantizer: torch.nn.Module) -> int | None:
    """The bits of a quantizer's grid (from its ``qmax``: 2^(b−1) − 1 symmetric, 2^b − 1 asymmetric levels), or
    None for modules without one."""
    if not hasattr(quantizer, "qmax"):
        return None
    levels = quantizer.qmax if getattr(quantizer, "asymmetric", False) else 2 * quantizer.qmax + 1
    return int(levels + 1).bit_length() - 1


def learned_parameters(qmodel: QuantizedVim, layer: int, config: ReconstructionConfig) -> list[torch.nn.Parameter]:
    """The scales of one block that reconstruction trains: every one, or with ``config.max_learned_bits`` those
    of grids that coarse (in ``block_parameters``' order, so a 4-bit model trains exactly as the release)."""
    owners = {f"{module_name}.{name}" if module_name else name: module
              for module_name, module in qmodel.quantizers.named_modules()
              for name, _ in module.named_parameters(recurse=False)}
    limit = config.max_learned_bits
    return [parameter for name, parameter in block_parameters(qmodel, layer).items()
            if limit is None or (grid_bits(owners[name]) or 0) <= limit]


def _stream(hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return residual + hidden.float()


def block_loss(fp_out: torch.Tensor, q_out: torch.Tensor) -> torch.Tensor:
    """1 − cosine over the hidden dimension, mean over tokens and images."""
    return 1 - F.cosine_similarity(fp_out, q_out, dim=-1).mean()


def reconstruct(qmodel: QuantizedVim, fp_model: VisionMamba, calib_images: torch.Tensor,
                config: ReconstructionConfig, progress: Progress | None = None,
                cancel: Event | None = None) -> list[dict]:
    """Train the scales of ``qmodel`` in place, block by block; returns per-block loss before/after."""
    generator = torch.Generator().manual_seed(config.seed)
    fp_model = fp_model.eval()
    qvim = qmodel.model.eval()
    with torch.no_grad():
        fp_hidden = fp_model.embed(calib_images)
        q_hidden = qvim.embed(calib_images)
    fp_residual = q_residual = None
    report = []
    n_blocks = len(qvim.layers)
    for index, (fp_block, q_block) in enumerate(zip(fp_model.layers, qvim.layers, strict=True)):
        with torch.no_grad():
            fp_hidden, fp_residual = fp_block(fp_hidden, fp_residual)
            target = _stream(fp_hidden, fp_residual)
            before = block_loss(target, _stream(*q_block(q_hidden, q_residual))).item()
        params = learned_parameters(qmodel, index, config)
        if params and config.epochs:
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            for _ in range(config.epochs):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"reconstruction cancelled in block {index + 1} of {n_blocks}")
                order = torch.randperm(len(calib_images), generator=generator)
                for start in range(0, len(order), config.batch_size):
                    rows = order[start:start + config.batch_size]
                    residual_rows = None if q_residual is None else q_residual[rows]
                    out = _stream(*q_block(q_hidden[rows], residual_rows))
                    loss = block_loss(target[rows], out)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                    optimizer.step()
                    if config.reflect_scales:
                        with torch.no_grad():
                            for scale in params:
                                scale.abs_()
        with torch.no_grad():
            q_hidden, q_residual = q_block(q_hidden, q_residual)
            after = block_loss(target, _stream(q_hidden, q_residual)).item()
        report.append({"block": index, "loss_before": before, "loss_after": after})
        if progress is not None:
            progress("reconstruct", index + 1, n_blocks, after)
    qmodel.provenance["reconstruction"] = {**asdict(config), "blocks": report}
    return report
