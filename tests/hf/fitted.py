"""Small fitted artifacts for the fast-path tests: klt bases, alloc widths and levels, nuq
codebooks with static scales, written as ``kvq calibrate`` names them (``L{i}.{k|v}.<suffix>``)
but drawn at random (valid, not fitted), so any head count, head_dim and width mix can be
tested in milliseconds. ``tc_config`` / ``kvquant_config`` build the recipes' KVConfigs on them.
"""

from __future__ import annotations

import torch

from kvq import codebooks
from kvq.kvconfig import KVConfig


def widths(heads: int, dim: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    """(heads, dim) integer widths in [0, 8] summing to bits * dim per head, with zeros and
    eights where the budget allows (as water-filling gives)."""
    out = torch.zeros(heads, dim, dtype=torch.long)
    for h in range(heads):
        left = bits * dim
        order = torch.randperm(dim, generator=gen)
        for i, c in enumerate(order.tolist()):
            room = 8 * (dim - i - 1)  # what the remaining channels can still take
            w = int(torch.randint(max(0, left - room), min(8, left) + 1, (1,), generator=gen))
            if i == 0:
                w = min(8, left)
            out[h, c], left = w, left - w
        assert left == 0
    return out


def write_tc(path, layers: int, heads: int, dim: int, bits: int, seed: int = 0) -> str:
    """klt + alloc tensors for every layer and K/V; returns the file path."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for kv in "kv":
            name = f"L{i}.{kv}"
            q, _ = torch.linalg.qr(torch.randn(heads, dim, dim, generator=gen,
                                               dtype=torch.float64))
            w = widths(heads, dim, bits, gen)
            steps = torch.rand(heads, dim, 256, generator=gen) * 0.02 + 1e-3  # strictly up
            levels = steps.cumsum(-1) - steps.sum(-1, keepdim=True) / 2
            tensors |= {f"{name}.klt.mean": torch.randn(heads, dim, generator=gen) * 0.05,
                        f"{name}.klt.basis": q.float(), f"{name}.alloc.widths": w.float(),
                        f"{name}.alloc.levels": levels}
    codebooks.write(path, tensors, {"num_layers": layers, "head_dim": dim})
    return str(path)


def write_nuq(path, layers: int, heads: int, dim: int, bits: int, seed: int = 0) -> str:
    """nuq levels (keys with static scales) for every layer and K/V; returns the file path."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for kv in "kv":
            name = f"L{i}.{kv}"
            inner = torch.sort(torch.rand(2**bits - 2, generator=gen) * 1.8 - 0.9).values
            tensors[name] = torch.cat([torch.tensor([-1.0]), inner, torch.tensor([1.0])])
            tensors[f"{name}.zero"] = torch.randn(heads, dim, generator=gen) * 0.1
            tensors[f"{name}.scale"] = torch.rand(heads, dim, generator=gen) + 0.5
    codebooks.write(path, tensors, {"num_layers": layers, "head_dim": dim})
    return str(path)


def tc_spec(file: str, layer: int, kv: str, bits: int, nsep: bool = True) -> str:
    ref = f"source={file}#L{layer}.{kv}"
    return ("nsep>" if nsep else "") + f"klt({ref})>alloc({bits},{ref})"


def kvquant_specs(file: str, layer: int, bits: int) -> tuple[str, str]:
    ref = f"source={file}#L{layer}"
    return (f"sparse(0.01,channel,fp32)>nuq({bits},scale=static,{ref}.k)",
            f"sparse(0.01,token,fp32)>ptok>nuq({bits},{ref}.v)")


def config(specs, rope: str = "pre", sinks: int = 1) -> KVConfig:
    """A KVConfig with per-layer (keys, values) specs, keys at ``rope``, ``sinks`` sinks."""
    layers = {i: {"keys": {"rope": rope, "pipeline": k}, "values": v}
              for i, (k, v) in enumerate(specs)}
    return KVConfig.model_validate({"keys": {"rope": rope, "pipeline": specs[0][0]},
                                    "values": specs[0][1], "sinks": sinks, "layers": layers})
