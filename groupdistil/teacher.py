"""The frozen teacher: loaded from its run folder, run under inference mode, optionally cached."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .errors import UserError

CKPT_FORMAT = "groupdistil-checkpoint-v1"


def resolve_checkpoint(path: str | Path, what: str = "teacher") -> Path:
    """A run folder -> its selected checkpoint; a file -> itself."""
    p = Path(path)
    if p.is_dir():
        ck = p / "checkpoints" / "best.pt"
        if not ck.is_file():
            raise UserError(f"{p}: no checkpoints/best.pt in this {what} run folder (did its run finish?)")
        return ck
    if not p.is_file():
        raise UserError(f"{p}: {what} run folder or checkpoint not found")
    return p


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to read means the file cannot be trusted
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT or "model" not in ck or "config" not in ck:
        raise UserError(f"{path}: not a GroupDistil checkpoint (missing format/model/config)")
    return ck


def load_model_from_checkpoint(path: str | Path, pipeline_cls: Any, what: str = "teacher") -> tuple[nn.Module, dict]:
    """Build the model described by the checkpoint's own config and load its weights."""
    ck_path = resolve_checkpoint(path, what)
    ck = load_checkpoint(ck_path)
    cfg = ck["config"]
    if cfg.get("pipeline") != pipeline_cls.name:
        raise UserError(f"{ck_path}: the {what} was trained with pipeline '{cfg.get('pipeline')}', "
                        f"this run uses '{pipeline_cls.name}'")
    model = pipeline_cls.model_for(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "state dict mismatch"
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"{ck_path}: the {what}'s weights do not fit the architecture of its config "
                        f"({cfg['model']}): {first} {detail}") from None
    return model, ck


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
