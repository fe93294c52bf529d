"""The tiny pipelines of tests/tiny_pipelines.py load as real teachers do (plain ``DiffusionPipeline``), keep
their family's layout, sample finite images of the tiny size that depend on the condition, and build
identically every time, without any download."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_pipelines import (
    FAMILIES,
    IMAGE_SIZES,
    PROMPT_FAMILIES,
    WORDS,
    call_kwargs,
    clip_tokenizer,
    gemma_tokenizer,
    t5_tokenizer,
    tiny_ldm,
    tiny_sd,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (pipeline class, component classes, component config values) that a recipe meets on the real one
LAYOUT = {
    "sd": (
        "StableDiffusionPipeline",
        {"scheduler": "PNDMScheduler"},
        {("scheduler", "prediction_type"): "epsilon"},
    ),
    "sd_v": (
        "StableDiffusionPipeline",
        {"scheduler": "DDIMScheduler"},
        {("scheduler", "prediction_type"): "v_prediction"},
    ),
    "sdxl": (
        "StableDiffusionXLPipeline",
        {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"},
        {("unet", "addition_embed_type"): "text_time", ("unet", "cross_attention_dim"): 64},
    ),
    "sd3": (
        "StableDiffusion3Pipeline",
        {
            "transformer": "SD3Transformer2DModel",
            "text_encoder_3": "T5EncoderModel",
            "tokenizer_3": "T5Tokenizer",
        },
        {("vae", "latent_channels"): 16, ("scheduler", "shift"): 3.0},
    ),
    "pixart": (  # learned sigma: 2 x 4 output channels
        "PixArtAlphaPipeline",
        {"transformer": "PixArtTransformer2DModel", "text_encoder": "T5EncoderModel"},
        {("transformer", "in_channels"): 4, ("transformer", "out_channels"): 8},
    ),
    "pixart_flow": (  # flow-trained, as fashion-flow: no learned sigma, DPM-Solver on flow sigmas
        "PixArtSigmaPipeline",
        {"transformer": "PixArtTransformer2DModel", "scheduler": "DPMSolverMultistepScheduler"},
        {("transformer", "out_channels"): 4, ("scheduler", "prediction_type"): "flow_prediction"},
    ),
    "sana": (
        "SanaPipeline",
        {"text_encoder": "Gemma2Model", "tokenizer": "GemmaTokenizer", "vae": "AutoencoderDC"},
        {("scheduler", "prediction_type"): "flow_prediction", ("scheduler", "use_flow_sigmas"): True},
    ),
    "flux": (
        "FluxPipeline",
        {"transformer": "FluxTransformer2DModel", "text_encoder_2": "T5EncoderModel"},
        {("transformer", "guidance_embeds"): True, ("vae", "latent_channels"): 16},
    ),
    "dit": (
        "DiTPipeline",
        {"transformer": "DiTTransformer2DModel", "scheduler": "DDIMScheduler"},
        {("transformer", "in_channels"): 4, ("transformer", "out_channels"): 8},
    ),
    "ldm_vq": ("LDMPipeline", {"vqvae": "VQModel", "unet": "UNet2DModel"}, {}),
    "ldm_kl": ("LDMPipeline", {"vqvae": "AutoencoderKL", "unet": "UNet2DModel"}, {}),
    "ddpm": (
        "DDPMPipeline",
        {"unet": "UNet2DModel", "scheduler": "DDPMScheduler"},
        {("unet", "in_channels"): 3},
    ),
}


def sample(pipe, family: str, condition=None, seed: int = 0) -> np.ndarray:
    """One 2-step image of ``family``'s tiny pipeline as a (1, H, W, 3) array in [0, 1]."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    kwargs = call_kwargs(family, condition)
    return pipe(**kwargs, num_inference_steps=2, output_type="np", generator=generator).images


