"""The built-in components, registered through the same hooks third-party plugins use."""

from __future__ import annotations

from kvq.hookspecs import hookimpl

STEPS = {
    "nsep": ("kvq.transforms.nsep:NormSeparation", None),
    "rot": ("kvq.transforms.rot:Rotation", None),
    "sparse": ("kvq.transforms.sparse:Sparse", None),
    "klt": ("kvq.transforms.klt:KLT", None),
    "ptok": ("kvq.granularity.ptok:PerToken", None),
    "pchan": ("kvq.granularity.pchan:PerChannel", None),
    "group": ("kvq.granularity.group:Group", None),
    "phead": ("kvq.granularity.phead:PerHead", None),
    "int": ("kvq.quantizers.integer:IntQuantizer", None),
    "int2": ("kvq.quantizers.integer:IntQuantizer", {"bits": 2}),
    "int3": ("kvq.quantizers.integer:IntQuantizer", {"bits": 3}),
    "int4": ("kvq.quantizers.integer:IntQuantizer", {"bits": 4}),
    "int8": ("kvq.quantizers.integer:IntQuantizer", {"bits": 8}),
    "q4_0": ("kvq.quantizers.ggml:Q4_0", None),
    "q4_1": ("kvq.quantizers.ggml:Q4_1", None),
    "q8_0": ("kvq.quantizers.ggml:Q8_0", None),
    "nuq": ("kvq.quantizers.nuq:Nuq", None),
    "alloc": ("kvq.quantizers.alloc:Alloc", None),
    "none": ("kvq.quantizers.none:NoQuantizer", None),
    "fp4": ("kvq.quantizers.fp4:FP4Quantizer", None),
    "fp8": ("kvq.quantizers.fp8:FP8Quantizer", None),
    "lloyd": ("kvq.quantizers.lloyd:Lloyd", None),
    "lloyd2": ("kvq.quantizers.lloyd:Lloyd", {"bits": 2}),
    "lloyd3": ("kvq.quantizers.lloyd:Lloyd", {"bits": 3}),
    "lloyd4": ("kvq.quantizers.lloyd:Lloyd", {"bits": 4}),
}

BACKENDS = {
    "torch": "kvq.backends.torch_backend:TorchBackend",
    "triton": "kvq.backends.triton.backend:TritonBackend",
}


@hookimpl
def kvq_register_steps(register):
    for name, (target, defaults) in STEPS.items():
        register(name, target, defaults=defaults)


@hookimpl
def kvq_register_backends(register):
    for name, target in BACKENDS.items():
        register(name, target)


@hookimpl
def kvq_register_presets(register):
    from kvq.presets import builtin_presets

    for name, factory in builtin_presets().items():
        register(name, factory)
