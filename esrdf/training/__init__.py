"""Training the predictor and the residual diffusion model (import-light: import the submodules).

- ``esrdf.training.config``: ``TrainConfig`` and its presets (saved as a checkpoint's ``train.json``).
- ``esrdf.training.predictor``: ``train_predictor`` (L = L_Em + L_Feat + L_Pixel, paper Eq. 15).
- ``esrdf.training.diffusion``: ``train_diffusion`` (the U-Net on residuals of a frozen predictor, Eq. 3-6).
- ``esrdf.training.loop``: the shared optimisation loop (AdamW, autocast, clipping, EMA, checkpoints, Ctrl-C).
- ``esrdf.training.distributed``: data-parallel training under torchrun.
"""