def test_every_family_has_a_layout():
    assert set(LAYOUT) == set(FAMILIES) == set(IMAGE_SIZES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_and_samples(family, tiny_pipeline_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(family))
    pipeline_class, classes, config = LAYOUT[family]
    assert type(pipe).__name__ == pipeline_class
    assert {name: type(getattr(pipe, name)).__name__ for name in classes} == classes
    assert {key: getattr(pipe, key[0]).config[key[1]] for key in config} == config

    image = sample(pipe, family)
    size = IMAGE_SIZES[family]
    assert image.shape == (1, size, size, 3)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    assert image.std() > 1e-4, "a constant image says nothing about the denoiser"
    np.testing.assert_array_equal(sample(pipe, family), image)  # seeded: the same image again
    if family in PROMPT_FAMILIES:  # the prompt reaches the denoiser
        other = sample(pipe, family, condition="a painting of a dog")
    elif family == "dit":  # the class reaches the denoiser
        other = sample(pipe, family, condition=7)
    else:
        other = sample(pipe, family, seed=1)
    assert np.abs(other - image).max() > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_builders_are_deterministic_and_tiny(family, tiny_pipeline_dir, tmp_path):
    first, again = tiny_pipeline_dir(family), FAMILIES[family](tmp_path / family)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert (first / f).read_bytes() == (again / f).read_bytes(), f"{f} differs between two builds"
    assert sum((first / f).stat().st_size for f in files) < 2_000_000


def test_sd3_samples_without_t5(tiny_pipeline_dir):
    """SD3 users drop T5 at load time; the pipeline then feeds zeros in its place, which changes the image."""
    folder = tiny_pipeline_dir("sd3")
    pipe = DiffusionPipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    image = sample(pipe, "sd3")
    assert image.shape == (1, IMAGE_SIZES["sd3"], IMAGE_SIZES["sd3"], 3) and np.isfinite(image).all()
    with_t5 = sample(DiffusionPipeline.from_pretrained(folder), "sd3")
    assert np.abs(with_t5 - image).max() > 1e-3


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_transformer_keeps_the_hub_legacy_class_name(family, tiny_pipeline_dir):
    """The DiT and PixArt-alpha hub folders name the transformer ``Transformer2DModel``; diffusers remaps it."""
    folder = tiny_pipeline_dir(family)
    assert json.loads((folder / "model_index.json").read_text())["transformer"] == [
        "diffusers",
        "Transformer2DModel",
    ]
    assert (
        json.loads((folder / "transformer" / "config.json").read_text())["_class_name"]
        == "Transformer2DModel"
    )
    assert (
        type(DiffusionPipeline.from_pretrained(folder).transformer).__name__
        == LAYOUT[family][1]["transformer"]
    )


def test_dit_labels_come_from_model_index(tiny_pipeline_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("dit"))
    assert pipe.get_label_ids(["class 3", "class 999"]) == [3, 999]
    assert pipe.transformer.config.num_embeds_ada_norm == 1000  # DiTPipeline's null class is 1000


@pytest.mark.parametrize("build", [clip_tokenizer, t5_tokenizer, gemma_tokenizer])
def test_tokenizer_keeps_words_whole_and_round_trips(build, tmp_path):
    tokenizer = build()
    specials = set(tokenizer.all_special_ids)
    for word in WORDS:
        pieces = [i for i in tokenizer(word).input_ids if i not in specials]
        assert len(pieces) == 1, f"{word!r} -> {tokenizer.convert_ids_to_tokens(pieces)}"
    text = "A photo of a Zebra, 42!"  # words outside the vocabulary fall back to characters, not <unk>
    ids = tokenizer(text).input_ids
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(decoded.split()).lower() == "".join(text.split()).lower()
    tokenizer.save_pretrained(tmp_path)
    loaded = type(tokenizer).from_pretrained(tmp_path)
    assert loaded(text).input_ids == ids and len(loaded) == len(tokenizer)


def test_clip_tokenizer_frames_with_start_and_end_tokens():
    tokenizer = clip_tokenizer()
    ids = tokenizer("a cat").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"]
    assert ids[-1] == len(tokenizer) - 1  # CLIP's eos is its last id, as in the real vocabulary


def test_unknown_variants_are_refused(tmp_path, tiny_pipeline_dir):
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction', got 'sample'"):
        tiny_sd(tmp_path, prediction_type="sample")
    with pytest.raises(ValueError, match="vae must be 'vq' or 'kl', got 'vqgan'"):
        tiny_ldm(tmp_path, vae="vqgan")
    with pytest.raises(ValueError, match="unknown family 'sd4'"):
        call_kwargs("sd4")
    with pytest.raises(ValueError, match="unknown family 'sd4'"):
        tiny_pipeline_dir("sd4")
    assert not any(tmp_path.iterdir())
