"""The SiD recipe end to end on tiny teachers: gradients, export, pipeline round trip, 2 processes, resume."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from launch_utils import ROOT, accelerate_launch
from tiny_models import sid_trainer, tiny_edm_teacher

from distill.pipelines import OneStepPipeline
from distill.sampling.student import student_sample
from distill.teachers.denoiser import Condition
from distill.teachers.edm import edm_weight, sample_lognormal_sigmas
from engine.trainer import Trainer


def make(tmp_path, teacher, **kw) -> Trainer:
    return sid_trainer(tmp_path, teacher, **kw)


def generator_grads(trainer: Trainer) -> torch.Tensor:
    trainer.enter_phase("generator")
    loss = trainer.recipe.loss("generator", None, trainer.models)[0]
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.trained_parameters("generator")])
    trainer.trained["generator"].optimizer.zero_grad(set_to_none=True)
    return grads


def test_generator_gradient_is_zero_while_fake_score_equals_teacher(tmp_path, teacher_dir):
    trainer = make(tmp_path, teacher_dir, alpha=1.2)
    at_init = generator_grads(trainer).abs().max()
    assert all(p.grad is None for p in trainer.frozen["teacher"].parameters())
    fake = trainer.accelerator.unwrap_model(trainer.trained["fake_score"].module)
    assert all(p.grad is None for p in fake.parameters())  # the generator step leaves f_psi without gradients
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.01 * torch.randn_like(p))
    perturbed = generator_grads(trainer).abs().max()
    # identical networks give y_real == y_fake up to float rounding of two separate forward passes
    assert at_init < 1e-5 * perturbed, (at_init, perturbed)


def test_losses_equal_a_direct_recomputation(tmp_path, teacher_dir):
    """Both steps against the paper's formulas, drawing the random numbers in the recipe's documented order."""
    trainer = make(tmp_path, teacher_dir, step_sigmas=[2.5, 0.8], alpha=1.2, max_timestep=600)
    models, recipe = trainer.models, trainer.recipe
    with torch.no_grad():  # f_psi != f_phi, so the SiD loss is not ~0
        for p in models["fake_score"].parameters():
            p.add_(0.01 * torch.randn_like(p))

    def sampled(seed):
        """x_g as the recipe draws it: z, then the number of steps, then the earlier steps' fresh noise."""
        torch.manual_seed(seed)
        z = torch.randn(4, 1, 8, 8)
        steps = int(torch.randint(2, ())) + 1
        return z, steps, student_sample(models["generator"], z, [2.5, 0.8], steps=steps)

    for seed in range(4):
        z, steps, x_g = sampled(seed)
        sigma = sample_lognormal_sigmas(4, -1.2, 1.2)
        noise = torch.randn_like(x_g)
        y_fake = models["fake_score"](x_g + sigma.view(-1, 1, 1, 1) * noise, sigma)
        want = (edm_weight(sigma) * (y_fake - x_g).pow(2).sum((1, 2, 3))).mean()
        torch.manual_seed(seed)
        got, extra = recipe.loss("fake_score", None, models)
        torch.testing.assert_close(got, want)
        assert extra["nonfinite_samples"] == 0

        z, steps, x_g = sampled(seed)
        t = torch.rand(4) * 0.6
        sigma = (80 ** (1 / 7) + (1 - t) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # EDM's rho-curve
        x_t = x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g)
        y_real, y_fake = models["teacher"](x_t, sigma), models["fake_score"](x_t, sigma)
        w = (x_g - y_real).abs().mean((1, 2, 3), keepdim=True)
        want = ((y_real - y_fake) * ((y_real - x_g) - 1.2 * (y_real - y_fake)) / w).sum((1, 2, 3)).mean()
        torch.manual_seed(seed)
        got, extra = recipe.loss("generator", None, models)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(extra["x_g_std"], x_g.std())


