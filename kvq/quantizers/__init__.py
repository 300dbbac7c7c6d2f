"""Quantizers: the last step of every pipeline. One integer quantizer serves 2/3/4/8 bits."""

from kvq.quantizers.base import Quantizer
from kvq.quantizers.integer import IntQuantizer
from kvq.quantizers.none import NoQuantizer
from kvq.quantizers.packing import pack, packed_row_bytes, unpack

__all__ = ["IntQuantizer", "NoQuantizer", "Quantizer", "pack", "packed_row_bytes", "unpack"]
