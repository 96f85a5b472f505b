"""The predictor's losses (paper Section 4.3): ``entropy`` (L_Em), ``feature`` (L_Feat), ``total`` (L).

Import-light on purpose (no torch here): import the submodules, e.g.
``from esrdf.losses.total import LossConfig, PredictorLoss``.
"""
