"""mask-sc models: the contrastive-sc teacher/baseline, the masked expression model, presets."""
from masksc.models.contrastive import ContrastiveConfig, ContrastiveSC, nt_xent
from masksc.models.masksc_model import MaskSC, MaskSCConfig
from masksc.models.presets import PRESETS, get_preset
from masksc.models.targets import FRAGMENTS, FragmentTargets

__all__ = ["ContrastiveConfig", "ContrastiveSC", "nt_xent", "MaskSC", "MaskSCConfig", "PRESETS", "get_preset",
           "FRAGMENTS", "FragmentTargets"]
