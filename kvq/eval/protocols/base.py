"""What every evaluation protocol shares: the score it returns and how it scores tokens."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvq.eval.metrics import Head, TokenStats, token_stats
from kvq.eval.pipelines import BASELINE
from kvq.kvconfig import KVConfig


@dataclass
class Score:
    """Summed negative log-likelihood over ``tokens`` scored tokens, with cost figures.

    ``cache_bytes``/``fp16_bytes``: bytes of the quantized K/V at rest (codes + metadata +
    any full-precision residual) and of the same K/V in fp16, summed over windows.
    ``token_nll``/``token_kl``/``token_top1``: per-token scores, one (T,) tensor per window, in
    scoring order (KL and top-1 agreement against the ``fp16`` reference run; empty when the
    run had none).
    """

    nll: float = 0.0
    tokens: int = 0
    cache_bytes: int = 0
    fp16_bytes: int = 0
    seconds: float = 0.0
    windows: int = 0
    token_nll: list = field(default_factory=list)
    token_kl: list = field(default_factory=list)
    token_top1: list = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def add(self, other: Score) -> None:
        for name in ("nll", "tokens", "cache_bytes", "fp16_bytes", "seconds", "windows",
                     "token_nll", "token_kl", "token_top1"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @classmethod
    def of(cls, stats: TokenStats, **costs) -> Score:
        """One window's score from its per-token ``stats`` and cost figures."""
        return cls(nll=float(stats.nll.double().sum()), tokens=stats.nll.numel(),
                   token_nll=[stats.nll], token_kl=[] if stats.kl is None else [stats.kl],
                   token_top1=[] if stats.top1 is None else [stats.top1], **costs)

    @property
    def has_reference(self) -> bool:
        return len(self.token_kl) == len(self.token_nll) > 0

    def kl_mean(self) -> float | None:
        return float(torch.cat(self.token_kl).double().mean()) if self.has_reference else None

    def kl_quantile(self, q: float = 0.99) -> float | None:
        if not self.has_reference:
            return None
        return float(torch.quantile(torch.cat(self.token_kl).double(), q))

    def top1(self) -> float | None:
        return float(torch.cat(self.token_top1).double().mean()) if self.has_reference else None


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


def reference_first(configs: dict[str, KVConfig]) -> list[str]:
    """Labels in run order with the ``fp16`` reference first, so every other run can be
    compared with it position by position."""
    return sorted(configs, key=lambda label: label != BASELINE)


def window_stats(head: Head, hidden: torch.Tensor, targets: torch.Tensor, label: str,
                 references: dict, key) -> TokenStats:
    """Stats of one window; the reference run's hidden states are kept in ``references[key]``
    (its own KL is 0 and top-1 agreement 1 by definition)."""
    if label == BASELINE:
        references[key] = hidden
        stats = token_stats(head, hidden, targets)
        stats.kl, stats.top1 = torch.zeros_like(stats.nll), torch.ones_like(stats.nll)
        return stats
    return token_stats(head, hidden, targets, references.get(key))


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy of ``targets`` (T,) under ``logits`` (T, vocab), in float32."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
