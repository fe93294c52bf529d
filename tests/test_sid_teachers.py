"""SiD faithful to the authors' code on every supported teacher: noise levels inside the teacher's training, f_psi
on the teacher's own objective, condition dropout only under guidance, the teacher's classes, the four SiD-LSG
scales, and non-finite samples dropped inside each loss. The EDM teacher's run stays bitwise the old one."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from diffusers import DDPMScheduler
from tiny_models import sid_trainer, tiny_flow_teacher, tiny_unet

from distill.sampling.student import student_sample
from distill.sid.losses import sample_generator_sigmas, sid_generator_loss
from distill.teachers.builders import build_unet, edm_scheduler
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.edm import drop_labels, edm_weight, sample_lognormal_sigmas
from engine.trainer import Trainer
from recipes import sid as sid_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- the EDM run is bitwise the old one
class OldEDMDraws(sid_recipe.SiDRecipe):
    """The two data-free steps as main had them before SiD followed each teacher's training (commit c91b3c4),
    re-implemented: EDM draws for every teacher, one CFG scale, labels dropped at any scale, null = num_classes."""

    def loss(self, phase, batch, models):
        cfg = self.config
        n = cfg.batch_size
        z = torch.randn(n, *self.shape)
        cond = null = None
        guide = {}
        if self.num_classes is not None:
            labels = torch.randint(0, self.num_classes, (n,))
            cond = Condition(class_labels=labels)
            null = Condition(class_labels=torch.full_like(labels, self.num_classes))
            guide = {"guidance_scale": cfg.guidance_scale, "null_cond": null}
        if phase == "fake_score":
            with torch.no_grad():
                x_g = self.generator_sample(models["generator"], z, cond)
            sigma = sample_lognormal_sigmas(n, cfg.p_mean, cfg.p_std)
            x_t = x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g)
            train = None
            if cond is not None:
                train = Condition(
                    class_labels=drop_labels(cond.class_labels, cfg.label_dropout, self.num_classes)
                )
            y_fake = models["fake_score"](x_t, sigma, train, **guide)
            return (edm_weight(sigma) * (y_fake - x_g).pow(2).flatten(1).sum(1)).mean()
        x_g = self.generator_sample(models["generator"], z, cond)
        t = torch.rand(n) * (800 / 1000.0)
        sigma = (80 ** (1 / 7.0) + (1 - t) * (0.002 ** (1 / 7.0) - 80 ** (1 / 7.0))) ** 7.0
        x_t = x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g)
        y_real = models["teacher"](x_t, sigma, cond, **guide)
        y_fake = models["fake_score"](x_t, sigma, cond, **guide)
        return sid_generator_loss(x_g, y_real, y_fake, cfg.alpha).mean()


def trained_weights(trainer: Trainer, steps: int = 3) -> dict[str, torch.Tensor]:
    for _ in range(steps):
        trainer.train_step()
    out = {}
    for name in ("generator", "fake_score"):
        module = trainer.accelerator.unwrap_model(trainer.trained[name].module)
        out |= {f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    return out


@pytest.mark.parametrize("conditional", [False, True], ids=["digits_like_uncond", "class_cfg2_two_steps"])
def test_edm_teacher_trains_bitwise_as_before(tmp_path, teacher_dir, class_teacher_dir, conditional):
    kw = {"guidance_scale": 2.0, "step_sigmas": [2.5, 0.8]} if conditional else {}
    folder = class_teacher_dir if conditional else teacher_dir
    new = trained_weights(sid_trainer(tmp_path / "new", folder, max_steps=3, **kw))
    cfg = sid_recipe.SiDConfig(
        teacher=str(folder),
        output_dir=str(tmp_path / "old"),
        batch_size=4,
        max_steps=3,
        eval_samples=16,
        eval_every=0,
        log_with="none",
        progress_bar=False,
        **kw,
    )  # the settings tiny_models.sid_trainer uses
    old = trained_weights(Trainer(cfg, OldEDMDraws(cfg)))
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new), [k for k in new if not torch.equal(new[k], old[k])]
    teacher = Denoiser.from_pretrained(folder)
    moved = [
        k for k in new if k.startswith("generator.") and not torch.equal(new[k], teacher.state_dict()[k[10:]])
    ]
    assert moved  # the runs trained: equal weights are not two untouched copies of the teacher


# --------------------------------------------------------------------------- noise levels the teacher knows
@contextmanager
def recorded_sigmas():
    """Every Denoiser forward's (module, sigma) while inside."""
    calls: list[tuple[Denoiser, torch.Tensor]] = []
    forward = Denoiser.forward

    def spy(self, x, sigma, *args, **kwargs):
        calls.append((self, torch.as_tensor(sigma).detach().reshape(-1).clone()))
        return forward(self, x, sigma, *args, **kwargs)

    Denoiser.forward = spy
    try:
        yield calls
    finally:
        Denoiser.forward = forward


