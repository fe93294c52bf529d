"""Student pipelines for latent teachers whose own pipeline cannot start where the student starts: this file is
copied into an exported student folder as ``onestep_latent_pipeline.py`` (see ``distill.export.latent``).

A one-step student ``G`` maps ``x = sigma0 * z`` (``z ~ N(0, I)``) to ``x0 = G(x, sigma0, cond)`` in EDM terms.
Stable Diffusion, SDXL and VP-trained PixArt get there with a standard ``EulerDiscreteScheduler`` alone; these
pipelines cannot, so each class below subclasses the teacher's own pipeline and changes only what differs:

* ``LDMPipeline`` reads ``scheduler.init_noise_sigma`` before ``set_timesteps`` (the table's largest sigma, not
  sigma0); ``DiTPipeline`` never scales its noise and steps the *scaled* model input. Both run their own loop
  with the shipped Euler scheduler (one step from sigma0 to 0) behind :class:`StudentSteps`, which starts from
  ``sigma0 * z`` and steps the unscaled sample.
* SD3, Flux and Sana (flow matching) start from unscaled noise at flow time 1; the student starts from
  ``t0 * z`` at ``t0 = sigma0 / (1 + sigma0)``: ``prepare_latents`` scales by ``t0`` and ``__call__`` passes the
  student's flow times as the pipeline's own ``sigmas`` argument (the scheduler is an unshifted
  ``FlowMatchEulerDiscreteScheduler``; its config keeps the student's noise levels under
  :data:`STEP_SIGMAS_KEY`).
* PixArt-alpha/-sigma trained with the flow objective (VP PixArt needs no code): the same, through PixArt's own
  loop, which also reads the scheduler's ``init_noise_sigma`` and calls its ``scale_model_input``; the flow
  Euler scheduler has neither, so during ``__call__`` the pipeline sees it behind :class:`FlowSteps`
  (noise scale 1, identity input scaling: flow models take ``x_t`` and the flow time as they are).

Every class keeps its pipeline's ``__call__`` signature (callers inspect it for ``prompt`` and the like), and
``OneStep...Pipeline.from_pretrained(folder)`` builds that class itself, running no code from the folder (the
toolkit's evaluation loads folders so).

It may import only torch, diffusers and the standard library: plain diffusers runs it with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import (
    DiTPipeline,
    FluxPipeline,
    LDMPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
)

#: this file's name (without .py) inside an exported folder: model_index.json's ``_class_name[0]``
PIPELINE_MODULE = "onestep_latent_pipeline"
#: the scheduler config key holding the student's EDM noise levels (flow families; LDM/DiT k-step students)
STEP_SIGMAS_KEY = "_onestep_step_sigmas"


def _calls_like_its_pipeline(cls: type) -> type:
    """Give ``cls`` a ``__call__`` with its diffusers pipeline's signature (the mixins' take ``*args,
    **kwargs``), so code that inspects ``pipe.__call__`` (for ``prompt``, ``use_resolution_binning``,
    ``max_sequence_length``, ...) sees the teacher pipeline's parameters."""
    pipeline = next(c for c in cls.__mro__ if c.__module__.startswith("diffusers."))
    call = cls.__call__

    @functools.wraps(pipeline.__call__)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return call(self, *args, **kwargs)

    cls.__call__ = __call__
    return cls


@contextlib.contextmanager
def _scheduler_stand_in(pipe: Any, stand_in: Any) -> Iterator[None]:
    """``pipe.scheduler`` is ``stand_in`` inside the block, the real one again after it. ``object.__setattr__``:
    a temporary stand-in, not a new pipeline component (``DiffusionPipeline.__setattr__`` would record it in the
    config)."""
    scheduler = pipe.scheduler
    object.__setattr__(pipe, "scheduler", stand_in)
    try:
        yield
    finally:
        object.__setattr__(pipe, "scheduler", scheduler)


def _one_step(kwargs: dict[str, Any], steps: int) -> None:
    """Default ``num_inference_steps`` to the student's own; refuse any other count by name."""
    n = kwargs.setdefault("num_inference_steps", steps)
    if n != steps:
        raise ValueError(f"this student samples in exactly {steps} step(s); got num_inference_steps={n}")


class StudentSteps:
    """The pipeline's Euler scheduler as LDM's and DiT's loops must see it for the student: the initial noise
    scale is sigma0 (the config's ``sigma_max``) before ``set_timesteps`` too, and with ``scale_first`` (DiT,
    which never scales its noise and steps its scaled model input) the first input is scaled by sigma0 and
    every step is taken from the unscaled sample kept here. A k-step (deterministic) student's noise levels
    (config :data:`STEP_SIGMAS_KEY`) replace the scheduler's own: ``set_timesteps`` takes them, then sigma 0."""

    def __init__(self, scheduler: Any, scale_first: bool) -> None:
        self.scheduler = scheduler
        self.scale_first = scale_first
        self.sample: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.config.sigma_max)

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any
    ) -> None:
        sigmas = self.scheduler.config.get(STEP_SIGMAS_KEY)
        if not sigmas:
            self.scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
            return
        self.scheduler.set_timesteps(sigmas=[float(x) for x in sigmas] + [0.0], device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        if self.sample is None or not self.scale_first:
            self.sample = sample * self.init_noise_sigma if self.scale_first else sample
        return self.scheduler.scale_model_input(self.sample, timestep)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True):
        out = self.scheduler.step(model_output, timestep, self.sample, return_dict=return_dict)
        self.sample = out.prev_sample if return_dict else out[0]
        return out


