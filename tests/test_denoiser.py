"""Denoiser: exact parameterisation conversions (analytic Gaussian), real tiny UNets, CFG, persistence."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_models
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    ScoreSdeVeScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

from distill.teachers.denoiser import Condition, Denoiser, null_condition

MU, S = 0.3, 0.6  # data x0 ~ N(MU, S^2) per pixel


pytestmark = pytest.mark.usefixtures("one_thread")


def exact_x0(x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_sigma] for Gaussian data: MU + S^2 / (S^2 + sigma^2) (x_sigma - MU)."""
    return MU + S**2 / (S**2 + sigma**2) * (x_sigma - MU)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class FakeVP(nn.Module):
    """Returns the exact eps / v / x0 for a discrete VP scheduler.

    Convention inverted here, independently of the wrapper: the model sees ``x_vp = sqrt(abar) x_sigma`` and
    a float timestep ``t``; ``log sigma(t)`` is the *forward* piecewise-linear interpolation of the table
    ``log sqrt((1 - abar_k) / abar_k)`` at ``t`` (integers hit the table exactly), and
    ``abar(t) = 1 / (1 + sigma(t)^2)``.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        abar = alphas_cumprod.double().numpy()
        self.log_sigmas = 0.5 * np.log((1 - abar) / abar)
        self.prediction_type = prediction_type
        self.seen: list[torch.Tensor] = []

    def forward(self, sample, timestep, **kwargs):
        self.seen.append(timestep.detach().clone())
        t = timestep.double().numpy()
        sigma = torch.from_numpy(np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas)))
        sigma = bcast(sigma, sample)
        sqrt_abar = 1 / torch.sqrt(1 + sigma**2)
        x_sigma = sample.double() / sqrt_abar
        x0 = exact_x0(x_sigma, sigma)
        eps = (x_sigma - x0) / sigma
        if self.prediction_type == "epsilon":
            out = eps
        elif self.prediction_type == "v_prediction":
            out = sqrt_abar * eps - torch.sqrt(1 - sqrt_abar**2) * x0
        else:
            out = x0
        return SimpleNamespace(sample=out.to(sample.dtype))


class FakeEDM(nn.Module):
    """Returns the exact EDM network output F: input c_in x, timestep 0.25 log(sigma) (EDM paper formulas)."""

    def __init__(self, sigma_data: float, prediction_type: str):
        super().__init__()
        self.sd, self.prediction_type = sigma_data, prediction_type
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, sample, timestep, **kwargs):
        self.seen.append((sample.detach().clone(), timestep.detach().clone()))
        sigma = bcast(torch.exp(4 * timestep.double()), sample)
        sd = self.sd
        c_in = 1 / torch.sqrt(sigma**2 + sd**2)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        x = sample.double() / c_in
        f = (exact_x0(x, sigma) - c_skip * x) / c_out
        return SimpleNamespace(sample=f.to(sample.dtype))


class FakeFlow(nn.Module):
    """Returns the exact velocity n - x0 for x_t = (1 - t) x0 + t n, timestep = t * T.

    Derived in flow coordinates (valid at t = 1): Cov(x0, x_t) = (1 - t) S^2, Var(x_t) = (1 - t)^2 S^2 + t^2,
    E[x0 | x_t] = MU + Cov / Var (x_t - (1 - t) MU) and v = (x_t - E[x0 | x_t]) / t.
    """

    def __init__(self, num_train_timesteps: int = 1000):
        super().__init__()
        self.T = num_train_timesteps

    def forward(self, sample, timestep, **kwargs):
        t = bcast(timestep.double() / self.T, sample)
        x_t = sample.double()
        var = (1 - t) ** 2 * S**2 + t**2
        x0 = MU + (1 - t) * S**2 / var * (x_t - (1 - t) * MU)
        return SimpleNamespace(sample=((x_t - x0) / t).to(sample.dtype))


def noisy(sigma: torch.Tensor, batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S * torch.randn(batch, 2, 3, 3, generator=g)
    return x0 + bcast(sigma, x0) * torch.randn(x0.shape, generator=g)


def table_log_sigmas(sched) -> np.ndarray:
    abar = sched.alphas_cumprod.double().numpy()
    with np.errstate(divide="ignore"):  # zero-terminal-SNR tables end in abar = 0
        return 0.5 * np.log((1 - abar) / abar)


# ----------------------------------------------------------------------------------------------------- VP
VP_CASES = [
    (DDPMScheduler, dict(beta_schedule="linear", prediction_type="epsilon")),
    (DDPMScheduler, dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")),
    (
        DDIMScheduler,
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample"),
    ),
    (EulerDiscreteScheduler, dict(beta_schedule="scaled_linear", prediction_type="epsilon")),
]


@pytest.mark.parametrize("sched_cls,kw", VP_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_vp_matches_analytic_on_and_between_table(sched_cls, kw):
    sched = sched_cls(**kw)
    ls = table_log_sigmas(sched)
    fake = FakeVP(sched.alphas_cumprod, kw["prediction_type"])
    d = Denoiser(fake, sched)
    assert d.parameterization == f"vp-{kw['prediction_type']}"
    assert d.sigma_min == pytest.approx(math.exp(ls[0])) and d.sigma_max == pytest.approx(math.exp(ls[-1]))

    on_table = [0, 1, 10, 250, 500, 998, 999]
    between = [(3, 0.5), (100, 0.25), (600, 0.9), (997, 0.3)]  # (k, w): log sigma = (1-w) ls[k] + w ls[k+1]
    sig_on = np.exp(ls[on_table])
    sig_between = np.exp([(1 - w) * ls[k] + w * ls[k + 1] for k, w in between])
    expected_t = list(map(float, on_table)) + [k + w for k, w in between]
    sigmas = torch.tensor(np.concatenate([sig_on, sig_between]), dtype=torch.float32)
    x = noisy(sigmas, batch=len(sigmas))
    out = d(x, sigmas)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, exact_x0(x, bcast(sigmas, x)).float(), atol=1e-4, rtol=0)
    # the wrapper passed float timesteps: integers on the table, fractions in between
    torch.testing.assert_close(
        fake.seen[-1], torch.tensor(expected_t, dtype=torch.float32), atol=2e-3, rtol=0
    )
    # scalar sigma path, several sigmas one at a time
    for s in [0.05, 1.0, 7.3]:
        xs = noisy(torch.tensor(s))
        torch.testing.assert_close(d(xs, s), exact_x0(xs, torch.tensor(s)), atol=1e-4, rtol=0)


def test_vp_timestep_rule_matches_diffusers_sigma_to_t_and_clamps():
    sched = EulerDiscreteScheduler()
    d = Denoiser(FakeVP(sched.alphas_cumprod, "epsilon"), sched)
    sig = np.array([0.02, 0.5, 1.0, 3.3, 80.0])
    ours = d.sigma_to_timestep(torch.tensor(sig, dtype=torch.float64))
    if hasattr(sched, "_sigma_to_t"):  # diffusers' own (private) Karras-sigma helper: same rule, unrounded
        ref = sched._sigma_to_t(sig, table_log_sigmas(sched))
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-3)
    ends = d.sigma_to_timestep(torch.tensor([1e-5, d.sigma_min, d.sigma_max, 1e5]))
    torch.testing.assert_close(ends, torch.tensor([0.0, 0.0, 999.0, 999.0]))
    # clamped timestep, but the eps conversion still uses the true sigma
    x = noisy(torch.tensor(1e-4))
    assert torch.isfinite(d(x, 1e-4)).all() and torch.isfinite(d(x, 0.0)).all()


def test_vp_trained_betas_and_zero_snr():
    betas = np.linspace(1e-4, 0.02, 50)
    sched = DDPMScheduler(num_train_timesteps=50, trained_betas=betas)
    d = Denoiser(FakeVP(sched.alphas_cumprod, "epsilon"), sched)
    assert d.sigma_max == pytest.approx(math.sqrt(1 / np.prod(1 - betas) - 1), rel=1e-5)
    x = noisy(torch.tensor(0.3))
    torch.testing.assert_close(d(x, 0.3), exact_x0(x, torch.tensor(0.3)), atol=1e-4, rtol=0)
    zsnr = Denoiser(FakeVP(sched.alphas_cumprod, "epsilon"), DDIMScheduler(rescale_betas_zero_snr=True))
    zsnr_table = table_log_sigmas(DDIMScheduler(rescale_betas_zero_snr=True))  # ends in +inf
    assert math.isfinite(zsnr.sigma_max) and zsnr.sigma_max > math.exp(zsnr_table[-2])
    assert zsnr.sigma_to_timestep(torch.tensor(math.exp(zsnr_table[-2]))).item() == pytest.approx(
        998, abs=1e-3
    )


# ----------------------------------------------------------------------------------------------------- EDM
@pytest.mark.parametrize("sched_cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_matches_analytic_and_diffusers_preconditioning(sched_cls, prediction_type):
    sched = sched_cls(sigma_data=0.7, prediction_type=prediction_type, sigma_min=0.003, sigma_max=60.0)
    fake = FakeEDM(0.7, prediction_type)
    d = Denoiser(fake, sched)
    assert d.parameterization == "edm" and d.sigma_data == 0.7
    assert (d.sigma_min, d.sigma_max) == (0.003, 60.0)
    sigmas = torch.tensor([0.003, 0.05, 0.7, 3.0, 60.0])
    x = noisy(sigmas, batch=5)
    torch.testing.assert_close(d(x, sigmas), exact_x0(x, bcast(sigmas, x)).float(), atol=1e-4, rtol=0)
    # exactly what a diffusers pipeline feeds the model and how it reads the output
    model_in, t = fake.seen[-1]
    for i, s in enumerate(sigmas):
        torch.testing.assert_close(model_in[i], sched.precondition_inputs(x[i], s), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(t[i : i + 1], sched.precondition_noise(s.reshape(1)), atol=1e-6, rtol=0)
        f = fake(model_in[i : i + 1], t[i : i + 1]).sample
        ref = sched.precondition_outputs(x[i : i + 1], f, s)
        torch.testing.assert_close(d(x[i : i + 1], s), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- flow
def test_flow_matches_analytic_and_velocity():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # shift must not change the mapping
    d = Denoiser(FakeFlow(), sched)
    assert d.parameterization == "flow" and d.sigma_max == math.inf
    sigmas = torch.tensor([0.01, 0.3, 1.0, 5.0, 50.0])
    x = noisy(sigmas, batch=5)
    torch.testing.assert_close(d(x, sigmas), exact_x0(x, bcast(sigmas, x)).float(), atol=1e-4, rtol=0)
    # velocity in flow time, including t = 1 (pure noise) which the sigma route cannot express
    t = torch.tensor([0.1, 0.5, 0.9, 1.0, 1.0])
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(5, 2, 3, 3, generator=g)
    v = d.velocity(x_t, t)
    ref = FakeFlow()(x_t, t * 1000).sample
    torch.testing.assert_close(v, ref)
    inner = slice(0, 3)
    tb = bcast(t[inner], x_t[inner])
    x0 = d(x_t[inner] / (1 - tb), tb / (1 - tb))
    torch.testing.assert_close(v[inner], (x_t[inner] - x0) / tb, atol=1e-4, rtol=1e-4)


def test_dpmsolver_flow_prediction_is_flow():
    d = Denoiser(FakeFlow(), {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction",
                              "use_flow_sigmas": True, "flow_shift": 3.0})  # fmt: skip
    assert d.parameterization == "flow"
    x = noisy(torch.tensor(2.0))
    torch.testing.assert_close(d(x, 2.0), exact_x0(x, torch.tensor(2.0)), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- helper consistency
@pytest.mark.parametrize(
    "sched",
    [DDPMScheduler(), EDMEulerScheduler(), FlowMatchEulerDiscreteScheduler()],
    ids=["vp", "edm", "flow"],
)
def test_eps_score_velocity_vpred_consistent_with_x0(sched, tiny_unet):
    d = Denoiser(tiny_unet, sched)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g) * 2
    sigma = torch.tensor([0.3, 1.5, 9.0])
    sb = bcast(sigma, x)
    x0 = d(x, sigma)
    torch.testing.assert_close(d.eps(x, sigma), (x - x0) / sb)
    torch.testing.assert_close(d.score(x, sigma), (x0 - x) / sb**2)
    eps = (x - x0) / sb
    abar = 1 / (1 + sb**2)
    torch.testing.assert_close(d.v_prediction(x, sigma), abar.sqrt() * eps - (1 - abar).sqrt() * x0)
    t = sigma / (1 + sigma)
    tb = bcast(t, x)
    x_t = x / (1 + sb)  # the same point in flow coordinates
    torch.testing.assert_close(d.velocity(x_t, t), (x_t - x0) / tb, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- real UNets
@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DModel:
    return tiny_models.tiny_unet(seed=0)


@pytest.fixture(scope="module")
def class_unet() -> UNet2DModel:
    return tiny_models.tiny_unet(seed=1, num_classes=3)  # 3 classes + null class 3


@pytest.fixture(scope="module")
def text_unet() -> UNet2DConditionModel:
    return tiny_models.tiny_text_unet(seed=2)


def test_real_unet_forward_module_contract(tiny_unet):
    d = Denoiser(tiny_unet, DDPMScheduler())
    x = torch.randn(2, 1, 8, 8)
    out = d(x, 1.0)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert d(x.to(torch.bfloat16), 1.0).dtype == torch.bfloat16
    assert d(x.double(), torch.tensor(1.0)).dtype == torch.float64
    assert [id(p) for p in d.parameters()] == [id(p) for p in tiny_unet.parameters()]
    assert all(k.startswith("model.") for k in d.state_dict())
    assert d.in_channels == 1 and d.sample_size == 8 and d.sigma_data == 0.5
    clone = copy.deepcopy(d)
    torch.testing.assert_close(clone(x, 1.0), out)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.equal(clone(x, 1.0), out)
    # gradients flow to the wrapped model only
    d(x, torch.tensor([0.5, 2.0])).square().mean().backward()
    assert all(p.grad is not None for p in tiny_unet.parameters())
    tiny_unet.zero_grad(set_to_none=True)


def test_class_conditional_cfg(class_unet):
    d = Denoiser(class_unet, DDIMScheduler(prediction_type="v_prediction"))
    x = torch.randn(3, 1, 8, 8)
    cond = Condition(class_labels=torch.tensor([0, 1, 2]))
    sigma = torch.tensor([0.5, 2.0, 10.0])
    plain = d(x, sigma, cond)
    torch.testing.assert_close(d(x, sigma, cond, guidance_scale=1.0), plain)
    null = d.null_condition(cond)
    assert null.class_labels.tolist() == [3, 3, 3]
    uncond = d(x, sigma, null)
    w = 3.5
    torch.testing.assert_close(
        d(x, sigma, cond, guidance_scale=w), uncond + w * (plain - uncond), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        d(x, sigma, cond, guidance_scale=w, null_cond=null),
        uncond + w * (plain - uncond),
        atol=1e-5,
        rtol=1e-5,
    )
    # bare integer tensors are class labels
    torch.testing.assert_close(d(x, sigma, torch.tensor([0, 1, 2])), plain)
    with pytest.raises(ValueError, match=r"batch size 2 does not match x batch size 3"):
        d(x, sigma, Condition(class_labels=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="null_cond batch size 1"):
        d(x, sigma, cond, guidance_scale=2.0, null_cond=Condition(class_labels=torch.tensor([3])))
    with pytest.raises(ValueError, match=r"one entry per sample \(3\)"):
        d(x, torch.ones(2), cond)


def test_text_conditional_cfg_edm(text_unet):
    d = Denoiser(text_unet, EDMEulerScheduler())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    text = torch.randn(2, 5, 8, generator=g)
    empty = torch.randn(1, 5, 8, generator=g)
    cond = Condition(encoder_hidden_states=text)
    plain = d(x, 2.0, cond)
    assert plain.shape == x.shape
    torch.testing.assert_close(d(x, 2.0, cond, guidance_scale=1.0), plain)
    null = d.null_condition(cond, null_encoder_hidden_states=empty)
    assert null.encoder_hidden_states.shape == text.shape
    uncond = d(x, 2.0, null)
    torch.testing.assert_close(
        d(x, 2.0, cond, 5.0, null), uncond + 5.0 * (plain - uncond), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="null_encoder_hidden_states"):
        d(x, 2.0, cond, guidance_scale=5.0)
    with pytest.raises(ValueError, match="needs cond.encoder_hidden_states"):
        d(x, 2.0)
    with pytest.raises(ValueError, match=r"cond batch size 3 does not match x batch size 2"):
        d(x, 2.0, torch.randn(3, 5, 8))


def test_condition_utilities():
    a = Condition(class_labels=torch.tensor([1, 2, 3]), encoder_hidden_states=torch.randn(3, 2, 4))
    b = Condition(class_labels=torch.tensor([0]), encoder_hidden_states=torch.randn(1, 2, 4))
    c = Condition.cat(a, b)
    assert c.batch_size == 4 and c.class_labels.tolist() == [1, 2, 3, 0]
    assert a[1].batch_size == 1 and a[1].class_labels.tolist() == [2]
    assert a[1:].class_labels.tolist() == [2, 3]
    assert a[torch.tensor([2, 0])].class_labels.tolist() == [3, 1]
    half = a.to("cpu", dtype=torch.float16)
    assert half.encoder_hidden_states.dtype == torch.float16 and half.class_labels.dtype == torch.int64
    assert a.repeat(2).class_labels.tolist() == [1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="class_labels"):
        Condition.cat(a, Condition(encoder_hidden_states=torch.randn(1, 2, 4)))
    with pytest.raises(ValueError, match="no num_class_embeds"):
        null_condition(a, num_class_embeds=None, null_encoder_hidden_states=torch.zeros(1, 2, 4))
    n = null_condition(a, num_class_embeds=11, null_encoder_hidden_states=torch.zeros(1, 2, 4))
    assert n.class_labels.tolist() == [10, 10, 10] and n.encoder_hidden_states.shape == (3, 2, 4)


# ------------------------------------------------------------------------------------------ bad inputs
def test_construction_errors(tiny_unet):
    with pytest.raises(ValueError, match="ScoreSdeVeScheduler"):
        Denoiser(tiny_unet, ScoreSdeVeScheduler())
    with pytest.raises(ValueError, match="'NotAScheduler'"):
        Denoiser(tiny_unet, {"_class_name": "NotAScheduler", "sigma_min": 0.1})
    with pytest.raises(ValueError, match="'banana'.*epsilon"):
        Denoiser(tiny_unet, {"_class_name": "DDPMScheduler", "prediction_type": "banana"})
    with pytest.raises(ValueError, match="'sample'"):
        Denoiser(tiny_unet, EDMDPMSolverMultistepScheduler(prediction_type="sample"))
    with pytest.raises(ValueError, match="'cubic'"):
        Denoiser(tiny_unet, {"_class_name": "DDPMScheduler", "beta_schedule": "cubic"})
    with pytest.raises(TypeError, match="Linear"):
        Denoiser(nn.Linear(2, 2), DDPMScheduler())
    with pytest.raises(TypeError, match="nn.Module"):
        Denoiser(lambda x, t: x, DDPMScheduler())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scheduler"):
        Denoiser(tiny_unet, 3)
    with pytest.raises(ValueError, match="does not accept conditioning"):
        Denoiser(tiny_unet, DDPMScheduler())(torch.randn(1, 1, 8, 8), 1.0, torch.randn(1, 2, 8))


# ----------------------------------------------------------------------------------------- persistence
def test_save_load_round_trip_layouts(class_unet, tmp_path):
    d = Denoiser(class_unet, DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"))
    x = torch.randn(2, 1, 8, 8)
    cond = Condition(class_labels=torch.tensor([0, 2]))
    ref = d(x, torch.tensor([0.4, 4.0]), cond, guidance_scale=2.0)

    d.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (
        json.loads((tmp_path / "saved/scheduler/scheduler_config.json").read_text())["_class_name"]
        == "DDIMScheduler"
    )
    for folder, sub in [
        (tmp_path / "saved", None),
        (tmp_path / "saved" / "unet", None),
        (tmp_path / "saved", "unet"),
    ]:
        loaded = Denoiser.from_pretrained(folder, subfolder=sub)
        assert loaded.parameterization == "vp-v_prediction" and loaded.scheduler_class == "DDIMScheduler"
        torch.testing.assert_close(
            loaded(x, torch.tensor([0.4, 4.0]), cond, guidance_scale=2.0), ref, atol=0, rtol=0
        )

    # diffusers pipeline folder (model_index.json + unet/ + scheduler/)
    (tmp_path / "saved" / "model_index.json").write_text(json.dumps({"_class_name": "DDIMPipeline"}))
    assert Denoiser.from_pretrained(tmp_path / "saved").parameterization == "vp-v_prediction"

    # model folder with scheduler_config.json next to config.json
    class_unet.save_pretrained(tmp_path / "flat")
    EDMEulerScheduler(sigma_data=0.6).save_pretrained(tmp_path / "flat")
    flat = Denoiser.from_pretrained(tmp_path / "flat")
    assert flat.parameterization == "edm" and flat.sigma_data == 0.6


def test_from_pretrained_errors(tiny_unet, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Denoiser.from_pretrained(tmp_path / "missing")
    tiny_unet.save_pretrained(tmp_path / "lonely")
    with pytest.raises(FileNotFoundError, match=r"no scheduler config.*scheduler_config\.json"):
        Denoiser.from_pretrained(tmp_path / "lonely")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model config"):
        Denoiser.from_pretrained(tmp_path / "empty")