def sid_calls(trainer: Trainer, steps: int = 2):
    """{'generator' | 'fake_score' | 'teacher': [sigmas]} of every network call in ``steps`` SiD iterations."""
    names = {id(trainer.accelerator.unwrap_model(tm.module)): n for n, tm in trainer.trained.items()}
    names[id(trainer.frozen["teacher"])] = "teacher"
    with recorded_sigmas() as calls:
        for _ in range(steps):
            trainer.train_step()
    out: dict[str, list[torch.Tensor]] = {}
    for module, sigma in calls:
        out.setdefault(names[id(module)], []).append(sigma)
    return {k: torch.cat(v) for k, v in out.items()}


def test_ddpm_teacher_is_only_asked_about_its_table(tmp_path, tiny_pipeline_dir):
    trainer = sid_trainer(tmp_path, tiny_pipeline_dir("ddpm"), batch_size=8)
    teacher = trainer.frozen["teacher"]
    assert trainer.recipe.noise_levels == "table" and trainer.recipe.table_range == (20, 979)
    assert trainer.recipe.fake_objective == "epsilon"
    calls = sid_calls(trainer)
    assert set(calls) == {"generator", "fake_score", "teacher"}
    every = torch.cat(list(calls.values()))
    assert teacher.sigma_min <= every.min() and every.max() <= teacher.sigma_max
    for name in ("fake_score", "teacher"):  # the losses' noise: table timesteps 20..979 only
        t = teacher.sigma_to_timestep(calls[name])
        assert t.min() >= 20 - 1e-3 and t.max() <= 979 + 1e-3
        torch.testing.assert_close(t, t.round(), atol=1e-3, rtol=0)
    assert torch.equal(calls["generator"], torch.full_like(calls["generator"], 2.5))


def test_old_edm_draws_on_the_ddpm_teacher_leave_its_table(tmp_path, tiny_pipeline_dir):
    """The control that shows the check above can fail: SiD's EDM draws reach below the DDPM table's sigma_0."""
    trainer = sid_trainer(tmp_path, tiny_pipeline_dir("ddpm"), batch_size=16, noise_levels="edm")
    teacher = trainer.frozen["teacher"]
    every = torch.cat(list(sid_calls(trainer).values()))
    assert (every < teacher.sigma_min).any()


def test_edm_teacher_keeps_sids_edm_draws(tmp_path, teacher_dir):
    trainer = sid_trainer(tmp_path, teacher_dir, batch_size=16)
    assert trainer.recipe.noise_levels == "edm" and trainer.recipe.fake_objective == "edm"
    calls = sid_calls(trainer)
    teacher = trainer.frozen["teacher"]
    assert teacher.sigma_min <= calls["teacher"].min() and calls["teacher"].max() <= 24.5  # t_max 800
    assert teacher.sigma_min <= calls["fake_score"].min() and calls["fake_score"].max() <= teacher.sigma_max
    with pytest.raises(ValueError, match="has no timestep table"):
        sid_trainer(tmp_path / "t", teacher_dir, noise_levels="table")


