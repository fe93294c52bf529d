"""A teacher's own training objective, for fine-tuning it (LoRA or full) on new images.

Diffusers' training scripts (``train_text_to_image_lora.py``, ``train_dreambooth_lora_sd3.py`` / ``_flux.py`` /
``_sana.py``) fine-tune each family with the loss it was trained with: noise the clean sample at a random timestep
of the scheduler's training table and regress the model output onto the target of the teacher's
parameterization with a plain MSE (mean over every element). :class:`TeacherObjective` is that loss around a
:class:`~distill.teachers.denoiser.Denoiser`, as a module whose ``forward`` runs the model, so DDP / DeepSpeed see
the call (the module is what the recipe trains):

====================  =============================================  ===========================================
parameterization      noise level (drawn uniformly from the table)   model input -> prediction vs. target
====================  =============================================  ===========================================
``vp-epsilon``        ``t ~ U{0..T-1}`` (DDPMScheduler's table),      ``sqrt(abar) x0 + sqrt(1 - abar) n`` ->
                      as ``sigma_t`` (:meth:`Denoiser.timestep_sigma`) epsilon vs. ``n``
``vp-v_prediction``   same                                           v vs. ``sqrt(abar) n - sqrt(1 - abar) x0``
                                                                     (diffusers' ``get_velocity``)
``vp-sample``         same                                           x0 vs. ``x0``
``flow``              flow time ``s`` of FlowMatchEulerDiscrete-      ``(1 - s) x0 + s n`` -> velocity vs.
                      Scheduler's training table (its ``sigmas``,     ``n - x0``
                      ``1/T .. 1``, static ``shift`` applied)
``edm``               ``sigma ~ exp(N(p_mean, p_std^2))`` (EDM)        EDM's weighted x0 loss (sum over elements,
                                                                     :func:`~distill.teachers.edm.edm_denoising_loss`)
====================  =============================================  ===========================================

The predictions are the Denoiser's own conversions of the model output (``eps``, ``v_prediction``, ``velocity``,
``forward``): for epsilon and v they go through its x0 and back, which equals the raw output up to float32
rounding (checked against a direct call of the diffusers model in ``tests/test_lora_images.py``); flow teachers'
``velocity`` is the raw output, exact even at ``s = 1``. Learned-sigma models (DiT, PixArt) train their mean
half only, as diffusers' PixArt scripts do (the Denoiser reads the first half).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.edm import edm_denoising_loss, sample_lognormal_sigmas

__all__ = ["TeacherObjective", "flow_training_times", "own_objective_loss"]


def flow_training_times(denoiser: Denoiser) -> Tensor:
    """The flow times ``s`` a flow-matching teacher trains on: ``FlowMatchEulerDiscreteScheduler``'s ``sigmas``
    built from the teacher's scheduler config (as diffusers' SD3 / Flux / Sana training scripts build their noise
    scheduler), float64 on the CPU, ``num_train_timesteps`` values in (0, 1]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(denoiser.scheduler_config))
    return scheduler.sigmas.to(torch.float64).flip(0).clone()


def own_objective_loss(
    denoiser: nn.Module,
    x0: Tensor,
    noise: Tensor,
    level: Tensor,
    cond: Condition | None = None,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Per-sample loss ``[B]`` of ``denoiser`` (a :class:`Denoiser`) in its own parameterization (see the module
    docstring): the mean over elements of ``(prediction - target)^2``, or EDM's weighted sum for EDM teachers.

    ``level``: ``[B]`` noise levels in the teacher's own coordinate: flow time ``s`` for flow teachers, ``sigma``
    for the others. ``guidance_scale``: the guidance input of a guidance-distilled teacher (FLUX.1-dev); other
    teachers are called once, unguided.
    """
    if level.ndim != 1 or level.shape[0] != x0.shape[0]:
        raise ValueError(f"level must have shape [{x0.shape[0]}], got {tuple(level.shape)}")
    scale = guidance_scale if denoiser.embedded_guidance else 1.0
    param = denoiser.parameterization
    if param == "edm":
        return edm_denoising_loss(lambda x, s: denoiser(x, s, cond), x0, level, noise, denoiser.sigma_data)
    view = (-1,) + (1,) * (x0.ndim - 1)
    x0f, n = x0.float(), noise.float()
    lv = level.float().view(view)
    if param == "flow":
        x_t = (1.0 - lv) * x0f + lv * n
        pred = denoiser.velocity(x_t.to(x0.dtype), level, cond, guidance_scale=scale)
        target = n - x0f
    else:
        x_sigma = (x0f + lv * n).to(x0.dtype)
        if param == "vp-epsilon":
            pred, target = denoiser.eps(x_sigma, level, cond, guidance_scale=scale), n
        elif param == "vp-v_prediction":
            pred = denoiser.v_prediction(x_sigma, level, cond, guidance_scale=scale)
            target = (n - lv * x0f) * (1.0 + lv.square()).rsqrt()  # sqrt(abar) n - sqrt(1 - abar) x0
        elif param == "vp-sample":
            pred, target = denoiser(x_sigma, level, cond, guidance_scale=scale), x0f
        else:
            raise ValueError(f"no training objective for a {param!r} teacher")
    return (pred.float() - target).pow(2).flatten(1).mean(1)


class TeacherObjective(nn.Module):
    """The teacher's own loss as a module: ``forward(x0, noise, level, cond)`` -> per-sample loss ``[B]``.

    Holds the :class:`Denoiser` (its only submodule, ``self.denoiser``) and draws training noise levels with
    :meth:`draw_levels`. ``p_mean`` / ``p_std``: EDM teachers' log-normal sigma distribution.
    """

    def __init__(
        self, denoiser: Denoiser, guidance_scale: float = 1.0, p_mean: float = -1.2, p_std: float = 1.2
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.guidance_scale = float(guidance_scale)
        self.p_mean, self.p_std = p_mean, p_std
        self.parameterization = denoiser.parameterization
        self._flow_times = flow_training_times(denoiser) if self.parameterization == "flow" else None

    @property
    def num_train_timesteps(self) -> int:
        return self.denoiser.num_train_timesteps

    def table_levels(self, timesteps: Tensor) -> Tensor:
        """Noise levels of table indices ``timesteps`` (``0 .. T-1``, low noise first): flow time for flow
        teachers, ``sigma_t`` for VP teachers (float32, on ``timesteps``' device)."""
        if self._flow_times is not None:
            idx = torch.as_tensor(timesteps).long()
            return self._flow_times.to(idx.device)[idx].to(torch.float32)
        return self.denoiser.timestep_sigma(timesteps)

    def draw_levels(
        self, n: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` training noise levels: uniform table timesteps (VP, flow) or EDM's log-normal sigmas, drawn on
        ``generator``'s device (``device`` without one) and returned on ``device``."""
        draw_on = generator.device if generator is not None else device
        if self.parameterization == "edm":
            return sample_lognormal_sigmas(n, self.p_mean, self.p_std, draw_on, generator).to(device)
        t = torch.randint(0, self.num_train_timesteps, (n,), device=draw_on, generator=generator)
        return self.table_levels(t).to(device)

    def forward(self, x0: Tensor, noise: Tensor, level: Tensor, cond: Condition | None = None) -> Tensor:
        return own_objective_loss(self.denoiser, x0, noise, level, cond, self.guidance_scale)
