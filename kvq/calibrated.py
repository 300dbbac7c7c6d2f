"""Steps whose parameters were fitted offline and live in a codebook file (``source=FILE#NAME``).

:class:`Calibrated` is the base of such steps (``nuq``, ``klt``, ``alloc``). When the step is
built it resolves the file (relative to the YAML that names it, see :mod:`kvq.codebooks`) and
takes ONE snapshot of it (:func:`kvq.codebooks.snapshot`): the bytes are read and hashed once,
the step checks its tensors ``NAME`` / ``NAME.<suffix>`` and from then on uses only the
snapshot (one copy per device); a file that changes on disk later is never read again. The
step records the file's sha256 (``sha256=``) and its absolute path in ``source``, so a config
written back (``to_dict``, ``save``, ``to_spec``) names the same file and refuses it once its
content changed. It also broadcasts per-KV-head tensors over the blocks the cache folds into the
head axis and refuses a model of another geometry.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import PrivateAttr, ValidationError, field_validator, model_validator

from kvq import codebooks
from kvq.errors import KVQError, SpecError, shorten
from kvq.spec.step import Step

_SPEC_UNSAFE = re.compile(r"[,()=>;\s]")


class Calibrated(Step):
    """Base of steps with a ``source: str | None`` field (mix in before Transform/Quantizer).

    Subclasses set ``calibrated_by`` (the recipe that fits them, for error messages) and
    implement :meth:`load_tensors` (check their tensors; called once at build time).
    ``sha256``: the hex digest the file must have (recorded by ``kvq calibrate``; filled in
    from the file when not given).
    """

    calibrated_by: ClassVar[str] = "kvq calibrate"
    needs: ClassVar[str] = "fitted parameters"  # what a step without ``source`` lacks
    _path: str = PrivateAttr(default="")
    _artifact: codebooks.Artifact | None = PrivateAttr(default=None)

    @field_validator("sha256", mode="before", check_fields=False)
    @classmethod
    def _digest(cls, value):
        if value is not None and not (isinstance(value, str)
                                      and re.fullmatch(r"[0-9a-f]{64}", value)):
            raise SpecError(f"sha256={shorten(value)} is not 64 lowercase hex digits",
                            suggestion="leave it out, or copy it from the YAML `kvq calibrate` "
                                       "wrote")
        return value

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

    def uses_source(self) -> bool:
        """Whether this step reads its file (steps whose file is optional override it)."""
        return True

    @model_validator(mode="after")
    def _load(self):
        name = self.spec_name()
        if not self.uses_source():
            return self
        if self.source is None:
            raise SpecError(f"{name} needs {self.needs}: {name}(...,source=FILE#NAME)",
                            suggestion=f"`{self.calibrated_by}` writes them with a YAML config "
                                       "that uses them")
        if _SPEC_UNSAFE.search(self.source):
            raise SpecError(f"reference {self.source[:200]!r} contains a space or one of "
                            ", ( ) = > ; which spec strings cannot hold",
                            suggestion="rename the file")
        file, ref = codebooks.split_ref(self.source)
        path = codebooks.resolve(file)
        self._artifact = codebooks.snapshot(path, self.sha256)
        self._path = str(path)
        self.load_tensors()
        # pin what was read: the absolute path (when a spec string can hold it) and the hash
        if not _SPEC_UNSAFE.search(str(path)):
            self.__dict__["source"] = f"{path}#{ref}"
        self.__dict__["sha256"] = self._artifact.sha256
        return self

    def load_tensors(self) -> None:
        """Check the step's tensors (raise :class:`SpecError` naming the file)."""
        raise NotImplementedError

    @property
    def file(self) -> Path:
        """The resolved file."""
        return Path(self._path)

    @property
    def where(self) -> str:
        """The resolved file, for messages (bounded)."""
        return shorten(self._path, 300)

    @property
    def artifact(self) -> codebooks.Artifact:
        """The snapshot of the file taken when the step was built (shared: do not modify)."""
        return self._artifact

    @property
    def calibration(self) -> dict[str, str]:
        """Metadata of the file (model, layers, kv_heads, head_dim, corpus, ...): a copy."""
        return dict(self._artifact.meta)

    @property
    def ref(self) -> str:
        """NAME of ``source=FILE#NAME``."""
        return codebooks.split_ref(self.source)[1]

    def shared(self, suffix: str, device=None) -> torch.Tensor:
        """The snapshot's fp32 tensor ``NAME.suffix`` on ``device`` (shared: do not modify)."""
        key = f"{self.ref}.{suffix}"
        if key not in self._artifact.tensors:
            raise SpecError(f"{self.spec_name()}: {key!r} is not in {self.where}",
                            suggestion=f"use a file written by `{self.calibrated_by}`")
        return self._artifact.tensor(key, device)

    def tensor(self, suffix: str, device=None) -> torch.Tensor:
        """A copy of the fp32 tensor ``NAME.suffix`` (SpecError when it is missing)."""
        return self.shared(suffix).to(device, copy=True)

    def per_head(self, t: torch.Tensor, heads_in_x: int) -> torch.Tensor:
        """(kv_heads, ...) -> (kv_heads * n, ...): x holds n blocks per head folded head-major
        (as :class:`kvq.hf.KVQCache` quantizes; n = 1 for plain K/V)."""
        heads = t.shape[0]
        if heads_in_x % heads:
            raise KVQError(f"{self.spec_name()} in {self.where} was fitted for {heads} kv heads, "
                           f"but the K/V have {heads_in_x} heads; use the file calibrated for "
                           "this model")
        return t.repeat_interleave(heads_in_x // heads, 0)

    def fitted_heads(self) -> int | None:
        """kv heads the step's per-head tensors were fitted for (None: nothing per head)."""
        return None

    def check_model(self, num_layers: int, head_dim: int, kv_heads: int | None = None) -> None:
        if self._artifact is None:  # a step that reads no file (see uses_source)
            return
        meta = self.calibration
        heads = self.fitted_heads()
        if heads is None and "kv_heads" in meta:
            heads = meta["kv_heads"]
        for value, fitted in ((num_layers, meta.get("num_layers")),
                              (head_dim, meta.get("head_dim")), (kv_heads, heads)):
            if value is not None and fitted is not None and str(fitted) != str(value):
                raise SpecError(
                    f"{self.where} was calibrated for {meta.get('model', 'another model')} "
                    f"({meta.get('num_layers')} layers, {heads or '?'} kv heads, head_dim "
                    f"{meta.get('head_dim')}), but this model has {num_layers} layers, "
                    f"{kv_heads or '?'} kv heads, head_dim {head_dim}",
                    suggestion=f"run `{self.calibrated_by}` for this model")


def check(cond: bool, step, what: str) -> None:
    """Raise the SpecError of a corrupt file unless ``cond``."""
    if not cond:
        raise SpecError(f"{step.spec_name()}: {what} in {step.where} (corrupt or foreign file?)",
                        suggestion="run `kvq calibrate` again to write a fresh file")


_LAYER_REF = re.compile(r"L(\d+)\.([kv])(?:\.|$)")


def check_layers(cfg, source: str = "config") -> None:
    """Refuse a config that uses a per-layer calibration file (tensors ``L{i}.k`` / ``L{i}.v``,
    as ``kvq calibrate`` writes) with another layer's tensors on some layer: what a truncated
    YAML does (the layers it lost fall back to layer 0's pipelines). Every layer the file's
    metadata records (``num_layers``) is checked."""
    done: set[tuple] = set()
    for p in cfg.pipelines():
        for step in p.steps:
            art = step.artifact if isinstance(step, Calibrated) else None
            if art is None or (art.path, art.sha256) in done:
                continue
            done.add((art.path, art.sha256))
            n = art.meta.get("num_layers", "")
            per_layer = any(_LAYER_REF.match(k) for k in art.tensors)
            if not (per_layer and n.isdigit()):
                continue
            skipped = cfg.skipped(int(n)) if cfg.skip else set()
            for i in range(int(n)):
                if i in skipped:
                    continue
                for role, pipe in zip("kv", cfg.for_layer(i, int(n))):
                    for s in pipe.steps:
                        if not isinstance(s, Calibrated) or s.artifact != art:
                            continue
                        m = _LAYER_REF.match(s.ref)
                        if m and (int(m.group(1)), m.group(2)) != (i, role):
                            names = {"k": "keys", "v": "values"}
                            raise SpecError(
                                f"{source}: layer {i} {names[role]} use {s.ref!r} of "
                                f"{shorten(str(art.path), 300)}, which was fitted for layer "
                                f"{m.group(1)} {names[m.group(2)]} (the file records {n} "
                                "layers: a truncated or edited YAML?)",
                                suggestion="use the YAML `kvq calibrate` wrote with this file, or "
                                           "calibrate again")
