"""LatentCodec: a latent teacher's latents decode to exactly the image its own diffusers pipeline makes from
them, encoding applies the family's scaling (and shift) to the VAE's own output, pixel teachers have no codec,
bad images are refused by name; and evaluation decodes latents before grids, statistics and the metric rule."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline, FluxPipeline
from tiny_pipelines import IMAGE_SIZES, call_kwargs, kl_vae

from distill.evaluation import quality
from distill.evaluation.commands import main as eval_main
from distill.evaluation.quality import GRID_SAMPLES, QualityTracker, evaluate_sampler
from distill.sampling.ode import sample
from distill.teachers.latents import LatentCodec

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT_FAMILIES = ("sd", "sdxl", "sd3", "pixart", "sana", "flux", "dit", "ldm_vq", "ldm_kl")
#: pipelines without output_type="latent": their latents are the last scheduler step's output (see below)
NO_LATENT_OUTPUT = ("dit", "ldm_vq", "ldm_kl")


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(quality, "_SKIP_NOTED", set())


@pytest.fixture(scope="module")
def codecs(tiny_pipeline_dir):
    built: dict[str, LatentCodec] = {}

    def get(family: str) -> LatentCodec:
        if family not in built:
            built[family] = LatentCodec.from_teacher(str(tiny_pipeline_dir(family)))
        return built[family]

    return get


def pipeline_latents_and_image(folder, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The family pipeline's final latents and its image in [0, 1] ([B, 3, H, W]) for the same seed."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**call_kwargs(family), "num_inference_steps": 2}
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    if family in NO_LATENT_OUTPUT:
        # DiTPipeline and LDMPipeline have no output_type="latent": record the last scheduler step's output,
        # which is what they then unscale and decode (DiT with guidance: its first, conditional half)
        steps: list[torch.Tensor] = []
        step = pipe.scheduler.step

        def recording_step(*args, **kw):
            out = step(*args, **kw)
            steps.append(out.prev_sample if hasattr(out, "prev_sample") else out[0])
            return out

        pipe.scheduler.step = recording_step
        image = pipe(generator=gen(), output_type="pt" if family == "dit" else "np", **kwargs).images
        image = torch.as_tensor(np.asarray(image)).permute(0, 3, 1, 2) if family != "dit" else image
        latents = steps[-1][: len(image)]
        return latents, image
    latents = pipe(generator=gen(), output_type="latent", **kwargs).images
    image = pipe(generator=gen(), output_type="pt", **kwargs).images
    if family == "flux":  # the transformer's packed 2x2 patches -> [B, 16, h, w]
        size = IMAGE_SIZES[family]
        latents = FluxPipeline._unpack_latents(latents, size, size, pipe.vae_scale_factor)
    return latents, image


@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_decode_matches_the_family_pipeline(family, tiny_pipeline_dir, codecs):
    latents, image = pipeline_latents_and_image(tiny_pipeline_dir(family), family)
    codec = codecs(family)
    decoded = codec.decode(latents)
    assert decoded.dtype == torch.float32 and decoded.shape == image.shape
    assert decoded.shape[-2:] == codec.image_size_for(latents.shape[-2:]) == (IMAGE_SIZES[family],) * 2
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), image.float(), rtol=0, atol=2e-5)
    # the convention matters at this tolerance: the VAE on the latents as they are gives another image; a
    # VQ-VAE's quantization absorbs that, so there the wrong convention is decoding without quantizing
    with torch.no_grad():
        if family == "ldm_vq":
            wrong = codec.vae.decode(codec.to_vae_latents(latents), force_not_quantize=True).sample
        else:
            wrong = codec.vae.decode(latents).sample
    assert ((wrong / 2 + 0.5).clamp(0, 1) - image).abs().max() > 1e-2
    if codec.shift_factor is not None:  # SD3, Flux: and without the shift, yet another
        with torch.no_grad():
            unshifted = codec.vae.decode(latents / codec.scaling_factor).sample
        assert ((unshifted / 2 + 0.5).clamp(0, 1) - image).abs().max() > 1e-3


@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_encode_applies_the_scaling_and_shift_to_the_vae_output(family, codecs):
    codec = codecs(family)
    size = IMAGE_SIZES[family]
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae, scale = codec.vae, codec.vae.config.scaling_factor
    shift = {"sd3": 0.0609, "flux": 0.1159}.get(family, 0.0)
    assert codec.shift_factor == (shift or None) and codec.scaling_factor == pytest.approx(scale)
    with torch.no_grad():
        encoded = vae.encode(images)
        if hasattr(encoded, "latent_dist"):
            direct = (encoded.latent_dist.mode() - shift) * scale
            drawn = (encoded.latent_dist.sample(torch.Generator().manual_seed(3)) - shift) * scale
            torch.testing.assert_close(
                codec.encode(images, generator=torch.Generator().manual_seed(3)), drawn, rtol=0, atol=0
            )
            assert not torch.allclose(drawn, direct)
        else:  # VQModel: unquantized encoder output; AutoencoderDC: its latent
            direct = getattr(encoded, "latents", None)
            direct = (encoded.latent if direct is None else direct) * scale
            torch.testing.assert_close(codec.encode(images), direct, rtol=0, atol=0)  # deterministic
    latents = codec.encode(images, sample=False)
    torch.testing.assert_close(latents, direct, rtol=1e-6, atol=1e-6)
    assert latents.dtype == torch.float32
    assert latents.shape == (2, codec.latent_channels, *codec.latent_size_for((size, size)))
    assert codec.image_shape_for(latents.shape[1:]) == (3, size, size)
    torch.testing.assert_close(codec.to_vae_latents(codec.from_vae_latents(latents)), latents)
    assert codec.decode(latents, batch_size=1).shape == images.shape


def test_latents_mean_and_std_as_sdxl_pipeline_when_the_config_has_them():
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.5, 1.0, 2.0]
    vae = kl_vae(latents_mean=mean, latents_std=std, scaling_factor=0.5)
    codec = LatentCodec(vae)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    with torch.no_grad():
        expected = vae.decode(z * s / 0.5 + m).sample  # StableDiffusionXLPipeline's denormalisation
    torch.testing.assert_close(codec.decode(z), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(codec.from_vae_latents(z * s / 0.5 + m), z, rtol=1e-5, atol=1e-5)


def test_upcast_keeps_an_fp16_sdxl_vae_in_float32(tiny_pipeline_dir):
    sdxl = LatentCodec.from_teacher(str(tiny_pipeline_dir("sdxl")), torch_dtype=torch.float16)
    sd = LatentCodec.from_teacher(str(tiny_pipeline_dir("sd")), torch_dtype=torch.float16)
    assert sdxl.upcast and sdxl.dtype == torch.float32 and "upcast" in repr(sdxl)
    assert not sd.upcast and sd.dtype == torch.float16  # SD's pipeline decodes in fp16
    assert (
        sdxl.to(dtype=torch.float16).dtype == torch.float32
        and sd.to(dtype=torch.float32).dtype == torch.float32
    )


def test_component_folders_find_the_pipeline_vae(tiny_pipeline_dir):
    for family, component in [("sd", "unet"), ("pixart", "transformer"), ("ldm_vq", "unet")]:
        folder = tiny_pipeline_dir(family)
        codec = LatentCodec.from_teacher(str(folder / component))
        vae = "vqvae" if family == "ldm_vq" else "vae"
        assert codec is not None and codec.source == f"{folder}/{vae}"
    codec = LatentCodec.from_teacher(tiny_pipeline_dir("sana"))  # a Path works too
    assert (
        codec.scale_factor == 4
        and codec.latent_size_for(32) == (8, 8)
        and codec.image_size_for(8) == (32, 32)
    )
    assert type(codec.vae).__name__ == "AutoencoderDC" and not codec.vae.training
    assert not any(p.requires_grad for p in codec.vae.parameters())


def test_pixel_teachers_have_no_codec(tiny_pipeline_dir, teacher_dir):
    assert LatentCodec.from_teacher(str(tiny_pipeline_dir("ddpm"))) is None
    assert LatentCodec.from_teacher(str(teacher_dir)) is None
    assert LatentCodec.from_teacher("default") is None


def test_missing_vae_folder_is_named(tiny_pipeline_dir, tmp_path):
    folder = shutil.copytree(tiny_pipeline_dir("sd"), tmp_path / "sd")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ValueError, match=r"autoencoder folder .*sd/vae has no config.json"):
        LatentCodec.from_teacher(str(folder))


def test_bad_images_and_latents_are_refused_by_name(codecs):
    codec = codecs("sd")
    good = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"dtype torch.uint8.*x / 127.5 - 1"):
        codec.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"span \[0, 255\]; expected \[-1, 1\]"):
        codec.encode(good + torch.linspace(0, 255, 16))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 16, 16\): expected \[B, 3, H, W\]"):
        codec.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"image size 15x16 is not a positive multiple of .* factor 2"):
        codec.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match=r"latents of shape \(1, 3, 8, 8\): expected \[B, 4, h, w\]"):
        codec.decode(torch.zeros(1, 3, 8, 8))
    codec.encode(good + 1.05)  # a little overshoot (resizing) is fine
    assert codec.encode(good).shape == (1, 4, 8, 8)


# ---------------------------------------------------------------------------------------------- evaluation
class CountingDenoiser(torch.nn.Module):
    """A stand-in latent teacher that counts the samples it denoises."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.in_channels, self.sample_size = channels, size
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.rows = 0

    def forward(self, x, sigma, cond=None):
        self.rows += x.shape[0]
        return x * self.scale / (1 + sigma)


