"""kvq tune: the allocation is optimal for its error model and meets the budget exactly."""

from __future__ import annotations

import itertools
import json

import pytest

from kvq.eval.errors import EvalError
from kvq.eval.tune import allocate, tune

SPECS = {"ptok>int2": 2.25, "ptok>int4": 4.25, "pchan>int3": 3.5, "none": 16.0}


def _diagnosis(errors: list[dict[str, tuple[float, float]]], weights=None) -> dict:
    """Synthetic diagnosis: per layer {spec: (key energy, value energy)}."""
    layers = []
    for i, errs in enumerate(errors):
        layers.append({"layer": i, "weight": (weights or [1.0] * len(errors))[i], "errors": {
            "keys": {s: {"energy": e[0]} for s, e in errs.items()},
            "values": {s: {"energy": e[1]} for s, e in errs.items()}}})
    return {"model": {"head_dim": 64, "layers": len(errors)}, "settings": {"block": 32},
            "bits": {"keys": dict(SPECS), "values": dict(SPECS)}, "layers": layers,
            "candidates": {"naive2": {"keys": "ptok>int2", "values": "ptok>int2",
                                      "bits_per_element": 2.25}}}


def _errors(seed: int, n_layers: int):
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n_layers):
        base = rng.uniform(0.5, 2.0)
        out.append({"ptok>int2": (base * rng.uniform(4, 9), base * rng.uniform(2, 6)),
                    "pchan>int3": (base * rng.uniform(0.5, 1.5), base * rng.uniform(1, 2)),
                    "ptok>int4": (base * rng.uniform(0.1, 0.4), base * rng.uniform(0.1, 0.4)),
                    "none": (0.0, 0.0)})
    return out


