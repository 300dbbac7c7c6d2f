"""Steps whose parameters were fitted offline and live in a codebook file (``source=FILE#NAME``).

:class:`Calibrated` is the mixin of such steps (``klt``, ``alloc``): it checks the reference when
the step is built, resolves the file (relative to the YAML that names it, see
:mod:`kvq.codebooks`), reads the step's tensors ``NAME.<suffix>``, broadcasts per-KV-head tensors
over the blocks the cache folds into the head axis, and refuses a model of another geometry.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from pydantic import PrivateAttr, ValidationError, model_validator

from kvq import codebooks
from kvq.errors import KVQError, SpecError
from kvq.spec.step import Step


class Calibrated(Step):
    """Base of steps with a ``source: str | None`` field (mix in before Transform/Quantizer).

    Subclasses set ``calibrated_by`` (the recipe that fits them, for error messages) and
    implement :meth:`load_tensors` (read and check their tensors; called at build time).
    """

    calibrated_by: ClassVar[str] = "kvq calibrate"
    needs: ClassVar[str] = "fitted parameters"  # what a step without ``source`` lacks
    _path: str = PrivateAttr(default="")

    @classmethod
    def validated(cls, data, name):
        """As :meth:`Step.validated`, but a file problem surfaces as its own one-line error."""
        try:
            return cls.model_validate({"type": cls.model_fields["type"].default, **data})
        except ValidationError as exc:
            inner = (exc.errors()[0].get("ctx") or {}).get("error")
            if isinstance(inner, SpecError):
                raise SpecError(inner.reason, suggestion=inner.suggestion) from None
        return super().validated(data, name)

    @model_validator(mode="after")
    def _load(self):
        name = self.spec_name()
        if self.source is None:
            raise SpecError(f"{name} needs {self.needs}: {name}(...,source=FILE#NAME)",
                            suggestion=f"`{self.calibrated_by}` writes them with a YAML config "
                                       "that uses them")
        if any(c in self.source for c in ",()=>") or any(c.isspace() for c in self.source):
            raise SpecError(f"reference {self.source[:200]!r} contains a space or one of "
                            ", ( ) = > which spec strings cannot hold",
                            suggestion="rename the file")
        file, _ = codebooks.split_ref(self.source)
        self._path = str(codebooks.resolve(file))
        self.load_tensors()
        return self

    def load_tensors(self) -> None:
        """Read and check the step's tensors (raise :class:`SpecError` naming the file)."""
        raise NotImplementedError

    @property
    def file(self) -> Path:
        """The resolved file."""
        return Path(self._path)

    @property
    def calibration(self) -> dict[str, str]:
        """Metadata of the file (model, layers, head_dim, corpus, ...)."""
        return codebooks.read(self.file)[0]

    def tensor(self, suffix: str, device=None) -> torch.Tensor:
        """The fp32 tensor ``NAME.suffix`` of the file (SpecError when it is missing)."""
        name = codebooks.split_ref(self.source)[1]
        tensors = codebooks.read(self.file)[1]
        key = f"{name}.{suffix}"
        if key not in tensors:
            raise SpecError(f"{self.spec_name()}: {key!r} is not in {self._path!r}",
                            suggestion=f"use a file written by `{self.calibrated_by}`")
        return tensors[key].float().to(device)

    def per_head(self, t: torch.Tensor, heads_in_x: int) -> torch.Tensor:
        """(kv_heads, ...) -> (kv_heads * n, ...): x holds n blocks per head folded head-major
        (as :class:`kvq.hf.KVQCache` quantizes; n = 1 for plain K/V)."""
        heads = t.shape[0]
        if heads_in_x % heads:
            raise KVQError(f"{self.spec_name()} in {self._path!r} was fitted for {heads} kv heads, "
                           f"but the K/V have {heads_in_x} heads; use the file calibrated for "
                           "this model")
        return t.repeat_interleave(heads_in_x // heads, 0)

    def check_model(self, num_layers: int, head_dim: int) -> None:
        meta = self.calibration
        for key, value in {"num_layers": num_layers, "head_dim": head_dim}.items():
            if key in meta and meta[key] != str(value):
                raise SpecError(
                    f"{self._path!r} was calibrated for {meta.get('model', 'another model')} "
                    f"({meta.get('num_layers')} layers, head_dim {meta.get('head_dim')}), but "
                    f"this model has {num_layers} layers, head_dim {head_dim}",
                    suggestion=f"run `{self.calibrated_by}` for this model")


def check(cond: bool, step, what: str) -> None:
    """Raise the SpecError of a corrupt file unless ``cond``."""
    if not cond:
        raise SpecError(f"{step.spec_name()}: {what} in {step._path!r} (corrupt or foreign file?)",
                        suggestion="run `kvq calibrate` again to write a fresh file")
