"""Teacher families: detection from JSON configs of every family, refusal by name before any weights are read,
pixel-space UNet teachers still loading as before, and hub ids served from a local folder."""

from __future__ import annotations

import json
import re
import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub
import pytest
import tiny_models
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    ModelMixin,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from torch import nn

from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.families import (
    SUPPORTED_TEACHERS,
    describe_teacher_source,
    scheduler_parameterization,
)
from distill.teachers.loading import check_teacher, load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP, T5 = ["transformers", "CLIPTextModel"], ["transformers", "T5EncoderModel"]
SD_VAE = dict(  # Stable Diffusion's AutoencoderKL shape: 4 blocks -> 8x downsampling
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


def write_minimal(
    root: Path, pipeline: str, models: dict[str, tuple[type, dict]], scheduler, **extra: list
) -> Path:
    """model_index.json + each model component's config.json (built on the meta device: no weights) +
    scheduler/scheduler_config.json: all that detection reads. ``extra``: other model_index entries."""
    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    with torch.device("meta"):
        for name, (cls, kwargs) in models.items():
            cls(**kwargs).save_config(root / name)
            index[name] = ["diffusers", cls.__name__]
    scheduler.save_config(root / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    index.update(extra)
    (root / "model_index.json").write_text(json.dumps(index))
    return root


SD_UNET = dict(sample_size=64, cross_attention_dim=768)
SDXL_UNET = dict(
    sample_size=128,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
#: family -> (pipeline class, models, scheduler, other model_index entries)
FAMILIES: dict[str, tuple[str, dict, Any, dict]] = {
    "sd": (
        "StableDiffusionPipeline",
        {"unet": (UNet2DConditionModel, SD_UNET), "vae": (AutoencoderKL, SD_VAE)},
        PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        {
            "text_encoder": CLIP,
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "safety_checker": [None, None],
        },
    ),
    "sdxl": (
        "StableDiffusionXLPipeline",
        {
            "unet": (UNet2DConditionModel, SDXL_UNET),
            "vae": (AutoencoderKL, {**SD_VAE, "scaling_factor": 0.13025}),
        },
        EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        {"text_encoder": CLIP, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
    ),
    "sd3": (
        "StableDiffusion3Pipeline",
        {
            "transformer": (SD3Transformer2DModel, {}),
            "vae": (
                AutoencoderKL,
                {**SD_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609},
            ),
        },
        FlowMatchEulerDiscreteScheduler(shift=3.0),
        {"text_encoder": CLIP, "text_encoder_2": CLIP, "text_encoder_3": T5},
    ),
    "pixart": (
        "PixArtAlphaPipeline",
        {
            "transformer": (PixArtTransformer2DModel, {"caption_channels": 4096}),
            "vae": (AutoencoderKL, SD_VAE),
        },
        DPMSolverMultistepScheduler(),
        {"text_encoder": T5},
    ),
    "sana": (
        "SanaPipeline",
        {"transformer": (SanaTransformer2DModel, {}), "vae": (AutoencoderDC, {"scaling_factor": 0.41407})},
        DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        {"text_encoder": ["transformers", "Gemma2Model"]},
    ),
    "flux": (
        "FluxPipeline",
        {
            "transformer": (FluxTransformer2DModel, {}),
            "vae": (
                AutoencoderKL,
                {**SD_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159},
            ),
        },
        FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        {"text_encoder": CLIP, "text_encoder_2": T5},
    ),
    "dit": (
        "DiTPipeline",
        {"transformer": (DiTTransformer2DModel, {}), "vae": (AutoencoderKL, SD_VAE)},
        DDIMScheduler(),
        {},
    ),
    "ldm": (
        "LDMPipeline",
        {
            "unet": (UNet2DModel, dict(sample_size=64, in_channels=3, out_channels=3)),
            "vqvae": (
                VQModel,
                dict(
                    block_out_channels=(128, 256, 512),
                    down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3,
                ),
            ),
        },
        DDIMScheduler(),
        {},
    ),
    "deepfloyd-if": (
        "IFPipeline",
        {
            "unet": (
                UNet2DConditionModel,
                dict(sample_size=64, in_channels=3, out_channels=6, cross_attention_dim=32),
            )
        },
        DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range"),
        {"text_encoder": T5},
    ),
    "consistency": (
        "ConsistencyModelPipeline",
        {"unet": (UNet2DModel, dict(sample_size=64, in_channels=3, out_channels=3))},
        CMStochasticIterativeScheduler(),
        {},
    ),
}
#: family -> (denoiser component, class, parameterization, latent sample shape, image size, conditioning,
#:            vae scaling factor, words the refusal must contain)
EXPECTED = {
    "sd": ("unet", "UNet2DConditionModel", "vp-epsilon", (4, 64, 64), (512, 512), "text", 0.18215,
           ["StableDiffusionPipeline (sd)", "AutoencoderKL (vae/)"]),
    "sdxl": ("unet", "UNet2DConditionModel", "vp-epsilon", (4, 128, 128), (1024, 1024), "text+pooled", 0.13025,
             ["StableDiffusionXLPipeline (sdxl)", "AutoencoderKL"]),
    "sd3": ("transformer", "SD3Transformer2DModel", "flow", (16, 128, 128), (1024, 1024), "text+pooled", 1.5305,
            ["StableDiffusion3Pipeline (sd3)", "AutoencoderKL", "SD3Transformer2DModel transformer"]),
    "pixart": ("transformer", "PixArtTransformer2DModel", "vp-epsilon", (4, 128, 128), (1024, 1024), "text",
               0.18215, ["PixArtAlphaPipeline (pixart)", "PixArtTransformer2DModel transformer"]),
    "sana": ("transformer", "SanaTransformer2DModel", "flow", (32, 32, 32), (1024, 1024), "text", 0.41407,
             ["SanaPipeline (sana)", "AutoencoderDC", "SanaTransformer2DModel"]),
    "flux": ("transformer", "FluxTransformer2DModel", "flow", None, None, "text+pooled", 0.3611,
             ["FluxPipeline (flux)", "FluxTransformer2DModel"]),
    "dit": ("transformer", "DiTTransformer2DModel", "vp-epsilon", (4, 32, 32), (256, 256), "class_labels", 0.18215,
            ["DiTPipeline (dit)", "DiTTransformer2DModel"]),
    "ldm": ("unet", "UNet2DModel", "vp-epsilon", (3, 64, 64), (256, 256), "none", 0.18215,
            ["LDMPipeline (ldm)", "VQModel (vqvae/)"]),
    "deepfloyd-if": ("unet", "UNet2DConditionModel", "vp-epsilon", (3, 64, 64), (64, 64), "text", None,
                     ["IFPipeline (deepfloyd-if)", "outputs 6", "learned variance"]),
    "consistency": ("unet", "UNet2DModel", None, (3, 64, 64), (64, 64), "none", None,
                    ["ConsistencyModelPipeline (consistency)", "CMStochasticIterativeScheduler"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        name: write_minimal(root / name, pipe, models, sched, **extra)
        for name, (pipe, models, sched, extra) in FAMILIES.items()
    }


@pytest.fixture
def no_weights(monkeypatch):
    """Fail loudly if anything tries to load model weights."""

    def boom(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained was called: weights were read")

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(boom))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_detected_and_judged_from_configs_alone(name, family_dirs, no_weights):
    comp, cls, param, shape, image, cond, scaling, words = EXPECTED[name]
    fam = describe_teacher_source(family_dirs[name])
    assert (fam.family, fam.pipeline_class) == (name, FAMILIES[name][0])
    assert (fam.denoiser_component, fam.denoiser_class, fam.denoiser_folder) == (comp, cls, comp)
    assert fam.parameterization == param and fam.scheduler_class == type(FAMILIES[name][2]).__name__
    assert fam.sample_shape == shape and fam.image_size == image and fam.conditioning == cond
    assert fam.vae_scaling_factor == scaling and fam.latent == (scaling is not None)
    if name != "consistency":  # every family the Denoiser calls is accepted, without reading weights
        assert fam.supported, fam.reason
        assert check_teacher(str(family_dirs[name])) == fam
        return
    assert not fam.supported
    # refused by family name, before any weights (the folders have none, and loading them would fail)
    for call in (lambda: load_teacher(str(family_dirs[name])), lambda: check_teacher(str(family_dirs[name]))):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "teachers are not supported yet: needs" in msg and SUPPORTED_TEACHERS in msg
        for word in words:
            assert word in msg


def test_latent_details(family_dirs):
    sd3 = describe_teacher_source(family_dirs["sd3"])
    assert sd3.text_encoders == ("text_encoder", "text_encoder_2", "text_encoder_3")
    assert (sd3.vae_component, sd3.vae_class, sd3.vae_shift_factor, sd3.vae_scale_factor) == (
        "vae",
        "AutoencoderKL",
        0.0609,
        8,
    )
    assert (
        sd3.prediction_type == "flow_prediction" and sd3.scheduler_file == "scheduler/scheduler_config.json"
    )
    sana = describe_teacher_source(family_dirs["sana"])
    assert sana.vae_scale_factor == 32 and sana.parameterization == "flow"  # DPM-Solver in flow mode
    ldm = describe_teacher_source(family_dirs["ldm"])
    assert (ldm.vae_component, ldm.vae_class, ldm.vae_scale_factor) == ("vqvae", "VQModel", 4)
    assert describe_teacher_source(family_dirs["sd"]).text_encoders == (
        "text_encoder",
    )  # safety_checker null


def test_component_folder_of_a_latent_pipeline_is_described_as_the_pipeline(family_dirs, no_weights):
    """An LDM used to load silently from its unet/ (trained on latents, exported without the VQ-VAE): its
    component folder is the pipeline's denoiser, so the recipes find its autoencoder."""
    fam = describe_teacher_source(family_dirs["ldm"] / "unet")
    assert (fam.family, fam.denoiser_folder, fam.vae_component) == ("ldm", "unet", "vqvae")
    assert fam.source == str(family_dirs["ldm"]) and fam.latent


def test_unknown_pipeline_and_bare_model_folders(tmp_path, no_weights):
    kandinsky = write_minimal(
        tmp_path / "k",
        "KandinskyV22Pipeline",
        {"unet": (UNet2DConditionModel, {}), "movq": (VQModel, {})},
        DDPMScheduler(),
    )
    fam = describe_teacher_source(kandinsky)
    assert fam.family == "kandinsky" and fam.vae_component == "movq" and not fam.supported
    other = write_minimal(
        tmp_path / "o",
        "SomeNewLatentPipeline",
        {"transformer": (DiTTransformer2DModel, {}), "vae": (AutoencoderKL, {})},
        DDIMScheduler(),
    )
    config = other / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "LuminaNextDiT2DModel"}))
    assert describe_teacher_source(other).family == "some-new-latent"
    with pytest.raises(
        ValueError,
        match=r"SomeNewLatentPipeline \(some-new-latent\) teachers are not supported yet: needs a call of "
        r"its LuminaNextDiT2DModel transformer \(supported: SD3Transformer2DModel, ",
    ):
        check_teacher(str(other))
    # a bare transformer model folder with a callable class is a pixel-space transformer teacher
    with torch.device("meta"):
        DiTTransformer2DModel().save_config(tmp_path / "bare")
    EDMEulerScheduler().save_config(tmp_path / "bare")
    bare = describe_teacher_source(tmp_path / "bare")
    assert (bare.family, bare.pipeline_class, bare.denoiser_folder) == ("pixel-transformer", None, "")
    assert bare.supported and bare.conditioning == "class_labels"
    # a bare autoencoder folder is no denoiser
    with torch.device("meta"):
        AutoencoderKL().save_config(tmp_path / "vae")
    DDPMScheduler().save_config(tmp_path / "vae")
    with pytest.raises(
        ValueError, match=r"AutoencoderKL \(pixel-model\) .* needs a UNet2DModel or UNet2DConditionModel"
    ):
        check_teacher(str(tmp_path / "vae"))
    # a pipeline with no denoiser at all
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]})
    )
    with pytest.raises(ValueError, match=r"needs .*a unet/ or transformer/ denoiser"):
        load_teacher(str(tmp_path / "none"))


