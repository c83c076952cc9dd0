"""The frozen teacher: a model run under inference mode, optionally cached (loading: :mod:`groupdistil.checkpoint`)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


class Teacher:
    """Callable ``batch -> {head: logits}`` running a frozen model under inference mode.

    The returned tensors are ordinary tensors (cloned out of inference mode) so the KD term can use them in the
    autograd graph of the student.
    """

    def __init__(self, model: nn.Module, autocast: Callable[[], Any]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.autocast = autocast
        self.cache: dict[str, Tensor] | None = None

    @torch.inference_mode()
    def _forward(self, x: Tensor) -> dict[str, Tensor]:
        with self.autocast():
            return self.model(x)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.cache is not None:
            idx = batch["index"]
            return {h: t[idx].float() for h, t in self.cache.items()}
        return {h: t.clone() for h, t in self._forward(batch["x"]).items()}

    def build_cache(self, dataset: Dataset, device: torch.device, batch_size: int, num_workers: int = 0,
                    dtype: torch.dtype = torch.float16) -> None:
        """Run the teacher once over the (deterministic) training set and keep its logits on ``device``.

        The cache lives in memory for this run only, so a different teacher or data can never hit it.
        """
        n = len(dataset)  # type: ignore[arg-type]
        keys = [[(i, 0) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
        loader = DataLoader(dataset, batch_sampler=keys, num_workers=num_workers)
        cache: dict[str, Tensor] = {}
        for batch in loader:
            x = batch["x"].to(device, non_blocking=True)
            idx = batch["index"].to(device)
            out = self._forward(x)
            for h, t in out.items():
                if h not in cache:
                    cache[h] = torch.empty((n, *t.shape[1:]), dtype=dtype, device=device)
                cache[h][idx] = t.to(dtype)
        self.cache = cache
