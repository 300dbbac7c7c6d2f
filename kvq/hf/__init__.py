"""kvq for Hugging Face transformers: a quantize-on-write KV cache.

``KVQCache`` builds on transformers' own ``Cache`` / ``DynamicLayer`` and plugs in through
``cache=`` (``past_key_values=`` before transformers 5.24; :func:`cache_kwargs` picks the name).
Nothing in transformers is patched; :func:`enable_fast_attention` registers the ``"kvq"``
attention implementation (decode attention over the packed blocks) and switches a model to it.
"""

from kvq.hf.attention import enable_fast_attention
from kvq.hf.cache import KVQCache
from kvq.hf.compat import cache_arg, cache_kwargs
from kvq.hf.coverage import fast_path_reason
from kvq.hf.geometry import KVGeometry, kv_geometry
from kvq.hf.layer import KVQLayer
from kvq.hf.memory import LayerMemory, MemoryReport, memory_report

__all__ = ["KVGeometry", "KVQCache", "KVQLayer", "LayerMemory", "MemoryReport", "cache_arg",
           "cache_kwargs", "enable_fast_attention", "fast_path_reason", "kv_geometry",
           "memory_report"]
