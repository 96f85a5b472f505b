"""ESRDF's networks: the predictor P (``esrdf.models.predictor``) and the U-Net (``esrdf.models.unet``).

Import-light: torch loads only when one of the names below is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esrdf.models.build import build_predictor, build_unet, count_parameters
    from esrdf.models.predictor import Predictor
    from esrdf.models.unet import UNet

_LAZY = {
    "build_predictor": "esrdf.models.build",
    "build_unet": "esrdf.models.build",
    "count_parameters": "esrdf.models.build",
    "Predictor": "esrdf.models.predictor",
    "UNet": "esrdf.models.unet",
}
__all__ = ["Predictor", "UNet", "build_predictor", "build_unet", "count_parameters"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'esrdf.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
