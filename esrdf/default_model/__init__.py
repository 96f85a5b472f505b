"""The shipped default 4x ESRDF model: a checkpoint and a ready onnxruntime bundle inside the package.

``default_bundle_dir()`` is what ``esrdf-run`` uses without ``--engine``; ``default_checkpoint_dir()``
holds the same model as safetensors + config, for ``esrdf-eval``, ``esrdf-export`` and the torch engine.
How it was trained and how well it does: MODEL_CARD.md; how to reproduce it: ``recipe.py``.

Import-light: the standard library and ``esrdf.config`` only, so the runtime can import it without torch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from esrdf.config import SamplingOptions

__all__ = [
    "RECOMMENDED_SAMPLING",
    "default_bundle_dir",
    "default_checkpoint_dir",
]


# Chosen by the sweep of steps, eta and prior on the held-out photos in MODEL_CARD.md. The shipped checkpoint
# carries them as sampling.json and the shipped bundle in its manifest's sampling section (written by
# ``recipe.ship_checkpoint`` and the export); tests/test_default_model.py checks that all three agree.
RECOMMENDED_SAMPLING = SamplingOptions(sampler="ddim", steps=20, eta=1.0, prior="matched")


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
