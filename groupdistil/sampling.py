"""Batch sampling as a pure function of (seed, step): exact resume, any number of workers or processes.

Global step ``s`` lies in epoch ``e = s // B`` with ``B = N // global_batch`` batches an epoch (last partial batch
dropped). Epoch ``e`` orders the samples by a permutation drawn from a generator seeded with ``(seed, e)`` (or, with
group-balanced sampling, builds every batch from ``B // G`` samples of each group: see ``balanced_order``). Rank
``r`` of ``W`` takes the ``r``-th contiguous slice of the global batch, so the union over ranks is exactly the batch
a single process would train on. Each sample gets an augmentation seed derived from ``(seed, e, position)``; the
dataset is indexed by the key ``(index, aug_seed)``.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

_MIX = 0x9E3779B1


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite stream of batches of ``(index, aug_seed)`` keys starting at ``start_step``."""

    def __init__(self, n_samples: int, global_batch: int, seed: int, start_step: int = 0,
                 groups: torch.Tensor | None = None, rank: int = 0, world_size: int = 1,
                 indices: torch.Tensor | None = None) -> None:
        """``indices``: the dataset indices it may draw (default all ``n_samples``; the held-out ones left out);
        ``groups``: the group of every dataset index, for group-balanced sampling."""
        self.indices = indices
        if indices is not None:
            groups = None if groups is None else groups[indices]
            n_samples = len(indices)
        if global_batch % world_size:
            raise ValueError(f"train.batch_size ({global_batch}) must be divisible by the number of processes "
                             f"({world_size})")
        if n_samples < global_batch:
            raise ValueError(f"the training set has {n_samples} samples, fewer than train.batch_size "
                             f"({global_batch})")
        self.n, self.global_batch, self.seed = n_samples, global_batch, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.batches_per_epoch = n_samples // global_batch
        self.members: list[torch.Tensor] | None = None  # positions (into the drawable samples) of each group
        if groups is not None:
            self.members = [(groups == g).nonzero().flatten() for g in sorted(set(groups.tolist()))]

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * _MIX + epoch) % (2**63))
        order = self.balanced_order(g) if self.members is not None else torch.randperm(self.n, generator=g)
        return order if self.indices is None else self.indices[order]

    def balanced_order(self, g: torch.Generator) -> torch.Tensor:
        """An epoch of batches each holding ``B // G`` samples of every one of the ``G`` groups (the remainder to
        groups in turn), in random order within the batch; each group's samples are drawn by cycling through its
        own permutations, so a small group repeats and a large one is subsampled."""
        assert self.members is not None
        n_groups, nb = len(self.members), self.batches_per_epoch
        take = [self.global_batch // n_groups + (1 if j < self.global_batch % n_groups else 0)
                for j in range(n_groups)]
        streams = []
        for j, m in enumerate(self.members):
            need = sum(take[(j - b) % n_groups] for b in range(nb))  # group j's share rotates over batches
            reps = -(-need // len(m))
            streams.append(torch.cat([m[torch.randperm(len(m), generator=g)] for _ in range(reps)])[:need].tolist())
        pos = [0] * n_groups
        order: list[int] = []
        for b in range(nb):
            batch: list[int] = []
            for j in range(n_groups):
                k = take[(j - b) % n_groups]
                batch += streams[j][pos[j]:pos[j] + k]
                pos[j] += k
            order += [batch[i] for i in torch.randperm(len(batch), generator=g).tolist()]
        return torch.tensor(order, dtype=torch.long)

    def batch_keys(self, step: int, order: torch.Tensor | None = None) -> list[tuple[int, int]]:
        epoch, b = divmod(step, self.batches_per_epoch)
        order = self.epoch_order(epoch) if order is None else order
        per_rank = self.global_batch // self.world_size
        start = b * self.global_batch + self.rank * per_rank
        idx = order[start:start + per_rank].tolist()
        base = ((self.seed * _MIX) ^ (epoch * 1_000_003)) % (2**31 - self.n - 1)
        return [(i, (base + start + j) % (2**31 - 1)) for j, i in enumerate(idx)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, epoch, order = self.start_step, -1, None
        while True:
            e = step // self.batches_per_epoch
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            yield self.batch_keys(step, order)
            step += 1


def heldout_split(cases: list[str], groups: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Dataset indices of whole cases held out of training, ``fraction`` of each group's cases (at least one case
    of every group that has two or more; none of a group with a single case), drawn with ``seed``. Sorted."""
    held: list[int] = []
    g = torch.Generator().manual_seed((seed * _MIX + 12345) % (2**63))
    for grp in sorted(set(groups.tolist())):
        members = [i for i in range(len(cases)) if int(groups[i]) == grp]
        names = sorted({cases[i] for i in members})
        if len(names) < 2:
            continue
        k = min(len(names) - 1, max(1, round(fraction * len(names))))
        chosen = {names[j] for j in torch.randperm(len(names), generator=g)[:k].tolist()}
        held += [i for i in members if cases[i] in chosen]
    return torch.tensor(sorted(held), dtype=torch.long)


def heldout_batches(dataset: Any, held: torch.Tensor, batch_size: int, device: torch.device, rank: int = 0,
                    world_size: int = 1, groups: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the held-out samples ``held`` (dataset indices; keys ``(index, 0)``), as batches on
    ``device``; ``groups`` (on ``device``, indexed by dataset index) replaces each sample's group when given."""
    from torch.utils.data import DataLoader

    keys = [(int(i), 0) for i in held[rank::world_size]]
    loader = DataLoader(dataset, batch_sampler=[keys[k:k + batch_size] for k in range(0, len(keys), batch_size)])
    batches = [{k: v.to(device) for k, v in b.items()} for b in loader]
    if groups is not None:
        for b in batches:
            b["group"] = groups[b["index"]]
    return batches
