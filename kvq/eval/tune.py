"""``kvq tune``: a pipeline and bit width per layer for keys and values, under a bit budget.

Input: a diagnosis (:func:`kvq.eval.diagnose.run`, best with every bit width) that gives, per
layer ``l`` and candidate pipeline ``p``, the squared relative attention-output error with only
the keys (``e_l^K(p)``) or only the values (``e_l^V(p)``) quantized by ``p``. Error model
(additive, K and V errors taken as uncorrelated):

    E = Σ_l (e_l^K(p_l^K) + e_l^V(p_l^V))          (default, "attention")
    E = Σ_l w_l (e_l^K(p_l^K) + e_l^V(p_l^V))      ("residual": w_l = the layer's weight in the
                                                    residual stream, see kvq.eval.diagnose)

Every layer counts the same by default: weighting by ``w_l`` starves the middle layers and
measured worse on SmolLM2 (docs/diagnose.md). Cost: the bits per element each pipeline
stores at the cache's block size (metadata included), averaged over layers and K/V exactly as
:meth:`kvq.KVConfig.bits_per_element` and ``kvq compare`` report it.

Allocation: exact multiple-choice knapsack by dynamic programming over integer costs (stored bits
per block of one head, divided by their gcd). The costs are few and discrete (a handful of
widths and metadata layouts), so the DP is exact and takes milliseconds; a greedy or Lagrangian
allocation would only reach the points on the convex hull of each layer's (bits, error) curve
and can leave budget unused.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kvq.eval.errors import EvalError
from kvq.knapsack import choose
from kvq.kvconfig import KVConfig, LayerOverride
from kvq.pipeline import Pipeline

ROLES = ("keys", "values")


@dataclass
class Choice:
    layer: int
    role: str
    spec: str
    bits: float
    error: float


ERROR_MODELS = ("attention", "residual")
MAX_BITS = 16  # fp16 K/V: a larger budget buys nothing


def check_budget(budget) -> None:
    """``--bits``: a finite number of bits/element in (0, 16]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
            or not 0 < budget <= MAX_BITS:
        raise EvalError(f"--bits must be positive and at most {MAX_BITS} (bits/element), got "
                        f"{budget!r}")


