"""What kind of teacher a folder or hub id holds, read from its JSON configs alone (no weights).

A diffusers pipeline folder names its pipeline class and components in ``model_index.json``; each component
folder has a ``config.json`` (models) or ``scheduler_config.json`` (schedulers). That is enough to tell which
family a teacher is (pixel-space UNet, Stable Diffusion, SDXL, SD3, PixArt, Sana, Flux, DiT, LDM, ...), whether
it is latent, what it is conditioned on, and whether :class:`~distill.teachers.denoiser.Denoiser` can call it.
:func:`describe_teacher_source` returns that description as a :class:`TeacherFamily`, so a recipe can refuse a
teacher by name (and check its conditioning) before it downloads or copies any weights.

This module also owns the scheduler names and parsing shared with the Denoiser (it imports nothing from the
Denoiser, so the Denoiser's loader can use it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.teachers.calls import TRANSFORMER_CALLS

__all__ = [
    "EDM_SCHEDULERS",
    "FLOW_SCHEDULERS",
    "SUPPORTED_TEACHERS",
    "TeacherFamily",
    "describe_teacher_source",
    "scheduler_class_and_config",
    "scheduler_config_candidates",
    "scheduler_parameterization",
]

#: Scheduler classes using diffusers' EDM preconditioning.
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
#: Scheduler classes using the rectified-flow convention.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")
EDM_PREDICTIONS = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")

MODEL_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
MODEL_INDEX = "model_index.json"
#: Denoiser classes whose call ``model(sample, timestep, class_labels= / encoder_hidden_states=)`` the
#: Denoiser makes today.
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
DENOISER_COMPONENTS = ("unet", "transformer")
VAE_COMPONENTS = ("vae", "vqvae", "movq")
SUPPORTED_TEACHERS = (
    "UNet2DModel / UNet2DConditionModel teachers in pixel space or on the latents of an AutoencoderKL, VQModel "
    "or AutoencoderDC (SD 1.x/2.x, SDXL, LDM), and SD3, PixArt, Sana, Flux and DiT transformers, with an EDM, "
    "discrete VP (DDPM, DDIM, Euler, ...) or flow-matching scheduler"
)
#: autoencoders whose latents the toolkit decodes and encodes (distill/teachers/latents.py)
VAE_CLASSES = ("AutoencoderKL", "VQModel", "AutoencoderDC")
#: pipelines refused whatever their parts: what they would need
UNSUPPORTED_PIPELINES = {
    "LDMTextToImagePipeline": "an encoder for its LDMBert text model (the pipeline has no encode_prompt)",
    "KandinskyV22Pipeline": "image-embedding conditioning from its prior pipeline",
    "StableDiffusionUpscalePipeline": "a low-resolution image input and noise-level conditioning",
}

#: ``_class_name`` of model_index.json -> family name, for pipelines whose name says more than their parts.
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionUpscalePipeline": "sd-upscale",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "SanaPipeline": "sana",
    "SanaSprintPipeline": "sana",
    "FluxPipeline": "flux",
    "DiTPipeline": "dit",
    "LDMPipeline": "ldm",
    "LDMTextToImagePipeline": "ldm-text",
    "IFPipeline": "deepfloyd-if",
    "ConsistencyModelPipeline": "consistency",
    "ScoreSdeVePipeline": "score-sde-ve",
    "KandinskyV22Pipeline": "kandinsky",
}
#: family of a pixel-space UNet teacher without a named pipeline, by Denoiser parameterization kind
PIXEL_FAMILIES = {"edm": "edm-unet", "flow": "flow-unet", "vp": "pixel-unet"}


# --------------------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------------------
def scheduler_class_and_config(scheduler: Mapping[str, Any] | Any) -> tuple[str | None, dict[str, Any]]:
    """Normalise a scheduler object or config dict to (class name, plain config dict with class defaults)."""
    if isinstance(scheduler, Mapping):
        cfg = dict(scheduler)
        name = cfg.get("_class_name")
    elif hasattr(scheduler, "config") and isinstance(scheduler.config, Mapping):
        cfg = dict(scheduler.config)
        name = type(scheduler).__name__
    else:
        raise TypeError(
            f"scheduler must be a diffusers scheduler or its config dict, got {type(scheduler).__name__}"
        )
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if isinstance(scheduler, Mapping) and name is not None:
        # Fill the class's own defaults (e.g. LCMScheduler defaults to scaled_linear, DDPM to linear).
        import diffusers

        sched_cls = getattr(diffusers, name, None)
        if isinstance(sched_cls, type) and hasattr(sched_cls, "from_config"):
            try:
                full = dict(sched_cls.from_config(cfg).config)
            except Exception:  # a config diffusers rejects is validated by Denoiser below
                full = {}
            cfg = {**{k: v for k, v in full.items() if not k.startswith("_")}, **cfg}
    return name, cfg


def scheduler_parameterization(scheduler: Mapping[str, Any] | Any) -> str:
    """``edm``, ``flow`` or ``vp-<prediction_type>``: how the Denoiser reads a teacher with this scheduler.

    ``Denoiser.__init__`` classifies its scheduler with this same function, so a teacher folder is judged from
    its JSON before its weights are loaded exactly as it will be after; raises ``ValueError`` naming what is
    wrong.
    """
    name, cfg = scheduler_class_and_config(scheduler)
    prediction = cfg.get("prediction_type", "epsilon")
    is_vp_config = cfg.get("beta_schedule") is not None or cfg.get("trained_betas") is not None
    if name in EDM_SCHEDULERS:
        if prediction not in EDM_PREDICTIONS:
            raise ValueError(
                f"Unsupported prediction_type {prediction!r} for {name}; diffusers' EDM preconditioning "
                f"supports {list(EDM_PREDICTIONS)}"
            )
        return "edm"
    if name in FLOW_SCHEDULERS or (
        is_vp_config and (cfg.get("use_flow_sigmas") or prediction == "flow_prediction")
    ):
        if cfg.get("invert_sigmas"):
            raise ValueError(f"{name} with invert_sigmas=True (t=1 is clean) is not supported")
        return "flow"
    if is_vp_config:
        if prediction not in VP_PREDICTIONS:
            raise ValueError(
                f"Unsupported prediction_type {prediction!r} for {name}; supported for discrete VP "
                f"schedulers: {list(VP_PREDICTIONS)}"
            )
        schedule = cfg.get("beta_schedule", "linear")
        if cfg.get("trained_betas") is None and schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"Unsupported beta_schedule {schedule!r}; supported: {list(BETA_SCHEDULES)} or trained_betas"
            )
        return f"vp-{prediction}"
    raise ValueError(
        f"Unsupported scheduler {name!r}: expected a discrete VP scheduler config (beta_schedule / "
        f"trained_betas, e.g. DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler), one of "
        f"{list(EDM_SCHEDULERS)} or one of {list(FLOW_SCHEDULERS)}"
    )


def scheduler_config_candidates(model_folder: str) -> list[str]:
    """Where a model folder's scheduler config may be, relative to the source root, first match wins.

    ``model_folder`` is the denoiser's folder relative to the root ('' for a bare model folder): next to its
    config, in a ``scheduler/`` inside it, in a sibling ``../scheduler/``, or in the root's ``scheduler/``.
    """
    base = model_folder.strip("/")
    join = lambda *parts: "/".join(p for p in parts if p)  # noqa: E731
    parent = "/".join(base.split("/")[:-1]) if base else ".."
    found = [
        join(base, SCHEDULER_CONFIG),
        join(base, "scheduler", SCHEDULER_CONFIG),
        join(parent, "scheduler", SCHEDULER_CONFIG),
        join("scheduler", SCHEDULER_CONFIG),
    ]
    return list(dict.fromkeys(found))


# --------------------------------------------------------------------------------------------------------
# The description
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherFamily:
    """A teacher folder or hub id as its configs describe it (see :func:`describe_teacher_source`).

    Paths (``denoiser_folder``, ``scheduler_file``) are relative to ``source`` with '/' separators, so they
    mean the same for a local folder and a hub repository. ``sample_channels`` / ``sample_size`` are the
    denoiser's sample (latents for a latent teacher); ``vae_scale_factor`` maps its size to image pixels.
    """

    source: str
    family: str
    pipeline_class: str | None
    denoiser_component: str | None
    denoiser_class: str | None
    denoiser_folder: str
    scheduler_class: str | None
    scheduler_file: str | None
    parameterization: str | None
    prediction_type: str | None
    vae_component: str | None
    vae_class: str | None
    vae_scaling_factor: float | None
    vae_shift_factor: float | None
    vae_scale_factor: int | None
    text_encoders: tuple[str, ...]
    conditioning: str
    sample_channels: int | None
    sample_size: tuple[int, int] | None
    supported: bool
    reason: str

    @property
    def latent(self) -> bool:
        """The denoiser works on autoencoder latents, not pixels."""
        return self.vae_component is not None

    @property
    def sample_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of what the denoiser denoises, when the configs give both."""
        if self.sample_channels is None or self.sample_size is None:
            return None
        return (self.sample_channels, *self.sample_size)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the images: the sample size, times the VAE's downsampling for a latent teacher."""
        if self.sample_size is None:
            return None
        factor = self.vae_scale_factor or 1
        return (self.sample_size[0] * factor, self.sample_size[1] * factor)

    @property
    def label(self) -> str:
        """How messages name the teacher: its pipeline class, else its model class."""
        return self.pipeline_class or self.denoiser_class or "model"

    def refusal(self) -> str:
        """The one-line message for an unsupported teacher."""
        return (
            f"{self.label} ({self.family}) teachers are not supported yet: {self.reason}; supported: "
            f"{SUPPORTED_TEACHERS} (teacher {self.source!r})"
        )

    def require(self) -> TeacherFamily:
        """Return self, or raise ``ValueError`` with :meth:`refusal` for an unsupported teacher."""
        if not self.supported:
            raise ValueError(self.refusal())
        return self


