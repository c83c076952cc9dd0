"""Group weighting by exponentiated-gradient ascent (group DRO / GroupDistil).

Per-group minibatch means come from a one-hot product (no Python loop over samples)::

    S_g = sum_i [g_i = g] * l_i,   N_g = sum_i [g_i = g],   l_g = S_g / max(N_g, 1)

and the weights take one EG step on the groups present in the batch, then are renormalised::

    a_g = l_g + C / sqrt(n_g)                        (the generalisation adjustment; C = 0 disables it)
    a_g <- a_g / sum_{h: N_h > 0} a_h                (only with normalize_loss: after the adjustment, as group_DRO)
    q_g <- q_g * exp(eta * a_g)   if N_g > 0         (else exp(0): unchanged before renormalising)
    q   <- q / sum(q)

with ``n_g`` the training count of group ``g`` (the generalisation adjustment, C = 0 disables it). The adjustment
enters the update only, never the returned objective ``sum_g q_g * l_g``. No gradient flows through ``q``.
A group with no training samples (``n_g = 0``; M&Ms vendors C and D) is out of the simplex: ``q_g = 0`` from the
start and forever, so the weights of the trained groups sum to 1 and the objective's scale does not drift as the
unseen groups would otherwise lose mass by renormalisation. Such groups are still evaluated and reported.

Sums and counts are reduced across processes *before* the update (``reduce`` argument), so every rank holds the
same weights as one process would on the global batch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_sums(losses: Tensor, groups: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group sums and counts: ``losses (B,)``, ``groups`` long ``(B,)`` -> ``(G,)``, ``(G,)``."""
    onehot = F.one_hot(groups.long(), n_groups).to(losses.dtype)  # (B, G)
    return onehot.t() @ losses, onehot.sum(0)


def reduced_group_means(losses: Tensor, groups: Tensor, n_groups: int,
                        reduce: Callable[[Tensor], Tensor] = lambda t: t) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group sums of this process (with gradient), and the per-group means (0 for absent groups) and counts of
    the global batch (sums and counts reduced over processes by ``reduce``; detached). The one place where group
    means of a training batch are computed."""
    sums, counts = group_sums(losses, groups, n_groups)
    stats = reduce(torch.stack([sums.detach(), counts]))
    return sums, stats[0] / stats[1].clamp_min(1), stats[1]


class GroupWeights(nn.Module):
    """Group weights ``q`` (stored as ``log q``, a buffer, so they are part of every checkpoint)."""

    def __init__(self, n_groups: int, eta: float = 0.01, adj_c: float = 0.0,
                 train_counts: list[int] | Tensor | None = None, normalize_loss: bool = False) -> None:
        super().__init__()
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        if eta < 0:
            raise ValueError(f"method_args.eta must be >= 0, got {eta}")
        self.n_groups, self.eta, self.normalize_loss = n_groups, float(eta), normalize_loss
        # groups with no training samples are out of the simplex: weight 0 (log q = -inf) from the start, never
        # updated (they are never in a batch); the trained groups start uniform and their weights sum to 1
        trained = (torch.ones(n_groups, dtype=torch.bool) if train_counts is None
                   else torch.as_tensor(train_counts) > 0)
        if not trained.any():
            raise ValueError("no group has training samples")
        log_q = torch.full((n_groups,), -math.log(int(trained.sum())))
        self.register_buffer("log_q", log_q.masked_fill(~trained, -math.inf))
        adj = torch.zeros(n_groups)
        if adj_c:
            if train_counts is None:
                raise ValueError("the generalisation adjustment (adj_c != 0) needs the training group counts")
            counts = torch.as_tensor(train_counts, dtype=torch.float32)
            adj = adj_c / counts.clamp_min(1).sqrt()
        self.register_buffer("adj", adj)

    @property
    def q(self) -> Tensor:
        return self.log_q.exp()

    @torch.no_grad()
    def step(self, group_loss: Tensor, counts: Tensor) -> Tensor:
        """One EG step from per-group mean losses and counts (both ``(G,)``); returns the new ``q``."""
        present = counts > 0
        loss = group_loss.detach().float() + self.adj
        if self.normalize_loss:  # as group_DRO's loss.py: the adjusted losses of the present groups, summing to 1
            loss = loss / torch.where(present, loss, torch.zeros_like(loss)).sum().clamp_min(1e-12)
        update = torch.where(present, self.eta * loss, torch.zeros_like(loss))
        self.log_q.add_(update)
        self.log_q.sub_(torch.logsumexp(self.log_q, 0))
        return self.q

    def forward(self, losses: Tensor, groups: Tensor, reduce: Callable[[Tensor], Tensor] = lambda t: t,
                scale: float = 1.0, signal: Tensor | None = None,
                signal_counts: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Update the weights and return the objective ``sum_g q_g * l_g`` of this minibatch.

        Args:
            losses: per-sample losses ``(B,)`` (with gradient).
            groups: long ``(B,)``.
            reduce: sums ``(2, G)`` [sums; counts] across processes (identity in a single process).
            scale: multiplies the objective; ``world_size`` under DDP, whose gradient averaging divides by it, so
                that the gradient equals the one of ``sum_g q_g * S_g / N_g`` on the global batch.
            signal: the per-group values ``(G,)`` the EG step ascends (already reduced over processes); by
                default the minibatch group losses ``l_g`` (the paper). ``signal_counts`` ``(G,)`` says which groups
                it covers (> 0); by default the minibatch counts.
        Returns:
            the objective (scalar, differentiable) and detached logs ``group_loss``, ``group_count``,
            ``group_signal`` (what the step ascended), ``group_weight`` (the weights after the update).
        """
        sums, group_loss, global_counts = reduced_group_means(losses.float(), groups, self.n_groups, reduce)
        if signal is None:
            signal, signal_counts = group_loss, global_counts
        q = self.step(signal, global_counts if signal_counts is None else signal_counts)
        objective = scale * (q * (sums / global_counts.clamp_min(1))).sum()
        return objective, {"group_loss": group_loss, "group_count": global_counts,
                           "group_signal": signal.detach().float().clone(), "group_weight": q.clone()}
