"""VLDeformer on ViLT: decomposed image and text encoders, their loss, data, training and evaluation.

The public names are imported lazily, so light modules (``model.synthetic``, ``model.images``)
start without loading torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.backbone import CheckpointError
    from model.modeling import DecomposeSettings, EarlyInteraction, VLDeformer

__all__ = ["CheckpointError", "DecomposeSettings", "EarlyInteraction", "VLDeformer"]

_HOMES = {
    "CheckpointError": "model.backbone",
    "DecomposeSettings": "model.modeling",
    "EarlyInteraction": "model.modeling",
    "VLDeformer": "model.modeling",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
