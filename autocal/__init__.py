"""autocal: zero-config calibration modules for Mixture-of-Experts models.

autocal records an MoE block's forward, detects its router, top-k, dispatch and
packed experts, and synthesizes a calibration module in which every token
reaches every expert while the block's output stays the original's.
"""

from . import errors
from .api import calibration_context, convert, restore, set_calibration_chunk_size, synthesize
from .coverage import Coverage, coverage
from .errors import AutocalError
from .explain import BlockReport, Report, explain
from .registry import MoECalibrationModule
from .sharing import shared_input_groups
from .unconverted import unconverted
from .verify import Verification

__all__ = [
    "AutocalError",
    "BlockReport",
    "Coverage",
    "Report",
    "Verification",
    "MoECalibrationModule",
    "calibration_context",
    "convert",
    "coverage",
    "errors",
    "explain",
    "restore",
    "set_calibration_chunk_size",
    "shared_input_groups",
    "synthesize",
    "unconverted",
]

__version__ = "0.1.0"