# --------------------------------------------------------------------------------------------------------
# Reading configs locally or from the hub
# --------------------------------------------------------------------------------------------------------
JsonReader = Callable[[str], "dict[str, Any] | None"]


def _local_reader(root: Path) -> JsonReader:
    def read(rel: str) -> dict[str, Any] | None:
        path = root / rel
        if not path.is_file():
            return None
        with open(path) as f:
            return json.load(f)

    return read


def _hub_reader(repo_id: str, revision: str | None, offline_misses: list[str]) -> JsonReader:
    """JSON files of a hub repo through ``huggingface_hub.hf_hub_download`` (one small file each, cached);
    files missing from an unreachable hub's local cache are appended to ``offline_misses``."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def read(rel: str) -> dict[str, Any] | None:
        if rel.startswith(".."):
            return None
        folder, _, filename = rel.rpartition("/")
        try:
            path = huggingface_hub.hf_hub_download(
                repo_id, filename, subfolder=folder or None, revision=revision
            )
        except LocalEntryNotFoundError:
            offline_misses.append(rel)
            return None
        except EntryNotFoundError:  # not in the repository
            return None
        with open(path) as f:
            return json.load(f)

    return read


def _components(index: Mapping[str, Any]) -> dict[str, str]:
    """model_index.json entries ``name: [library, class]`` that are present (not ``[null, null]``)."""
    return {
        k: v[1]
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == 2 and v[1] is not None
    }


def _kebab(name: str) -> str:
    base = name.removesuffix("Pipeline") or name
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", base).lower()


def _size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    return None


def _vae_scale_factor(cfg: Mapping[str, Any]) -> int | None:
    """Spatial downsampling of an autoencoder, as its diffusers pipelines compute it."""
    blocks = cfg.get("encoder_block_out_channels") or cfg.get("block_out_channels")  # AutoencoderDC first
    return 2 ** (len(blocks) - 1) if isinstance(blocks, (list, tuple)) and blocks else None


def _conditioning(denoiser_cfg: Mapping[str, Any], is_unet: bool, text_encoders: tuple[str, ...]) -> str:
    """none / class_labels / text / text+pooled / text+class_labels, from the denoiser config."""
    cfg = denoiser_cfg
    text = bool(text_encoders) or any(
        cfg.get(k) is not None for k in ("cross_attention_dim", "caption_channels", "joint_attention_dim")
    )
    pooled = cfg.get("addition_embed_type") == "text_time" or cfg.get("pooled_projection_dim") is not None
    if is_unet:
        labels = cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None
    else:  # DiT: class labels through adaptive norm, when nothing textual is configured
        labels = not text and cfg.get("num_embeds_ada_norm") is not None
    parts = (["text"] if text else []) + (["pooled"] if text and pooled else []) + (["class_labels"] * labels)
    return "+".join(parts) or "none"


def _transformer_call_class(class_name: str | None, cfg: Mapping[str, Any]) -> str | None:
    """The transformer class the Denoiser calls for ``class_name``: itself when it has a call, and for the
    hub's legacy ``Transformer2DModel`` folders the class diffusers remaps them to by ``norm_type``."""
    if class_name in TRANSFORMER_CALLS:
        return class_name
    if class_name == "Transformer2DModel":
        return {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}.get(
            cfg.get("norm_type", "")
        )
    return None


