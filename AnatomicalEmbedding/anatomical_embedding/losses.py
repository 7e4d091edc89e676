"""Contrastive losses shared by the methods (AEFM's L_AC and L_RC; MoCo-style InfoNCE; Adam's
InfoNCE over a purposively pruned memory bank).

All functions take L2-normalised embeddings unless stated otherwise and return scalar tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce_queue(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None,
                   temperature: float) -> torch.Tensor:
    """Per-point InfoNCE against a queue of negatives, averaged over points (MoCo).

    ``query``: (P, C) online features ``e_i``; ``key``: (P, C) momentum features ``e'_i`` (the positive of
    point i); ``queue``: (Q, C) negatives ``d_j`` (``None`` or empty: no negatives, loss is then 0).

    ``loss = mean_i -log( exp(e_i.e'_i/t) / (exp(e_i.e'_i/t) + sum_j exp(e_i.d_j/t)) )``.

    This is our reading of AEFM's equation (1): as printed, the sums over points and negatives sit
    *inside* the exponentials, which collapses all points into one logit and is not a usable softmax;
    we use the per-point InfoNCE of MoCo (the cited reference), which the paper says it follows.
    """
    pos = (query * key).sum(dim=1, keepdim=True)  # (P, 1)
    if queue is None or queue.numel() == 0:
        logits = pos
    else:
        logits = torch.cat([pos, query @ queue.t()], dim=1)  # (P, 1 + Q)
    logits = logits / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), target)


def info_nce_in_image(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None,
                      temperature: float) -> torch.Tensor:
    """InfoNCE whose negatives are the queue *and* the other points' keys of the same sample.

    ``query``, ``key``: (N, P, C), row ``i`` of sample ``n`` is a positive pair; ``queue``: (Q, C) or None.
    ``loss = mean_{n,i} -log( exp(q_ni.k_ni/t) / (sum_j exp(q_ni.k_nj/t) + sum_d exp(q_ni.d/t)) )``.
    """
    n, p, _ = query.shape
    logits = torch.einsum("npc,nqc->npq", query, key)  # (N, P, P), positives on the diagonal
    if queue is not None and queue.numel() > 0:
        logits = torch.cat([logits, query @ queue.t()], dim=2)  # (N, P, P + Q)
    target = torch.arange(p, device=query.device).repeat(n)
    return F.cross_entropy((logits / temperature).flatten(0, 1).float(), target)


def region_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean embedding of one map: ``features`` (C, ...), ``labels`` (...) int.

    Returns ``(means (num_classes, C), present (num_classes,) bool)``; absent classes get zero means.
    """
    c = features.shape[0]
    f = features.reshape(c, -1).t()  # (V, C)
    onehot = F.one_hot(labels.reshape(-1).long(), num_classes).to(f.dtype)  # (V, K)
    counts = onehot.sum(0)
    means = (onehot.t() @ f) / counts.clamp(min=1).unsqueeze(1)
    return means, counts > 0


def region_contrastive_loss(means: torch.Tensor, means_momentum: torch.Tensor) -> torch.Tensor:
    """AEFM's L_RC (equation 2), implemented as printed.

    ``means``: (M, C) region means ``ebar_m`` from the online map, ``means_momentum``: (M, C) ``ebar'_m``
    from the momentum map, rows aligned by class (only classes present in both; caller filters).
    ``P = sum_m ebar_m.ebar'_m``, ``N = sum_{m != n} ebar_m.ebar'_n``,
    ``L = -log((1 + e^P) / (1 + e^P + e^N))``. Unlike eq. (1) this form is a well-defined two-term
    softmax, so we keep the sums inside the exponentials as printed (no temperature in the paper).
    Fewer than two regions: no contrast, loss 0.
    """
    if means.shape[0] < 2:
        return means.sum() * 0.0
    sim = means.float() @ means_momentum.float().t()  # (M, M)
    p = torch.diagonal(sim).sum()
    n = sim.sum() - p
    num = torch.logaddexp(torch.zeros_like(p), p)  # log(1 + e^P)
    den = torch.logsumexp(torch.stack([torch.zeros_like(p), p, n]), dim=0)
    return den - num


def purposive_prune_mask(query: torch.Tensor, bank: torch.Tensor, gamma: float, level: int) -> torch.Tensor:
    """Adam's Purposive Pruner (supplementary Algorithm 1) as a keep-mask: ``(B, K)`` bool, True = key kept.

    ``query``: (B, C) anchor embeddings q; ``bank``: (K, C) memory bank keys. At granularity level ``n = 0`` the
    bank is used whole; otherwise key ``k_i`` is kept for anchor q only if ``sim(k_i, q) < gamma`` (cosine
    similarity, both re-normalised as in Algorithm 1), i.e. every key with similarity >= gamma is removed.
    """
    keep = torch.ones(query.shape[0], bank.shape[0], dtype=torch.bool, device=query.device)
    if level == 0 or bank.shape[0] == 0:
        return keep
    sim = F.normalize(query.detach().float(), dim=1) @ F.normalize(bank.float(), dim=1).t()
    return sim < gamma


def pruned_info_nce(query: torch.Tensor, key: torch.Tensor, bank: torch.Tensor | None, temperature: float,
                    gamma: float, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's loss: MoCo's InfoNCE of each query against its positive key and its own pruned memory bank.

    ``L = mean_b -log( exp(q_b.k_b/t) / (exp(q_b.k_b/t) + sum_{i in MB_pruned(q_b)} exp(q_b.k_i/t)) )`` with
    ``MB_pruned`` from :func:`purposive_prune_mask`. Returns ``(loss, keep mask (B, K))``.
    """
    bank = query.new_zeros(0, query.shape[1]) if bank is None else bank
    keep = purposive_prune_mask(query, bank, gamma, level)
    pos = (query.float() * key.float()).sum(dim=1, keepdim=True)
    neg = (query.float() @ bank.float().t()).masked_fill(~keep, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target), keep
