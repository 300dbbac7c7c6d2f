"""kvq for Hugging Face transformers: a quantize-on-write KV cache.

``KVQCache`` builds on transformers' own ``Cache`` / ``DynamicLayer`` and plugs in through
``past_key_values=``; nothing in transformers is patched.
"""

from kvq.hf.cache import KVQCache
from kvq.hf.geometry import KVGeometry, kv_geometry
from kvq.hf.layer import KVQLayer
from kvq.hf.memory import LayerMemory, MemoryReport, memory_report

__all__ = ["KVGeometry", "KVQCache", "KVQLayer", "LayerMemory", "MemoryReport", "kv_geometry",
           "memory_report"]
