"""Distillation of diffusion / flow teachers into one-step and few-step students.

Subpackages by concern: ``teachers`` (the Denoiser interface and loading), ``sampling`` (teacher ODE solvers and
the k-step student sampler), ``sid`` and ``reflow`` (the two methods), ``evaluation`` (offline metrics and the
``onestep eval``/``sample`` commands), ``export`` (diffusers folders, model cards, publishing); ``pipelines``
holds the diffusers pipelines users sample exported students with, and ``data`` the image datasets.
"""

import engine  # noqa: F401  imported first: silences bitsandbytes' import-time warning before peft loads it
