"""``kvq diagnose``: per-layer statistics, attention-output errors and a classification."""

from kvq.eval.diagnose.runner import Settings, run

__all__ = ["Settings", "run"]
