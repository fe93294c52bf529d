"""onestep-toolkit's student pipelines, self-contained: this file is copied into every exported student folder.

An exported student folder (model_index.json + unet/ + scheduler/) names its pipeline class in
model_index.json as ``"_class_name": ["onestep_pipeline", "OneStepPipeline"]`` (or ``"RectifiedFlowPipeline"``)
and holds this file as ``onestep_pipeline.py``, so plain diffusers loads it where onestep-toolkit is not
installed::

    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("path/to/student", trust_remote_code=True)
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images

(diffusers runs code shipped in a model folder only when told ``trust_remote_code=True``, local folders too.)

It may import only torch, diffusers and the standard library. That is why :class:`X0Predictor` repeats the
subset of ``distill.teachers.denoiser.Denoiser``'s scheduler conversions that exported students use (EDM
preconditioning, discrete VP epsilon / v / sample prediction, flow matching) and :func:`sample_steps` repeats
the k-step loop of ``distill.sampling.student.student_sample``; the toolkit's tests hold both copies equal.
Inside the toolkit, ``distill.pipelines.OneStepPipeline`` / ``RectifiedFlowPipeline`` subclass the classes
below, so the toolkit and plain diffusers sample with this same code.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

#: this file's name (without .py) inside an exported folder: model_index.json's ``_class_name[0]``
PIPELINE_MODULE = "onestep_pipeline"
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


class X0Predictor:
    """``x0_hat = D(x, sigma)`` for ``x = x0 + sigma * n`` from a diffusers UNet under its scheduler's convention.

    * EDM (``EDMEulerScheduler``...): ``c_skip x + c_out F(c_in x, 0.25 log sigma)`` (``c_out`` negated for
      ``v_prediction``), as diffusers' EDM schedulers precondition.
    * Discrete VP (any config with ``beta_schedule`` / ``trained_betas``: DDPM, DDIM, Euler...): the UNet sees
      ``x / sqrt(1 + sigma^2)`` at the float timestep that interpolates ``log sigma_t`` over the table (clamped
      to its ends); epsilon, v or sample prediction. Euler's ``timestep_type="continuous"`` with v-prediction
      gets ``0.25 log sigma``.
    * Flow matching (``FlowMatchEulerDiscreteScheduler``, or a VP config with ``use_flow_sigmas`` /
      ``flow_prediction``): ``t = sigma / (1 + sigma)``, ``x_t = x / (1 + sigma)``, ``x0 = x_t - t v(x_t, T t)`` (T = num_train_timesteps).

    Coefficients run in float32 (float64 for float64 ``x``), the UNet in its own dtype; the result has x's dtype.
    """

    def __init__(self, scheduler: Any) -> None:
        name = type(scheduler).__name__
        cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        self.sigma_data = float(cfg.get("sigma_data", 0.5))
        self.continuous_time = False
        is_vp = cfg.get("beta_schedule") is not None or cfg.get("trained_betas") is not None
        if name in EDM_SCHEDULERS:
            self.kind = "edm"
            allowed: tuple[str, ...] = ("epsilon", "v_prediction")
        elif name in FLOW_SCHEDULERS or (
            is_vp and (cfg.get("use_flow_sigmas") or self.prediction_type == "flow_prediction")
        ):
            if cfg.get("invert_sigmas"):
                raise ValueError(f"{name} with invert_sigmas=True (t=1 is clean) is not supported")
            self.kind, self.prediction_type, allowed = "flow", "flow_prediction", ("flow_prediction",)
        elif is_vp:
            self.kind = "vp"
            allowed = ("epsilon", "v_prediction", "sample")
            self.log_sigmas = _vp_log_sigmas(cfg)
            self.continuous_time = (
                cfg.get("timestep_type") == "continuous" and self.prediction_type == "v_prediction"
            )
        else:
            raise ValueError(
                f"Unsupported scheduler {name!r}: expected an EDM scheduler {list(EDM_SCHEDULERS)}, a flow "
                f"scheduler {list(FLOW_SCHEDULERS)} or a discrete VP scheduler (beta_schedule / trained_betas)"
            )
        if self.prediction_type not in allowed:
            raise ValueError(
                f"Unsupported prediction_type {self.prediction_type!r} for {name}: expected {allowed}"
            )

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The float32 timestep the UNet receives at noise level ``sigma`` ([B])."""
        s = sigma if sigma.dtype == torch.float64 else sigma.float()
        if self.kind == "edm" or self.continuous_time:
            return (0.25 * s.clamp(min=1e-20).log()).float()
        if self.kind == "flow":
            return ((1.0 - 1.0 / (1.0 + s)) * self.num_train_timesteps).float()
        table = self.log_sigmas.to(s.device, torch.float32 if s.device.type == "mps" else torch.float64)
        ls = s.to(table.dtype).clamp(min=1e-30).log().clamp(min=table[0], max=table[-1])
        idx = (torch.searchsorted(table, ls, right=True) - 1).clamp(0, table.numel() - 2)
        lo, hi = table[idx], table[idx + 1]
        return (idx.to(table.dtype) + (ls - lo) / (hi - lo)).float()

    def __call__(self, unet: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, **model_kwargs: Any):
        """x0_hat for ``x`` ([B, ...]) at ``sigma`` ([B]); ``model_kwargs`` (class_labels...) go to the UNet."""
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = sigma.to(x.device, work).reshape(-1)
        sb = s.view(-1, *[1] * (x.ndim - 1))
        xf = x.to(work)
        t = self.timestep(s)
        mdtype = next((p.dtype for p in unet.parameters() if p.is_floating_point()), work)

        def model(x_in: torch.Tensor) -> torch.Tensor:
            out = unet(x_in.to(mdtype), t.to(x.device, torch.float32), **model_kwargs)
            if not isinstance(out, torch.Tensor):
                out = out.sample if hasattr(out, "sample") else out[0]
            return out.to(work)

        if self.kind == "edm":
            denom = sb.square() + self.sigma_data**2
            c_in = denom.rsqrt()
            c_out = sb * self.sigma_data * c_in
            if self.prediction_type == "v_prediction":
                c_out = -c_out
            x0 = (self.sigma_data**2 / denom) * xf + c_out * model(xf * c_in)
        elif self.kind == "flow":
            x_t = xf / (1.0 + sb)
            x0 = x_t - (1.0 - 1.0 / (1.0 + sb)) * model(x_t)
        else:
            scale = (1.0 + sb.square()).rsqrt()  # sqrt(alpha_bar)
            out = model(xf * scale)
            if self.prediction_type == "epsilon":
                x0 = xf - sb * out
            elif self.prediction_type == "v_prediction":
                x0 = scale.square() * xf - (sb * scale) * out
            else:
                x0 = out
        return x0.to(x.dtype)


