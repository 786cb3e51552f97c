"""Channel-attention blocks: SE and its family. Imports nothing else from senet."""

from ._common import create_act, create_gate, hidden_width, list_gates, make_divisible, odd_kernel
from .bam import BAM
from .cbam import CBAM, cbam_from_timm, cbam_to_timm
from .coord import CoordAttention
from .eca import CECA, ECA
from .factory import (
    attention_blocks,
    create_attention,
    describe_attention,
    get_attention,
    is_attention,
    list_attentions,
)
from .gc import GlobalContext
from .gct import GCT
from .ge import GatherExcite, ge_param
from .se import EffectiveSE, SqueezeExcite, se_mobilenetv3, se_released
from .se_variants import SEGroupConv, SEVar1, SEVar2, SEVar3
from .sk import SelectiveKernel
from .srm import SRM
from .sse import SpatialChannelSE, SpatialSE

__all__ = [
    "BAM", "CBAM", "GCT", "SRM", "CoordAttention", "GatherExcite", "GlobalContext", "SelectiveKernel",
    "cbam_from_timm", "cbam_to_timm", "ge_param",
    "CECA", "ECA", "EffectiveSE", "SEGroupConv", "SEVar1", "SEVar2", "SEVar3", "SpatialChannelSE",
    "SpatialSE", "SqueezeExcite", "attention_blocks", "create_act", "create_attention", "create_gate",
    "describe_attention", "get_attention", "hidden_width", "is_attention", "list_attentions", "list_gates",
    "make_divisible", "odd_kernel",
    "se_mobilenetv3", "se_released",
]
