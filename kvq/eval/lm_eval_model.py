"""``kvq_hf``: lm-evaluation-harness's HF model with every forward and ``generate`` going through
a fresh :class:`kvq.hf.KVQCache`.

.. code-block:: bash

    lm_eval --model kvq_hf --model_args 'pretrained=smollm2,kv=nsep>pchan>int4' --tasks TASK

Model args on top of ``hf``'s: ``kv=`` (spec, preset or YAML/JSON path, keys and values),
``keys=`` / ``values=`` (override one side; ``none`` keeps that side exact),
``prefill=quantized|exact`` (default ``quantized``: loglikelihood forwards see quantized K/V,
otherwise they would measure nothing),
``residual=`` and ``block=`` (cache options), ``sinks=N`` (first N real tokens exact) and
``key_rope=pre`` (keys quantized before RoPE; both also settable in the ``kv=`` YAML).
``pretrained=smollm2`` is kvq's embedded default model. The pipeline, its spec and its
bits/element are added to the results' ``config``.
Loglikelihood batches are right-padded by lm-eval, so pad positions would enter per-channel
statistics: ``batch_size`` other than 1 (or ``auto``) is refused. lm-eval splits
``--model_args`` on commas, so a spec containing one is refused with a pointer to presets and
YAML files.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (built-in models register first; see kvq.eval.lm_eval_hook)
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from kvq.eval.caches import geometry, make_cache
from kvq.hf.compat import cache_arg, cache_kwargs


def _int_option(name: str, value) -> int:
    """An integer model arg (lm-eval passes ``--model_args`` values as strings or numbers)."""
    from kvq.errors import shorten
    from kvq.eval.errors import EvalError

    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise EvalError(f"kvq_hf model arg {name}={shorten(value)}: expected a whole number of "
                    f"tokens, e.g. {name}=128")


_UNSET = object()  # a pipeline arg not given (lm-eval turns a given ``none`` into None)


def _pipeline_option(name: str, value):
    """``kv=`` / ``keys=`` / ``values=`` as given: None when absent, ``"none"`` for ``none``
    (lm-eval parses ``values=none`` to Python None), a string otherwise; lm-eval's other
    conversions (``true`` -> True, ``8`` -> 8) are refused."""
    from kvq.errors import shorten
    from kvq.eval.errors import EvalError

    if value is _UNSET:
        return None
    if value is None:
        return "none"
    if isinstance(value, str):
        if value.count("(") > value.count(")"):
            raise EvalError(
                f"kvq_hf model arg {name}={shorten(value)} was cut at a comma: lm-eval splits "
                "--model_args on commas, so a spec with one (group(32,token), "
                "int4(dtype=fp32,...)) cannot be given there; use a preset name (kvq list "
                f"presets), a spec without commas, or a YAML file: {name}=path/to/kv.yaml")
        return value
    if isinstance(value, _config_types()):  # Python callers may pass built objects
        return value
    raise EvalError(f"kvq_hf model arg {name}={shorten(value)}: expected a spec, a preset name "
                    f"or a YAML/JSON path, e.g. {name}=nsep>pchan>int4")


def _config_types() -> tuple:
    import kvq

    return (kvq.Pipeline, kvq.KVConfig)


def _check_split_args(kwargs: dict) -> None:
    """A model arg whose name is no identifier (``token)>int4``) is the tail of a spec that
    lm-eval cut at a comma."""
    from kvq.errors import shorten
    from kvq.eval.errors import EvalError

    for key in kwargs:
        if not (isinstance(key, str) and key.isidentifier()):
            raise EvalError(
                f"kvq_hf model arg {shorten(key)} is not an argument name: lm-eval splits "
                "--model_args on commas, so a kv=/keys=/values= spec with a comma was cut "
                "there; use a preset name (kvq list presets), a spec without commas, or a "
                "YAML file: kv=path/to/kv.yaml")


def _check_batch_size(batch_size) -> None:
    from kvq.errors import shorten
    from kvq.eval.errors import EvalError

    if str(batch_size).strip() != "1":
        raise EvalError(f"kvq_hf batch_size={shorten(batch_size)}: only batch_size=1 is "
                        "supported; lm-eval right-pads loglikelihood batches and the pad "
                        "positions would enter kvq's per-channel (token-axis) statistics")


class _CompleteCheckpoint:
    """Stands in for HFLM's ``AUTO_MODEL_CLASS`` while it loads: the same ``from_pretrained``,
    then :func:`kvq.eval.models.check_complete` on the missing weights it reports."""

    def __init__(self, auto, pretrained: str):
        self.auto, self.pretrained = auto, pretrained

    def from_pretrained(self, *args, **kwargs):
        from kvq.eval import models

        model, info = self.auto.from_pretrained(*args, output_loading_info=True, **kwargs)
        models.check_complete(self.pretrained, self.pretrained, info)
        return model


@register_model("kvq_hf")
class KVQLM(HFLM):
    """HFLM with a quantized K/V cache (see the module docstring for the extra model args)."""

    def __init__(
        self,
        pretrained="smollm2",
        kv=_UNSET,
        keys=_UNSET,
        values=_UNSET,
        prefill: str = "quantized",
        residual: int = 128,
        block: int = 32,
        sinks=None,
        key_rope=None,
        **kwargs,
    ):
        import kvq
        from kvq.eval import models

        residual, block = _int_option("residual", residual), _int_option("block", block)
        sinks = None if sinks is None else _int_option("sinks", sinks)  # sinks=true is no count
        kv, keys, values = (_pipeline_option(n, v) for n, v in
                            (("kv", kv), ("keys", keys), ("values", values)))
        _check_split_args(kwargs)
        _check_batch_size(kwargs.get("batch_size", 1))
        if isinstance(pretrained, str):
            pretrained, extra = models.resolve(pretrained)
            for key, value in extra.items():
                kwargs.setdefault(key, value)
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, **kwargs)
        cfg = kvq.kv("fp16" if kv is None else kv)
        if keys is not None or values is not None:
            sides = {
                k: kvq.build(v) for k, v in (("keys", keys), ("values", values)) if v is not None
            }
            cfg = cfg.model_copy(update=sides | {"name": None})
        if sinks is not None or key_rope is not None:
            data = cfg.to_dict() | {"name": None, "keys": cfg.keys.to_spec()}
            data["key_rope"] = cfg.key_rope if key_rope is None else key_rope
            if sinks is not None:
                data["sinks"] = sinks
            cfg = kvq.KVConfig.from_dict(data, source="model_args")
        self.kv_config = cfg
        self.cache_options = dict(prefill=prefill, residual=residual, block=block)
        make_cache(cfg, self._model, **self.cache_options)  # validates now, not mid-run

    def _create_model(self, pretrained, *args, **kwargs):
        """HFLM's loading, refusing a checkpoint that lacks weights as ``kvq compare`` does
        (transformers would fill them with random values and the scores would be noise)."""
        if not isinstance(pretrained, str):
            return super()._create_model(pretrained, *args, **kwargs)
        auto = self.AUTO_MODEL_CLASS
        self.AUTO_MODEL_CLASS = _CompleteCheckpoint(auto, pretrained)
        try:
            return super()._create_model(pretrained, *args, **kwargs)
        finally:
            self.AUTO_MODEL_CLASS = auto

    def new_cache(self):
        """A fresh cache for one forward or one ``generate`` call."""
        return make_cache(self.kv_config, self._model, **self.cache_options)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if attn_mask is not None or labels is not None:  # seq2seq: no decoder cache to replace
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with torch.no_grad():
            kw = cache_kwargs(self.model, self.new_cache())
            return self.model(inps, use_cache=True, **kw).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        generation_kwargs[cache_arg(self.model)] = self.new_cache()
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        layers, _, head_dim = geometry(self._model.config)
        cfg = self.kv_config
        return super().get_model_info() | {
            "kvq_pipeline": cfg.label,
            "kvq_config": cfg.to_dict(),
            # statistics over tokens are taken per block of `block` tokens in the cache
            "kvq_bits_per_element": round(
                cfg.bits_per_element(head_dim, self.cache_options["block"], layers), 4
            ),
            "kvq_cache": self.cache_options,
        }