# ------------------------------------------------------------------------------------- supported teachers
def test_tiny_edm_teacher_is_supported(teacher_dir, class_teacher_dir):
    fam = check_teacher(str(teacher_dir), conditioning=("none", "class_labels"))
    assert (fam.family, fam.pipeline_class, fam.denoiser_component) == ("edm-unet", None, "unet")
    assert fam.supported and fam.reason == "pixel-space UNet2DModel with EDMEulerScheduler (edm)"
    assert (fam.sample_shape, fam.image_size, fam.conditioning, fam.latent) == (
        (1, 8, 8),
        (8, 8),
        "none",
        False,
    )
    assert describe_teacher_source(class_teacher_dir).conditioning == "class_labels"
    assert check_teacher("default").family == "edm-unet"
    # loads as before: the same model and scheduler as building the Denoiser from its parts
    unet = UNet2DModel.from_pretrained(teacher_dir / "unet")
    direct = Denoiser(unet, EDMEulerScheduler.from_pretrained(teacher_dir / "scheduler"))
    loaded = load_teacher(str(teacher_dir))
    x, sigma = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 7.0])
    torch.testing.assert_close(loaded(x, sigma), direct(x, sigma), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x, sigma), tiny_models_denoiser()(x, sigma), rtol=0, atol=0)


