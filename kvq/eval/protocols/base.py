"""What every evaluation protocol shares: the score it returns and how it scores tokens."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvq.kvconfig import KVConfig


@dataclass
class Score:
    """Summed negative log-likelihood over ``tokens`` scored tokens, with cost figures.

    ``cache_bytes``/``fp16_bytes``: bytes of the quantized K/V at rest (codes + metadata +
    any full-precision residual) and of the same K/V in fp16, summed over windows.
    """

    nll: float = 0.0
    tokens: int = 0
    cache_bytes: int = 0
    fp16_bytes: int = 0
    seconds: float = 0.0
    windows: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def add(self, other: Score) -> None:
        for field in ("nll", "tokens", "cache_bytes", "fp16_bytes", "seconds", "windows"):
            setattr(self, field, getattr(self, field) + getattr(other, field))


class Protocol:
    """One way of measuring a K/V pipeline on token windows (see each subclass).

    ``run(model, windows, configs, tick)`` returns ``{name: Score}`` for ``configs`` (name ->
    KVConfig); ``windows`` is a LongTensor (n, L); ``tick()`` is called once per (window, config).
    """

    name: str = ""
    description: str = ""

    def run(
        self,
        model,
        windows: torch.Tensor,
        configs: dict[str, KVConfig],
        tick: Callable[[], None] = lambda: None,
    ) -> dict[str, Score]:
        raise NotImplementedError

    def check(self, context: int) -> None:
        """Raise :class:`~kvq.eval.errors.EvalError` if this protocol cannot run at ``context``."""


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy of ``targets`` (T,) under ``logits`` (T, vocab), in float32."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
