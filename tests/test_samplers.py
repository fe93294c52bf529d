"""PF-ODE samplers against the closed-form Gaussian flow, NFE accounting, seeding and batching."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import EDMEulerScheduler
from tiny_models import tiny_unet
from torch import nn

from distill.sampling.ode import (
    SampleResult,
    default_sigma_range,
    edm_heun_sample,
    euler_sample,
    karras_sigmas,
    sample,
    steps_for_nfe,
)
from distill.teachers.denoiser import Condition, Denoiser

MU, S = 0.3, 0.5  # data x0 ~ N(MU, S^2) per pixel
SHAPE = (1, 4, 4)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny convs are dominated by OpenMP hand-offs; on a busy 2-core box 2 threads are ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_d(x: torch.Tensor, sigma: float, cond=None) -> torch.Tensor:
    """Exact denoiser E[x0 | x0 + sigma n] for Gaussian data."""
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


class CountingD:
    """Plain callable with a reported range that records every sigma it is queried at."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.sigmas: list[float] = []

    def __call__(self, x, sigma, cond=None):
        self.sigmas.append(float(sigma))
        return gaussian_d(x, sigma)


def pf_ode_solution(noise: torch.Tensor, sigma_max: float = 80.0) -> torch.Tensor:
    """Exact PF-ODE endpoint for Gaussian data: x0 = MU + S / sqrt(S^2 + sigma_max^2) (x_T - MU)."""
    x_t = noise.double() * sigma_max
    return (MU + S / math.sqrt(S**2 + sigma_max**2) * (x_t - MU)).float()


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def rel_err(images: torch.Tensor, ref: torch.Tensor) -> float:
    return ((images - ref).abs().max() / (ref - MU).abs().max()).item()


