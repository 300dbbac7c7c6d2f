"""The spec language: ``"nsep>pchan>int4"`` <-> pipeline steps."""

from kvq.spec.grammar import ParsedStep, parse
from kvq.spec.step import Step

__all__ = ["ParsedStep", "Step", "parse"]