@pytest.mark.parametrize("kind", ["vp_epsilon", "vp_v", "flow"])
def test_table_teacher_losses_equal_the_authors_recomputation(tmp_path, kind):
    """Both steps on a table teacher against SiD-LSG's computation, drawing in the recipe's documented order:
    z, G's sample, t ~ U{20..979}, noise; f_psi's loss is the teacher's own objective on its own inputs."""
    if kind == "flow":
        folder = tiny_flow_teacher(tmp_path / "teacher")
        scheduler = None
    else:
        scheduler = DDPMScheduler(prediction_type="epsilon" if kind == "vp_epsilon" else "v_prediction")
        folder = Denoiser(tiny_unet(3), scheduler).save_pretrained(tmp_path / "teacher")
    trainer = sid_trainer(tmp_path / "run", folder, alpha=1.2)
    models, recipe = trainer.models, trainer.recipe
    with torch.no_grad():  # f_psi != f_phi, so the SiD loss is not ~0
        for p in models["fake_score"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    fake_unet = models["fake_score"].model
    for seed in range(2):
        torch.manual_seed(seed)
        z = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            x_g = student_sample(models["generator"], z, [2.5])
        t = torch.randint(20, 980, (4,))
        noise = torch.randn_like(x_g)
        with torch.no_grad():
            if kind == "flow":
                s = (t.float() / 1000).view(-1, 1, 1, 1)
                out = fake_unet((1 - s) * x_g + s * noise, t.float()).sample
                want = (out - (noise - x_g)).pow(2).sum((1, 2, 3)).mean()
            elif kind == "vp_epsilon":
                out = fake_unet(scheduler.add_noise(x_g, noise, t), t).sample
                want = (out - noise).pow(2).sum((1, 2, 3)).mean()
            else:
                out = fake_unet(scheduler.add_noise(x_g, noise, t), t).sample
                snr = torch.tensor(
                    [scheduler.alphas_cumprod[i] / (1 - scheduler.alphas_cumprod[i]) for i in t]
                )
                per = (out - scheduler.get_velocity(x_g, noise, t)).pow(2).sum((1, 2, 3))
                want = (per * snr / (snr + 1)).mean()
        torch.manual_seed(seed)
        got, extra = recipe.loss("fake_score", None, models)
        torch.testing.assert_close(got, want, rtol=2e-4, atol=0)
        assert extra["nonfinite_samples"] == 0

        torch.manual_seed(seed)
        z = torch.randn(4, 1, 8, 8)
        x_g = student_sample(models["generator"], z, [2.5])
        sigma = models["teacher"].timestep_sigma(torch.randint(20, 980, (4,)))
        x_t = x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g)
        want = sid_generator_loss(
            x_g, models["teacher"](x_t, sigma), models["fake_score"](x_t, sigma), 1.2
        ).mean()
        torch.manual_seed(seed)
        torch.testing.assert_close(recipe.loss("generator", None, models)[0], want)


def test_timestep_settings_on_a_table_teacher(tmp_path, tiny_pipeline_dir):
    folder = tiny_pipeline_dir("ddpm")
    trainer = sid_trainer(tmp_path, folder, batch_size=2, min_timestep=100, max_timestep=400)
    assert trainer.recipe.table_range == (100, 400)
    facts = trainer.recipe.card_facts(trainer, {})
    assert facts["noise_levels"] == "table" and (facts["min_timestep"], facts["max_timestep"]) == (100, 400)
    assert facts["fake_score_objective"] == "epsilon"
    with pytest.raises(ValueError, match=r"table timesteps 20\.\.1000; the teacher was trained on 0\.\.999"):
        sid_trainer(tmp_path / "bad", folder, max_timestep=1000)
    with pytest.raises(ValueError, match=r"step_sigmas \[500.0\] lie outside the teacher's trained sigmas"):
        sid_trainer(tmp_path / "bad", folder, step_sigmas=[2.5, 500.0])
    with pytest.raises(ValueError, match=r"min_timestep=900 must be in \[0, max_timestep=800"):
        sid_recipe.SiDConfig(min_timestep=900, max_timestep=800)


# ------------------------------------------------------------------------------------- classes and guidance
@contextmanager
def recorded_labels():
    """The class labels of every Denoiser forward while inside (the null branch of a guided call included)."""
    calls: list[torch.Tensor] = []
    denoise = Denoiser._denoise

    def spy(self, x, sigma, cond):
        calls.append(None if cond is None else cond.class_labels.clone())
        return denoise(self, x, sigma, cond)

    Denoiser._denoise = spy
    try:
        yield calls
    finally:
        Denoiser._denoise = denoise


def fake_score_labels(trainer: Trainer) -> torch.Tensor:
    """The labels f_psi sees in one fake-score step (only f_psi runs with grad-free G before it)."""
    trainer.enter_phase("fake_score")
    with recorded_labels() as calls:
        trainer.recipe.loss("fake_score", None, trainer.models)
    return calls[-1]  # G's call(s) come first


@pytest.mark.parametrize(
    ("scales", "dropped"),
    [
        ({}, False),
        ({"guidance_scale_teacher": 3.0}, False),  # the teacher's guidance needs no null score from f_psi
        ({"guidance_scale_fake_train": 2.0}, True),
        ({"guidance_scale_fake_alpha": 2.0}, True),
    ],
)
def test_labels_are_dropped_for_f_psi_only_under_its_guidance(tmp_path, class_teacher_dir, scales, dropped):
    trainer = sid_trainer(tmp_path, class_teacher_dir, label_dropout=1.0, **scales)
    assert trainer.recipe.drops_labels == dropped
    labels = fake_score_labels(trainer)
    if dropped:  # every label dropped to the null class 10 (label_dropout = 1)
        assert (labels[:4] == 10).all()
    else:
        assert (labels[:4] < 10).all()