def read_diagnosis(path: Path) -> dict:
    """A ``diagnose.json`` checked for everything :func:`tune` reads (clean errors for a file
    that is missing, not UTF-8, malformed, too deeply nested or not a diagnosis)."""
    from kvq.errors import SpecError
    from kvq.spec.files import load_json, read_text

    hint = "run kvq diagnose --bits all and pass its diagnose.json"
    shown = str(path)[:200]
    try:
        if not path.is_file():
            raise EvalError(f"--diagnosis {shown!r} is not a file; {hint}")
        data = load_json(read_text(path), f"--diagnosis {shown!r}")
    except SpecError as err:
        raise EvalError(f"{err}; {hint}") from None
    except OSError as err:
        raise EvalError(f"--diagnosis {shown!r} cannot be read ({err.strerror}); {hint}") from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise EvalError(f"--diagnosis {shown!r} is not a kvq diagnose JSON: {what}; {hint}")

    def num(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    need(isinstance(data, dict), "not an object")
    for key in ("model", "settings", "layers", "bits", "candidates"):
        need(key in data, f"no {key!r}")
    m, st = data["model"], data["settings"]
    need(isinstance(m, dict) and count(m.get("head_dim")) and count(m.get("layers")),
         "'model' needs positive integers head_dim and layers")
    need(isinstance(st, dict) and count(st.get("block")), "'settings' needs a positive block")
    bits = data["bits"]
    need(isinstance(bits, dict) and all(isinstance(bits.get(r), dict) and bits[r]
                                        and all(num(b) and b >= 0 for b in bits[r].values())
                                        for r in ROLES), "'bits' needs keys and values widths")
    rows = data["layers"]
    need(isinstance(rows, list) and len(rows) == m["layers"],
         f"'layers' needs one row per layer ({m['layers']})")
    for i, row in enumerate(rows):
        need(isinstance(row, dict) and row.get("layer") == i, f"layer row {i} is not layer {i}")
        need(num(row.get("weight")), f"layer {i} has no numeric weight")
        errs = row.get("errors")
        need(isinstance(errs, dict), f"layer {i} has no errors")
        for r in ROLES:
            e = errs.get(r)
            need(isinstance(e, dict) and e and all(
                spec in bits[r] and isinstance(v, dict) and num(v.get("energy"))
                for spec, v in e.items()),
                f"layer {i} {r} errors need a numeric energy per candidate of 'bits'")
    cands = data["candidates"]
    need(isinstance(cands, dict) and all(
        isinstance(c, dict) and num(c.get("bits_per_element")) and all(
            isinstance(c.get(r), str) and all(c[r] in row["errors"][r] for row in rows)
            for r in ROLES) for c in cands.values()),
        "'candidates' needs keys, values and bits_per_element per preset")
    return data


def allocate(diagnosis: dict, budget: float, error_model: str = "attention") -> list[Choice]:
    """Per (layer, role) the pipeline minimising the predicted error with mean bits <= budget.

    ``error_model``: ``"attention"`` (default) sums the squared relative attention errors of
    all layers as they are; ``"residual"`` weighs each by the layer's residual-stream weight
    ``w_l`` (measured worse on SmolLM2: docs/diagnose.md).
    """
    if error_model not in ERROR_MODELS:
        raise EvalError(f"--error-model {error_model!r}: use one of {', '.join(ERROR_MODELS)}")
    head_dim, block = diagnosis["model"]["head_dim"], diagnosis["settings"]["block"]
    unit = block * head_dim  # bits per element x unit = stored bits per block of one head
    items = []
    for row in diagnosis["layers"]:
        for role in ROLES:
            w = row["weight"] if error_model == "residual" else 1.0
            opts = [(spec, diagnosis["bits"][role][spec], w * e["energy"])
                    for spec, e in row["errors"][role].items()]
            items.append((row["layer"], role, opts))
    costs = [[(round(b * unit), err) for _, b, err in opts] for _, _, opts in items]
    picks = choose(costs, math.floor(budget * unit * len(items) + 1e-9))
    if picks is None:
        cheapest = sum(min(c for c, _ in opts) for opts in costs)
        raise EvalError(f"--bits {budget:g}: the cheapest candidates need "
                        f"{cheapest / unit / len(items):.3f} bits/element; raise --bits or "
                        "add cheaper candidates")
    return [Choice(layer, role, *opts[j]) for (layer, role, opts), j in zip(items, picks)]


def to_config(choices: list[Choice], name: str) -> KVConfig:
    """A KVConfig: the most common key/value pipelines as defaults, other layers overridden."""
    default = {r: Counter(c.spec for c in choices if c.role == r).most_common(1)[0][0]
               for r in ROLES}
    layers: dict[int, dict] = {}
    for c in choices:
        if c.spec != default[c.role]:
            layers.setdefault(c.layer, {})[c.role] = Pipeline.parse(c.spec)
    return KVConfig(name=name, keys=Pipeline.parse(default["keys"]),
                    values=Pipeline.parse(default["values"]),
                    layers={i: LayerOverride(**o) for i, o in sorted(layers.items())})


def tune(diagnosis: dict, budget: float, name: str | None = None,
         error_model: str = "attention") -> tuple[KVConfig, dict]:
    """``(config, report)``: the allocation as a KVConfig and a plain-data report (predicted error
    of the tuned config and of every uniform candidate preset within the budget)."""
    check_budget(budget)
    choices = allocate(diagnosis, budget, error_model)
    m, block = diagnosis["model"], diagnosis["settings"]["block"]
    cfg = to_config(choices, name or f"tuned{budget:g}")
    bits = cfg.bits_per_element(m["head_dim"], block, m["layers"])
    if bits > budget + 1e-9:  # the DP works in exact integer bits; this would be a kvq bug
        raise EvalError(f"internal error: tuned config stores {bits} bits/element > {budget}")
    uniform = {}
    for preset, c in diagnosis["candidates"].items():
        if c["bits_per_element"] <= budget + 1e-9:
            uniform[preset] = {"bits_per_element": c["bits_per_element"],
                               "predicted_error": sum(
                                   (r["weight"] if error_model == "residual" else 1.0)
                                   * (r["errors"]["keys"][c["keys"]]["energy"]
                                      + r["errors"]["values"][c["values"]]["energy"])
                                   for r in diagnosis["layers"])}
    report = {
        "budget": budget,
        "error_model": error_model,
        "bits_per_element": bits,
        "predicted_error": sum(c.error for c in choices),
        "uniform": uniform,
        "choices": [c.__dict__ for c in choices],
    }
    return cfg, report


HEADER = "# kvq tune:"


def check_out(out: Path, force: bool = False) -> None:
    """Refuse an ``--out`` that exists and is not a YAML written by ``kvq tune`` (unless
    ``force``), before any diagnosis runs: kvq never overwrites a file it did not write."""
    from kvq.errors import shorten

    show = shorten(str(out), 200)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_file():
        raise EvalError(f"--out {show} exists and is not a regular file; choose another --out")
    if force:
        return
    try:
        with open(out, "rb") as f:
            ours = f.read(len(HEADER)) == HEADER.encode()
    except OSError as exc:
        raise EvalError(f"--out {show} is unreadable ({exc.strerror or exc})") from None
    if not ours:
        raise EvalError(f"--out would overwrite {show}, which is not a YAML written by kvq "
                        "tune; choose another --out or pass --force")


def write_config(cfg: KVConfig, out: Path, budget: float) -> None:
    """Write the tuned config atomically, with the header that marks it as kvq tune's."""
    from kvq.spec.files import write_atomic

    text = f"{HEADER} budget {budget:g} bits/element\n" + cfg.to_yaml()
    try:
        write_atomic(out, text.encode("utf-8"))
    except OSError as exc:
        raise EvalError(f"cannot write --out ({exc.strerror or exc})") from None
