import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr
from tiny_models import tiny_unet

from distill.sid.losses import (
    batch_mean,
    fake_score_loss,
    fake_score_weight,
    keep_finite,
    sample_generator_sigmas,
    sample_table_timesteps,
    sid_generator_loss,
    sid_sigma_from_t,
)
from distill.teachers.builders import edm_scheduler
from distill.teachers.denoiser import Denoiser
from distill.teachers.edm import drop_labels, edm_denoising_loss, edm_weight, sample_lognormal_sigmas


def test_generator_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    x_g, y_r, y_f = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    alpha = 1.2
    got = sid_generator_loss(x_g, y_r, y_f, alpha)
    for i in range(3):
        w = max(float((x_g[i] - y_r[i]).abs().mean()), 1e-5)
        want = float(((y_r[i] - y_f[i]) * ((y_r[i] - x_g[i]) - alpha * (y_r[i] - y_f[i]))).sum() / w)
        assert got[i].item() == pytest.approx(want, rel=1e-5)
    # alpha = 1 reduces to (y_real - y_fake) * (y_fake - x_g) / w
    w = (x_g - y_r).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(
        sid_generator_loss(x_g, y_r, y_f, 1.0), ((y_r - y_f) * (y_f - x_g) / w).sum((1, 2, 3))
    )


def _generator_grads(alpha: float, same_scores: bool) -> torch.Tensor:
    torch.manual_seed(0)
    gen = torch.nn.Conv2d(1, 1, 3, padding=1)
    teacher = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 1)
    )
    fake = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 1))
    if same_scores:
        fake.load_state_dict(teacher.state_dict())
    teacher.requires_grad_(False)
    fake.requires_grad_(False)
    z = torch.randn(4, 1, 6, 6)
    x_g = gen(2.5 * z)
    sigma = torch.full((4, 1, 1, 1), 1.5)
    x_t = x_g + sigma * torch.randn_like(x_g)
    loss = sid_generator_loss(x_g, teacher(x_t), fake(x_t), alpha).mean()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in gen.parameters()])


def test_generator_gradient_vanishes_when_fake_score_equals_teacher():
    assert torch.count_nonzero(_generator_grads(1.0, same_scores=True)) == 0
    assert _generator_grads(1.0, same_scores=False).abs().max() > 1e-4  # and the test can fail
    assert _generator_grads(1.2, same_scores=False).abs().max() > 1e-4


def test_normaliser_is_stop_gradient():
    x_g = torch.randn(2, 1, 3, 3, requires_grad=True)
    y_r, y_f = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    sid_generator_loss(x_g, y_r, y_f, 1.0).sum().backward()
    w = (x_g.detach() - y_r).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x_g.grad, -(y_r - y_f) / w)  # d/dx_g of (y_r - y_f)(y_f - x_g)/w, w constant


def test_sigma_schedules():
    assert sid_sigma_from_t(torch.tensor(0.0)).item() == pytest.approx(0.002, rel=1e-4)
    assert sid_sigma_from_t(torch.tensor(1.0)).item() == pytest.approx(80.0, rel=1e-4)
    s = sample_generator_sigmas(10000, max_timestep=800, generator=torch.Generator().manual_seed(0))
    assert s.min() >= 0.002 and s.max() <= sid_sigma_from_t(torch.tensor(0.8)).item() + 1e-4
    assert 24.0 < sid_sigma_from_t(torch.tensor(0.8)).item() < 24.5
    ln = sample_lognormal_sigmas(20000, -1.2, 1.2, generator=torch.Generator().manual_seed(0)).log()
    assert ln.mean().item() == pytest.approx(-1.2, abs=0.03) and ln.std().item() == pytest.approx(
        1.2, abs=0.03
    )


