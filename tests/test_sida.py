"""SiDA: the encoder discriminator's losses, its logits, and the recipe's warm-up and start rules."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import sid_trainer

from distill.sid.discriminator import EncoderLogits, conditional_rows, find_encoder_end
from distill.sid.losses import discriminator_loss, fake_score_loss, generator_adversarial_loss
from distill.teachers.edm import edm_weight, sample_lognormal_sigmas
from distill.teachers.loading import load_teacher
from engine.trainer import Trainer
from recipes import sid as sid_recipe


def test_discriminator_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2, 5, 1, 2, 2, generator=g)
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0, 20.0])
    bce = F.binary_cross_entropy_with_logits
    want = (
        edm_weight(sigma).mean() * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))) / 2
    )
    torch.testing.assert_close(discriminator_loss(real, fake, sigma), want)
    with pytest.raises(ValueError, match="logit shapes differ"):
        discriminator_loss(real, fake[:, :, :1], sigma)


def test_generator_adversarial_loss_matches_direct_computation_and_gradient():
    g = torch.Generator().manual_seed(1)
    x_g, y_real = torch.randn(2, 3, 1, 4, 4, generator=g)
    logits = (5 * torch.randn(3, 1, 2, 2, generator=g)).requires_grad_(True)
    x_g.requires_grad_(True)
    got = generator_adversarial_loss(logits, x_g, y_real)
    w = (x_g - y_real).abs().mean(dim=(1, 2, 3))
    bce = F.binary_cross_entropy_with_logits(logits.clamp(-10, 10), torch.ones_like(logits))
    want = sum(bce / w[i] * 16 for i in range(3)) / 3
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.count_nonzero(logits.grad) == logits.numel()
    assert x_g.grad is None or torch.count_nonzero(x_g.grad) == 0  # the normaliser is a stop-gradient


def test_encoder_logits_are_the_channel_mean_of_the_last_down_block(teacher_dir):
    teacher = load_teacher(str(teacher_dir))
    block = find_encoder_end(teacher)
    assert block is teacher.model.down_blocks[-1]
    seen = []
    handle = block.register_forward_hook(lambda m, i, o: seen.append(o[0].detach()))
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.5, 1.0, 2.0])
    with EncoderLogits(teacher).capture() as logits:
        teacher(x, sigma)
    handle.remove()
    assert len(logits) == 1 and logits[0].shape == (3, 1, *seen[0].shape[2:])
    torch.testing.assert_close(logits[0], seen[0].mean(dim=1, keepdim=True))
    teacher(x, sigma)
    assert len(logits) == 1  # the hook is gone after the block
    with pytest.raises(ValueError, match="no diffusers UNet"):
        find_encoder_end(torch.nn.Linear(2, 2))


def make(tmp_path, teacher, **kw) -> Trainer:
    return sid_trainer(tmp_path, teacher, **{"real_data": "digits", **kw})


def test_generator_waits_then_trains_with_the_adversarial_term(tmp_path, teacher_dir):
    # batch 4: steps 0-1 (8 images) only f_psi; from step 2 G too; its adversarial term from 16 images on
    trainer = make(tmp_path, teacher_dir, generator_freeze_images=8, adversarial_start_images=16, max_steps=2)
    assert trainer.recipe.phases(1) == ["fake_score"]
    assert trainer.recipe.phases(2) == ["fake_score", "generator"]
    gen = trainer.accelerator.unwrap_model(trainer.trained["generator"].module)
    fake = trainer.accelerator.unwrap_model(trainer.trained["fake_score"].module)
    g0 = [p.detach().clone() for p in gen.parameters()]
    f0 = [p.detach().clone() for p in fake.parameters()]
    logs = trainer.train_step()
    assert "fake_score/discriminator_loss" in logs and "generator/loss" not in logs
    trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(g0, gen.parameters()))  # G waited
    assert any(not torch.equal(a, b) for a, b in zip(f0, fake.parameters()))
    card = (tmp_path / "student" / "README.md").read_text()
    assert "method: SiDA" in card and "real_data: digits" in card
    trainer.config.max_steps = 4
    logs = trainer.train_step()  # step 2, 8 images seen: G steps with SiD only
    assert "generator/loss" in logs and "generator/adversarial_loss" not in logs
    assert any(not torch.equal(a, b) for a, b in zip(g0, gen.parameters()))
    trainer.train_step()
    logs = trainer.train_step()  # 16 images seen: the adversarial term is on
    assert torch.isfinite(logs["generator/adversarial_loss"]) and logs["generator/adversarial_loss"] > 0


def test_fake_score_step_adds_the_discriminator_loss(tmp_path, teacher_dir):
    trainer = make(tmp_path, teacher_dir, generator_freeze_images=0, adversarial_weight_fake_score=0.5)
    models = trainer.models
    batch = {"pixel_values": torch.rand(4, 1, 8, 8) * 2 - 1}
    torch.manual_seed(5)
    loss, extra = trainer.recipe.loss("fake_score", batch, models)
    torch.testing.assert_close(loss, extra["score_loss"] + 0.5 * extra["discriminator_loss"])

    # direct re-computation: real and generated images noised with the same sigma and noise through f_psi
    torch.manual_seed(5)
    z = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        x_g = models["generator"](2.5 * z, torch.full((4,), 2.5))
    sigma = sample_lognormal_sigmas(4, -1.2, 1.2)
    noise = torch.randn_like(x_g)
    s = sigma.view(-1, 1, 1, 1)
    with EncoderLogits(models["fake_score"]).capture() as logits:
        y_fake = models["fake_score"](x_g + s * noise, sigma)
        models["fake_score"](batch["pixel_values"] + s * noise, sigma)
    torch.testing.assert_close(extra["score_loss"], fake_score_loss(y_fake, x_g, sigma).mean())
    torch.testing.assert_close(extra["discriminator_loss"], discriminator_loss(logits[1], logits[0], sigma))

    trainer.config.real_data = None
    trainer.recipe.discriminator = None
    torch.manual_seed(5)
    plain, _ = trainer.recipe.loss("fake_score", batch, models)
    torch.testing.assert_close(plain, extra["score_loss"])  # same noise: the score part is plain SiD's


def test_bad_sida_settings_fail_before_work(tmp_path, teacher_dir):
    with pytest.raises(ValueError, match="adversarial_weight_generator"):
        sid_recipe.SiDConfig(adversarial_weight_generator=-1.0)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        make(tmp_path, teacher_dir, batch_size=4096)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        make(tmp_path, teacher_dir, real_data=str(tmp_path / "no_such_folder"))


def test_lora_student_reads_logits_from_the_fake_score_adapter(tmp_path, teacher_dir):
    trainer = make(
        tmp_path,
        teacher_dir,
        student="lora",
        lora_rank=2,
        generator_freeze_images=0,
        adversarial_start_images=0,
    )
    shared = trainer.recipe.discriminator.block
    assert shared is trainer.frozen["teacher"].shared.model.base_model.model.down_blocks[-1]
    logs = trainer.train_step()
    assert torch.isfinite(logs["fake_score/discriminator_loss"])
    assert torch.isfinite(logs["generator/adversarial_loss"])


@pytest.mark.parametrize("clip", [None, 0.0], ids=["sida_default", "off"])
def test_fake_score_gradient_values_are_clipped_before_its_step(tmp_path, teacher_dir, clip):
    """SiDA clips f_psi's gradient values at 1 right before its optimiser step (a step pre-hook the recipe puts on
    its own optimiser); a large discriminator weight makes raw values far above 1, so the clip shows."""
    trainer = make(
        tmp_path,
        teacher_dir,
        generator_freeze_images=10**6,
        adversarial_weight_fake_score=1e4,
        fake_score_grad_value_clip=clip,
    )
    optimizer = trainer.trained["fake_score"].optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimiser inside accelerate's wrapper
    seen = []

    def largest(opt, args, kwargs):  # registered after the recipe's hook: sees what the step uses
        grads = [p.grad.abs().max() for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(max(grads)))

    optimizer.register_step_pre_hook(largest)
    trainer.train_step()
    if clip is None:
        assert seen == [1.0]
        assert trainer.recipe.card_facts(trainer, {})["fake_score_grad_value_clip"] == 1.0
    else:
        assert seen[0] > 1.0
        assert "fake_score_grad_value_clip" not in trainer.recipe.card_facts(trainer, {})
    assert sid_recipe.SiDConfig().grad_value_clip() == 0.0  # data-free SiD: no clip unless set
    assert sid_recipe.SiDConfig(real_data="digits", fake_score_grad_value_clip=0.5).grad_value_clip() == 0.5
    with pytest.raises(ValueError, match="fake_score_grad_value_clip=-1.0 must be >= 0"):
        sid_recipe.SiDConfig(fake_score_grad_value_clip=-1.0)


def test_conditional_rows_keep_the_conditional_branch():
    logits = torch.arange(8.0).view(8, 1, 1, 1)
    assert conditional_rows(logits, 8) is logits  # unguided call
    torch.testing.assert_close(conditional_rows(logits, 4), logits[:4])  # guided: [cond; null]
    with pytest.raises(ValueError, match="logits for 8 rows; expected 3"):
        conditional_rows(logits, 3)


# --- text teachers (SiD-LSG + SiDA) ------------------------------------------------------------------------
CAPTIONS = ["a photo of a cat", "a red car", "a photo of a cat", "a red car"]


def caption_folder(folder, captions, size=16):
    """An imagefolder of RGB images with a metadata.jsonl ``text`` column (diffusers' training-script layout)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def text_sida(tmp_path, teacher, data, prompts=("a red car", "a blue bird", "a photo of a cat"), **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    settings = dict(
        prompts=str(prompt_file),
        prompt_cache_dir=str(tmp_path / "cache"),
        real_data=str(data),
        guidance_scale=2.0,
        label_dropout=0.0,
        batch_size=2,
        generator_freeze_images=0,
        adversarial_start_images=0,
    )
    return sid_trainer(tmp_path / "run", teacher, **{**settings, **kw})


