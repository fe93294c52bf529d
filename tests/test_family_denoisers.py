"""The Denoiser on every family's tiny pipeline predicts what the family's own pipeline predicts, with CFG.

Each check runs the real pipeline for ONE Euler step to sigma 0 (``output_type="latent"``, or the latents handed
to the VAE where the pipeline always decodes): that step's result is exactly the pipeline's guided x0 prediction
at its first noise level, so it must equal ``Denoiser.forward`` (VP families) or ``x_t - t * velocity`` (flow
families) on the same latents, with the conditioning from the pipeline's own ``encode_prompt``.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.models.autoencoders.vae import DecoderOutput
from tiny_pipelines import call_kwargs

from distill.teachers.calls import flux_pack, flux_unpack
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.families import describe_teacher_source

pytestmark = pytest.mark.usefixtures("one_thread")

GUIDANCE = 3.0


def _pipe(folder) -> DiffusionPipeline:
    return DiffusionPipeline.from_pretrained(folder).to(torch.float32)


def _latents(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _text_conditions(pipe, family: str) -> tuple[Condition, Condition]:
    """(cond, null) from the pipeline's own encode_prompt, as the Denoiser takes them."""
    prompt = call_kwargs(family)["prompt"]
    if family in ("sd", "sd_v"):
        pe, ne = pipe.encode_prompt(prompt, "cpu", 1, True, "")
        return Condition(encoder_hidden_states=pe), Condition(encoder_hidden_states=ne)
    if family == "sdxl":
        pe, ne, pp, npp = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True)
        ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
        return (
            Condition(encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": pp, "time_ids": ids}),
            Condition(encoder_hidden_states=ne, added_cond_kwargs={"text_embeds": npp, "time_ids": ids}),
        )
    if family == "sd3":
        pe, ne, pp, npp = pipe.encode_prompt(prompt, prompt, prompt, device="cpu")
        return (
            Condition(encoder_hidden_states=pe, model_kwargs={"pooled_projections": pp}),
            Condition(encoder_hidden_states=ne, model_kwargs={"pooled_projections": npp}),
        )
    if family in ("pixart", "pixart_flow", "sana"):
        # the text options the pipeline's __call__ passes by default (Sana's complex_human_instruction)
        defaults = inspect.signature(type(pipe).__call__).parameters
        options = {k: defaults[k].default for k in ("complex_human_instruction",) if k in defaults}
        options |= {"clean_caption": False} if family.startswith("pixart") else {}
        pe, pm, ne, nm = pipe.encode_prompt(prompt, True, device="cpu", **options)
        return (
            Condition(encoder_hidden_states=pe, model_kwargs={"encoder_attention_mask": pm}),
            Condition(encoder_hidden_states=ne, model_kwargs={"encoder_attention_mask": nm}),
        )
    if family == "flux":
        pe, pp, _ = pipe.encode_prompt(prompt, prompt, device="cpu")
        return Condition(encoder_hidden_states=pe, model_kwargs={"pooled_projections": pp}), None
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["sd", "sd_v", "sdxl", "pixart"])
def test_vp_text_families_match_their_pipeline(family, tiny_pipeline_dir):
    folder = tiny_pipeline_dir(family)
    pipe = _pipe(folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    cond, null = _text_conditions(pipe, family)
    z = _latents((1, 4, 8, 8))
    kwargs = {**call_kwargs(family), "height": 16, "width": 16}
    pipe.scheduler.set_timesteps(1)
    sigma = float(pipe.scheduler.sigmas[0])
    x = z * pipe.scheduler.init_noise_sigma  # what the pipeline starts from
    expected = pipe(**kwargs, num_inference_steps=1, guidance_scale=GUIDANCE, latents=z, output_type="latent")
    expected = expected.images
    denoiser = Denoiser.from_pretrained(folder)
    got = denoiser(x, sigma, cond, guidance_scale=GUIDANCE, null_cond=null)
    assert denoiser.parameterization == describe_teacher_source(folder).parameterization
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    unguided = denoiser(x, sigma, cond)
    assert (unguided - got).abs().max() > 1e-4  # guidance changed the prediction: the null branch is used


@pytest.mark.parametrize("family", ["sd3", "sana", "flux"])
def test_flow_text_families_match_their_pipeline(family, tiny_pipeline_dir):
    folder = tiny_pipeline_dir(family)
    pipe = _pipe(folder)
    if family == "sana":  # Sana ships DPM-Solver on flow sigmas; one Euler step shows the raw prediction
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe.set_progress_bar_config(disable=True)
    cond, null = _text_conditions(pipe, family)
    z = _latents((1, 16 if family in ("sd3", "flux") else 4, 8, 8))
    given = flux_pack(z) if family == "flux" else z
    kwargs = call_kwargs(family)
    out = pipe(**kwargs, num_inference_steps=1, guidance_scale=GUIDANCE, latents=given, output_type="latent")
    expected = flux_unpack(out.images, 8, 8) if family == "flux" else out.images
    denoiser = Denoiser.from_pretrained(folder)
    assert denoiser.kind == "flow"
    v = denoiser.velocity(z, 1.0, cond, guidance_scale=GUIDANCE, null_cond=null)
    torch.testing.assert_close(z - v, expected, atol=2e-5, rtol=1e-4)
    if family == "flux":  # guidance is the model's input, not CFG: another scale gives another prediction
        assert denoiser.embedded_guidance
        assert (denoiser.velocity(z, 1.0, cond, guidance_scale=1.0) - v).abs().max() > 1e-5


def _decoded_latents(pipe, run) -> torch.Tensor:
    """The latents a pipeline that always decodes hands to its VAE (DiT, LDM), times the VAE scaling it
    divided by, i.e. the sampler's final latents."""
    vae = getattr(pipe, "vae", None) or pipe.vqvae
    seen = []

    def decode(z, *args, **kwargs):
        seen.append(z.clone())
        return DecoderOutput(sample=torch.zeros(z.shape[0], 3, 16, 16))

    vae.decode = decode
    run()
    return seen[0]


def test_dit_matches_its_pipeline_with_the_null_class(tiny_pipeline_dir):
    folder = tiny_pipeline_dir("dit")
    pipe = _pipe(folder)
    # DiTPipeline steps its *scaled* model input, which only a scheduler without input scaling survives: its
    # own DDIM, one step from t = 999 straight to x0 (final alpha 1)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # DiTPipeline's own draw
    seen = _decoded_latents(
        pipe, lambda: pipe([3], guidance_scale=GUIDANCE, generator=generator, num_inference_steps=1)
    )
    expected = seen * pipe.vae.config.scaling_factor
    pipe.scheduler.set_timesteps(1)
    t = int(pipe.scheduler.timesteps[0])
    abar = float(pipe.scheduler.alphas_cumprod[t])
    sigma = ((1 - abar) / abar) ** 0.5
    denoiser = Denoiser.from_pretrained(folder)
    assert (denoiser.num_classes, denoiser.num_class_embeds) == (1000, 1001)
    labels = Condition(class_labels=torch.tensor([3]))
    got = denoiser(z / abar**0.5, sigma, labels, guidance_scale=GUIDANCE)  # null class 1000, as DiTPipeline
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["ldm_vq", "ddpm"])
def test_unconditional_unets_match_their_pipeline(family, tiny_pipeline_dir):
    folder = tiny_pipeline_dir(family)
    pipe = _pipe(folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    denoiser = Denoiser.from_pretrained(folder)
    shape = (1, denoiser.sample_channels, denoiser.sample_size, denoiser.sample_size)
    pipe.scheduler.set_timesteps(1)
    sigma = float(pipe.scheduler.sigmas[0])
    if family == "ddpm":
        z = _latents(shape)
        scheduler = pipe.scheduler
        x = z * scheduler.init_noise_sigma
        t = scheduler.timesteps[0]
        eps = pipe.unet(scheduler.scale_model_input(x, t), t).sample
        expected = scheduler.step(eps, t, x).prev_sample
    else:
        generator = torch.Generator().manual_seed(0)
        z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        x = z * pipe.scheduler.init_noise_sigma
        seen = _decoded_latents(pipe, lambda: pipe(generator=generator, num_inference_steps=1))
        expected = seen * pipe.vqvae.config.scaling_factor  # LDMPipeline divides by it before decoding
    torch.testing.assert_close(denoiser(x, sigma), expected, atol=2e-5, rtol=1e-4)


def test_transformer_without_its_text_condition_is_named(tiny_pipeline_dir):
    denoiser = Denoiser.from_pretrained(tiny_pipeline_dir("sd3"))
    with pytest.raises(
        ValueError, match="SD3Transformer2DModel needs encoder_hidden_states, pooled_projections"
    ):
        denoiser(torch.zeros(1, 16, 8, 8), 1.0)


def test_flux_packing_round_trips_and_matches_diffusers():
    from diffusers import FluxPipeline

    z = _latents((2, 16, 8, 6))
    packed = flux_pack(z)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(z, 2, 16, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(flux_unpack(packed, 8, 6), z, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even height and width, got 7 x 6"):
        flux_pack(_latents((1, 16, 7, 6)))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_peft_wrapped_transformer_is_called_as_its_family(family, tiny_pipeline_dir):
    """LoRA students wrap the transformer in a PeftModel: it must still get its keyword call (and Flux its
    packing), and a fresh adapter (B = 0) must not change the prediction."""
    from peft import LoraConfig, get_peft_model

    folder = tiny_pipeline_dir(family)
    cond, _ = _text_conditions(_pipe(folder), family)
    plain = Denoiser.from_pretrained(folder)
    wrapped = Denoiser.from_pretrained(folder)
    wrapped.model = get_peft_model(wrapped.model, LoraConfig(r=2, target_modules=["to_q", "to_k"]))
    z = _latents((1, 16, 8, 8))
    expected = plain.velocity(z, 0.7, cond)
    torch.testing.assert_close(wrapped.velocity(z, 0.7, cond), expected, rtol=0, atol=1e-6)
    assert wrapped.embedded_guidance == plain.embedded_guidance == (family == "flux")
