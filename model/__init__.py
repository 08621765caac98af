"""VLDeformer on ViLT: decomposed image and text encoders, their loss, data, training and evaluation."""

from model.backbone import CheckpointError
from model.modeling import DecomposeSettings, EarlyInteraction, VLDeformer

__all__ = ["CheckpointError", "DecomposeSettings", "EarlyInteraction", "VLDeformer"]
