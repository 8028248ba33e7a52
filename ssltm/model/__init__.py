"""The SSLTM model (the paper's §3; README "The SSLTM model") and its video predictor.

Modules, one file per part: ``backbone`` (torchvision ResNet and Swin-S trunks), ``neck`` (FPN + PPM), ``stt``
(Spatial-Temporal Transformer), ``rfce`` (shared OCR, category attention, GCC), ``heads`` (segmentation
heads, losses), ``short_term`` (the short-term module interface and builder; ``netwarp``, ``st_ocr``: two
modules), ``ocrnet`` (the OCRNet decoder and its video variants TCB and NetWarp-OCR), ``ssltm`` (the model),
``predictor`` (streaming and whole-video inference).
"""

from .backbone import BACKBONES, RESNETS, ResNetTrunk, SwinTrunk, build_trunk
from .neck import FPNNeck, PyramidPooling
from .predictor import VideoPredictor
from .rfce import CategoryAttention, GlobalCategoryContext, ObjectContext
from .short_term import SHORT_TERM, ShortTermModule, build_short_term
from .ssltm import SSLTM
from .stt import ShortTermTransformer, STTBlock, STTUnit

__all__ = [
    "BACKBONES",
    "RESNETS",
    "SHORT_TERM",
    "SSLTM",
    "CategoryAttention",
    "FPNNeck",
    "GlobalCategoryContext",
    "ObjectContext",
    "PyramidPooling",
    "ResNetTrunk",
    "STTBlock",
    "STTUnit",
    "SwinTrunk",
    "ShortTermModule",
    "ShortTermTransformer",
    "VideoPredictor",
    "build_short_term",
    "build_trunk",
]