def test_edm_losses_match_direct_computation():
    x0 = torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    noise = torch.randn_like(x0)
    denoise = lambda x, s: 0.5 * x  # noqa: E731
    got = edm_denoising_loss(denoise, x0, sigma, noise)
    for i in range(3):
        lam = (sigma[i] ** 2 + 0.25) / (sigma[i] * 0.5) ** 2
        want = lam * ((0.5 * (x0[i] + sigma[i] * noise[i]) - x0[i]) ** 2).sum()
        assert got[i].item() == pytest.approx(want.item(), rel=1e-5)
    y = torch.randn_like(x0)
    torch.testing.assert_close(
        fake_score_loss(y, x0, sigma), edm_weight(sigma) * (y - x0).pow(2).sum((1, 2, 3))
    )
    assert edm_weight(torch.tensor(0.5)).item() == pytest.approx(2 * 0.25 / (0.25 * 0.25))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        edm_denoising_loss(denoise, x0, sigma[:2], noise)


def test_label_dropout_sets_a_share_of_labels_to_the_null_class():
    labels = torch.arange(20000) % 10
    assert drop_labels(labels, 0.0, 10) is labels
    assert torch.equal(drop_labels(labels, 1.0, 10), torch.full_like(labels, 10))
    torch.manual_seed(0)
    dropped = drop_labels(labels, 0.25, 10)
    torch.manual_seed(0)
    want = torch.where(torch.rand(20000) < 0.25, 10, labels)  # the same draw, one per label
    assert torch.equal(dropped, want)
    assert (dropped == 10).float().mean().item() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match=r"p=1.5 must be in \[0, 1\]"):
        drop_labels(labels, 1.5, 10)


def test_generator_loss_with_a_second_fake_score_in_the_alpha_term():
    g = torch.Generator().manual_seed(3)
    x_g, y_r, y_f, y_a = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(4))
    w = (x_g - y_r).abs().mean(dim=(1, 2, 3), keepdim=True)
    want = ((y_r - y_f) * ((y_r - x_g) - 1.2 * (y_r - y_a)) / w).sum((1, 2, 3))
    torch.testing.assert_close(sid_generator_loss(x_g, y_r, y_f, 1.2, y_fake_alpha=y_a), want)
    assert not torch.allclose(sid_generator_loss(x_g, y_r, y_f, 1.2), want)  # y_fake_alpha is used
    # alpha = 1: (y_real - y_fake) * (y_fake_alpha - x_g) / w
    torch.testing.assert_close(
        sid_generator_loss(x_g, y_r, y_f, 1.0, y_fake_alpha=y_a),
        ((y_r - y_f) * (y_a - x_g) / w).sum((1, 2, 3)),
    )


def test_edm_draws_with_a_smallest_timestep():
    s = sample_generator_sigmas(
        5000, max_timestep=800, min_timestep=300, generator=torch.Generator().manual_seed(0)
    )
    assert s.min() >= sid_sigma_from_t(torch.tensor(0.3)) - 1e-5
    assert s.max() <= sid_sigma_from_t(torch.tensor(0.8)) + 1e-4
    # min_timestep = 0 draws exactly the old U[0, max/1000] (the digits run stays bitwise the same)
    old = sid_sigma_from_t(torch.rand(7, generator=torch.Generator().manual_seed(1)) * 0.8)
    new = sample_generator_sigmas(7, 800, generator=torch.Generator().manual_seed(1))
    assert torch.equal(old, new)


def test_table_timesteps_cover_both_ends_and_nothing_else():
    t = sample_table_timesteps(20000, 20, 979, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 20 and t.max() == 979
    assert t.unique().numel() == 960
    with pytest.raises(ValueError, match="t_min <= t_max"):
        sample_table_timesteps(3, 50, 40)


def test_timestep_sigma_reads_the_teachers_table():
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    vp = Denoiser(tiny_unet(), ddpm)
    t = torch.tensor([0, 20, 625, 979, 999])
    abar = ddpm.alphas_cumprod[t].double()
    torch.testing.assert_close(vp.timestep_sigma(t), ((1 - abar) / abar).sqrt().float())
    assert vp.timestep_sigma(torch.tensor(625)).item() == pytest.approx(2.5, abs=0.05)  # SD's t_init = 625
    torch.testing.assert_close(vp.sigma_to_timestep(vp.timestep_sigma(t)), t.float(), atol=1e-3, rtol=0)
    assert vp.has_timestep_table and vp.timestep_sigma(0).item() == pytest.approx(vp.sigma_min, rel=1e-6)
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 999\]"):
        vp.timestep_sigma(torch.tensor([1000]))
    flow = Denoiser(tiny_unet(), FlowMatchEulerDiscreteScheduler())
    s = t.double() / 1000
    torch.testing.assert_close(flow.timestep_sigma(t), (s / (1 - s)).float())
    torch.testing.assert_close(flow.sigma_to_timestep(flow.timestep_sigma(t)), t.float(), atol=1e-3, rtol=0)
    edm = Denoiser(tiny_unet(), edm_scheduler())
    assert not edm.has_timestep_table
    with pytest.raises(ValueError, match="no timestep table"):
        edm.timestep_sigma(torch.tensor([20]))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", "flow"])
