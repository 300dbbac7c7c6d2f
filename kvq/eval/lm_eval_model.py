"""``kvq_hf``: lm-evaluation-harness's HF model with every forward and ``generate`` going through
a fresh :class:`kvq.hf.KVQCache`.

.. code-block:: bash

    lm_eval --model kvq_hf --model_args 'pretrained=smollm2,kv=nsep>pchan>int4' --tasks TASK

Model args on top of ``hf``'s: ``kv=`` (spec, preset or YAML/JSON path, keys and values),
``keys=`` / ``values=`` (override one side), ``prefill=quantized|exact`` (default
``quantized``: loglikelihood forwards see quantized K/V, otherwise they would measure nothing),
``residual=`` and ``block=`` (cache options), ``sinks=N`` (first N real tokens exact) and
``key_rope=pre`` (keys quantized before RoPE; both also settable in the ``kv=`` YAML).
``pretrained=smollm2`` is kvq's embedded default model. The pipeline, its spec and its
bits/element are added to the results' ``config``.
Loglikelihood batches are right-padded by lm-eval: keep ``batch_size=1`` (the default) so that
pad positions never enter per-channel statistics.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (built-in models register first; see kvq.eval.lm_eval_hook)
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from kvq.eval.caches import geometry, make_cache


@register_model("kvq_hf")
class KVQLM(HFLM):
    """HFLM with a quantized K/V cache (see the module docstring for the extra model args)."""

    def __init__(
        self,
        pretrained="smollm2",
        kv=None,
        keys=None,
        values=None,
        prefill: str = "quantized",
        residual: int = 128,
        block: int = 32,
        sinks=None,
        key_rope=None,
        **kwargs,
    ):
        import kvq
        from kvq.eval import models

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
        self.cache_options = dict(prefill=prefill, residual=int(residual), block=int(block))
        make_cache(cfg, self._model, **self.cache_options)  # validates now, not mid-run

    def new_cache(self):
        """A fresh cache for one forward or one ``generate`` call."""
        return make_cache(self.kv_config, self._model, **self.cache_options)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if attn_mask is not None or labels is not None:  # seq2seq: no decoder cache to replace
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with torch.no_grad():
            return self.model(inps, past_key_values=self.new_cache(), use_cache=True).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        generation_kwargs["past_key_values"] = self.new_cache()
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
