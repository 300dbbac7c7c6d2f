"""Static (calibrated) scales read from a file: the ``scale=static`` option of ``fp8`` / ``fp4``.

Serving engines quantize the FP8 / NVFP4 KV cache with scales fitted offline and shipped in the
checkpoint (vLLM's ``k_scale`` / ``v_scale``, per tensor or per attention head). ``kvq
calibrate --recipe fp8-tensor`` (and ``fp8-head``, ``nvfp4``) fits them
(:mod:`kvq.static_scales`) into a codebook file (:mod:`kvq.codebooks`); a step references them as
``source=FILE#NAME`` and reads the fp32 tensor ``NAME.scale``: shape () for one scale per
tensor, (kv_heads,) for one per KV head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import PrivateAttr, ValidationError, model_validator

from kvq import codebooks
from kvq.errors import KVQError, SpecError
from kvq.spec.step import Step


class StaticScaled(Step):
    """Mixin of quantizers with ``scale: ... | "static"`` and ``source: str | None``."""

    calibrated_by: ClassVar[str] = "kvq calibrate --recipe fp8-tensor"
    _path: str = PrivateAttr(default="")

    @classmethod
    def validated(cls, data, name):
        """As :meth:`Step.validated`, but a scale/file problem is its own one-line error."""
        try:
            return cls.model_validate({"type": cls.model_fields["type"].default, **data})
        except ValidationError as exc:
            inner = (exc.errors()[0].get("ctx") or {}).get("error")
            if isinstance(inner, SpecError):
                raise SpecError(inner.reason, suggestion=inner.suggestion) from None
        return super().validated(data, name)

    @model_validator(mode="after")
    def _static_source(self):
        name = self.spec_name()
        if self.scale != "static":
            if self.source is not None:
                raise SpecError(f"{name}: source= is read only with scale=static",
                                suggestion=f"write {name}(...,scale=static,source=FILE#NAME)")
            return self
        if self.source is None:
            raise SpecError(f"{name}(scale=static) needs calibrated scales: "
                            f"{name}(...,scale=static,source=FILE#NAME)",
                            suggestion=f"`{self.calibrated_by}` writes them with a YAML config "
                                       "that uses them")
        file, _ = codebooks.split_ref(self.source)
        self._path = str(codebooks.resolve(file))
        self.static_scale()
        return self

    def static_scale(self, device=None) -> torch.Tensor:
        """The fp32 scale: () per tensor or (kv_heads,) per KV head (SpecError if corrupt)."""
        key = f"{codebooks.split_ref(self.source)[1]}.scale"
        t = codebooks.read(codebooks.resolve(self._path))[1].get(key)
        if t is None:
            raise SpecError(f"{self.spec_name()}: {key!r} is not in {self._path!r}",
                            suggestion=f"use a file written by `{self.calibrated_by}`")
        if t.dim() > 1 or t.numel() == 0 or not bool(torch.isfinite(t).all() & (t > 0).all()):
            raise SpecError(f"{self.spec_name()}: {key!r} in {self._path!r} is not a finite "
                            "positive scalar or (kv_heads,) tensor (corrupt file?)",
                            suggestion="run `kvq calibrate` again to write a fresh file")
        return t.float().to(device)

    def broadcast_scale(self, shape, device) -> torch.Tensor:
        """The scale broadcast to x (B, kv_heads * n, T, D): (1, H * n, 1, 1), head-major."""
        s = self.static_scale(device)
        if s.dim() == 0:
            return s.reshape(1, 1, 1, 1)
        if shape[1] % s.numel():
            raise KVQError(f"{self.spec_name()} scales in {self._path!r} are for {s.numel()} kv "
                           f"heads, but the K/V have {shape[1]} heads; use the file calibrated "
                           "for this model")
        return s.repeat_interleave(shape[1] // s.numel())[None, :, None, None]

    def check_model(self, num_layers: int, head_dim: int) -> None:
        if self.scale != "static":
            return
        meta = codebooks.read(codebooks.resolve(self._path))[0]
        for key, value in {"num_layers": num_layers, "head_dim": head_dim}.items():
            if key in meta and meta[key] != str(value):
                raise SpecError(
                    f"{self._path!r} was calibrated for {meta.get('model', 'another model')} "
                    f"({meta.get('num_layers')} layers, head_dim {meta.get('head_dim')}), but "
                    f"this model has {num_layers} layers, head_dim {head_dim}",
                    suggestion=f"run `{self.calibrated_by}` for this model")