def fake_trainer(tmp_path):
    logged = []

    def log_images(tag, images, upscale=1):
        logged.append(images)
        return tmp_path / f"{tag}.png"

    trainer = SimpleNamespace(
        accelerator=Accelerator(cpu=True),
        device=torch.device("cpu"),
        config=SimpleNamespace(progress_bar=False),
        images_seen=10,
        step=1,
        log_images=log_images,
    )
    return trainer, logged


def test_tracker_decodes_before_the_grid_and_statistics(tmp_path, codecs, capsys):
    codec = codecs("sd")
    trainer, logged = fake_trainer(tmp_path)
    tracker = QualityTracker(trainer, num_samples=5000, seed=3, shape=(4, 8, 8), decode=codec.decode)
    assert tracker.image_shape == (3, 16, 16) and tracker.noise.shape == (GRID_SAMPLES, 4, 8, 8)
    assert "FD/precision/recall skipped for 3x16x16" in capsys.readouterr().err
    metrics = tracker.evaluate(lambda z, cond: torch.tanh(z), tag="g")
    expected = codec.decode(torch.tanh(tracker.noise)).clamp(-1, 1)
    assert logged[0].shape == (GRID_SAMPLES, 3, 16, 16)
    torch.testing.assert_close(logged[0], expected, rtol=0, atol=1e-6)
    assert metrics["mean"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert metrics["std"] == pytest.approx(float(expected.std()), abs=1e-6)


def test_tracker_judges_feature_metrics_on_the_decoded_shape(tmp_path):
    trainer, _ = fake_trainer(tmp_path)
    # digits-shaped latents that decode to 3x16x16 images: a grid's worth, no digits metrics
    to_rgb = lambda z: z.repeat(1, 3, 2, 2)  # noqa: E731
    tracker = QualityTracker(trainer, num_samples=600, seed=1, shape=(1, 8, 8), decode=to_rgb)
    assert len(tracker.noise) == GRID_SAMPLES
    assert "fd" not in tracker.evaluate(lambda z, cond: torch.tanh(z), tag="a")
    # 4x4x4 latents that decode to digits-shaped images: every sample, digits metrics
    to_digits = lambda z: z.reshape(len(z), 1, 8, 8)  # noqa: E731
    tracker = QualityTracker(trainer, num_samples=600, seed=1, shape=(4, 4, 4), decode=to_digits)
    assert len(tracker.noise) == 600 and tracker.image_shape == (1, 8, 8)
    assert "fd" in tracker.evaluate(lambda z, cond: torch.tanh(z), tag="b")


def test_evaluate_sampler_decodes_and_judges_the_image_shape(codecs, capsys):
    codec = codecs("sd")
    fake = CountingDenoiser(4, 8)
    metrics, images = evaluate_sampler(fake, 5000, nfe=3, seed=1, progress_bar=False, decode=codec.decode)
    assert fake.rows == GRID_SAMPLES * 3 and images.shape == (GRID_SAMPLES, 3, 16, 16)
    latents = sample(fake, GRID_SAMPLES, nfe=3, generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(images, codec.decode(latents).clamp(-1, 1), rtol=0, atol=1e-6)
    assert metrics["mean"] == pytest.approx(float(images.mean())) and "fd" not in metrics
    assert "skipped for 3x16x16" in capsys.readouterr().err
    digits_shaped_latents = CountingDenoiser(1, 8)
    evaluate_sampler(
        digits_shaped_latents, 5000, nfe=1, progress_bar=False, decode=lambda z: z.repeat(1, 3, 1, 1)
    )
    assert digits_shaped_latents.rows == GRID_SAMPLES  # not 5000: the images are 3x8x8


def test_eval_command_decodes_a_latent_teacher(tiny_pipeline_dir, codecs, monkeypatch, capsys):
    """``onestep eval`` on an (unconditional) latent pipeline folder: its samples (latents from a stand-in
    denoiser, so the figures can be recomputed here) are decoded by the folder's VAE before the statistics. Text
    folders are refused outside the Fashion-MNIST metrics (tests/test_fashion_metrics.py)."""
    fake = CountingDenoiser(4, 8)
    monkeypatch.setattr("distill.evaluation.commands.load_teacher", lambda model: fake)
    folder = str(tiny_pipeline_dir("ldm_kl"))
    assert eval_main(["--model", folder, "--nfe", "1", "--num-samples", "500", "--no-progress"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    latents = sample(fake, GRID_SAMPLES, nfe=1, generator=torch.Generator().manual_seed(0)).images
    images = codecs("ldm_kl").decode(latents).clamp(-1, 1)
    assert out["num_samples"] == GRID_SAMPLES and "fd" not in out
    assert out["mean"] == pytest.approx(float(images.mean()), rel=1e-5)
    assert out["std"] == pytest.approx(float(images.std()), rel=1e-5)
    assert "decoding latents with LatentCodec(AutoencoderKL" in captured.err
    assert "skipped for 3x16x16" in captured.err


def test_a_vae_without_block_widths_needs_a_scale_factor():
    vae = SimpleNamespace(config={"scaling_factor": 1.0}, eval=lambda: vae, requires_grad_=lambda flag: vae)
    with pytest.raises(ValueError, match="pass scale_factor"):
        LatentCodec(vae)