def test_karras_sigmas():
    s = karras_sigmas(18)
    assert s.shape == (19,) and s.dtype == torch.float64
    assert s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002) and s[-1] == 0
    assert bool((s.diff() < 0).all())
    i, n, rho = 5, 18, 7.0
    manual = (80.0 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    assert s[i].item() == pytest.approx(manual, rel=1e-12)
    assert karras_sigmas(1, 0.1, 5.0).tolist() == [5.0, 0.0]
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(4, 1.0, 0.5)


def test_heun_matches_closed_form_and_converges_second_order():
    z = noise(64)
    exact = pf_ode_solution(z)
    fine = edm_heun_sample(gaussian_d, z, num_steps=256)
    torch.testing.assert_close(fine.images, exact, atol=1e-3, rtol=0)
    e50 = rel_err(edm_heun_sample(gaussian_d, z, 50).images, exact)
    e100 = rel_err(edm_heun_sample(gaussian_d, z, 100).images, exact)
    assert 0.18 < e100 / e50 < 0.32  # 2nd order: halving the step quarters the error
    # Euler is first order: same budget, clearly worse
    assert rel_err(euler_sample(gaussian_d, z, 99).images, exact) > 3 * e50


def test_heun_35_nfe_statistics_and_euler_worse():
    z = noise(4096, seed=1)
    exact = pf_ode_solution(z)
    heun = edm_heun_sample(gaussian_d, z, num_steps=18)
    assert heun.nfe == 35
    # the deterministic map is a ~5% contraction at 18 steps for this Gaussian (EDM grid): visible, bounded
    assert rel_err(heun.images, exact) < 0.07
    assert abs(heun.images.mean().item() - MU) < 0.01
    assert abs(heun.images.std().item() - S) < 0.07 * S
    euler_same = euler_sample(gaussian_d, z, num_steps=35)
    euler_few = euler_sample(gaussian_d, z, num_steps=10)
    assert rel_err(euler_few.images, exact) > rel_err(euler_same.images, exact) > rel_err(heun.images, exact)


def test_nfe_accounting_and_default_range():
    d = CountingD(sigma_min=0.1, sigma_max=10.0)
    res = edm_heun_sample(d, noise(2), num_steps=6)
    assert isinstance(res, SampleResult) and res.nfe == 11 == len(d.sigmas)
    assert d.sigmas[0] == pytest.approx(10.0) and min(d.sigmas) == pytest.approx(0.1)
    d2 = CountingD(sigma_min=0.0, sigma_max=math.inf)
    res = euler_sample(d2, noise(2), num_steps=7)
    assert res.nfe == 7 == len(d2.sigmas) and d2.sigmas[0] == pytest.approx(80.0)
    assert min(d2.sigmas) == pytest.approx(0.002)
    assert default_sigma_range(gaussian_d) == (0.002, 80.0)
    assert default_sigma_range(d, sigma_max=3.0) == (0.1, 3.0)
    assert steps_for_nfe(35) == ("heun", 18) and steps_for_nfe(1) == ("euler", 1)
    assert steps_for_nfe(4, "euler") == ("euler", 4)
    with pytest.raises(ValueError, match="odd NFE"):
        steps_for_nfe(4)
    with pytest.raises(ValueError, match="'rk4'"):
        steps_for_nfe(5, "rk4")


def test_sample_seeding_batching_and_one_step():
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    a = sample(gaussian_d, 10, nfe=9, generator=g(0), shape=SHAPE)
    b = sample(gaussian_d, 10, nfe=9, generator=g(0), shape=SHAPE, batch_size=3)
    c = sample(gaussian_d, 10, nfe=9, generator=g(1), shape=SHAPE)
    assert a.nfe == b.nfe == 9 and a.images.shape == (10, *SHAPE)
    torch.testing.assert_close(a.images, b.images, atol=0, rtol=0)
    assert not torch.allclose(a.images, c.images)
    one = sample(gaussian_d, 4, nfe=1, generator=g(2), shape=SHAPE)
    z = torch.cat([torch.randn(1, *SHAPE, generator=gen) for gen in [g(2)] for _ in range(4)])
    assert one.nfe == 1
    torch.testing.assert_close(one.images, gaussian_d(z * 80.0, 80.0))
    with pytest.raises(ValueError, match="shape"):
        sample(gaussian_d, 2, nfe=3)


class FakeEDM(nn.Module):
    """Exact EDM network output F for the Gaussian (input c_in x, timestep 0.25 log sigma)."""

    def forward(self, sample, timestep, **kwargs):
        sigma = torch.exp(4 * timestep.double()).reshape(-1, 1, 1, 1)
        denom = sigma**2 + 0.25
        x = sample.double() * denom.sqrt()
        c_skip, c_out = 0.25 / denom, sigma * 0.5 / denom.sqrt()
        x0 = MU + S**2 / (S**2 + sigma**2) * (x - MU)
        return SimpleNamespace(sample=((x0 - c_skip * x) / c_out).float())


def test_samplers_drive_a_denoiser():
    d = Denoiser(FakeEDM(), EDMEulerScheduler())
    z = noise(8, seed=3)
    via_wrapper = edm_heun_sample(d, z, num_steps=10)
    direct = edm_heun_sample(gaussian_d, z, num_steps=10)
    assert via_wrapper.nfe == direct.nfe == 19
    torch.testing.assert_close(via_wrapper.images, direct.images, atol=1e-4, rtol=1e-4)


def test_sample_with_real_unet_cfg_and_cond_slicing():
    unet = tiny_unet(seed=0, num_classes=2)  # 2 classes + null class 2
    d = Denoiser(unet, EDMEulerScheduler())
    cond = Condition(class_labels=torch.tensor([0, 1, 0, 1, 1]))
    kw = dict(nfe=3, cond=cond, guidance_scale=2.0)
    full = sample(d, 5, generator=torch.Generator().manual_seed(0), **kw)
    parts = sample(d, 5, generator=torch.Generator().manual_seed(0), batch_size=2, **kw)
    assert full.images.shape == (5, 1, 8, 8) and full.images.dtype == torch.float32 and full.nfe == 3
    # batches of 2 vs 5 take different CPU kernels: float rounding, grown by CFG from sigma 80, reaches ~4e-5
    # relative; a wrong condition or noise slice would differ by O(1)
    torch.testing.assert_close(parts.images, full.images, atol=1e-4, rtol=1e-4)
    null = d.null_condition(cond)  # explicit null for all 5 samples, sliced per batch like cond
    explicit = sample(d, 5, generator=torch.Generator().manual_seed(0), batch_size=2, null_cond=null, **kw)
    torch.testing.assert_close(explicit.images, parts.images, atol=1e-6, rtol=1e-6)
    plain = sample(d, 5, generator=torch.Generator().manual_seed(0), nfe=3, cond=cond)
    assert not torch.allclose(plain.images, full.images)
