"""``kvq export``: hand a KV configuration to the engine that serves the model.

>>> from kvq.export import export
>>> res = export("turboquant4", "vllm", model="path/to/model", out="export/")  # doctest: +SKIP
>>> res.command, res.exact                                                   # doctest: +SKIP
('vllm serve ... --kv-cache-dtype turboquant_4bit_nc', True)

One module per engine (:data:`ENGINES`); each maps a :class:`~kvq.KVConfig` exactly or refuses
with a one-line reason and the closest configuration it runs (``suggest=True`` exports that
one, ``exact=False``, and writes it as ``suggested.yaml`` for ``kvq compare``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from kvq.errors import KVQError, SpecError
from kvq.export.base import Exported, Model, Refused

#: engine name -> module (``ENGINE``, ``export(cfg, model)``)
ENGINES: dict[str, str] = {
    "vllm": "kvq.export.vllm",
    "llama.cpp": "kvq.export.llama_cpp",
    "compressed-tensors": "kvq.export.compressed_tensors",
    "modelopt": "kvq.export.modelopt",
}

__all__ = ["ENGINES", "Exported", "Model", "Refused", "export", "load_model"]


def load_model(model: str | None = None) -> Model:
    """:class:`Model` of a local model directory (``config.json``), or of the default model."""
    import json

    from kvq.eval import models
    from kvq.hf.geometry import kv_geometry

    if model in (None, "", models.DEFAULT_MODEL):
        path, name = models.default_model_dir(), models.DEFAULT_MODEL_NAME
    else:
        path = Path(model).expanduser()
        name = path.name
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise KVQError(f"--model {str(model)[:200]!r} is not a model directory with a "
                       "config.json (kvq export reads the model's own config; a .gguf needs "
                       "converting first)")
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise KVQError(f"cannot read {str(cfg_file)[:200]!r}: {str(err)[:120]}") from None
    g = kv_geometry(hf)
    return Model(name=name, num_layers=g.num_layers, kv_heads=g.kv_heads, head_dim=g.head_dim,
                 path=path, config=data)


def export(config: Any, engine: str, model: str | Model | None = None,
           out: str | Path | None = None, suggest: bool = False, force: bool = False,
           **options) -> Exported:
    """Export ``config`` (preset, spec, YAML path or KVConfig) for ``engine``.

    Raises :class:`Refused` when the engine cannot run it exactly, unless ``suggest`` (then the
    closest configuration it runs is exported, ``exact=False``). ``out``: directory to write the
    files into (see :func:`kvq.export.files.write`); ``options`` go to the engine's exporter
    (compressed-tensors: ``scales`` file).
    """
    import kvq

    if engine not in ENGINES:
        raise SpecError(f"unknown engine {str(engine)[:40]!r}",
                        suggestion="engines: " + ", ".join(ENGINES))
    mod = importlib.import_module(ENGINES[engine])
    cfg = kvq.kv(config)
    m = model if isinstance(model, Model) else load_model(model)
    if out is not None:
        from kvq.export import files

        files.check_out(Path(out), force)
    try:
        res = mod.export(cfg, m, **options)
    except Refused as err:
        if not suggest or err.closest is None:
            raise
        res = mod.export(err.closest, m, **options)
        res.exact, res.reason = False, err.reason
    res.files["kvq_config.yaml"] = _portable_yaml(res.config)
    if not res.exact:
        res.files["suggested.yaml"] = res.config.to_yaml()
    res.files["export.json"] = _summary(res, cfg)
    if out is not None:
        from kvq.export import files

        files.write(Path(out), res.files, res.copies, force)
    return res


def _portable_yaml(cfg) -> str:
    """``cfg`` as YAML with calibrated files referenced by absolute path (the YAML is written
    into ``--out``, away from the file its relative references were resolved against)."""
    import re

    text = cfg.to_yaml()
    for p in cfg.pipelines():
        for step in p.steps:
            src, path = getattr(step, "source", None), getattr(step, "_path", "")
            if src and path:
                absolute = f"{path}#{src.rpartition('#')[2]}"
                text = re.sub(re.escape(f"source={src}") + r"(?=[,)])",
                              lambda _m, a=absolute: f"source={a}", text)
    return text


def _summary(res: Exported, source) -> str:
    import json

    return json.dumps({"engine": res.engine, "exact": res.exact, "reason": res.reason,
                       "source": source.to_dict(), "exported": res.config.to_dict(),
                       "command": res.command, "engine_args": res.engine_args,
                       "notes": res.notes}, indent=2) + "\n"