def tiny_models_denoiser() -> Denoiser:
    """The in-memory teacher that tiny_edm_teacher saves (same seed), before any save/load."""
    from distill.teachers.builders import edm_scheduler

    return Denoiser(tiny_models.tiny_unet(0), edm_scheduler())


def test_ddpm_pipeline_folder_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "ddpm")
    fam = check_teacher(str(tmp_path / "ddpm"))
    assert (fam.family, fam.pipeline_class, fam.parameterization) == (
        "pixel-unet",
        "DDPMPipeline",
        "vp-epsilon",
    )
    assert fam.sample_shape == (3, 32, 32)
    loaded = load_teacher(str(tmp_path / "ddpm"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        loaded(x, torch.tensor([0.5, 20.0])),
        Denoiser(unet, scheduler)(x, torch.tensor([0.5, 20.0])),
        rtol=0,
        atol=0,
    )
    assert (
        load_teacher(str(tmp_path / "ddpm" / "unet")).parameterization == "vp-epsilon"
    )  # the component alone


def test_text_unet_supported_by_denoiser_but_refused_by_a_label_only_recipe(tmp_path):
    Denoiser(tiny_models.tiny_text_unet(), EDMEulerScheduler()).save_pretrained(tmp_path / "text")
    fam = check_teacher(str(tmp_path / "text"))
    assert fam.supported and fam.conditioning == "text"
    with pytest.raises(
        ValueError, match=r"conditioned on 'text'; this recipe can condition on \['class_labels', 'none'\]"
    ):
        check_teacher(str(tmp_path / "text"), conditioning=("none", "class_labels"))
    d = load_teacher(str(tmp_path / "text"))
    assert d(torch.zeros(1, 1, 8, 8), 1.0, Condition(encoder_hidden_states=torch.zeros(1, 3, 8))).shape == (
        1,
        1,
        8,
        8,
    )


def test_scheduler_override_is_judged(teacher_dir):
    assert describe_teacher_source(teacher_dir, scheduler=DDIMScheduler()).parameterization == "vp-epsilon"
    refusal = r"UNet2DModel \(pixel-unet\) teachers are not supported yet: needs an EDM, discrete VP or "
    refusal += r"flow-matching scheduler \(Unsupported scheduler 'CMStochasticIterativeScheduler'"
    with pytest.raises(ValueError, match=refusal):
        Denoiser.from_pretrained(teacher_dir, scheduler=CMStochasticIterativeScheduler())


# -------------------------------------------------------------------------- scheduler rules stay in step
class _Probe(nn.Module):
    def forward(self, sample, timestep):
        return sample


SCHEDULERS = [
    DDPMScheduler(),
    DDIMScheduler(prediction_type="v_prediction"),
    PNDMScheduler(beta_schedule="scaled_linear"),
    EulerDiscreteScheduler(prediction_type="sample"),
    EDMEulerScheduler(prediction_type="v_prediction"),
    FlowMatchEulerDiscreteScheduler(),
    DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True),
    CMStochasticIterativeScheduler(),
    {"_class_name": "DDPMScheduler", "prediction_type": "banana"},
    {"_class_name": "DDPMScheduler", "beta_schedule": "cubic"},
    {"_class_name": "EDMEulerScheduler", "prediction_type": "sample"},
    {"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True},
    {"_class_name": "NotAScheduler", "sigma_min": 0.1},
]


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=lambda s: str(getattr(s, "config", s))[:60])
def test_scheduler_parameterization_agrees_with_denoiser(scheduler):
    try:
        expected = Denoiser(_Probe(), scheduler).parameterization
    except ValueError as e:
        with pytest.raises(ValueError) as err:
            scheduler_parameterization(scheduler)
        assert str(err.value) == str(e)
        return
    assert scheduler_parameterization(scheduler) == expected