def test_sid_trains_exports_and_pipeline_reproduces_ema(tmp_path, teacher_dir):
    trainer = make(tmp_path, teacher_dir, max_steps=3, alpha=0.9)
    metrics = trainer.fit()
    assert {"fd", "precision", "recall"} <= set(metrics)
    gen = trainer.accelerator.unwrap_model(trainer.trained["generator"].module)
    teacher = trainer.frozen["teacher"]
    assert any(not torch.equal(a, b) for a, b in zip(gen.parameters(), teacher.parameters()))
    folder = tmp_path / "student"
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers"
    facts = card.data.to_dict()["onestep"]
    cfg = trainer.config
    want = {
        "method": "SiD",
        "alpha": 0.9,
        "num_steps": 1,
        "step_sigmas": "[2.5]",
        "noise_levels": "edm",
        "min_timestep": 0.0,
        "max_timestep": 800.0,
        "fake_score_objective": "edm",
        "guidance_scale_teacher": 1.0,
        "training_steps": 3,
        "generated_images_seen": 12,
        "lr_generator": cfg.lr_generator,
        "lr_fake_score": cfg.lr_fake_score,
        "adam_betas_generator": "[0.0, 0.999]",
        "ema_halflife_images": cfg.ema_halflife_images,
        "lr_decay": "none",
    }
    assert {k: facts[k] for k in want} == want
    assert facts["final_fd"] == pytest.approx(metrics["fd"])
    pipe = OneStepPipeline.from_pretrained(str(folder))
    z = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    got = pipe(batch_size=5, noise=z, output_type="pt").images
    with torch.no_grad():
        want_images = student_sample(trainer.models.ema("generator"), z, [2.5]).clamp(-1, 1)
    torch.testing.assert_close(got, want_images)


def test_raw_generator_is_evaluated_next_to_its_ema(tmp_path, teacher_dir):
    """``eval_raw_generator``: ``raw_`` metrics are G's own weights on the same fixed noise, the plain ones stay
    the EMA's, and only the EMA is tracked as the best."""
    trainer = make(tmp_path, teacher_dir, max_steps=3, eval_raw_generator=True, eval_samples=64)
    metrics = trainer.fit()
    recipe = trainer.recipe
    gen = trainer.accelerator.unwrap_model(trainer.trained["generator"].module)
    sigmas = trainer.config.step_sigmas
    raw = recipe.quality.evaluate(lambda z, c: student_sample(gen, z, sigmas, c), "check", track=False)
    ema = recipe.quality.evaluate(
        lambda z, c: student_sample(trainer.models.ema("generator"), z, sigmas, c), "check", track=False
    )
    assert metrics["raw_fd"] == pytest.approx(raw["fd"])
    assert metrics["fd"] == pytest.approx(ema["fd"])
    assert metrics["raw_fd"] != pytest.approx(metrics["fd"])  # 3 steps apart: the EMA lags G
    assert [h["fd"] for h in recipe.quality.history] == [pytest.approx(metrics["fd"])]
    assert gen.training  # back in training mode after its evaluation


def test_export_best_keeps_the_student_of_the_lowest_fd(tmp_path, teacher_dir):
    """``export_best``: student_best holds the EMA of the evaluation with the lowest FD (here the second of
    three, FD forced), its card that evaluation's figures; student holds the last EMA."""
    trainer = make(tmp_path, teacher_dir, max_steps=3, eval_every=1, export_best=True)
    recipe, forced, ema_at = trainer.recipe, iter([3.0, 1.0, 2.0]), {}
    real_evaluate = recipe.quality.evaluate

    def evaluate(sample_fn, tag, track=True):
        metrics = real_evaluate(sample_fn, tag, track=False)
        metrics["fd"] = next(forced)
        if track:
            recipe.quality.history.append(metrics)
            if metrics["fd"] < recipe.quality.best.get("fd", float("inf")):
                recipe.quality.best = {**metrics, "images_seen": float(trainer.images_seen)}
        ema_at[trainer.step] = {
            k: v.clone() for k, v in trainer.models.ema("generator").model.state_dict().items()
        }
        return metrics

    recipe.quality.evaluate = evaluate
    trainer.fit()
    best = OneStepPipeline.from_pretrained(str(tmp_path / "student_best"))
    last = OneStepPipeline.from_pretrained(str(tmp_path / "student"))
    for key, value in best.unet.state_dict().items():
        assert torch.equal(value, ema_at[2][key].to(value.dtype)), key
    assert any(not torch.equal(v, ema_at[2][k].to(v.dtype)) for k, v in last.unet.state_dict().items())
    facts = ModelCard.load(tmp_path / "student_best" / "README.md").data.to_dict()["onestep"]
    assert facts["best_fd"] == 1.0 and facts["training_steps"] == 2 and "final_fd" not in facts
    card = (tmp_path / "student_best" / "README.md").read_text()
    assert ".partial" not in card and str((tmp_path / "student_best").resolve()) in card
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("student")) == [
        "student",
        "student_best",
    ]


def test_export_best_needs_evaluations(tmp_path, teacher_dir):
    with pytest.raises(ValueError, match="export_best=true .* eval_every=0"):
        make(tmp_path, teacher_dir, export_best=True, eval_every=0)


