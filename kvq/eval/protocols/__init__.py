"""Evaluation protocols, by name (``kvq compare --protocols``)."""

from __future__ import annotations

from kvq.eval.errors import EvalError
from kvq.eval.protocols.base import Protocol, Score
from kvq.eval.protocols.seed import Seed
from kvq.eval.protocols.streaming import Streaming
from kvq.eval.protocols.teacher_forced import TeacherForced

PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in (TeacherForced, Seed, Streaming)}


def get_protocol(name: str, **options) -> Protocol:
    """The protocol called ``name``, built with the options it accepts."""
    if name not in PROTOCOLS:
        import difflib

        close = difflib.get_close_matches(name, PROTOCOLS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EvalError(f"unknown protocol {name!r}{hint}; known: {', '.join(PROTOCOLS)}")
    cls = PROTOCOLS[name]
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})


__all__ = ["PROTOCOLS", "Protocol", "Score", "get_protocol"]