def _vp_log_sigmas(cfg: dict[str, Any]) -> torch.Tensor:
    """``log sigma_t`` (float64) of a discrete VP table, built by diffusers' DDPMScheduler from the config.

    A zero-terminal-SNR table (alpha_bar = 0 at the end) gets diffusers' 2**-24 there, or a log-linear
    extrapolation of the last two entries where 2**-24 would not keep the table decreasing.
    """
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in cfg.items() if k in accepted}
    abar = DDPMScheduler(**{**kwargs, "prediction_type": "epsilon"}).alphas_cumprod.to(torch.float64).clone()
    if float(abar[-1]) <= 0.0:
        abar[-1] = 2.0**-24
        if abar.numel() > 2 and abar[-1] >= abar[-2]:
            abar[-1] = abar[-2] ** 2 / abar[-3]
    return 0.5 * ((1 - abar) / abar).log()


def sample_steps(
    x0_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    sigmas: Sequence[float],
    deterministic: bool,
    fresh_noise: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """x0 after one call per noise level from ``x = sigmas[0] z``; between calls ``x`` moves to the next level
    with fresh noise (SiD: ``x0 + sigma' n``) or ``deterministic``ally (rectified flow's Euler step in EDM form:
    ``x0 + sigma' (x - x0) / sigma``).

    The toolkit's one k-step loop (``distill.sampling.student.student_sample`` calls it): only the last call
    records gradients, which SiD's generator loss needs; under ``torch.no_grad`` it is plain sampling.
    """
    x = z * sigmas[0]
    for i, sigma in enumerate(sigmas):
        last = i + 1 == len(sigmas)
        with contextlib.nullcontext() if last else torch.no_grad():
            x0 = x0_fn(x, torch.full((z.shape[0],), float(sigma), device=z.device))
        if last:
            return x0
        nxt = float(sigmas[i + 1])
        if deterministic:
            x0 = x0.to(x.dtype)
            x = x0 + (nxt / float(sigma)) * (x - x0)
        else:
            x = x0 + nxt * fresh_noise()
    raise ValueError("sigmas is empty")


def flow_step_sigmas(num_steps: int, sigma_max: float) -> list[float]:
    """EDM noise levels of ``num_steps`` uniform Euler steps in flow time from ``t_max = sigma_max / (1 + sigma_max)``
    (``sigma = t / (1 - t)``; the final level 0 is left out)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps={num_steps} must be >= 1")
    t_max = sigma_max / (1.0 + sigma_max)
    times = [t_max * (1.0 - i / num_steps) for i in range(1, num_steps)]
    return [float(sigma_max)] + [t / (1.0 - t) for t in times]


class OneStepPipeline(DiffusionPipeline):
    """x = G(sigma_0 z; sigma_0); a k-step student re-noises to sigma_i with fresh noise and applies G again."""

    model_cpu_offload_seq = "unet"
    #: how a k-step student moves to the next noise level (False: fresh noise, as SiD trains it)
    deterministic_steps = False

    def __init__(self, unet, scheduler, step_sigmas: list[float] | None = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(step_sigmas=list(step_sigmas or [2.5]))

    # ---------------------------------------------------------------- saving and loading
    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' save, plus this file as ``onestep_pipeline.py`` so the folder loads without the toolkit."""
        target = Path(save_directory) / f"{PIPELINE_MODULE}.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or not target.samefile(__file__):
            shutil.copyfile(__file__, target)
        super().save_pretrained(save_directory, *args, **kwargs)

    def to_json_string(self) -> str:
        """model_index.json names ``[onestep_pipeline, <class>]``: diffusers then loads the class from the file
        in the folder (with ``trust_remote_code=True``)."""
        config = json.loads(super().to_json_string())
        own = next((c.__name__ for c in type(self).__mro__ if c.__module__ == __name__), type(self).__name__)
        config["_class_name"] = [PIPELINE_MODULE, own]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any):
        """The folder's config with ``_class_name`` as a plain name, so ``ThisClass.from_pretrained(folder)``
        builds this class (a ``[module, class]`` pair would make diffusers import the folder's file instead)."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][-1]
        return out

    # ---------------------------------------------------------------- sampling
    def sigmas_for(self, num_inference_steps: int | None) -> list[float]:
        """The noise levels sampled for ``num_inference_steps`` (default: the steps the student was trained for)."""
        sigmas = [float(s) for s in self.config.step_sigmas]
        steps = num_inference_steps or len(sigmas)
        if not 1 <= steps <= len(sigmas):
            raise ValueError(
                f"num_inference_steps={steps}: this student was trained for 1..{len(sigmas)} steps"
            )
        return sigmas[:steps]

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        class_labels: torch.Tensor | list[int] | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` images from unit noise ``noise`` (drawn from ``generator`` if not given);
        ``output_type``: "pil", "np" or "pt" (a tensor in [-1, 1])."""
        sigmas = self.sigmas_for(num_inference_steps)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        device = self.unet.device
        dtype = torch.float32 if self.deterministic_steps else self.unet.dtype
        if noise is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if noise.shape[0] != batch_size:
            raise ValueError(f"noise has {noise.shape[0]} samples for batch_size={batch_size}")
        kwargs: dict[str, Any] = {}
        if class_labels is not None:
            kwargs["class_labels"] = torch.as_tensor(class_labels, device=device).long()
        if encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states.to(device, self.unet.dtype)
        for name, value in kwargs.items():
            if value.shape[0] != batch_size:
                raise ValueError(f"{name} has {value.shape[0]} entries for batch_size={batch_size}")
        x0 = X0Predictor(self.scheduler)
        images = sample_steps(
            lambda x, sigma: x0(self.unet, x, sigma, **kwargs),
            noise.to(device, dtype),
            sigmas,
            deterministic=self.deterministic_steps,
            fresh_noise=lambda: randn_tensor(shape, generator=generator, device=device, dtype=dtype),
        ).clamp(-1, 1)
        if output_type == "pt":
            out = images
        else:
            arr = images.add(1).div(2).permute(0, 2, 3, 1).float().cpu().numpy()
            out = self.numpy_to_pil(arr) if output_type == "pil" else arr
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


class RectifiedFlowPipeline(OneStepPipeline):
    """Deterministic 1- or N-step rectified-flow sampling: Euler in flow time, written in EDM form as
    ``x' = x0_hat + sigma' (x - x0_hat) / sigma`` (no fresh noise), from ``x = step_sigmas[0] * z``.

    A reflowed velocity field (``any_steps=True``) samples in any number of steps on the uniform flow-time
    grid; a distilled N-step student (``any_steps=False``) uses its training grid ``step_sigmas`` (or a prefix).
    """

    deterministic_steps = True

    def __init__(
        self, unet, scheduler, step_sigmas: list[float] | None = None, any_steps: bool = False
    ) -> None:
        super().__init__(unet=unet, scheduler=scheduler, step_sigmas=step_sigmas)
        self.register_to_config(any_steps=bool(any_steps))

    def sigmas_for(self, num_inference_steps: int | None) -> list[float]:
        if not self.config.any_steps:
            return super().sigmas_for(num_inference_steps)
        steps = num_inference_steps or len(self.config.step_sigmas)
        return flow_step_sigmas(steps, float(self.config.step_sigmas[0]))