# ------------------------------------------------------------------------------------------------ hub ids
class FakeHub:
    """``hf_hub_download`` / ``snapshot_download`` serving repo ids from local folders (copied, as the hub
    cache would be), recording every file handed out."""

    def __init__(self, repos: dict[str, Path], cache: Path) -> None:
        self.repos, self.cache = repos, cache
        self.files: list[str] = []
        self.snapshots = 0

    def hf_hub_download(self, repo_id, filename, subfolder=None, revision=None, **kwargs):
        rel = f"{subfolder}/{filename}" if subfolder else filename
        if repo_id not in self.repos:  # what an offline hub answers for a repo it never cached
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"{rel} of {repo_id} is not cached")
        src = self.repos[repo_id] / rel
        if not src.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{rel} not in {repo_id}")
        return str(self._copy(repo_id, rel))

    def snapshot_download(self, repo_id, allow_patterns=None, revision=None, **kwargs):
        self.snapshots += 1
        root = self.repos[repo_id]
        for src in root.rglob("*"):
            rel = src.relative_to(root).as_posix()
            if src.is_file() and (allow_patterns is None or any(fnmatch(rel, p) for p in allow_patterns)):
                self._copy(repo_id, rel)
        return str(self.cache / repo_id)

    def _copy(self, repo_id: str, rel: str) -> Path:
        dst = self.cache / repo_id / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.repos[repo_id] / rel, dst)
        self.files.append(rel)
        return dst


