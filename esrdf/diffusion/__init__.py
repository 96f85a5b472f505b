"""Residual diffusion (ESRDF paper Section 3, Eq. 1-7).

- ``esrdf.diffusion.schedule``: float64 noise schedules (numpy only; linear, cosine, zero terminal SNR).
- ``esrdf.diffusion.samplers``: pure-function DDPM and DDIM samplers and residual SR sampling (torch).
- ``esrdf.diffusion.objective``: forward noising q(r_t | r_0) and the eps-prediction loss (torch).

Import-light on purpose: import the submodule you need; nothing here pulls in torch.
"""
