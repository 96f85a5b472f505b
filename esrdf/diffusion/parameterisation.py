"""What the U-Net predicts, and the exact maps between its output and eps (paper Eq. 3 and 5-6).

With r_t = sqrt(ab_t) r_0 + sqrt(1 - ab_t) eps (Eq. 3, ab = alpha_bar), three targets carry the same
information at every t (Salimans & Ho 2022, "Progressive distillation", Section 4):

    eps   the paper's target (Eq. 6)
    v     sqrt(ab_t) eps - sqrt(1 - ab_t) r_0
    x0    r_0 itself

They differ in how a loss on them weights the error in r_0 across t. A residual is small (std ~0.05 on
photos), so for most t of the paper's schedule r_t is nearly all noise: an L1 on eps then spends almost all
of its effort on copying x_t and almost none on r_0 = E[r_0 | c] at high noise, which is what the first
sampling steps need. v and x0 put weight on r_0 there.

Every consumer converts the output to eps with :func:`output_to_eps`; the samplers and the exported step
graph's update (affine in x_t, eps, noise) are then the same for all three. The conversions are affine in
(x_t, output) with coefficients of t alone, and defined wherever 1 - ab_t > 0, which holds at every t.
"""

from __future__ import annotations

from torch import Tensor

from esrdf.config import Prediction

PREDICTIONS: tuple[Prediction, ...] = ("eps", "v", "x0")


def training_target(prediction: Prediction, r0: Tensor, noise: Tensor, sqrt_ab: Tensor | float,
                    sqrt_one_minus_ab: Tensor | float) -> Tensor:  # fmt: skip
    """The regression target of the U-Net for r_t = sqrt_ab r0 + sqrt_one_minus_ab noise."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return sqrt_ab * noise - sqrt_one_minus_ab * r0
    if prediction == "x0":
        return r0
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def output_to_eps(prediction: Prediction, output: Tensor, x_t: Tensor, sqrt_ab: Tensor | float,
                  sqrt_one_minus_ab: Tensor | float) -> Tensor:  # fmt: skip
    """eps implied by the U-Net's ``output`` at x_t: the inverse of :func:`training_target` given x_t.

    v:  eps = sqrt(ab) v + sqrt(1 - ab) x_t       x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
    """
    if prediction == "eps":
        return output
    if prediction == "v":
        return sqrt_ab * output + sqrt_one_minus_ab * x_t
    if prediction == "x0":
        return (x_t - sqrt_ab * output) / sqrt_one_minus_ab
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