@pytest.fixture
def hub(tmp_path, monkeypatch, teacher_dir, family_dirs, tiny_pipeline_dir):
    pipe = tmp_path / "repos" / "edm"
    shutil.copytree(teacher_dir, pipe)
    (pipe / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "EDMEulerScheduler"],
            }
        )
    )
    (pipe / "unused").mkdir()
    (pipe / "unused" / "big.safetensors").write_bytes(b"0" * 64)
    pickled = tmp_path / "repos" / "pickled"
    UNet2DModel.from_pretrained(teacher_dir / "unet").save_pretrained(pickled, safe_serialization=False)
    shutil.copy(teacher_dir / "scheduler" / "scheduler_config.json", pickled)
    repos = {
        "org/edm": pipe,
        "org/pickled": pickled,
        "org/consistency": family_dirs["consistency"],
        "org/tiny-sd3": tiny_pipeline_dir("sd3"),
    }
    fake = FakeHub(repos, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_hub_teacher_equals_local_load(hub, teacher_dir):
    fam = describe_teacher_source("org/edm")
    assert (fam.family, fam.pipeline_class, fam.denoiser_folder) == ("edm-unet", "DDPMPipeline", "unet")
    assert all(f.endswith(".json") for f in hub.files) and hub.snapshots == 0  # configs only
    hub.files.clear()
    remote, local = load_teacher("org/edm"), load_teacher(str(teacher_dir))
    assert (
        "unused/big.safetensors" not in hub.files and "unet/diffusion_pytorch_model.safetensors" in hub.files
    )
    assert remote.parameterization == local.parameterization == "edm"
    assert remote.state_dict().keys() == local.state_dict().keys()
    for k, v in local.state_dict().items():
        assert torch.equal(remote.state_dict()[k], v), k
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(remote(x, 2.0), local(x, 2.0), rtol=0, atol=0)


def test_hub_bare_model_with_pickled_weights(hub, teacher_dir):
    remote = Denoiser.from_pretrained("org/pickled")
    assert hub.snapshots == 2  # no safetensors, so a second snapshot fetched the .bin
    assert "diffusion_pytorch_model.bin" in hub.files
    local = load_teacher(str(teacher_dir))
    for k, v in local.state_dict().items():  # same weights (outputs may differ in the last bit: pickled
        assert torch.equal(remote.state_dict()[k], v), k  # storages are aligned differently)
    assert remote.scheduler_config == local.scheduler_config


def test_hub_transformer_teacher_downloads_only_its_denoiser(hub, tiny_pipeline_dir):
    remote = load_teacher("org/tiny-sd3")
    local = load_teacher(str(tiny_pipeline_dir("sd3")))
    assert remote.parameterization == local.parameterization == "flow"
    for k, v in local.state_dict().items():
        assert torch.equal(remote.state_dict()[k], v), k
    weights = [f for f in hub.files if not f.endswith(".json")]
    assert weights and all(f.startswith("transformer/") for f in weights), weights  # no text encoders, no VAE


def test_hub_unsupported_teacher_refused_before_download(hub, no_weights):
    name = "ConsistencyModelPipeline (consistency)"
    for call in (lambda: load_teacher("org/consistency"), lambda: check_teacher("org/consistency")):
        with pytest.raises(ValueError, match=rf"{re.escape(name)} teachers are not supported yet"):
            call()
    assert hub.snapshots == 0 and all(f.endswith(".json") for f in hub.files)


def test_uncached_hub_id_offline_says_so(hub):
    with pytest.raises(
        FileNotFoundError, match=r"'org/elsewhere': model_index\.json.* not in the local Hugging Face cache"
    ):
        load_teacher("org/elsewhere")
    with pytest.raises(
        FileNotFoundError, match=r"no model config in 'org/sd3-parts'"
    ):  # reachable, not diffusers
        hub.repos["org/sd3-parts"] = hub.cache / "empty"
        hub.repos["org/sd3-parts"].mkdir(parents=True)
        describe_teacher_source("org/sd3-parts")


def test_missing_files_still_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model config"):
        load_teacher(str(tmp_path))
    tiny_models.tiny_unet().save_pretrained(tmp_path / "lonely")
    with pytest.raises(FileNotFoundError, match=r"no scheduler config.*scheduler_config\.json"):
        load_teacher(str(tmp_path / "lonely"))


def test_an_exported_student_folder_is_a_supported_teacher(tmp_path, teacher_dir):
    """Students ship their pipeline file ([module, class] in model_index.json); reflow's next round and SiD
    from a student load them as teachers."""
    from distill.export.generator import export_generator

    folder = export_generator(
        Denoiser.from_pretrained(teacher_dir), tmp_path / "student", [2.5], str(teacher_dir), "SiD", {}
    )
    assert json.loads((folder / "model_index.json").read_text())["_class_name"][-1] == "OneStepPipeline"
    family = check_teacher(str(folder))
    assert (
        family.pipeline_class == "OneStepPipeline"
        and family.supported
        and family.denoiser_component == "unet"
    )
    torch.testing.assert_close(
        load_teacher(str(folder)).model.state_dict(), Denoiser.from_pretrained(teacher_dir).model.state_dict()
    )
