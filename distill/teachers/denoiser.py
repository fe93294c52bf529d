"""One EDM-style denoiser interface over diffusers teachers.

Every distillation recipe reasons in EDM terms: a noisy sample is ``x_sigma = x0 + sigma * n`` and the
teacher is a function ``D(x_sigma, sigma, cond) -> x0_hat``. Diffusers models are trained under three
different conventions (discrete VP/DDPM tables, EDM preconditioning, rectified flow), so :class:`Denoiser`
hides the conversion and lets SiD, reflow and the samplers treat every teacher alike.

Supported scheduler families (chosen from the scheduler class name and config):

* **Discrete VP** (``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``,
  ``DPMSolverMultistepScheduler``, ``PNDMScheduler``, ... -- any config with ``beta_schedule`` or
  ``trained_betas``). ``alphas_cumprod`` is built by instantiating a ``DDPMScheduler`` from the config, so
  ``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, ``sigmoid`` and ``trained_betas`` all work.
  ``sigma_t = sqrt((1 - abar_t) / abar_t)``; the model sees ``x_sigma / sqrt(1 + sigma^2)``.

  *Timestep rule.* The model receives a continuous float timestep obtained by inverting the
  piecewise-linear map ``t -> log(sigma_t)`` through the table points ``(t, log sigma_t)`` for
  ``t = 0 .. T-1``: with ``k`` the table interval holding ``log(sigma)``,
  ``t = k + (log(sigma) - log(sigma_k)) / (log(sigma_{k+1}) - log(sigma_k))``. On table sigmas this gives
  the integer ``t`` exactly; it is the same rule as diffusers' ``EulerDiscreteScheduler._sigma_to_t`` (used
  for Karras sigmas) but without rounding. ``log(sigma)`` outside ``[log sigma_0, log sigma_{T-1}]`` is
  clamped, so the timestep saturates at ``0`` or ``T-1`` while the input scaling and the x0 conversion
  still use the true ``sigma`` (the model is asked about the nearest noise level it was trained on).
  Euler's ``timestep_type="continuous"`` + ``v_prediction`` (SD x4 upscaler style) instead receives
  ``0.25 * log(sigma)`` as diffusers does. Zero-terminal-SNR tables (``abar_{T-1} = 0``) get a finite last
  entry: diffusers' ``2**-24``, or a log-linear extrapolation where that would not be below ``abar_{T-2}``.
  ``sigma_min`` / ``sigma_max`` are the table ends.
* **EDM** (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``): exactly the diffusers preconditioning,
  model input ``c_in * x`` with ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``, timestep
  ``c_noise = 0.25 * log(sigma)``, output ``x0 = c_skip * x + c_out * F`` (``c_out`` negated for diffusers'
  ``v_prediction``). ``sigma_min`` / ``sigma_max`` come from the config but are not enforced; only
  ``sigma = 0`` is floored at 1e-20 inside the log (where ``c_out = 0`` and ``D(x, 0) = x`` anyway).
* **Flow matching** (``FlowMatchEulerDiscreteScheduler``, or a VP-family scheduler configured with
  ``use_flow_sigmas`` / ``prediction_type="flow_prediction"``): ``x_t = (1 - t) x0 + t n`` with the model
  predicting ``v = n - x0`` at timestep ``t * num_train_timesteps``. With ``t = sigma / (1 + sigma)``,
  ``x_t = x_sigma / (1 + sigma)`` and ``x0 = x_t - t v``. ``shift`` / dynamic shifting only reshape the
  *sampling* schedule, never this mapping, so they are ignored here. Any ``t`` in ``[0, 1]`` is valid, so
  ``sigma_min = 0`` and ``sigma_max = inf``; :meth:`Denoiser.velocity` reaches ``t = 1`` directly.

Precision: sigma-dependent coefficients and the x0 combination run in float32 (float64 if ``x`` is
float64); the model runs in its parameter dtype with float32 timesteps; the result has ``x``'s dtype.

Conditioning travels in :class:`Condition`; classifier-free guidance is available to every caller through
``forward(..., guidance_scale=w, null_cond=...)`` and runs the conditional and null branches in one batch.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

# Scheduler names and parsing live with the teacher-family detection, which reads them before any weights.
from distill.teachers.calls import call_denoiser, denoiser_class_name, sample_channels
from distill.teachers.families import BETA_SCHEDULES as _BETA_SCHEDULES
from distill.teachers.families import (
    EDM_SCHEDULERS,
    FLOW_SCHEDULERS,
    MODEL_INDEX,
    SCHEDULER_CONFIG,
    describe_teacher_source,
    scheduler_config_candidates,
    scheduler_parameterization,
)
from distill.teachers.families import scheduler_class_and_config as _scheduler_class_and_config

__all__ = [
    "Condition",
    "Denoiser",
    "SchedulerLike",
    "null_condition",
    "CondLike",
    "EDM_SCHEDULERS",
    "FLOW_SCHEDULERS",
]


SchedulerLike = Mapping[str, Any] | Any
SigmaLike = float | Tensor


# --------------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------------
def _index_tensor(t: Tensor | None, idx: Any) -> Tensor | None:
    if t is None:
        return None
    if isinstance(idx, int):  # keep the batch dimension so the result is still a valid batch
        idx = slice(idx, idx + 1) if idx != -1 else slice(idx, None)
    return t[idx]


@dataclass
class Condition:
    """Model conditioning kept together so it can be batched, sliced and moved like one tensor.

    ``class_labels`` ([B] long) feed class-conditional UNets and DiT, ``encoder_hidden_states`` ([B, L, D])
    feed cross-attention UNets and text transformers, ``added_cond_kwargs`` (e.g. SDXL ``text_embeds`` /
    ``time_ids``, each [B, ...]) is passed to the model as that one dict, and ``model_kwargs`` holds further
    per-sample keyword tensors passed as they are (``pooled_projections`` of SD3/Flux, ``encoder_attention_mask``
    of PixArt/Sana, ``guidance`` of guidance-distilled Flux). Every tensor has the batch as its first dimension.
    """

    class_labels: Tensor | None = None
    encoder_hidden_states: Tensor | None = None
    added_cond_kwargs: dict[str, Tensor] | None = None
    model_kwargs: dict[str, Tensor] | None = None

    _TENSORS: ClassVar[tuple[str, ...]] = ("class_labels", "encoder_hidden_states")
    _DICTS: ClassVar[tuple[str, ...]] = ("added_cond_kwargs", "model_kwargs")

    def tensors(self) -> dict[str, Tensor]:
        """All tensors with a batch dimension, keyed by a readable name (used for validation)."""
        out: dict[str, Tensor] = {}
        for name in self._TENSORS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in self._DICTS:
            for k, v in (getattr(self, name) or {}).items():
                if isinstance(v, Tensor):
                    out[f"{name}[{k!r}]"] = v
        return out

    @property
    def batch_size(self) -> int | None:
        """Batch size shared by the fields, or ``None`` for an empty condition."""
        sizes = {t.shape[0] if t.ndim > 0 else 1 for t in self.tensors().values()}
        if not sizes:
            return None
        if len(sizes) > 1:
            raise ValueError(f"Condition fields disagree on batch size: {self._shapes()}")
        return sizes.pop()

    def is_empty(self) -> bool:
        """True when nothing would be passed to the model."""
        return not self.tensors()

    def _shapes(self) -> str:
        return ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors().items())

    def map(self, fn: Callable[[Tensor], Tensor]) -> Condition:
        """A condition with ``fn`` applied to every tensor (dict entries too; non-tensors kept)."""

        def apply(v: Any) -> Any:
            return fn(v) if isinstance(v, Tensor) else v

        values: dict[str, Any] = {name: apply(getattr(self, name)) for name in self._TENSORS}
        for name in self._DICTS:
            d = getattr(self, name)
            values[name] = None if d is None else {k: apply(v) for k, v in d.items()}
        return Condition(**values)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Condition:
        """Move every tensor; ``dtype`` only applies to floating tensors so labels and masks keep theirs."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self.map(move)

    def __getitem__(self, idx: Any) -> Condition:
        """Index along the batch; an int keeps a batch of one so micro-batching stays uniform."""
        return self.map(lambda t: _index_tensor(t, idx))

    def repeat(self, n: int) -> Condition:
        """Repeat each sample ``n`` times along the batch (``repeat_interleave``)."""
        return self.map(lambda t: t.repeat_interleave(n, 0))

    @staticmethod
    def combine(a: Condition, b: Condition, fn: Callable[[Tensor, Tensor], Tensor], what: str) -> Condition:
        """Apply ``fn`` to each pair of matching tensors of ``a`` and ``b``, which must set the same fields."""

        def pair(x: Tensor | None, y: Tensor | None, name: str) -> Tensor | None:
            if x is None and y is None:
                return None
            if x is None or y is None:
                raise ValueError(
                    f"Condition.{what}: field {name!r} is set on one condition but not the other"
                )
            return fn(x, y.to(x.device))

        values: dict[str, Any] = {name: pair(getattr(a, name), getattr(b, name), name) for name in a._TENSORS}
        for name in a._DICTS:
            da, db = getattr(a, name), getattr(b, name)
            if da is None and db is None:
                values[name] = None
                continue
            ka, kb = set(da or {}), set(db or {})
            if ka != kb:
                raise ValueError(f"Condition.{what}: {name} keys differ: {sorted(ka)} vs {sorted(kb)}")
            values[name] = {k: pair(da[k], db[k], k) for k in sorted(ka)}
        return Condition(**values)

    @staticmethod
    def cat(a: Condition, b: Condition) -> Condition:
        """Concatenate two conditions along the batch (used for batched CFG)."""
        return Condition.combine(a, b, lambda x, y: torch.cat([x, y], dim=0), "cat")

    @staticmethod
    def where(keep: Tensor, a: Condition, b: Condition) -> Condition:
        """Per sample, ``a``'s row where ``keep`` ([B] bool) is true, else ``b``'s (condition dropout with ``b``
        the null condition; a batch-of-one ``b`` is broadcast)."""

        def select(x: Tensor, y: Tensor) -> Tensor:
            y = y.expand_as(x) if y.shape[0] == 1 and x.shape[0] != 1 else y
            if x.shape != y.shape:
                raise ValueError(f"Condition.where: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
            return torch.where(keep.to(x.device).view((-1,) + (1,) * (x.ndim - 1)), x, y)

        return Condition.combine(a, b, select, "where")

    @classmethod
    def coerce(cls, cond: Condition | Tensor | Mapping[str, Any] | None) -> Condition | None:
        """Accept a Condition, a dict of its fields, or a bare tensor (integer -> labels, float -> text)."""
        if cond is None or isinstance(cond, Condition):
            return cond
        if isinstance(cond, Tensor):
            if cond.is_floating_point():
                return cls(encoder_hidden_states=cond)
            return cls(class_labels=cond)
        if isinstance(cond, Mapping):
            names = {f.name for f in fields(cls)}
            bad = set(cond) - names
            if bad:
                raise ValueError(
                    f"Unknown condition keys {sorted(bad)}; expected a subset of {sorted(names)}"
                )
            return cls(**cond)
        raise TypeError(f"cond must be a Condition, Tensor, dict or None, got {type(cond).__name__}")


#: Anything :meth:`Condition.coerce` accepts.
CondLike = Condition | Tensor | Mapping[str, Any] | None


def null_condition(
    cond: CondLike,
    num_class_embeds: int | None = None,
    null_encoder_hidden_states: Tensor | None = None,
    null_added_cond_kwargs: Mapping[str, Tensor] | None = None,
) -> Condition:
    """The "unconditional" counterpart of ``cond`` for classifier-free guidance.

    Class labels map to the dedicated null class ``num_class_embeds - 1``: a class-conditional teacher trained
    with CFG label dropout has ``num_classes + 1`` embeddings and the last one is the null class. Text
    conditioning has no such convention, so the caller supplies the null embedding (e.g. the encoded empty
    prompt, [1, L, D] or [B, L, D]); it is expanded to the batch. ``added_cond_kwargs`` are reused unless
    ``null_added_cond_kwargs`` is given (pass SDXL's pooled empty-prompt embeds there).
    """
    c = Condition.coerce(cond)
    assert c is not None
    bsz = c.batch_size or 1
    labels = None
    if c.class_labels is not None:
        if num_class_embeds is None:
            raise ValueError(
                "cond has class_labels but the model has no num_class_embeds, so there is no null class"
            )
        labels = torch.full_like(c.class_labels, num_class_embeds - 1)
    text = None
    if c.encoder_hidden_states is not None:
        if null_encoder_hidden_states is None:
            raise ValueError(
                "cond has encoder_hidden_states: pass null_encoder_hidden_states (e.g. empty-prompt "
                "embeddings) or an explicit null_cond"
            )
        text = null_encoder_hidden_states.to(c.encoder_hidden_states)
        if text.shape[0] == 1 and bsz != 1:
            text = text.expand(bsz, *text.shape[1:])
        if text.shape[1:] != c.encoder_hidden_states.shape[1:] or text.shape[0] != bsz:
            raise ValueError(
                f"null_encoder_hidden_states shape {tuple(null_encoder_hidden_states.shape)} does not match "
                f"encoder_hidden_states {tuple(c.encoder_hidden_states.shape)}"
            )
    added = None
    if c.added_cond_kwargs is not None:
        src = dict(null_added_cond_kwargs) if null_added_cond_kwargs is not None else c.added_cond_kwargs
        added = {}
        for k, v in src.items():
            if isinstance(v, Tensor) and v.shape[0] == 1 and bsz != 1:
                v = v.expand(bsz, *v.shape[1:])
            added[k] = v
    # per-sample keyword tensors (masks, pooled text) are the caller's to replace with text's explicit null
    return Condition(labels, text, added, c.model_kwargs)


# --------------------------------------------------------------------------------------------------------
# Scheduler parsing
# --------------------------------------------------------------------------------------------------------
def _vp_alphas_cumprod(cfg: Mapping[str, Any]) -> Tensor:
    """alphas_cumprod for a discrete VP config, built by diffusers' own DDPMScheduler (float64)."""
    from diffusers import DDPMScheduler

    schedule = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is None and schedule not in _BETA_SCHEDULES:
        raise ValueError(
            f"Unsupported beta_schedule {schedule!r}; supported: {list(_BETA_SCHEDULES)} or trained_betas"
        )
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in cfg.items() if k in accepted}
    kwargs["prediction_type"] = "epsilon"  # irrelevant to the table; avoids rejecting e.g. flow_prediction
    try:
        sched = DDPMScheduler(**kwargs)
    except NotImplementedError as e:
        raise ValueError(f"Cannot build beta schedule {schedule!r}: {e}") from e
    abar = sched.alphas_cumprod.to(torch.float64).clone()
    # Zero-terminal-SNR schedules end at abar = 0 (sigma = inf). Diffusers' Euler/DPM schedulers use 2**-24,
    # but that can exceed abar[T-2] (it does for the default linear schedule) and break monotonicity, so in
    # that case extrapolate log(abar) linearly from the last two finite entries instead.
    if float(abar[-1]) <= 0.0:
        abar[-1] = 2.0**-24
        if abar.numel() > 2 and abar[-1] >= abar[-2]:
            abar[-1] = abar[-2] ** 2 / abar[-3]
    return abar