@pytest.mark.parametrize("budget", [2.25, 2.8, 3.0, 3.5, 4.0, 6.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_allocation_is_the_brute_force_optimum(budget, seed):
    d = _diagnosis(_errors(seed, 2), weights=[2.0, 0.5])
    choices = allocate(d, budget, "residual")
    got = sum(c.error for c in choices)
    best = min(
        sum(d["layers"][i // 2]["weight"] * d["layers"][i // 2]["errors"][r][s]["energy"]
            for i, (r, s) in enumerate(zip(["keys", "values"] * 2, combo)))
        for combo in itertools.product(SPECS, repeat=4)
        if sum(SPECS[s] for s in combo) <= 4 * budget + 1e-9)
    assert got == pytest.approx(best)
    assert sum(c.bits for c in choices) / 4 <= budget + 1e-12


@pytest.mark.parametrize("budget", [2.5, 3.0, 3.25, 4.0])
def test_budget_met_as_kvconfig_reports_it(budget):
    d = _diagnosis(_errors(3, 30))
    cfg, report = tune(d, budget)
    bits = cfg.bits_per_element(head_dim=64, seq=32, num_layers=30)
    assert bits <= budget + 1e-12
    assert bits == pytest.approx(report["bits_per_element"])
    assert bits > budget - 1.0  # the budget is used, not wasted
    assert report["predicted_error"] <= report["uniform"]["naive2"]["predicted_error"]


def test_config_defaults_are_the_common_choice_and_round_trip(tmp_path):
    import kvq

    d = _diagnosis(_errors(4, 6))
    cfg, _ = tune(d, 3.0, name="t3")
    path = tmp_path / "t3.yaml"
    cfg.save(path)
    again = kvq.load(path)
    assert again == cfg and again.name == "t3"
    for layer in range(6):
        assert again.for_layer(layer) == cfg.for_layer(layer)


def test_errors():
    d = _diagnosis(_errors(0, 2))
    with pytest.raises(EvalError, match="cheapest candidates need 2.250"):
        tune(d, 2.0)
    with pytest.raises(EvalError, match="positive"):
        tune(d, 0)


def test_tune_cli_and_compare_report_the_same_bits(tiny_dir, text_file, tmp_path, capsys):
    """kvq tune on a real (tiny) diagnosis; kvq compare runs the YAML and reports its bits."""
    from kvq.cli.main import main

    diag = tmp_path / "diag"
    assert main(["diagnose", "--model", str(tiny_dir), "--corpus", str(text_file), "--bits",
                 "2,4", "--context", "64", "--block", "16", "--queries", "8", "--out",
                 str(diag), "--quiet", "--no-plot"]) == 0
    yaml = tmp_path / "t.yaml"
    assert main(["tune", "--bits", "4", "--diagnosis", str(diag / "diagnose.json"),
                 "--out", str(yaml)]) == 0
    assert "bits/element (budget 4)" in capsys.readouterr().out
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_dir), "--corpus", str(text_file), "--pipelines",
                 str(yaml), "--context", "64", "--tokens", "64", "--block", "16", "--protocols",
                 "teacher-forced", "--out", str(out), "--quiet", "--no-plot"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    tuned = next(r for r in rows if r["pipeline"] == "tuned4")
    import kvq

    assert tuned["bits_per_element"] == pytest.approx(
        kvq.load(yaml).bits_per_element(head_dim=16, seq=16, num_layers=2), abs=1e-9)
    assert 3.0 < tuned["bits_per_element"] <= 4.0
    assert main(["tune", "--bits", "4", "--diagnosis", str(yaml)]) == 2


def test_tune_out_never_overwrites_a_file_it_did_not_write(tiny_dir, text_file, tmp_path, capsys):
    """A user's file at --out is refused before any diagnosis (exit 2, file unchanged); a YAML
    kvq tune wrote is replaced; --force overwrites."""
    from kvq.cli.main import main

    diag = tmp_path / "diag"
    assert main(["diagnose", "--model", str(tiny_dir), "--corpus", str(text_file), "--bits",
                 "2,4", "--context", "64", "--block", "16", "--queries", "8", "--out",
                 str(diag), "--quiet", "--no-plot"]) == 0
    mine = tmp_path / "notes.yaml"
    mine.write_text("my notes\n")
    args = ["tune", "--bits", "4", "--diagnosis", str(diag / "diagnose.json"), "--out", str(mine)]
    assert main(args) == 2
    assert "not a YAML written by kvq tune" in capsys.readouterr().err
    assert mine.read_text() == "my notes\n"
    assert main(["tune", "--bits", "3", "--model", str(tiny_dir), "--out", str(mine)]) == 2
    assert mine.read_text() == "my notes\n"  # refused before the diagnosis ran
    assert main([*args, "--force"]) == 0
    assert mine.read_text().startswith("# kvq tune:")
    assert main(args) == 0  # kvq tune's own YAML is replaced
    import kvq

    assert kvq.load(mine).label == "tuned4"
    (tmp_path / "d.yaml").mkdir()
    assert main([*args[:-1], str(tmp_path / "d.yaml")]) == 2


def test_tune_without_diagnosis_runs_diagnose_first(tmp_path, capsys):
    from kvq.cli.main import main

    assert main(["tune", "--bits", "3", "--model", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["tune", "--bits", "-1"]) == 2
    assert main(["tune", "--bits", "3", "--stress", "scale=0"]) == 2


def test_error_models_weigh_layers_differently():
    errs = [{"ptok>int2": (1.0, 1.0), "ptok>int4": (0.1, 0.1), "pchan>int3": (0.5, 0.5),
             "none": (0.0, 0.0)}] * 2
    d = _diagnosis(errs, weights=[10.0, 0.01])
    residual, attention = allocate(d, 3.25, "residual"), allocate(d, 3.25)

    def cost(choices, weighted):
        return sum((d["layers"][c.layer]["weight"] if weighted else 1.0)
                   * d["layers"][c.layer]["errors"][c.role][c.spec]["energy"] for c in choices)

    assert [c.spec for c in residual if c.layer == 1] == ["ptok>int2", "ptok>int2"]
    assert cost(residual, True) <= cost(attention, True)  # each optimal for its own model
    assert cost(attention, False) <= cost(residual, False)
    with pytest.raises(EvalError, match="--error-model"):
        allocate(d, 3.0, "bogus")
