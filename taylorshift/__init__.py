"""TaylorShift attention (Nauen, Palacio, Dengel, arXiv 2403.02920) for PyTorch."""

from taylorshift import reference
from taylorshift._extension import available as extension_available
from taylorshift.crossover import crossover, flops, paper_thresholds
from taylorshift.decoding import CausalState
from taylorshift.functional import taylor_shift_attention
from taylorshift.modules import TaylorShiftAttention, replace_attention, restore_attention

__all__ = [
    "CausalState",
    "TaylorShiftAttention",
    "crossover",
    "extension_available",
    "flops",
    "paper_thresholds",
    "reference",
    "replace_attention",
    "restore_attention",
    "taylor_shift_attention",
]
__version__ = "0.1.0"
