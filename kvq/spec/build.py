"""Turn parsed steps, strings and dicts into step models, and check a chain's structure."""

from __future__ import annotations

import re
from typing import Any

from kvq.errors import SpecError, shorten
from kvq.spec.grammar import ParsedStep, parse
from kvq.spec.step import Step


def make_step(item: Any, index: int = 0) -> Step:
    """A step model from a :class:`ParsedStep`, a one-step spec string, a dict or a Step."""
    from kvq.registry import STEPS

    if isinstance(item, Step):
        return item
    if isinstance(item, str):
        parsed = parse(item)
        if len(parsed) != 1:
            raise _located(SpecError(f"expected one step, got {shorten(item)}"), index)
        item = parsed[0]
    if isinstance(item, dict):
        data = dict(item)
        name = data.pop("type", None)
        if not isinstance(name, str):
            raise _located(SpecError("step without a 'type'",
                                     suggestion="write e.g. {type: int, bits: 4}"), index)
        entry = _entry(STEPS, name, index)
        cls = STEPS.load(entry)
        clash = {k for k in entry.defaults if k in data and data[k] != entry.defaults[k]}
        if clash:
            raise _located(SpecError(f"{sorted(clash)} contradict the step name "
                                     f"{shorten(name)}"), index)
        return cls.validated({**data, **entry.defaults}, name)
    if isinstance(item, ParsedStep):
        entry = _entry(STEPS, item.name, index)
        return STEPS.load(entry).from_parsed(item, entry.defaults)
    raise _located(SpecError(f"cannot make a step from {type(item).__name__}"), index)


def _entry(registry, name: str, index: int):
    try:
        return registry.entry(name)
    except SpecError as unknown:
        m = re.fullmatch(r"int(\d+)", name)
        err = unknown if not m else SpecError(
            f"unsupported bit width {m.group(1)[:20]} in {shorten(name)}",
            suggestion="kvq quantizes to int2, int3, int4 or int8")
        raise _located(err, index) from None


def check_structure(steps: list[Step]) -> None:
    """``transforms... > [granularity] > quantizer``, each transform at most once."""
    roles = [s.role for s in steps]
    if "quantizer" not in roles:
        raise _located(SpecError("pipeline has no quantizer",
                                 suggestion="end it with int2, int3, int4, int8 or none"),
                       len(steps) - 1)
    first_q = roles.index("quantizer")
    if roles.count("quantizer") > 1:
        second = roles.index("quantizer", first_q + 1)
        raise _located(SpecError(f"second quantizer {steps[second].to_spec()!r}",
                                 suggestion="a pipeline has exactly one quantizer, at the end"),
                       second)
    if first_q != len(steps) - 1:
        raise _located(SpecError(f"{steps[first_q + 1].to_spec()!r} after the quantizer",
                                 suggestion="the quantizer is the last step"), first_q + 1)
    grans = [i for i, r in enumerate(roles) if r == "granularity"]
    if len(grans) > 1:
        raise _located(SpecError(f"second granularity {steps[grans[1]].to_spec()!r}",
                                 suggestion="choose one of ptok, pchan, group(size[,axis])"),
                       grans[1])
    if grans and any(r == "transform" for r in roles[grans[0]:]):
        late = next(i for i in range(grans[0], len(roles)) if roles[i] == "transform")
        raise _located(SpecError(f"transform {steps[late].to_spec()!r} after the granularity "
                                 f"{steps[grans[0]].to_spec()!r}",
                                 suggestion="write transforms first, e.g. 'nsep>rot>pchan>int4'"),
                       late)
    try:
        steps[-1].resolve_granularity(steps[grans[0]] if grans else None)  # type: ignore[attr-defined]
    except SpecError as err:
        raise _located(err, grans[0] if grans else len(steps) - 1) from None
    seen: dict[str, int] = {}
    for i, s in enumerate(steps):
        if s.role == "transform":
            if s.type in seen:  # type: ignore[attr-defined]
                raise _located(SpecError(f"transform {s.type!r} appears twice"), i)
            seen[s.type] = i  # type: ignore[attr-defined]
    if steps[-1].type == "none" and len(steps) > 1:  # type: ignore[attr-defined]
        raise _located(SpecError("the 'none' quantizer stores K/V unchanged, so steps before it "
                                 "would do nothing", suggestion="write just 'none'"), 0)


def _located(err: SpecError, index: int) -> SpecError:
    err.step = index  # type: ignore[attr-defined]
    return err