@pytest.fixture(scope="module")
def no_null_teacher(tmp_path_factory):
    """A 10-class teacher with exactly 10 class embeddings (no null class, as EDM CIFAR-10-cond ports)."""
    torch.manual_seed(0)
    unet = build_unet(8, 1, block_out_channels=(8, 16), layers_per_block=1, num_classes=9, norm_num_groups=4)
    assert unet.config.num_class_embeds == 10
    return Denoiser(unet.eval(), edm_scheduler()).save_pretrained(tmp_path_factory.mktemp("no_null"))


def test_a_teacher_without_null_class_keeps_every_class(tmp_path, no_null_teacher):
    trainer = sid_trainer(tmp_path, no_null_teacher, num_classes=10, batch_size=64)
    recipe = trainer.recipe
    assert (recipe.num_classes, recipe.null_label) == (10, None)
    torch.manual_seed(0)
    _, cond, null = recipe.latents()
    assert null is None and cond.class_labels.max() == 9  # class 9 is drawn, never taken as null
    assert recipe.quality.labels.max() == 9
    with recorded_labels() as calls:
        trainer.train_step()
    seen = torch.cat([c for c in calls if c is not None])
    assert seen.max() == 9 and seen.min() >= 0
    assert recipe.card_facts(trainer, {})["num_classes"] == 10
    # by default the last embedding is the null class (the toolkit's own teachers)
    default = sid_trainer(tmp_path / "d", no_null_teacher)
    assert (default.recipe.num_classes, default.recipe.null_label) == (9, 9)


@pytest.mark.parametrize(
    "setting",
    ["guidance_scale", "guidance_scale_fake_train", "guidance_scale_fake_alpha", "guidance_scale_teacher"],
)
def test_guidance_without_a_null_class_is_refused_at_start_up(
    tmp_path, no_null_teacher, setting, monkeypatch
):
    copies, deepcopy = [], sid_recipe.copy.deepcopy

    def spy(obj, *args):
        if isinstance(obj, Denoiser):
            copies.append(obj)
        return deepcopy(obj, *args)

    monkeypatch.setattr(sid_recipe.copy, "deepcopy", spy)
    with pytest.raises(ValueError, match=rf"{setting}=2: classifier-free guidance needs a null class") as err:
        sid_trainer(tmp_path, no_null_teacher, num_classes=10, **{setting: 2.0})
    assert "num_classes=10 = its class embeddings" in str(err.value) and copies == []


def test_class_settings_that_do_not_fit_the_teacher_fail_clearly(tmp_path, teacher_dir, class_teacher_dir):
    with pytest.raises(ValueError, match=r"num_classes=5 does not fit .* 11 class embeddings: expected 10"):
        sid_trainer(tmp_path, class_teacher_dir, num_classes=5)
    with pytest.raises(ValueError, match="num_classes=3 but teacher .* has no class embeddings"):
        sid_trainer(tmp_path, teacher_dir, num_classes=3)
    with pytest.raises(ValueError, match="guidance_scale=2: .* is unconditional"):
        sid_trainer(tmp_path, teacher_dir, guidance_scale=2.0)


SCALES = {
    "guidance_scale_fake_train": 1.5,
    "guidance_scale_fake_difference": 2.0,
    "guidance_scale_fake_alpha": 3.0,
    "guidance_scale_teacher": 4.0,
}


