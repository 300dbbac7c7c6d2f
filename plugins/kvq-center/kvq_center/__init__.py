"""Example kvq plugin: per-channel mean centering."""

from kvq_center.center import Center

__all__ = ["Center"]