# --------------------------------------------------------------------------------------------------------
# Denoiser
# --------------------------------------------------------------------------------------------------------
class Denoiser(nn.Module):
    """EDM-convention denoiser ``x0_hat = D(x_sigma, sigma, cond)`` around a diffusers model.

    The wrapped model is the only submodule (``self.model``) and supplies the only parameters, so the wrapper
    can be deep-copied, DDP-wrapped and trained like the model itself (SiD's fake score and generator are
    copies of the teacher). Schedule tables are plain attributes, not buffers, so ``state_dict()`` is exactly
    the model's (with a ``model.`` prefix).

    Args:
        model: an ``nn.Module`` called as ``model(sample, timestep, **kwargs)`` returning ``.sample``
            (``UNet2DModel``, ``UNet2DConditionModel``, ...).
        scheduler: a diffusers scheduler or its config dict (must carry ``_class_name`` unless it is a
            discrete VP config with betas).
    """

    def __init__(self, model: nn.Module, scheduler: SchedulerLike) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        sig = inspect.signature(model.forward)
        kinds = [p.kind for p in sig.parameters.values()]
        positional = sum(
            k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds
        )
        if positional < 2 and inspect.Parameter.VAR_POSITIONAL not in kinds:
            raise TypeError(
                f"model {type(model).__name__}.forward{sig} must accept (sample, timestep, **kwargs) like "
                "diffusers UNets"
            )
        self.model = model
        params = sig.parameters
        has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._accepted_kwargs: set[str] | None = None if has_var_kw else set(params)
        ehs = params.get("encoder_hidden_states")
        self._needs_text = ehs is not None and ehs.default is inspect.Parameter.empty

        name, cfg = _scheduler_class_and_config(scheduler)
        self.scheduler_class = name
        self.scheduler_config = cfg
        self.prediction_type: str = cfg.get("prediction_type", "epsilon")
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        self._sigma_data = 0.5
        self._continuous_vp_time = False
        self._tables: dict[str, Tensor] = {}
        # one classification (and its errors) for loading-time checks and for the maths below
        parameterization = scheduler_parameterization(scheduler)

        if parameterization == "edm":
            self.kind = "edm"
            self._sigma_data = float(cfg.get("sigma_data", 0.5))
            self._sigma_min = float(cfg.get("sigma_min", 0.002))
            self._sigma_max = float(cfg.get("sigma_max", 80.0))
        elif parameterization == "flow":
            self.kind = "flow"
            self.prediction_type = "flow_prediction"
            self._sigma_min, self._sigma_max = 0.0, math.inf
        else:
            self.kind = "vp"
            abar = _vp_alphas_cumprod(cfg)
            log_sigmas = (0.5 * ((1 - abar) / abar).log()).to(torch.float64)
            if not bool(torch.isfinite(log_sigmas).all()) or not bool((log_sigmas.diff() > 0).all()):
                raise ValueError(f"{name}: sigma_t table is not finite and strictly increasing")
            self._log_sigmas = log_sigmas
            self.alphas_cumprod = abar
            self._sigma_min = float(log_sigmas[0].exp())
            self._sigma_max = float(log_sigmas[-1].exp())
            self._continuous_vp_time = (
                cfg.get("timestep_type") == "continuous" and self.prediction_type == "v_prediction"
            )

    # ---------------------------------------------------------------- properties
    @property
    def parameterization(self) -> str:
        """``vp-epsilon``, ``vp-v_prediction``, ``vp-sample``, ``edm`` or ``flow``."""
        return f"vp-{self.prediction_type}" if self.kind == "vp" else self.kind

    @property
    def sigma_min(self) -> float:
        """Smallest trained sigma (VP: table end; EDM: config; flow: 0)."""
        return self._sigma_min

    @property
    def sigma_max(self) -> float:
        """Largest trained sigma (VP: table end; EDM: config; flow: inf since t=1 is pure noise)."""
        return self._sigma_max

    @property
    def sigma_data(self) -> float:
        """EDM ``sigma_data`` (0.5 when the scheduler has none)."""
        return self._sigma_data

    @property
    def has_timestep_table(self) -> bool:
        """True for teachers trained on a table of timesteps ``0 .. num_train_timesteps - 1`` (discrete VP and
        flow matching); EDM teachers are trained on a continuous sigma distribution instead."""
        return self.kind in ("vp", "flow")

    def timestep_sigma(self, timesteps: Tensor | float) -> Tensor:
        """Sigma of table timesteps ``t`` in ``[0, num_train_timesteps - 1]`` (float32, on ``t``'s device).

        VP: ``sqrt((1 - abar_t) / abar_t)``, with ``log sigma`` interpolated linearly between table entries for
        fractional ``t`` (the inverse of :meth:`sigma_to_timestep`). Flow: ``s / (1 - s)`` at flow time
        ``s = t / num_train_timesteps``. The table index is meant even where the model is fed another timestep
        (Euler's continuous-time VP models). EDM teachers have no table: ``ValueError``.
        """
        if not self.has_timestep_table:
            raise ValueError(
                f"{self.parameterization} teacher ({self.scheduler_class}) has no timestep table; draw its noise "
                "levels as sigmas"
            )
        t = torch.as_tensor(timesteps)
        last = self.num_train_timesteps - 1
        if bool(((t < 0) | (t > last)).any()):
            raise ValueError(f"timesteps must be in [0, {last}], got {t.min().item()}..{t.max().item()}")
        if self.kind == "flow":
            s = t.to(torch.float64) / self.num_train_timesteps
            return (s / (1.0 - s)).to(torch.float32)
        table = self._log_sigma_table(t.device)
        tf = t.to(table.dtype)
        lo = tf.floor().long().clamp(max=table.numel() - 2)
        frac = tf - lo.to(table.dtype)
        return (table[lo] + frac * (table[lo + 1] - table[lo])).exp().to(torch.float32)

    @property
    def in_channels(self) -> int | None:
        """Channels the model expects, read from its diffusers config."""
        return self._model_config_value("in_channels")

    @property
    def sample_size(self) -> int | tuple[int, int] | None:
        """Spatial size the model was configured for."""
        value = self._model_config_value("sample_size")
        return tuple(value) if isinstance(value, (list, tuple)) else value

    @property
    def sample_channels(self) -> int | None:
        """Channels of the samples (latents) denoised: ``in_channels``, except for Flux's packed tokens."""
        return sample_channels(self.model)

    @property
    def embedded_guidance(self) -> bool:
        """A guidance-distilled model (FLUX.1-dev): the guidance scale is an input, not two branches (CFG)."""
        return bool(self._model_config_value("guidance_embeds"))

    @property
    def num_class_embeds(self) -> int | None:
        """Number of class embeddings (num_classes + 1 with a null class), if class-conditional.

        DiT's ``num_embeds_ada_norm`` counts the real classes; its label table has one more row, the null class
        (DiTPipeline guides towards class 1000 of 1000)."""
        if denoiser_class_name(self.model) == "DiTTransformer2DModel":
            classes = self._model_config_value("num_embeds_ada_norm")
            return int(classes) + 1 if classes else None
        return self._model_config_value("num_class_embeds")

    @property
    def num_classes(self) -> int | None:
        """Real classes of a class-conditional model: its embeddings less the null class (the last one)."""
        embeds = self.num_class_embeds
        return embeds - 1 if embeds else None

    def _model_config_value(self, key: str) -> Any:
        cfg = getattr(self.model, "config", None)
        if isinstance(cfg, Mapping) and key in cfg:
            return cfg[key]
        if cfg is not None and hasattr(cfg, key):
            return getattr(cfg, key)
        return getattr(self.model, key, None)

    def _model_dtype(self) -> torch.dtype | None:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    # ---------------------------------------------------------------- conversions
    def _log_sigma_table(self, device: torch.device) -> Tensor:
        key = str(device)
        if key not in self._tables:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._tables[key] = self._log_sigmas.to(device=device, dtype=dtype)
        return self._tables[key]

    def sigma_to_timestep(self, sigma: SigmaLike) -> Tensor:
        """The (float) timestep the wrapped model receives at ``sigma`` (see the module docstring)."""
        s = torch.as_tensor(sigma)
        s = (s if s.dtype == torch.float64 else s.to(torch.float32)).reshape(-1) if s.ndim else s.float()
        if self.kind == "edm" or self._continuous_vp_time:
            return (0.25 * s.clamp(min=1e-20).log()).to(torch.float32)
        if self.kind == "flow":
            return (self._sigma_to_flow_t(s) * self.num_train_timesteps).to(torch.float32)
        table = self._log_sigma_table(s.device)
        ls = s.to(table.dtype).clamp(min=1e-30).log().clamp(min=table[0], max=table[-1])
        idx = (torch.searchsorted(table, ls.reshape(-1), right=True) - 1).clamp(0, table.numel() - 2)
        lo, hi = table[idx], table[idx + 1]
        t = idx.to(table.dtype) + (ls.reshape(-1) - lo) / (hi - lo)
        return t.reshape(ls.shape).to(torch.float32)

    @staticmethod
    def _sigma_to_flow_t(s: Tensor) -> Tensor:
        return 1.0 - 1.0 / (1.0 + s)  # = s / (1 + s), finite at s = inf

    @staticmethod
    def _work_dtype(x: Tensor) -> torch.dtype:
        """Conversions run in float32 (float64 if x is float64) whatever the model/input precision."""
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _sigma_vector(self, sigma: SigmaLike, x: Tensor) -> Tensor:
        """Sigma as a [B] tensor in the work dtype on x's device."""
        b = x.shape[0]
        s = torch.as_tensor(sigma, device=x.device, dtype=self._work_dtype(x))
        if s.numel() == 1:
            return s.reshape(1).expand(b)
        if s.numel() != b or any(d != 1 for d in s.shape[1:]):
            raise ValueError(
                f"sigma must be a scalar or have one entry per sample ({b}), got {tuple(s.shape)}"
            )
        return s.reshape(b)

    def _model_kwargs(self, cond: Condition | None, b: int) -> dict[str, Any]:
        """The condition as the model's keyword arguments (floating tensors in the model's dtype)."""
        kwargs: dict[str, Any] = {}
        if cond is not None:
            cb = cond.batch_size
            if cb is not None and cb != b:
                raise ValueError(f"cond batch size {cb} does not match x batch size {b} ({cond._shapes()})")
            mdtype = self._model_dtype()

            def cast(t: Any) -> Any:
                floating = isinstance(t, Tensor) and t.is_floating_point()
                return t.to(mdtype) if floating and mdtype is not None else t

            if cond.class_labels is not None:
                kwargs["class_labels"] = cond.class_labels
            if cond.encoder_hidden_states is not None:
                kwargs["encoder_hidden_states"] = cast(cond.encoder_hidden_states)
            if cond.added_cond_kwargs is not None:
                kwargs["added_cond_kwargs"] = {k: cast(v) for k, v in cond.added_cond_kwargs.items()}
            for k, v in (cond.model_kwargs or {}).items():
                kwargs[k] = v if k == "guidance" else cast(v)
        if self._needs_text and "encoder_hidden_states" not in kwargs:
            raise ValueError(f"{type(self.model).__name__} needs cond.encoder_hidden_states")
        if self._accepted_kwargs is not None:
            bad = set(kwargs) - self._accepted_kwargs
            if bad:
                raise ValueError(f"{type(self.model).__name__} does not accept conditioning {sorted(bad)}")
        return kwargs

    def _call_model(self, x_in: Tensor, timestep: Tensor, cond: Condition | None) -> Tensor:
        """Run the model in its own dtype (float32 timesteps) through its family's call
        (:func:`~distill.teachers.calls.call_denoiser`) and return its output in x_in's dtype."""
        kwargs = self._model_kwargs(cond, x_in.shape[0])
        mdtype = self._model_dtype() or x_in.dtype
        t = timestep.to(device=x_in.device, dtype=torch.float32)
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(x_in.shape[0])
        return call_denoiser(self.model, x_in.to(mdtype), t, kwargs).to(x_in.dtype)

    def _denoise(self, x: Tensor, sigma: SigmaLike, cond: Condition | None) -> Tensor:
        """Unguided x0 prediction in the work dtype."""
        s = self._sigma_vector(sigma, x)
        view = (-1,) + (1,) * (x.ndim - 1)
        sb = s.view(view)
        xf = x.to(s.dtype)
        t = self.sigma_to_timestep(s)
        if self.kind == "edm":
            sd = self._sigma_data
            denom = sb.square() + sd**2
            c_in = denom.rsqrt()
            c_skip = sd**2 / denom
            c_out = sb * sd * c_in
            if self.prediction_type == "v_prediction":
                c_out = -c_out
            f = self._call_model(xf * c_in, t, cond)
            return c_skip * xf + c_out * f
        if self.kind == "flow":
            tb = self._sigma_to_flow_t(sb)
            x_t = xf / (1.0 + sb)
            v = self._call_model(x_t, t, cond)
            return x_t - tb * v
        scale = (1.0 + sb.square()).rsqrt()  # sqrt(abar)
        out = self._call_model(xf * scale, t, cond)
        if self.prediction_type == "epsilon":
            return xf - sb * out
        if self.prediction_type == "v_prediction":
            # x0 = sqrt(abar) x_vp - sqrt(1 - abar) v with x_vp = sqrt(abar) x_sigma
            return scale.square() * xf - (sb * scale) * out
        return out

    def _flow_velocity(self, x_t: Tensor, t: SigmaLike, cond: Condition | None) -> Tensor:
        """Direct v = n - x0 for flow models (exact at t = 1 where sigma is infinite)."""
        tv = self._sigma_vector(t, x_t)
        return self._call_model(x_t.to(tv.dtype), tv * self.num_train_timesteps, cond)

    def _guided(
        self,
        fn: Callable[[Tensor, Tensor, Condition | None], Tensor],
        x: Tensor,
        sigma: SigmaLike,
        cond: CondLike,
        guidance_scale: float,
        null_cond: CondLike,
    ) -> Tensor:
        """Apply ``fn`` with optional CFG; the output is linear in ``fn`` so guidance commutes with it."""
        c = Condition.coerce(cond)
        if c is not None and c.is_empty():
            c = None
        s = self._sigma_vector(sigma, x)
        if self.embedded_guidance:  # Flux-dev: the scale is the model's guidance input, one branch
            if c is None:
                raise ValueError(f"{denoiser_class_name(self.model)} needs a condition (prompt embeddings)")
            if "guidance" not in (c.model_kwargs or {}):
                scale = torch.full((x.shape[0],), float(guidance_scale), device=x.device)
                c = Condition(
                    c.class_labels,
                    c.encoder_hidden_states,
                    c.added_cond_kwargs,
                    {**(c.model_kwargs or {}), "guidance": scale},
                )
            return fn(x, s, c)
        if guidance_scale == 1.0 or (c is None and null_cond is None):
            return fn(x, s, c)
        if c is None:
            raise ValueError("guidance_scale != 1 needs a cond to guide towards")
        b = x.shape[0]
        n = Condition.coerce(null_cond) if null_cond is not None else self.null_condition(c)
        assert n is not None
        for name, cc in (("cond", c), ("null_cond", n)):
            if cc.batch_size != b:
                raise ValueError(f"{name} batch size {cc.batch_size} does not match x batch size {b}")
        both = fn(torch.cat([x, x]), torch.cat([s, s]), Condition.cat(c, n))
        out_c, out_u = both[:b], both[b:]
        return out_u + guidance_scale * (out_c - out_u)

    # ---------------------------------------------------------------- public API
    def forward(
        self,
        x: Tensor,
        sigma: SigmaLike,
        cond: CondLike = None,
        guidance_scale: float = 1.0,
        null_cond: CondLike = None,
    ) -> Tensor:
        """x0_hat for ``x = x0 + sigma * n``; ``sigma`` is a float, 0-d or [B] tensor.

        With ``guidance_scale != 1`` the conditional and null branches run in one batched call and the
        result is ``x0_uncond + w * (x0_cond - x0_uncond)``; ``null_cond`` defaults to
        :meth:`null_condition` (null class for labels; text needs an explicit null).
        """
        return self._guided(self._denoise, x, sigma, cond, guidance_scale, null_cond).to(x.dtype)

    def null_condition(
        self,
        cond: CondLike,
        null_encoder_hidden_states: Tensor | None = None,
        null_added_cond_kwargs: Mapping[str, Tensor] | None = None,
    ) -> Condition:
        """The null condition for ``cond`` using this model's null class (see :func:`null_condition`)."""
        return null_condition(cond, self.num_class_embeds, null_encoder_hidden_states, null_added_cond_kwargs)

    def eps(
        self,
        x: Tensor,
        sigma: SigmaLike,
        cond: CondLike = None,
        guidance_scale: float = 1.0,
        null_cond: CondLike = None,
    ) -> Tensor:
        """Predicted noise ``(x - x0_hat) / sigma``."""
        s = self._sigma_vector(sigma, x).view((-1,) + (1,) * (x.ndim - 1))
        x0 = self._guided(self._denoise, x, sigma, cond, guidance_scale, null_cond)
        return ((x.to(s.dtype) - x0) / s).to(x.dtype)

    def score(
        self,
        x: Tensor,
        sigma: SigmaLike,
        cond: CondLike = None,
        guidance_scale: float = 1.0,
        null_cond: CondLike = None,
    ) -> Tensor:
        """Score of the noisy marginal, ``(x0_hat - x) / sigma^2``."""
        s = self._sigma_vector(sigma, x).view((-1,) + (1,) * (x.ndim - 1))
        x0 = self._guided(self._denoise, x, sigma, cond, guidance_scale, null_cond)
        return ((x0 - x.to(s.dtype)) / s.square()).to(x.dtype)

    def velocity(
        self,
        x_t: Tensor,
        t: SigmaLike,
        cond: CondLike = None,
        guidance_scale: float = 1.0,
        null_cond: CondLike = None,
    ) -> Tensor:
        """Flow velocity ``n - x0`` for ``x_t = (1 - t) x0 + t n`` (flow time ``t`` in (0, 1]).

        Flow teachers are queried directly (exact even at ``t = 1``); other teachers go through
        ``sigma = t / (1 - t)``, ``x_sigma = x_t / (1 - t)`` and ``v = (x_t - x0_hat) / t``, so ``0 < t < 1``.
        """
        if self.kind == "flow":
            return self._guided(self._flow_velocity, x_t, t, cond, guidance_scale, null_cond).to(x_t.dtype)
        tv = self._sigma_vector(t, x_t).view((-1,) + (1,) * (x_t.ndim - 1))
        x_sigma = x_t.to(tv.dtype) / (1.0 - tv)
        x0 = self._guided(
            self._denoise, x_sigma, (tv / (1.0 - tv)).reshape(-1), cond, guidance_scale, null_cond
        )
        return ((x_t.to(tv.dtype) - x0) / tv).to(x_t.dtype)

    def v_prediction(
        self,
        x: Tensor,
        sigma: SigmaLike,
        cond: CondLike = None,
        guidance_scale: float = 1.0,
        null_cond: CondLike = None,
    ) -> Tensor:
        """VP-sense ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` with ``abar = 1 / (1 + sigma^2)``."""
        s = self._sigma_vector(sigma, x).view((-1,) + (1,) * (x.ndim - 1))
        x0 = self._guided(self._denoise, x, sigma, cond, guidance_scale, null_cond)
        eps = (x.to(s.dtype) - x0) / s
        return ((eps - s * x0) * (1.0 + s.square()).rsqrt()).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"parameterization={self.parameterization!r}, scheduler={self.scheduler_class!r}, "
            f"sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g}"
        )

    # ---------------------------------------------------------------- persistence
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        subfolder: str | None = None,
        scheduler: SchedulerLike | None = None,
        **kwargs: Any,
    ) -> Denoiser:
        """Load a diffusers model folder, pipeline folder or hub id with its scheduler config.

        The source is first described from its JSON configs (:func:`~.families.describe_teacher_source`):
        a teacher the Denoiser cannot use yet (latent or transformer families: SD, SDXL, SD3, PixArt, Sana,
        Flux, DiT, LDM, ...) is refused by name with ``ValueError`` before any weights are read.

        Local layouts: a *pipeline folder* (``model_index.json``, or the ``unet/`` + ``scheduler/`` layout
        written by :meth:`save_pretrained`) uses its ``unet/`` or ``transformer/`` (or ``subfolder``) and
        ``scheduler/``; a *model folder* (``config.json`` + weights) takes its scheduler from
        ``scheduler_config.json`` next to the config, a ``scheduler/`` folder inside it, or a sibling
        ``../scheduler/``. A hub id is described through ``hf_hub_download`` of its JSON files, then only its
        denoiser and scheduler are downloaded. ``kwargs`` go to the model's ``from_pretrained``
        (``torch_dtype``, ``variant``, ...; ``revision`` also picks the hub revision). ``scheduler``
        overrides the stored one.
        """
        path = Path(path_or_id)
        if not path.exists():
            if _looks_like_hub_id(str(path_or_id)):
                return cls._from_hub(str(path_or_id), subfolder, scheduler, **kwargs)
            raise FileNotFoundError(f"Denoiser.from_pretrained: path {str(path)!r} does not exist")
        try:
            family = describe_teacher_source(path, subfolder, scheduler).require()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"Denoiser.from_pretrained: {e}") from None
        root = Path(family.source) / family.denoiser_folder
        model_cfg = root / "config.json"
        if not model_cfg.is_file():
            raise FileNotFoundError(
                f"Denoiser.from_pretrained: no model config at {str(model_cfg)!r}; expected a diffusers "
                "model folder (config.json + weights) or a pipeline folder with a unet/ or transformer/ "
                "subfolder"
            )
        if scheduler is None:
            if family.scheduler_file is None:
                tried = ", ".join(
                    str(Path(family.source) / c) for c in scheduler_config_candidates(family.denoiser_folder)
                )
                raise FileNotFoundError(
                    f"Denoiser.from_pretrained: no scheduler config for {str(path)!r}; looked for {tried}"
                )
            with open(Path(family.source) / family.scheduler_file) as f:
                scheduler = json.load(f)
        model_cls = _diffusers_model_class(family.denoiser_class, model_cfg)
        return cls(model_cls.from_pretrained(str(root), **kwargs), scheduler)

    @classmethod
    def _from_hub(
        cls, repo_id: str, subfolder: str | None, scheduler: SchedulerLike | None, **kwargs: Any
    ) -> Denoiser:
        """Hub ids: judge the teacher from its JSON configs, then download only its denoiser and scheduler
        (``huggingface_hub.snapshot_download``) and load that snapshot like a local folder."""
        import huggingface_hub

        revision = kwargs.pop("revision", None)
        family = describe_teacher_source(repo_id, subfolder, scheduler, revision=revision).require()
        if family.denoiser_class is None:
            raise FileNotFoundError(f"Denoiser.from_pretrained: hub repo {repo_id!r} has no denoiser config")
        folder = family.denoiser_folder
        prefix = f"{folder}/" if folder else ""
        configs = [MODEL_INDEX, f"{prefix}*.json"]
        if scheduler is None and family.scheduler_file is not None:
            configs.append(family.scheduler_file)
        local = None
        for weights in _weight_patterns(kwargs.get("variant")):  # safetensors first, .bin if there are none
            local = Path(
                huggingface_hub.snapshot_download(
                    repo_id, allow_patterns=configs + [prefix + w for w in weights], revision=revision
                )
            )
            if any(any((local / folder).glob(w)) for w in weights):
                break
        assert local is not None
        return cls.from_pretrained(local, subfolder=folder or None, scheduler=scheduler, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike[str], safe_serialization: bool = True) -> Path:
        """Write ``folder/unet`` (model, safetensors) and ``folder/scheduler/scheduler_config.json``.

        :meth:`from_pretrained` reads this layout back from ``folder``.
        """
        folder = Path(folder)
        if not hasattr(self.model, "save_pretrained"):
            raise TypeError(
                f"{type(self.model).__name__} has no save_pretrained; only diffusers models can be saved"
            )
        self.model.save_pretrained(str(folder / "unet"), safe_serialization=safe_serialization)
        sched_dir = folder / "scheduler"
        sched_dir.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = dict(self.scheduler_config)
        if self.scheduler_class is not None:
            cfg = {"_class_name": self.scheduler_class, **cfg}
        with open(sched_dir / SCHEDULER_CONFIG, "w") as f:
            json.dump(_jsonable(cfg), f, indent=2, sort_keys=True)
        return folder


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays / tensors (trained_betas)
        return obj.tolist()
    return obj


def _weight_patterns(variant: str | None) -> list[list[str]]:
    """File patterns of a diffusers model's weights (single file or shards), safetensors then pickle."""
    v = f".{variant}" if variant else ""
    return [
        [
            f"diffusion_pytorch_model{v}.{ext}",
            f"diffusion_pytorch_model{v}-*.{ext}",
            f"diffusion_pytorch_model-*{v}.{ext}",
        ]
        for ext in ("safetensors", "bin")
    ]


def _looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", s)) and not s.startswith((".", "/"))


def _diffusers_model_class(class_name: str | None, where: Any) -> type:
    import diffusers

    cls = getattr(diffusers, class_name, None) if class_name else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(
            f"Unsupported model class {class_name!r} in {str(where)!r}; expected a diffusers model such as "
            "UNet2DModel or UNet2DConditionModel"
        )
    return cls
