"""Reflow math against direct computations: time distributions, losses, velocity conversion, samplers, straightness."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import tiny_unet

from distill.reflow.flow import (
    default_huber_c,
    distill_loss,
    euler_on_sigmas,
    flow_euler_sample,
    flow_sigmas,
    flow_time_grid,
    pseudo_huber,
    reflow_loss,
    regression_loss,
    sample_flow_times,
    straightness,
    t_max_for,
    u_shaped_density,
    velocity_from_denoiser,
)
from distill.teachers.denoiser import Denoiser

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def edm(teacher_dir) -> Denoiser:
    return Denoiser.from_pretrained(teacher_dir).eval()


@pytest.fixture(scope="module")
def flow() -> Denoiser:
    return Denoiser(tiny_unet(seed=1), FlowMatchEulerDiscreteScheduler()).eval()


def batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1), torch.randn(n, 1, 8, 8, generator=g)


# ---------------------------------------------------------------------------------- time distributions
def test_u_shaped_matches_its_density_and_cdf():
    a = 4.0
    u = torch.linspace(0, 1, 20001, dtype=torch.float64)
    assert torch.trapezoid(u_shaped_density(u, a), u).item() == pytest.approx(1.0, abs=1e-6)
    t = sample_flow_times(
        200_000, "u_shaped", 0.0, 1.0, u_shape_a=a, generator=torch.Generator().manual_seed(0)
    )
    t = t.double().sort().values
    cdf = (torch.expm1(a * t) + math.exp(a) - torch.exp(a * (1 - t))) / (2 * math.expm1(a))
    empirical = torch.arange(1, len(t) + 1, dtype=torch.float64) / len(t)
    assert (cdf - empirical).abs().max().item() < 0.006  # Kolmogorov-Smirnov distance
    # U-shaped: the ends are denser than the middle, in the ratio of the density
    ends, middle = ((t < 0.1) | (t > 0.9)).double().mean(), ((t > 0.45) & (t < 0.55)).double().mean()
    assert ends / middle > 3.0


def test_time_distributions_map_affinely_into_the_range():
    t_min, t_max = 1e-3, 80 / 81
    g = torch.Generator().manual_seed(3)
    got = sample_flow_times(1000, "logit_normal", t_min, t_max, logit_mean=0.3, logit_std=1.5, generator=g)
    g.manual_seed(3)
    want = t_min + (t_max - t_min) * torch.sigmoid(0.3 + 1.5 * torch.randn(1000, generator=g))
    torch.testing.assert_close(got, want)
    g.manual_seed(4)
    uni = sample_flow_times(50_000, "uniform", t_min, t_max, generator=g)
    assert t_min <= uni.min() and uni.max() <= t_max
    assert uni.mean().item() == pytest.approx((t_min + t_max) / 2, abs=0.005)
    with pytest.raises(ValueError, match="unknown time distribution"):
        sample_flow_times(2, "beta")
    with pytest.raises(ValueError, match="t_min"):
        sample_flow_times(2, "uniform", 0.5, 0.4)


# ------------------------------------------------------------------------------------------- losses
def test_pseudo_huber_and_l2_by_hand():
    diff = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(pseudo_huber(diff, c=0.0), torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(pseudo_huber(diff, c=1.0), torch.tensor([math.sqrt(26) - 1, 0.0]))
    assert default_huber_c(64) == pytest.approx(0.00054 * 8)
    torch.testing.assert_close(
        pseudo_huber(diff), torch.sqrt(torch.tensor([25.0, 0.0]) + 0.00054**2 * 2) - 0.00054 * 2**0.5
    )
    pred, target = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(regression_loss(pred, target, "l2"), torch.tensor([13.0 / 3]))
    with pytest.raises(ValueError, match="unknown loss"):
        regression_loss(pred, target, "lpips")


def test_reflow_loss_is_a_denoising_loss_with_the_paired_noise(edm):
    """v - (z - x) = (x - D(x + sigma z, sigma)) / t: the velocity loss through the EDM wrapper."""
    x, z = batch()
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.9, 80 / 81])
    got = reflow_loss(lambda x_t, tt: velocity_from_denoiser(edm, x_t, tt), x, z, t)
    sigma = t / (1 - t)
    with torch.no_grad():
        x0 = edm(x + sigma.view(-1, 1, 1, 1) * z, sigma)
    want = (x - x0).square().flatten(1).mean(1) / t.square()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    oracle = reflow_loss(lambda x_t, tt: z - x, x, z, t)
    assert oracle.abs().max() == 0
    zero = reflow_loss(lambda x_t, tt: torch.zeros_like(x_t), x, z, t)
    torch.testing.assert_close(zero, (z - x).square().flatten(1).mean(1))


def test_distill_loss_starts_from_pure_noise():
    x, z = batch(4)
    t = torch.tensor([0.9, 0.9, 0.5, 0.5])
    start = torch.tensor([True, False, True, False])
    seen = {}

    def oracle(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:  # the exact velocity towards x
        seen["x_t"] = x_t
        return (x_t - x) / tt.view(-1, 1, 1, 1)

    assert distill_loss(oracle, x, z, t, start).abs().max() < 1e-10
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"][start], (tb * z)[start])
    torch.testing.assert_close(seen["x_t"][~start], ((1 - tb) * x + tb * z)[~start])
    got = distill_loss(
        lambda x_t, tt: torch.zeros_like(x_t), x, z, t, start, kind="pseudo_huber", huber_c=0.0
    )
    want = torch.where(start.view(-1, 1, 1, 1), tb * z, (1 - tb) * x + tb * z) - x
    torch.testing.assert_close(got, want.flatten(1).norm(dim=1))


# ---------------------------------------------------------------------------------------- sampling
def test_velocity_conversion_matches_denoiser_velocity(edm, flow):
    x, z = batch()
    t = torch.tensor([0.02, 0.2, 0.4, 0.6, 0.8, 0.95])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * z
    with torch.no_grad():
        for model in (edm, flow):
            torch.testing.assert_close(
                velocity_from_denoiser(model, x_t, t), model.velocity(x_t, t), rtol=1e-4, atol=1e-5
            )


def test_flow_grid_and_sigmas():
    assert flow_time_grid(2, 0.8) == [0.8, 0.4, 0.0]
    assert t_max_for(80.0) == pytest.approx(80 / 81)
    assert flow_sigmas(1, 80.0) == [80.0]
    s = flow_sigmas(2, 80.0)
    assert s[0] == 80.0 and s[1] == pytest.approx((40 / 81) / (1 - 40 / 81))


@pytest.mark.parametrize("kind", ["edm", "flow"])
def test_edm_form_euler_equals_flow_time_euler(kind, edm, flow):
    model = edm if kind == "edm" else flow
    _, z = batch(5, seed=2)
    with torch.no_grad():
        for n in (1, 3):
            a = euler_on_sigmas(model, z, flow_sigmas(n, 80.0))
            b = flow_euler_sample(lambda x_t, t: model.velocity(x_t, t), z, n, 80 / 81).images
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        one = model(80.0 * z, 80.0)  # the one-step sampler is D(sigma_max z, sigma_max)
    torch.testing.assert_close(euler_on_sigmas(model, z, [80.0]), one)


# ------------------------------------------------------------------------------------- straightness
def test_straightness_by_hand():
    z = torch.randn(3, 1, 4, 4)
    constant = torch.randn(3, 1, 4, 4)
    assert straightness(lambda x, t: constant, z, 5, 0.9) < 1e-12  # a straight path
    # v = t * c: on times [1, .5, 0] the velocities are c and c/2, the chord is .75 c; S = mean(.25^2, .25^2)
    ones = torch.ones(3, 1, 4, 4)
    assert straightness(lambda x, t: t.view(-1, 1, 1, 1) * ones, z, 2, 1.0) == pytest.approx(0.0625)


def test_an_ideal_denoiser_has_a_straight_flow():
    """D(x, sigma) = x* for every input: the converted velocity field moves on a line, S = 0; a teacher's is not."""
    target = torch.randn(4, 1, 8, 8)

    def ideal(x, sigma, cond=None):
        return target.expand_as(x)

    z = torch.randn(4, 1, 8, 8)
    assert straightness(lambda x_t, t: velocity_from_denoiser(ideal, x_t, t), z, 8, 80 / 81) < 1e-10

    def curved(x, sigma, cond=None):  # x0 prediction that depends on the noise level
        return target * torch.as_tensor(sigma).view(-1, 1, 1, 1).clamp(max=2.0)

    assert straightness(lambda x_t, t: velocity_from_denoiser(curved, x_t, t), z, 8, 80 / 81) > 1e-3
