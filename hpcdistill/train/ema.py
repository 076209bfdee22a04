"""The exponential moving average of a model's weights (train.ema_decay): a float32 copy of the module, updated after
every optimizer step, saved in checkpoints so a resumed run averages exactly as an uninterrupted one."""

from __future__ import annotations

import copy
from typing import Any

import torch


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(module).float().eval()  # float32 whatever the training precision
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """Warmed up as (1 + n) / (10 + n): the first steps' random-init weights do not linger in the average."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        pairs = list(zip(self.module.state_dict().values(), module.state_dict().values()))
        floats = [(avg, new) for avg, new in pairs if avg.dtype.is_floating_point]
        # one fused lerp over all tensors: the training step's hot path, one kernel group instead of one per tensor
        torch._foreach_lerp_([a for a, _ in floats], [n.detach().to(a.dtype) for a, n in floats], 1.0 - decay)
        for avg, new in pairs:
            if not avg.dtype.is_floating_point:
                avg.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return {"decay": self.decay, "updates": self.updates, "weights": weights}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.updates = int(saved["updates"])
        self.module.load_state_dict(saved["weights"])
