"""kvq calibrate: artifact round trip through kvq.load / KVQCache / kvq compare, and its errors."""

import json

import pytest
import torch

import kvq
from kvq.cli.main import main


@pytest.fixture(scope="module")
def artifact(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "k3.yaml"
    rc = main(["calibrate", "--quiet", "--model", str(tiny_dir), "--corpus", str(text_file),
               "--tokens", "128", "--context", "64", "--block", "16", "--out", str(out)])
    assert rc == 0
    return out


def test_writes_one_yaml_with_its_safetensors(artifact, tiny):
    model, _ = tiny
    cfg = kvq.load(artifact)
    assert artifact.with_suffix(".safetensors").is_file()
    assert cfg.name == "k3" and cfg.key_rope == "pre" and cfg.sinks == 1
    assert sorted(cfg.layers) == [1]  # layer 0 is the default; the tiny model has 2 layers
    k0, v0 = cfg.for_layer(0)
    k1, _ = cfg.for_layer(1)
    assert k0.quantizer.source.endswith("#L0.k") and k1.quantizer.source.endswith("#L1.k")
    assert v0.quantizer.source.endswith("#L0.v") and k0.quantizer.scale == "static"
    meta = k0.quantizer.calibration
    assert meta["num_layers"] == "2" and meta["corpus"].endswith("richard.txt")
    assert meta["key_rope"] == "pre" and meta["sensitivity"] == "fisher"
    lv = k0.quantizer.levels(16)
    assert lv.shape == (8,) and (lv[1:] > lv[:-1]).all()
    from kvq.codebooks import relative_to

    with relative_to(artifact.parent):  # relative codebook paths: relative to the YAML's dir
        again = kvq.KVConfig.from_dict(cfg.to_dict())
    assert again == cfg

    from kvq.hf import KVQCache

    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        out = model(ids, past_key_values=KVQCache(cfg, model, residual=0, block=16)).logits
    rel = (out - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and 0 < rel < 0.5


def test_compare_runs_the_calibrated_yaml(artifact, tiny_dir, text_file, tmp_path):
    out = tmp_path / "cmp"
    rc = main(["compare", "--quiet", "--no-plot", "--model", str(tiny_dir), "--corpus",
               str(text_file), "--pipelines", f"kvquant3,{artifact}", "--context", "64",
               "--tokens", "64", "--block", "16", "--protocols", "teacher-forced", "--out",
               str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["pipeline"] for r in rows} == {"fp16", "kvquant3", "k3"}
    assert all(r["value"] > 0 for r in rows)
    rc = main(["compare", "--quiet", "--model", str(tiny_dir), "--corpus", str(text_file),
               "--pipelines", str(artifact), "--bits", "2", "--context", "64", "--out",
               str(out)])
    assert rc == 2  # nuq levels are fitted at one width: --bits cannot rewrite them


def test_missing_corrupt_and_mismatched_artifacts(artifact, tmp_path, tiny):
    import shutil

    copy = tmp_path / "k3.yaml"
    shutil.copy(artifact, copy)
    with pytest.raises(kvq.SpecError, match="does not exist"):
        kvq.load(copy)  # the safetensors file did not come along
    copy.with_suffix(".safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(kvq.SpecError, match="not a readable safetensors"):
        kvq.load(copy)
    shutil.copy(artifact.with_suffix(".safetensors"), copy.with_suffix(".safetensors"))
    copy.write_text(copy.read_text().replace("nuq(3", "nuq(2"))
    with pytest.raises(kvq.SpecError, match="2 bits need 4"):
        kvq.load(copy)

    import transformers as tf

    from kvq.hf import KVQCache

    model, _ = tiny
    cfg = kvq.load(artifact)
    other = tf.LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 3})
    with pytest.raises(kvq.SpecError, match="calibrated for .*2 layers.*3 layers"):
        KVQCache(cfg, other)


@pytest.mark.parametrize("argv, message", [
    (["--corpus", "shakespeare"], "evaluation split"),
    (["--corpus", "shakespeare:eval"], "evaluation split"),
    (["--corpus", "prose"], "Use prose:calib"),
    (["--corpus", "code:eval"], "Use code:calib"),
    (["--recipe", "nope"], "unknown recipe"),
    (["--out", "x.json"], "must end in .yaml"),
    (["--keys", "pchan>int3", "--values", "ptok>int3"], "nothing to calibrate"),
    (["--keys", "pchan>nuq(3,source=a#b)", "--values", "ptok>int3"], "must end with one nuq"),
    (["--sinks", "-1"], "--sinks"),
    (["--bits", "3"], "needs klt>alloc(b) recipes"),
    (["--recipe", "tc3", "--bits", "0"], "--bits must be positive"),
    (["--recipe", "tc3", "--levels", "uniform"], "--levels uniform does not apply"),
    (["--recipe", "tc3", "--allocate", "measured"], "give --bits B"),
    (["--recipe", "tc3", "--bits", "3", "--measure-windows", "0"], "--measure-windows"),
])
def test_bad_input_exits_2_before_loading_a_model(argv, message, capsys):
    assert main(["calibrate", "--model", "/nonexistent/model", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def tc_artifact(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tc") / "tc.yaml"
    rc = main(["calibrate", "--quiet", "--recipe", "tc3", "--bits", "3.6", "--model",
               str(tiny_dir), "--corpus", str(text_file), "--tokens", "256", "--context", "64",
               "--out", str(out)])
    assert rc == 0
    return out


def test_transform_coding_budget_artifact(tc_artifact, tiny):
    from kvq.hf import KVQCache

    model, _ = tiny
    cfg = kvq.load(tc_artifact)
    assert cfg.key_rope == "pre" and cfg.sinks == 1
    pipes = [p for i in range(2) for p in cfg.for_layer(i)]
    assert all([s.type for s in p.steps] == ["nsep", "klt", "alloc"] for p in pipes)
    widths = [p.quantizer.bits for p in pipes]
    head_dim = model.config.head_dim
    mean = sum(w + 16 / head_dim for w in widths) / len(widths)
    assert mean <= 3.6 + 1e-9 and set(widths) <= {2, 3, 4} and len(set(widths)) > 1
    meta = pipes[0].quantizer.calibration
    assert meta["bits"] == "3.6" and meta["sensitivity"] == "fisher"
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        out = model(ids, past_key_values=KVQCache(cfg, model, residual=0, block=16)).logits
    rel = (out - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and 0 < rel < 0.5


def test_measured_allocation_spends_the_budget_where_the_divergence_is(tiny_dir, text_file,
                                                                        tmp_path, monkeypatch):
    import kvq.eval.measured_widths as mw

    seen = {}
    real = mw.measured_costs

    def spy(*args, **kwargs):
        seen.update(real(*args, **kwargs))
        return seen

    monkeypatch.setattr(mw, "measured_costs", spy)
    out = tmp_path / "m.yaml"
    rc = main(["calibrate", "--quiet", "--recipe", "tc3", "--bits", "3.6", "--allocate",
               "measured", "--measure-windows", "2", "--model", str(tiny_dir), "--corpus",
               str(text_file), "--tokens", "256", "--context", "64", "--out", str(out)])
    assert rc == 0
    cfg = kvq.load(out)
    assert len(seen) == 2 * 2 * 3 and all(v >= 0 for v in seen.values())  # KL >= 0
    chosen = {(i, r): p.quantizer.bits for i in range(2)
              for r, p in zip("kv", cfg.for_layer(i))}
    assert sum(b + 1 for b in chosen.values()) / 4 <= 3.6 + 1e-9  # head_dim 16: norm = 1 bit
    total = sum(seen[i, r, b] for (i, r), b in chosen.items())
    # the knapsack's choice is the cheapest divergence among all choices within the budget
    import itertools

    best = min(sum(seen[k[0], k[1], b] for k, b in zip(chosen, combo))
               for combo in itertools.product((2, 3, 4), repeat=4)
               if sum(b + 1 for b in combo) / 4 <= 3.6 + 1e-9)
    assert total == pytest.approx(best)