def describe_teacher_source(
    path_or_id: str | os.PathLike[str],
    subfolder: str | None = None,
    scheduler: Mapping[str, Any] | Any | None = None,
    revision: str | None = None,
) -> TeacherFamily:
    """Describe a teacher from its JSON configs only: local folder, pipeline folder or hub id.

    ``subfolder`` names the denoiser's folder when it is not ``unet/`` or ``transformer/``; ``scheduler``
    (object or config) replaces the stored scheduler, as in ``Denoiser.from_pretrained``. A model folder
    inside a pipeline folder (``.../unet``) is described as that pipeline's component, so the unet of a
    latent pipeline is refused like the pipeline. Raises ``FileNotFoundError`` when no model config exists.
    """
    source = str(path_or_id)
    path = Path(path_or_id)
    if path.exists():
        if subfolder is None and (path / MODEL_CONFIG).is_file():
            parent_index = path.parent / MODEL_INDEX
            if parent_index.is_file():
                with open(parent_index) as f:
                    listed = _components(json.load(f))
                if path.name in listed or path.name in DENOISER_COMPONENTS:
                    return describe_teacher_source(path.parent, path.name, scheduler)
        return _describe(source, _local_reader(path), subfolder, scheduler, lambda rel: (path / rel).is_dir())
    offline_misses: list[str] = []
    try:
        return _describe(source, _hub_reader(source, revision, offline_misses), subfolder, scheduler, None)
    except FileNotFoundError as e:
        if offline_misses:
            raise FileNotFoundError(
                f"hub id {source!r}: {', '.join(offline_misses)} not in the local Hugging Face cache and "
                "the hub cannot be reached (offline: HF_HUB_OFFLINE=1 or no network); download it first or "
                "pass a folder"
            ) from e
        raise


