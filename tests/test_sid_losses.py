import pytest
import torch

from distill.sid.losses import fake_score_loss, sample_generator_sigmas, sid_generator_loss, sid_sigma_from_t
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
