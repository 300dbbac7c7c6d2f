"""``kvq tune``: per-layer K/V pipelines and bit widths under a bits/element budget -> YAML."""

from __future__ import annotations

import argparse

from kvq.cli.diagnose import add_common, settings_from

EXAMPLES = """examples:
  kvq tune --bits 3 --out tuned3.yaml                 # diagnose (every width), then allocate
  kvq diagnose --bits all --out diag/ && kvq tune --bits 4 --diagnosis diag/diagnose.json
  kvq compare --pipelines tuned3.yaml,kivi2,naive2 --context 2048 --protocols teacher-forced
  lm_eval --model kvq_hf --model_args pretrained=smollm2,kv=tuned3.yaml --tasks ...

The budget is the mean stored bits per K/V element (metadata included, blocks of --block
tokens), exactly as KVConfig.bits_per_element and kvq compare's bits/elt column report it.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="choose a pipeline and bit width per layer (K and V) under a bit budget",
        description="Assign every layer's keys and values a candidate pipeline so that the mean "
        "stored bits/element is at most --bits and the predicted error (from kvq diagnose) is "
        "smallest; write a KVConfig YAML with per-layer overrides.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bits", type=float, required=True, metavar="B",
                   help="budget: mean stored bits per K/V element (e.g. 3 or 4.0)")
    p.add_argument("--diagnosis", metavar="JSON",
                   help="diagnose.json to reuse (from kvq diagnose --bits all); default: run "
                   "the diagnosis now with every registered preset")
    p.add_argument("--error-model", choices=("attention", "residual"), default="attention",
                   help="attention (default): sum of the layers' squared relative attention "
                   "errors; residual: each weighted by the layer's weight in the residual stream")
    p.add_argument("--name", help="config name in the YAML (default tuned<B>)")
    p.add_argument("--out", default=None, help="YAML to write (default tuned<B>.yaml; a file "
                   "kvq tune did not write is never overwritten without --force)")
    p.add_argument("--force", action="store_true",
                   help="overwrite --out even if it is not a YAML written by kvq tune")
    add_common(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from kvq.cli.diagnose import set_threads
    from kvq.eval.artifact import make_folder
    from kvq.eval.tune import check_budget, check_out, read_diagnosis, tune, write_config

    check_budget(args.bits)
    out = Path(args.out or f"tuned{args.bits:g}.yaml")
    check_out(out, args.force)
    make_folder(out.parent)
    if args.diagnosis:
        _refuse_diagnosis_options(args)
        diagnosis = read_diagnosis(Path(args.diagnosis))
    else:
        from kvq.eval.diagnose import run as diagnose

        settings = settings_from(args, None)
        settings.validate()
        set_threads(args.threads)
        diagnosis = diagnose(settings, progress=not args.quiet)
    cfg, report = tune(diagnosis, args.bits, args.name, args.error_model)
    write_config(cfg, out, args.bits)
    print(summary(cfg, report))
    print(f"wrote {out}")
    return 0


def _refuse_diagnosis_options(args) -> None:
    """``--diagnosis`` reuses a finished diagnosis: options that would change it are refused,
    not silently ignored."""
    import argparse

    from kvq.eval.errors import EvalError

    defaults = argparse.ArgumentParser()
    add_common(defaults)
    given = [f"--{name.replace('_', '-')}" for name in
             ("model", "corpus", "pipelines", "context", "windows", "queries", "block", "stress",
              "device", "threads")
             if getattr(args, name) != defaults.get_default(name)]
    if given:
        raise EvalError(f"{', '.join(given)} would change the diagnosis, but --diagnosis reuses "
                        "a finished one; run kvq diagnose with them, or leave out --diagnosis")


def summary(cfg, report: dict) -> str:
    from kvq.eval.report import _f, _table

    lines = [f"{cfg.label}: {report['bits_per_element']:.4f} bits/element (budget "
             f"{report['budget']:g}), predicted error {report['predicted_error']:.4f}", ""]
    rows = []
    by_layer: dict = {}
    for c in report["choices"]:
        by_layer.setdefault(c["layer"], {})[c["role"]] = c
    for layer, cs in sorted(by_layer.items()):
        rows.append([layer, cs["keys"]["spec"], _f(cs["keys"]["bits"], 2), cs["values"]["spec"],
                     _f(cs["values"]["bits"], 2)])
    lines.append(_table(["layer", "keys", "bits", "values", "bits"], rows))
    uni = sorted(report["uniform"].items(), key=lambda kv: kv[1]["predicted_error"])
    if uni:
        lines += ["", "Uniform presets within the budget (predicted error):", ""]
        lines.append(_table(["preset", "bits/elt", "predicted error"],
                            [[n, _f(u["bits_per_element"], 2), _f(u["predicted_error"], 4)]
                             for n, u in uni]))
    return "\n".join(lines)
