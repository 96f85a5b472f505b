"""The shipped default 4x ESRDF model: a checkpoint and a ready onnxruntime bundle inside the package.

``default_bundle_dir()`` is what ``esrdf-run`` uses without ``--engine``; ``default_checkpoint_dir()``
holds the same model as safetensors + config, for ``esrdf-eval``, ``esrdf-export`` and the torch engine.
How it was trained and how well it does: MODEL_CARD.md; how to reproduce it: ``recipe.py``.

Import-light: the standard library only, so the runtime can import it without torch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["RECOMMENDED_ETA", "default_bundle_dir", "default_checkpoint_dir"]

# The DDIM eta of the measured quality in MODEL_CARD.md; esrdf-run uses it when given neither --engine nor
# --eta. With eta = 0 this short-trained U-Net leaves visible noise (measured: see the model card).
RECOMMENDED_ETA = 1.0


def _shipped_dir(name: str) -> Path:
    # The package is installed as plain files (editable or wheel, never zipped), so the resource is a real
    # directory that onnxruntime and safetensors can open by path.
    path = Path(str(resources.files(__name__).joinpath(name)))
    if not (path / ("manifest.json" if name == "bundle" else "config.json")).is_file():
        raise FileNotFoundError(
            f"the default model's {name} is missing at {path}; reinstall esrdf, or rebuild it with "
            "`make default-model`"
        )
    return path


def default_bundle_dir() -> Path:
    """Directory of the shipped onnxruntime bundle (manifest.json, predictor and step graphs)."""
    return _shipped_dir("bundle")


def default_checkpoint_dir() -> Path:
    """Directory of the shipped checkpoint (config.json + model.safetensors: predictor and EMA U-Net)."""
    return _shipped_dir("checkpoint")