def test_fake_score_objective_is_the_teachers_own_loss(prediction):
    """The x0 loss with :func:`fake_score_weight` equals the teacher's training loss computed the diffusers way:
    epsilon MSE, SNR/(SNR+1)-weighted v MSE (the SiD-LSG authors' code), x0 MSE, flow-matching velocity MSE."""
    torch.manual_seed(0)
    unet = tiny_unet(seed=4)
    if prediction == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler()
    else:
        scheduler = DDPMScheduler(prediction_type=prediction)
    teacher = Denoiser(unet, scheduler)
    x0, noise = torch.randn(2, 4, 1, 8, 8)
    t = torch.tensor([20, 300, 640, 979])
    sigma = teacher.timestep_sigma(t)
    with torch.no_grad():
        y = teacher(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma)  # the Denoiser's x0 prediction
        got = fake_score_loss(y, x0, sigma, objective=teacher.parameterization.removeprefix("vp-"))
        if prediction == "flow":
            s = (t.float() / 1000).view(-1, 1, 1, 1)
            out = unet((1 - s) * x0 + s * noise, t.float()).sample
            want = (out - (noise - x0)).pow(2).sum((1, 2, 3))
        else:
            out = unet(scheduler.add_noise(x0, noise, t), t).sample
            target = {"epsilon": noise, "sample": x0}.get(prediction)
            if prediction == "v_prediction":
                target = scheduler.get_velocity(x0, noise, t)
            want = (out - target).pow(2).sum((1, 2, 3))
            if prediction == "v_prediction":
                snr = compute_snr(scheduler, t)
                want = want * snr / (snr + 1)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=0)
    # and the EDM weight is not that objective: the test can tell them apart
    assert not torch.allclose(fake_score_loss(y, x0, sigma), want, rtol=1e-2)


def test_fake_score_weight_rejects_unknown_objectives():
    assert torch.equal(fake_score_weight(torch.tensor([2.0]), "edm"), edm_weight(torch.tensor([2.0])))
    with pytest.raises(ValueError, match="'x0'"):
        fake_score_weight(torch.tensor([1.0]), "x0")


def test_non_finite_samples_are_dropped_from_the_loss():
    g = torch.Generator().manual_seed(2)
    x_g = torch.randn(4, 1, 3, 3, generator=g).requires_grad_(True)
    y_r, y_f = torch.randn(2, 4, 1, 3, 3, generator=g)
    y_f[1, 0, 1, 1] = float("nan")
    y_r[3, 0, 0, 0] = float("inf")
    (xk, rk, fk), dropped = keep_finite(x_g, y_r, y_f)
    assert dropped.item() == 2 and xk.shape[0] == 2
    loss = batch_mean(sid_generator_loss(xk, rk, fk, 1.2))
    want = sid_generator_loss(x_g[[0, 2]], y_r[[0, 2]], y_f[[0, 2]], 1.2).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.isfinite(x_g.grad).all() and x_g.grad[[1, 3]].abs().max() == 0
    assert x_g.grad[[0, 2]].abs().max() > 0
    # nothing dropped: the very same tensors; everything dropped: a differentiable zero
    kept, none = keep_finite(x_g, y_r[[0, 2, 0, 2]])
    assert none.item() == 0 and kept[0] is x_g
    (empty,), _ = keep_finite(y_f[[1, 1]])
    zero = batch_mean(empty.pow(2).sum((1, 2, 3)))
    assert zero.item() == 0.0
