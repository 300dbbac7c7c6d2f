"""Invertible transforms applied before the quantizer (one per file)."""

from kvq.transforms.base import Transform
from kvq.transforms.nsep import NormSeparation
from kvq.transforms.rot import Rotation

__all__ = ["NormSeparation", "Rotation", "Transform"]