def _describe(
    source: str,
    read: JsonReader,
    subfolder: str | None,
    scheduler: Mapping[str, Any] | Any | None,
    is_dir: Callable[[str], bool] | None,
) -> TeacherFamily:
    index = read(MODEL_INDEX) or {}
    listed = _components(index)
    pipeline_class = index.get("_class_name")
    if isinstance(pipeline_class, (list, tuple)):  # a pipeline shipped in the folder: [module file, class]
        pipeline_class = pipeline_class[-1]
    needs: list[str] = []

    # 1. the denoiser: explicit subfolder, a bare model folder, or the pipeline's unet/ or transformer/
    folder: str | None = None
    denoiser_cfg: dict[str, Any] | None = None
    if subfolder is not None:
        folder = subfolder.strip("/")
        denoiser_cfg = read(f"{folder}/{MODEL_CONFIG}")
    elif not listed and (bare := read(MODEL_CONFIG)) is not None:
        folder, denoiser_cfg = "", bare
    else:
        for name in [c for c in DENOISER_COMPONENTS if c in listed] or list(DENOISER_COMPONENTS):
            cfg = read(f"{name}/{MODEL_CONFIG}")
            if cfg is not None or name in listed:
                folder, denoiser_cfg = name, cfg
                break
    if folder is None:
        if not listed and pipeline_class is None:
            raise FileNotFoundError(
                f"no model config in {source!r}: expected a diffusers model folder (config.json + "
                "weights) or a pipeline folder with a unet/ or transformer/ subfolder (model_index.json)"
            )
        needs.append(f"a unet/ or transformer/ denoiser (model_index.json lists {sorted(listed)})")
    component = folder.split("/")[-1] if folder else None
    denoiser_class = (denoiser_cfg or {}).get("_class_name") or (listed.get(component) if component else None)
    if folder is not None and denoiser_cfg is None and component not in listed:
        raise FileNotFoundError(
            f"no model config at {source}/{folder}/{MODEL_CONFIG}: expected a diffusers model folder "
            "(config.json + weights) or a pipeline folder with a unet/ or transformer/ subfolder"
        )
    denoiser_cfg = denoiser_cfg or {}

    # 2. the autoencoder, if any: a latent teacher
    vae_component = next((c for c in VAE_COMPONENTS if c in listed), None)
    if vae_component is None and is_dir is not None:
        vae_component = next((c for c in VAE_COMPONENTS if is_dir(c) and read(f"{c}/{MODEL_CONFIG}")), None)
    vae_cfg = (read(f"{vae_component}/{MODEL_CONFIG}") if vae_component else None) or {}
    vae_class = vae_cfg.get("_class_name") or listed.get(vae_component or "")
    vae_scale = _vae_scale_factor(vae_cfg) if vae_component else None

    # 3. the scheduler
    sched_file = None
    sched_cfg: Any = scheduler
    if scheduler is None and folder is not None:
        for rel in scheduler_config_candidates(folder):
            sched_cfg = read(rel)
            if sched_cfg is not None:
                sched_file = rel
                break
    sched_class = parameterization = prediction = None
    if sched_cfg is not None:
        sched_class, full = scheduler_class_and_config(sched_cfg)
        prediction = full.get("prediction_type", "epsilon")
        try:
            parameterization = scheduler_parameterization(sched_cfg)
        except ValueError as e:
            needs.append(f"an EDM, discrete VP or flow-matching scheduler ({e})")
        if parameterization == "flow":
            prediction = "flow_prediction"

    # 4. what the Denoiser cannot do
    text_encoders = tuple(sorted(c for c in listed if c.startswith("text_encoder") or c == "bert"))
    is_unet = denoiser_class in UNET_CLASSES
    is_transformer = not is_unet and (component == "transformer" or "Transformer" in (denoiser_class or ""))
    if pipeline_class in UNSUPPORTED_PIPELINES:
        needs.append(UNSUPPORTED_PIPELINES[pipeline_class])
    if is_transformer:
        callable_class = _transformer_call_class(denoiser_class, denoiser_cfg)
        if callable_class is None:
            needs.append(
                f"a call of its {denoiser_class} transformer (supported: {', '.join(TRANSFORMER_CALLS)})"
            )
    elif denoiser_class is not None and not is_unet:
        needs.append(f"a UNet2DModel or UNet2DConditionModel denoiser, not {denoiser_class}")
    in_ch, out_ch = denoiser_cfg.get("in_channels"), denoiser_cfg.get("out_channels")
    if is_unet and in_ch is not None and out_ch is not None and out_ch not in (in_ch, 2 * in_ch):
        needs.append(
            f"a denoiser whose output has its input's {in_ch} channels ({denoiser_class} takes {in_ch} and "
            f"outputs {out_ch}: extra conditioning inputs such as a low-resolution or masked image)"
        )
    if vae_component is not None and vae_class not in VAE_CLASSES:
        needs.append(f"a {', '.join(VAE_CLASSES)} autoencoder, not {vae_class} ({vae_component}/)")

    kind = parameterization.split("-")[0] if parameterization else None
    if pipeline_class in PIPELINE_FAMILIES:
        family = PIPELINE_FAMILIES[pipeline_class]
    elif vae_component is None and is_unet and kind in PIXEL_FAMILIES:
        family = PIXEL_FAMILIES[kind]
    elif pipeline_class:
        family = _kebab(pipeline_class)
    else:
        space = "latent" if vae_component else "pixel"
        family = f"{space}-{'transformer' if is_transformer else 'unet' if is_unet else 'model'}"

    channels = vae_cfg.get("latent_channels") if vae_component else None
    channels = channels if channels is not None else in_ch
    supported = not needs
    if supported:
        reason = f"{'latent' if vae_component else 'pixel-space'} {denoiser_class or 'model'}"
        reason += f" with {sched_class} ({parameterization})" if sched_class else " (scheduler not found yet)"
    else:
        reason = "needs " + (", ".join(needs[:-1]) + " and " if len(needs) > 1 else "") + needs[-1]
    return TeacherFamily(
        source=source,
        family=family,
        pipeline_class=pipeline_class,
        denoiser_component=component,
        denoiser_class=denoiser_class,
        denoiser_folder=folder or "",
        scheduler_class=sched_class,
        scheduler_file=sched_file,
        parameterization=parameterization,
        prediction_type=prediction,
        vae_component=vae_component,
        vae_class=vae_class,
        vae_scaling_factor=vae_cfg.get("scaling_factor") if vae_component else None,
        vae_shift_factor=vae_cfg.get("shift_factor") if vae_component else None,
        vae_scale_factor=vae_scale,
        text_encoders=text_encoders,
        conditioning=_conditioning(denoiser_cfg, is_unet, text_encoders),
        sample_channels=channels,
        sample_size=_size(denoiser_cfg.get("sample_size")),
        supported=supported,
        reason=reason,
    )
