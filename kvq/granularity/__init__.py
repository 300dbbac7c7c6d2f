"""Granularities: which elements share one scale (and zero point)."""

from kvq.granularity.base import Granularity
from kvq.granularity.group import Group
from kvq.granularity.pchan import PerChannel
from kvq.granularity.phead import PerHead
from kvq.granularity.ptok import PerToken

__all__ = ["Granularity", "Group", "PerChannel", "PerHead", "PerToken"]
