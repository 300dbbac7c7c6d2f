"""``kvq calibrate --bits B --allocate measured``: alloc widths from measured output divergence.

The predicted distortion of :mod:`kvq.transform_coding` (Gaussian model, diagonal Fisher weights)
ranks the coordinates of one layer well but compares layers poorly. Here every candidate width b
of every (layer, K/V) is measured instead: the model runs over calibration windows with only that
layer's keys (or values) quantized at b, and the cost of the choice is the summed
KL(p_exact || p_quantized) of the next-token distributions. The widths then come from the same
exact knapsack, on the assumption that the divergences of different layers add up.
Cost: one forward per candidate and window (3 widths x 2 x layers x windows).
"""

from __future__ import annotations

from pathlib import Path

import torch


def measured_costs(model, windows: list[torch.Tensor], fits: dict, recipes: dict[str, str],
                   rope: str, sinks: int, widths: tuple[int, ...], tmp: Path,
                   tick=lambda: None) -> dict[tuple[int, str, int], float]:
    """KL summed over ``windows`` ((1, T) ids) per (layer, role, width), one layer quantized."""
    from kvq import codebooks
    from kvq import transform_coding as tc
    from kvq.eval.caches import make_cache
    from kvq.hf.compat import cache_kwargs
    from kvq.kvconfig import KVConfig

    tensors = {f"L{i}.{r}.w{b}.{k}": t for (i, r), fit in fits.items() for b in widths
               for k, t in fit.fit(b).items()}
    path = codebooks.write(tmp / "candidates.safetensors", tensors, {})
    with torch.no_grad():
        ref = [torch.log_softmax(model(w).logits[0].float(), -1) for w in windows]
    costs = {}
    for (i, r) in fits:
        for b in widths:
            spec = tc.with_source(tc.at_bits(recipes[r], b), f"{path}#L{i}.{r}.w{b}")
            role = "keys" if r == "k" else "values"
            cfg = KVConfig.from_dict({"keys": {"rope": rope, "pipeline": "none"},
                                      "values": "none", "sinks": sinks,
                                      "layers": {i: {role: spec}}})
            total = 0.0
            for w, lp in zip(windows, ref):
                cache = make_cache(cfg, model, prefill="quantized")
                with torch.no_grad():
                    out = model(w, **cache_kwargs(model, cache), use_cache=True).logits[0]
                lq = torch.log_softmax(out.float(), -1)
                total += float((lp.exp() * (lp - lq)).sum())
            costs[i, r, b] = total
            tick()
    return costs
