"""Which K/V configurations diagnose and tune consider: every registered preset (plugins' too).

Nothing here lists families: a preset registered later (a new method, a plugin) joins the
candidates by being registered. ``bits`` keeps the presets whose key and value quantizers both
have one of those widths; ``fp16`` (no quantization) is kept only when 16 is asked for. Extra
candidates (``--pipelines``: preset names, spec strings or YAML files without per-layer
overrides) are added as given.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvq.errors import KVQError
from kvq.eval.errors import EvalError
from kvq.kvconfig import KVConfig
from kvq.pipeline import Pipeline


@dataclass
class Candidates:
    """``presets``: name -> KVConfig; ``keys``/``values``: spec -> Pipeline (deduplicated);
    ``skipped``: name -> why it cannot run on this model."""

    presets: dict[str, KVConfig]
    keys: dict[str, Pipeline]
    values: dict[str, Pipeline]
    skipped: dict[str, str]

    def pairs(self) -> dict[str, tuple[str, str]]:
        return {n: (c.keys.to_spec(), c.values.to_spec()) for n, c in self.presets.items()}


def collect(bits: list[int] | None, extra: list[str] | None, head_dim: int, num_layers: int,
            block: int) -> Candidates:
    """Registered presets at ``bits`` (all widths when None) plus ``extra``, checked to fit."""
    from kvq.loading import kv
    from kvq.presets import presets

    chosen: dict[str, KVConfig] = {}
    for name, cfg in presets().items():
        widths = {cfg.keys.bits, cfg.values.bits}
        if bits is None or widths <= set(bits):
            chosen[name] = cfg
    for name in extra or []:
        try:
            cfg = kv(name)
        except KVQError as err:
            raise EvalError(f"candidate {name!r}: {err}") from None
        if cfg.layers:
            raise EvalError(f"candidate {name!r} has per-layer overrides; give candidates with "
                            "one key and one value pipeline")
        chosen.setdefault(cfg.label if cfg.name is None else name, cfg)
    if not chosen:
        raise EvalError(f"no registered preset has {bits} bits; see `kvq list` for presets")
    out = Candidates({}, {}, {}, {})
    for name, cfg in chosen.items():
        why = _misfit(cfg, head_dim, num_layers, block)
        if why:
            out.skipped[name] = why
            continue
        out.presets[name] = cfg
        out.keys.setdefault(cfg.keys.to_spec(), cfg.keys)
        out.values.setdefault(cfg.values.to_spec(), cfg.values)
    if not out.presets:
        raise EvalError("no candidate fits this model: " + "; ".join(
            f"{n}: {w}" for n, w in list(out.skipped.items())[:3]))
    return out


def _misfit(cfg: KVConfig, head_dim: int, num_layers: int, block: int) -> str | None:
    # diagnose measures one key and one value pipeline per layer on post-RoPE keys, all tokens
    # quantized: options that change that are not modelled, so such presets are left out (named)
    if cfg.skip:
        return f"keeps layers {list(cfg.skip)} unquantized (skip), which diagnose does not model"
    if cfg.key_rope != "post" or cfg.layers and any(o.key_rope for o in cfg.layers.values()):
        return "quantizes keys before RoPE, which diagnose does not model"
    if cfg.sinks:
        return f"keeps {cfg.sinks} sink token(s) exact, which diagnose does not model"
    try:
        cfg.check(num_layers=num_layers, head_dim=head_dim)
    except KVQError as err:
        return str(err)
    for p in (cfg.keys, cfg.values):
        tb = p.token_block
        if tb and block % tb:
            return f"{p.to_spec()!r} groups {tb} tokens, which does not divide --block {block}"
    return None
