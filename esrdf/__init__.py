"""ESRDF: entropy-subtraction-supported residual-diffusion SR (Huang et al., Symmetry 2026, 18(1), 193).

This top-level package must stay import-light: ``import esrdf.runtime`` runs this file first, and the
runtime must not pull in torch. Import submodules explicitly (``from esrdf.models.unet import UNet``).
"""

__version__ = "0.1.0"