@pytest.mark.usefixtures("one_thread")
def test_text_teacher_sida_draws_the_real_captions_and_reads_the_conditional_branch(
    tmp_path, tiny_pipeline_dir
):
    """Guided SiDA on a text teacher: G draws each real image's caption in f_psi's step, and D's loss equals a
    direct computation with plain (unguided) conditional f_psi calls on generated and real latents."""
    data = caption_folder(tmp_path / "data", CAPTIONS)
    trainer = text_sida(tmp_path, tiny_pipeline_dir("sd"), data)
    recipe, models = trainer.recipe, trainer.models
    real = recipe._real_images().dataset
    assert real["caption_index"] == [2, 0, 2, 0] and real["text"] == CAPTIONS  # rows of the prompt file

    seen = {}
    sample, sigmas, encode = recipe.generator_sample, recipe.noise_sigmas, recipe.codec.encode

    def generator_sample(generator, z, cond):
        seen["cond"], seen["x_g"] = cond, sample(generator, z, cond)
        return seen["x_g"]

    def noise_sigmas(n, device, phase):
        seen["sigma"] = sigmas(n, device, phase)
        seen["rng"] = torch.get_rng_state()  # the noise is drawn next
        return seen["sigma"]

    def codec_encode(images, **kw):
        seen["x_real"] = encode(images, **kw)
        return seen["x_real"]

    recipe.generator_sample, recipe.noise_sigmas, recipe.codec.encode = (
        generator_sample,
        noise_sigmas,
        codec_encode,
    )
    batch = {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1, "caption_index": torch.tensor([2, 0])}
    draw = recipe.conditions.sample
    recipe.conditions.sample = None  # f_psi's step takes the batch's captions and draws no random prompts
    loss, extra = recipe.loss("fake_score", batch, models)
    recipe.conditions.sample = draw

    cond, _ = recipe.conditions.fixed(torch.tensor([2, 0]))
    torch.testing.assert_close(seen["cond"].encoder_hidden_states, cond.encoder_hidden_states)
    torch.set_rng_state(seen["rng"])
    noise = torch.randn_like(seen["x_g"])
    sigma = seen["sigma"]
    s = sigma.view(-1, 1, 1, 1)
    with torch.no_grad(), EncoderLogits(models["fake_score"]).capture() as logits:
        models["fake_score"](seen["x_g"] + s * noise, sigma, cond)
        models["fake_score"](seen["x_real"] + s * noise, sigma, cond)
    assert logits[0].shape[0] == 2
    want = discriminator_loss(logits[1], logits[0], sigma)
    torch.testing.assert_close(extra["discriminator_loss"], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, extra["score_loss"] + extra["discriminator_loss"])

    loss, extra = recipe.loss("generator", batch, models)
    assert torch.isfinite(extra["adversarial_loss"]) and extra["adversarial_loss"] > 0
    torch.testing.assert_close(loss, 0.5 * extra["sid_loss"] + 0.5 * 1e-4 * extra["adversarial_loss"])
    logs = trainer.train_step()  # the whole step, from the folder's batches
    assert torch.isfinite(logs["fake_score/discriminator_loss"]) and torch.isfinite(logs["generator/loss"])


@pytest.mark.usefixtures("one_thread")
def test_text_teacher_sida_refuses_uncaptioned_or_unknown_captions(tmp_path, tiny_pipeline_dir):
    teacher = tiny_pipeline_dir("sd")
    with pytest.raises(ValueError, match=r"has no 'text' column \(captions\)"):
        text_sida(tmp_path / "a", teacher, "digits")
    data = caption_folder(tmp_path / "data", CAPTIONS)
    with pytest.raises(ValueError, match=r"1 caption\(s\) are not among the 2 prompts .* 'a photo of a cat'"):
        text_sida(tmp_path / "b", teacher, data, prompts=("a red car", "a blue bird"))