class _Shipped:
    """What every class here shares: ``ThisClass.from_pretrained(folder)`` builds this class (the toolkit's
    copy, no code from the folder runs) although model_index.json names ``[module, class]``."""

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """The folder's config with ``_class_name`` as a plain name (a ``[module, class]`` pair makes diffusers
        import the folder's file, and refuse it without ``trust_remote_code``)."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][-1]
        return out


class _StudentLoop(_Shipped):
    """LDM / DiT: run the pipeline's own ``__call__`` with :class:`StudentSteps` in place of its scheduler."""

    _scale_first = False

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _one_step(kwargs, len(self.scheduler.config.get(STEP_SIGMAS_KEY) or [None]))
        with _scheduler_stand_in(self, StudentSteps(self.scheduler, self._scale_first)):
            return super().__call__(*args, **kwargs)


@_calls_like_its_pipeline
class OneStepLDMPipeline(_StudentLoop, LDMPipeline):
    """LDMPipeline sampling the one-step student (``pipe(generator=..., num_inference_steps=1)``)."""


@_calls_like_its_pipeline
class OneStepDiTPipeline(_StudentLoop, DiTPipeline):
    """DiTPipeline sampling the one-step student (``pipe(class_labels, guidance_scale=1.0, ...)``)."""

    _scale_first = True


class _FlowStudent(_Shipped):
    """SD3 / Flux / Sana / flow PixArt: noise scaled to the student's first flow time, the student's flow
    times as sigmas."""

    def _student_sigmas(self) -> list[float]:
        sigmas = self.scheduler.config.get(STEP_SIGMAS_KEY)
        if not sigmas:
            raise ValueError(
                f"scheduler config has no {STEP_SIGMAS_KEY!r}: not a onestep-toolkit student folder"
            )
        return [float(s) for s in sigmas]

    def prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
        out = super().prepare_latents(*args, **kwargs)
        sigma0 = self._student_sigmas()[0]
        t0 = sigma0 / (1.0 + sigma0)
        if isinstance(out, tuple):  # Flux: (packed latents, image ids)
            return (out[0] * t0, *out[1:])
        return out * t0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sigmas = self._student_sigmas()
        _one_step(kwargs, len(sigmas))
        kwargs["sigmas"] = [s / (1.0 + s) for s in sigmas]
        return super().__call__(*args, **kwargs)


@_calls_like_its_pipeline
class OneStepStableDiffusion3Pipeline(_FlowStudent, StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline sampling the one-step student."""


@_calls_like_its_pipeline
class OneStepFluxPipeline(_FlowStudent, FluxPipeline):
    """FluxPipeline sampling the one-step student."""


@_calls_like_its_pipeline
class OneStepSanaPipeline(_FlowStudent, SanaPipeline):
    """SanaPipeline sampling the one-step student."""


class FlowSteps:
    """The flow Euler scheduler as a VP-style loop (PixArt's) reads it: the noise is not rescaled here
    (``init_noise_sigma = 1``; :meth:`_FlowStudent.prepare_latents` scales it to the student's first flow time)
    and the model input is the sample itself; everything else is the wrapped scheduler's."""

    init_noise_sigma = 1.0

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample


class _FlowPixArt(_FlowStudent):
    """PixArt with a flow-trained transformer: :class:`_FlowStudent` inside PixArt's loop with
    :class:`FlowSteps` in place of the scheduler for the duration of the call."""

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _scheduler_stand_in(self, FlowSteps(self.scheduler)):
            return super().__call__(*args, **kwargs)


@_calls_like_its_pipeline
class OneStepPixArtAlphaPipeline(_FlowPixArt, PixArtAlphaPipeline):
    """PixArtAlphaPipeline sampling the one-step student of a flow-trained PixArt-alpha."""


@_calls_like_its_pipeline
class OneStepPixArtSigmaPipeline(_FlowPixArt, PixArtSigmaPipeline):
    """PixArtSigmaPipeline sampling the one-step student of a flow-trained PixArt-sigma."""


#: teacher pipeline class -> the class here that samples its student
STUDENT_PIPELINES = {
    "LDMPipeline": OneStepLDMPipeline,
    "DiTPipeline": OneStepDiTPipeline,
    "StableDiffusion3Pipeline": OneStepStableDiffusion3Pipeline,
    "FluxPipeline": OneStepFluxPipeline,
    "SanaPipeline": OneStepSanaPipeline,
}
#: pipelines whose teacher may be VP (no code ships) or flow-trained: the class here that samples a flow student
FLOW_STUDENT_PIPELINES = {
    "PixArtAlphaPipeline": OneStepPixArtAlphaPipeline,
    "PixArtSigmaPipeline": OneStepPixArtSigmaPipeline,
}