def test_class_conditional_two_step_student_with_guidance(tmp_path):
    teacher = tiny_edm_teacher(tmp_path / "teacher_c", num_classes=10)
    trainer = make(tmp_path / "run", teacher, guidance_scale=2.0, step_sigmas=[2.5, 0.8])
    assert trainer.recipe.num_classes == 10
    trainer.fit()
    pipe = OneStepPipeline.from_pretrained(str(tmp_path / "run" / "student"))
    assert pipe.config.step_sigmas == [2.5, 0.8]
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2, 3])
    got = pipe(
        batch_size=3,
        noise=z,
        class_labels=labels,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    renoise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        want = student_sample(
            trainer.models.ema("generator"),
            z,
            [2.5, 0.8],
            Condition(class_labels=labels),
            fresh_noise=lambda: torch.randn(3, 1, 8, 8, generator=renoise),
        ).clamp(-1, 1)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        pipe(batch_size=1, num_inference_steps=3)


def test_generator_beta1_of_its_own_reaches_the_optimiser_and_the_card(tmp_path, teacher_dir):
    default = make(tmp_path / "default", teacher_dir)
    assert all(tm.optimizer.defaults["betas"] == (0.0, 0.999) for tm in default.trained.values())
    trainer = make(tmp_path / "own", teacher_dir, adam_beta1_generator=0.9, max_steps=1)
    assert trainer.trained["generator"].optimizer.defaults["betas"] == (0.9, 0.999)
    assert trainer.trained["fake_score"].optimizer.defaults["betas"] == (0.0, 0.999)
    trainer.fit()
    card = (tmp_path / "own" / "student" / "README.md").read_text()
    assert "adam_betas_generator: '[0.9, 0.999]'" in card, card
    assert "adam_betas_fake_score: '[0.0, 0.999]'" in card, card
    with pytest.raises(ValueError, match=r"adam_beta1_generator=1\.0 must be in \[0, 1\)"):
        make(tmp_path / "bad", teacher_dir, adam_beta1_generator=1.0)


def test_bad_teacher_is_refused_before_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-teacher"):
        make(tmp_path, tmp_path / "no-such-teacher")


@pytest.mark.distributed
def test_two_processes_then_resume(tmp_path, teacher_dir):
    args = [
        "--teacher",
        str(teacher_dir),
        "--output_dir",
        str(tmp_path),
        "--batch_size",
        "4",
        "--eval_samples",
        "16",
        "--eval_every",
        "0",
        "--log_with",
        "none",
        "--checkpoint_every",
        "1",
    ]
    accelerate_launch(ROOT / "recipes" / "sid.py", [*args, "--max_steps", "2"])
    state = json.loads((tmp_path / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["images_seen"] == 16
    out = accelerate_launch(
        ROOT / "recipes" / "sid.py", [*args, "--max_steps", "3", "--resume_from", "latest"]
    )
    assert "Resumed from" in out.stdout + out.stderr
    assert (tmp_path / "checkpoints" / "step_3" / "ema_generator.safetensors").is_file()
    assert (tmp_path / "student" / "model_index.json").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_stay_finite(tmp_path, teacher_dir, precision):
    """With SiD's small fp16 loss scale (128) these steps do not overflow: every step trains, in fp32 weights."""
    trainer = make(tmp_path, teacher_dir, mixed_precision=precision)
    scaler = trainer.accelerator.scaler
    assert (scaler is not None) == (precision == "fp16")  # fp16 scales its losses, bf16 needs no scaler
    if scaler is not None:
        assert scaler.get_scale() == 128.0
    before = [p.detach().clone() for p in trainer.trained_parameters("fake_score")]
    for _ in range(3):
        logs = trainer.train_step()
        assert all(torch.isfinite(v) for v in logs.values())
    for name in ("generator", "fake_score"):
        net = trainer.accelerator.unwrap_model(trainer.trained[name].module)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trained_parameters("fake_score")))
    assert trainer.nonfinite_steps == {"fake_score": 0, "generator": 0}


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path, teacher_dir):
    """A loss scale far past fp16's range must overflow: the step is counted, skipped and the scale lowered."""
    trainer = make(tmp_path, teacher_dir, mixed_precision="fp16", fp16_initial_scale=2.0**60)
    scaler = trainer.accelerator.scaler
    names = ("fake_score", "generator")
    before = {n: [p.detach().clone() for p in trainer.trained_parameters(n)] for n in names}
    trainer.train_step()
    assert trainer.nonfinite_steps == {"fake_score": 1, "generator": 1}
    assert scaler.get_scale() < 2.0**60
    for name, params in before.items():  # skipped: no parameter moved
        assert all(torch.equal(a, b) for a, b in zip(params, trainer.trained_parameters(name))), name