def test_each_guidance_scale_reaches_its_call(tmp_path, class_teacher_dir):
    trainer = sid_trainer(tmp_path, class_teacher_dir, alpha=1.2, guidance_scale=9.0, **SCALES)
    models, recipe = trainer.models, trainer.recipe
    with torch.no_grad():
        for p in models["fake_score"].parameters():
            p.add_(0.02 * torch.randn_like(p))

    def draws(seed):
        torch.manual_seed(seed)
        z = torch.randn(4, 1, 8, 8)
        labels = torch.randint(0, 10, (4,))
        cond, null = Condition(class_labels=labels), Condition(class_labels=torch.full_like(labels, 10))
        return z, cond, null

    def guided(name, x, sigma, cond, null, scale):
        return models[name](x, sigma, cond, guidance_scale=scale, null_cond=null)

    z, cond, null = draws(0)
    with torch.no_grad():
        x_g = student_sample(models["generator"], z, [2.5], cond)
    sigma = sample_lognormal_sigmas(4, -1.2, 1.2)
    x_t = x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g)
    train = Condition(class_labels=drop_labels(cond.class_labels, 0.1, 10))
    want = edm_weight(sigma) * (guided("fake_score", x_t, sigma, train, null, 1.5) - x_g).pow(2).sum(
        (1, 2, 3)
    )
    torch.manual_seed(0)
    torch.testing.assert_close(recipe.loss("fake_score", None, models)[0], want.mean(), rtol=1e-4, atol=1e-5)

    def generator_loss(difference, alpha_term, teacher):
        z, cond, null = draws(1)
        x_g = student_sample(models["generator"], z, [2.5], cond)
        sigma = sample_generator_sigmas(4, 800)
        x_t = x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g)
        y_real = guided("teacher", x_t, sigma, cond, null, teacher)
        y_fake = guided("fake_score", x_t, sigma, cond, null, difference)
        y_alpha = guided("fake_score", x_t, sigma, cond, null, alpha_term)
        return sid_generator_loss(x_g, y_real, y_fake, 1.2, y_fake_alpha=y_alpha).mean()

    want = generator_loss(2.0, 3.0, 4.0)
    torch.manual_seed(1)
    got = recipe.loss("generator", None, models)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for swapped in ((3.0, 2.0, 4.0), (2.0, 3.0, 2.0), (4.0, 3.0, 2.0)):  # each scale matters where it is used
        assert not torch.allclose(got, generator_loss(*swapped), rtol=1e-3)
    facts = recipe.card_facts(trainer, {})
    assert {k: facts[k] for k in SCALES} == SCALES and facts["guidance_scale"] == 9.0


def test_guidance_scales_default_to_guidance_scale():
    cfg = sid_recipe.SiDConfig(guidance_scale=2.5, guidance_scale_teacher=1.0)
    assert cfg.guidance_scales() == {**dict.fromkeys(SCALES, 2.5), "guidance_scale_teacher": 1.0}


# ------------------------------------------------------------------------------------- non-finite samples
class NaNSample(torch.nn.Module):
    """``model``'s output with sample ``index`` set to NaN (a sample gone bad inside a network)."""

    def __init__(self, model: torch.nn.Module, index: int = 0) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x, sigma, *args, **kwargs):
        out = self.model(x, sigma, *args, **kwargs)
        bad = torch.zeros(out.shape[0], *[1] * (out.ndim - 1), dtype=torch.bool)
        bad[self.index] = True
        return torch.where(bad, torch.full_like(out, float("nan")), out)


def test_a_nan_sample_is_dropped_from_each_loss(tmp_path, teacher_dir):
    trainer = sid_trainer(tmp_path, teacher_dir, alpha=1.2)
    models = trainer.models
    with torch.no_grad():
        for p in models["fake_score"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    bad = {
        "generator": models["generator"],
        "teacher": models["teacher"],
        "fake_score": NaNSample(models["fake_score"], 1),
    }
    keep = [0, 2, 3]

    torch.manual_seed(0)
    z = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        x_g = student_sample(models["generator"], z, [2.5])
    sigma = sample_lognormal_sigmas(4, -1.2, 1.2)
    y = models["fake_score"](x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g), sigma)
    want = (edm_weight(sigma) * (y - x_g).pow(2).sum((1, 2, 3)))[keep].mean()
    torch.manual_seed(0)
    got, extra = trainer.recipe.loss("fake_score", None, bad)
    torch.testing.assert_close(got, want)
    assert extra["nonfinite_samples"] == 1

    trainer.enter_phase("generator")
    torch.manual_seed(1)
    z = torch.randn(4, 1, 8, 8)
    x_g = student_sample(models["generator"], z, [2.5])
    sigma = sample_generator_sigmas(4, 800)
    x_t = x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g)
    y_real, y_fake = models["teacher"](x_t, sigma), models["fake_score"](x_t, sigma)
    want = sid_generator_loss(x_g[keep], y_real[keep], y_fake[keep], 1.2).mean()
    torch.manual_seed(1)
    got, extra = trainer.recipe.loss("generator", None, bad)
    torch.testing.assert_close(got, want)
    assert extra["nonfinite_samples"] == 1
    got.backward()  # one bad sample does not cost the step: G's gradient is finite and not zero
    grads = torch.cat([p.grad.flatten() for p in trainer.trained_parameters("generator")])
    assert torch.isfinite(grads).all() and grads.abs().max() > 0
