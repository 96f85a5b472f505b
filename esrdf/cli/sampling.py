"""The sampling flags every command shares: ``--sampler --steps --eta --prior`` (and ``--seed``).

One definition, so esrdf-run, esrdf-eval, esrdf-export and esrdf-bench spell, check and document them alike.
Every flag defaults to None ("not given"): the command passes one ``esrdf.config.SamplingOptions`` on, and
what it leaves out is filled where the model is known (a bundle's ``sampling`` section, a checkpoint's
``sampling.json``), then by the built-in rule of ``SamplingOptions.resolve``.

Import-light (click and ``esrdf.config``): the torch-free runtime's CLI uses it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from esrdf.config import PRIORS, SAMPLERS, SamplingOptions

F = TypeVar("F", bound=Callable[..., Any])


def sampling_options(default_from: str, seed: bool = True, seed_help: str = "Noise seed") -> Callable[[F], F]:
    """Add the sampling flags to a click command; it receives them as one ``sampling: SamplingOptions``.

    ``default_from`` completes each flag's help, "(default: from <default_from>)". ``seed=False`` leaves out
    ``--seed`` (e.g. esrdf-export, which records defaults, not a request's seed).
    """
    default = f"(default: from {default_from})"
    flags = [
        click.option("--sampler", type=click.Choice(SAMPLERS), default=None, help=f"Sampler {default}."),
        click.option(
            "--steps",
            type=click.IntRange(min=1),
            default=None,
            help=f"Sampling steps: DDIM 1..T, DDPM all T {default}.",
        ),
        click.option("--eta", type=click.FloatRange(0.0, 1.0), default=None, help=f"DDIM eta {default}."),
        click.option(
            "--prior",
            type=click.Choice(PRIORS),
            default=None,
            help=f"Where x_T starts: matched, N(0, (1 - alpha_bar_T) I), or paper, N(0, I) {default}.",
        ),
    ]
    if seed:
        flags.append(
            click.option(
                "--seed", type=click.IntRange(min=0), default=None, help=f"{seed_help} (default: 0)."
            )
        )

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def with_sampling(
            *args: Any, sampler: str | None, steps: int | None, eta: float | None, prior: str | None,
            seed: int | None = None, **kwargs: Any,
        ) -> Any:  # fmt: skip
            return command(*args, sampling=SamplingOptions(sampler, steps, eta, seed, prior), **kwargs)

        for flag in reversed(flags):
            with_sampling = flag(with_sampling)
        return with_sampling  # type: ignore[return-value]

    return decorate
