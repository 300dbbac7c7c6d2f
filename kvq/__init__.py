"""kvq: composable, measurable KV-cache quantization for LLMs.

>>> import kvq
>>> p = kvq.build("nsep>pchan>int4")
>>> p.bits_per_element(head_dim=128, seq=4096)  # doctest: +ELLIPSIS
4.12...
"""

from kvq.errors import BackendError, KVQError, NumericsError, SpecError
from kvq.hookspecs import hookimpl
from kvq.kvconfig import KVConfig
from kvq.loading import build, kv, load
from kvq.pipeline import Pipeline
from kvq.presets import presets
from kvq.quantized import QuantizedTensor
from kvq.spec import Step

__version__ = "0.1.0"



def __getattr__(name: str):
    """``kvq.hf`` and ``kvq.eval`` import on first use (they pull in transformers / lm-eval)."""
    if name in ("hf", "eval"):
        import importlib

        return importlib.import_module(f"kvq.{name}")
    raise AttributeError(f"module 'kvq' has no attribute {name!r}")


__all__ = ["BackendError", "KVConfig", "KVQError", "NumericsError", "Pipeline", "QuantizedTensor",
           "SpecError", "Step", "build", "hookimpl", "kv", "load", "presets"]
