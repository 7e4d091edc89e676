"""Losses shared by the methods: one InfoNCE family (AEFM's L_AC, Adam's pruned bank, HDSSL's eq. 1), AEFM's
region terms (L_RC) and AnatoMask's masked reconstruction loss (SparK eq. 2). HDSSL's restorative term is a
plain ``F.mse_loss`` in ``methods/hdssl.py``.

The family: :func:`info_nce` is the core (cross-entropy of temperature-scaled logits against the positive's
column); the variants differ only in where a query's negatives come from, as their papers do:

* :func:`info_nce_queue` (MoCo, AEFM): a queue of past keys;
* :func:`info_nce_in_image` (AEFM, our addition): the queue plus the other points of the same sample;
* :func:`pruned_info_nce` (Adam): the memory bank less the keys too similar to the query (Purposive Pruner);
* :func:`hdssl_info_nce` (HDSSL eq. 1): both views of a patch pair, no queue, symmetric over the two views.

All functions take L2-normalised embeddings unless stated otherwise and return scalar tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from anatomical_embedding.nets.spark import patchify

#: Logit for masked-out entries in :func:`hdssl_info_nce`: finite, so rows without any valid entry give finite
#: (unused) gradients.
_MASKED = -1e9


def _fp32(tensor: torch.Tensor):
    """Autocast off on ``tensor``'s device: similarities (logits) are computed in float32 whatever the AMP mode,
    so a positive and its negatives are rounded alike (bf16 logits carry ~3 significant digits, and the
    1/temperature scaling magnifies their error)."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def info_nce(logits: torch.Tensor, temperature: float, target: torch.Tensor | None = None) -> torch.Tensor:
    """Core InfoNCE: ``mean_r -log softmax(logits_r / t)[target_r]``, in float32.

    ``logits``: (R, K) similarities of each query row to its candidates; ``target``: (R,) column of each row's
    positive (``None``: column 0, MoCo's positive-first layout).
    """
    if target is None:
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy((logits / temperature).float(), target)


def positive_first_logits(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor | None,
                          keep: torch.Tensor | None = None) -> torch.Tensor:
    """MoCo's logits ``[q_b.k_b, q_b.n_1, ..., q_b.n_K]`` (B, 1 + K); ``keep`` (B, K) bool masks negatives out.

    ``negatives`` ``None`` or empty: the positive column alone.
    """
    with _fp32(query):  # under bf16/fp16 autocast a matmul would round the negatives, not the positive
        query = query.float()
        pos = (query * key.float()).sum(dim=1, keepdim=True)  # (B, 1)
        if negatives is None or negatives.numel() == 0:
            return pos
        neg = query @ negatives.float().t()  # (B, K)
    if keep is not None:
        neg = neg.masked_fill(~keep, float("-inf"))
    return torch.cat([pos, neg], dim=1)


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
    return info_nce(positive_first_logits(query, key, queue), temperature)


def info_nce_in_image(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None,
                      temperature: float) -> torch.Tensor:
    """InfoNCE whose negatives are the queue *and* the other points' keys of the same sample.

    ``query``, ``key``: (N, P, C), row ``i`` of sample ``n`` is a positive pair; ``queue``: (Q, C) or None.
    ``loss = mean_{n,i} -log( exp(q_ni.k_ni/t) / (sum_j exp(q_ni.k_nj/t) + sum_d exp(q_ni.d/t)) )``.
    """
    n, p, _ = query.shape
    with _fp32(query):
        query = query.float()
        logits = torch.einsum("npc,nqc->npq", query, key.float())  # (N, P, P), positives on the diagonal
        if queue is not None and queue.numel() > 0:
            logits = torch.cat([logits, query @ queue.float().t()], dim=2)  # (N, P, P + Q)
    return info_nce(logits.flatten(0, 1), temperature, torch.arange(p, device=query.device).repeat(n))


def hdssl_info_nce(z_a: torch.Tensor, z_b: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """HDSSL's eq. (1), symmetric: mean over valid anchors of both views.

    ``z_a``, ``z_b``: (G, n, D) unit vectors, row i of both the same location; ``mask``: (G, n) bool, False rows
    take part neither as anchors nor as negatives. Anchor ``z_A^i`` has logits ``<z_A^i, z_B^i>/tau``
    (positive), ``<z_A^i, z_A^j>/tau`` and ``<z_A^i, z_B^j>/tau`` for valid ``j != i`` (negatives), within its
    group G (a patch pair, or the whole batch flattened).

    Same InfoNCE as :func:`info_nce`, but the mean runs over valid anchors only and the input dtype is kept, so
    it is written as ``logsumexp - positive`` (``cross_entropy`` rounds differently in the last bits).
    """
    n = z_a.shape[1]
    t = float(temperature)
    ab = z_a @ z_b.transpose(1, 2) / t
    aa = z_a @ z_a.transpose(1, 2) / t
    bb = z_b @ z_b.transpose(1, 2) / t
    invalid_col = ~mask[:, None, :]
    self_or_invalid = torch.eye(n, dtype=torch.bool, device=z_a.device)[None] | invalid_col
    pos = ab.diagonal(dim1=1, dim2=2)
    row_a = torch.cat([aa.masked_fill(self_or_invalid, _MASKED), ab.masked_fill(invalid_col, _MASKED)], dim=2)
    row_b = torch.cat([ab.transpose(1, 2).masked_fill(invalid_col, _MASKED), bb.masked_fill(self_or_invalid, _MASKED)],
                      dim=2)
    per_anchor = 0.5 * ((torch.logsumexp(row_a, dim=2) - pos) + (torch.logsumexp(row_b, dim=2) - pos))
    return per_anchor[mask].mean()


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
    logits = positive_first_logits(query.float(), key.float(), bank.float(), keep)
    return info_nce(logits, temperature), keep


# ------------------------------------------------------------------ reconstruction (AnatoMask / SparK)
def masked_patch_loss(image: torch.Tensor, rec: torch.Tensor, active: torch.Tensor, p: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (2) as published: per-patch normalised MSE, averaged over the masked patches only.

    Each target patch is standardised by its own mean and (unbiased, as ``torch.var``) variance + 1e-6;
    returns ``(loss, per_patch)`` with ``per_patch`` (N, L) the patch MSE (zero at visible patches).
    """
    inp = patchify(image.float(), p)
    out = patchify(rec.float(), p)
    mean = inp.mean(dim=-1, keepdim=True)
    var = inp.var(dim=-1, keepdim=True)
    target = (inp - mean) / (var + 1e-6).sqrt()
    per_patch = ((out - target) ** 2).mean(dim=-1)
    masked = (~active.reshape(active.shape[0], -1)).to(per_patch.dtype)
    per_patch = per_patch * masked
    return per_patch.sum() / (masked.sum() + 1e-8), per_patch
