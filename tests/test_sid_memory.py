"""SiD's memory options on the tiny EDM teacher: a low-precision frozen teacher, gradient checkpointing (full
and LoRA students), 8-bit Adam and G's EMA on the CPU."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.utils.checkpoint
from safetensors.torch import load_file
from tiny_models import sid_trainer

from distill.sid.lora_student import ADAPTERS, enable_adapter_checkpointing
from distill.teachers.builders import build_unet, edm_scheduler
from distill.teachers.denoiser import Denoiser
from distill.teachers.loading import load_teacher

#: gradients with checkpointing against without: the recomputation repeats the same float32 arithmetic on the
#: same inputs, so they agree to rounding (measured: exactly equal on CPU; relative L2 over all of a network's gradients)
CKPT_RTOL = 1e-6
#: a bf16 teacher's x0 against the fp32 teacher's, relative L2 over a batch (bf16 keeps 8 mantissa bits,
#: ~4e-3 per rounding; measured 2.6e-3 on the tiny teacher)
BF16_RTOL = 2e-2


def unwrapped(trainer, name: str) -> torch.nn.Module:
    return trainer.accelerator.unwrap_model(trainer.trained[name].module)


def phase_gradients(trainer, phase: str, seed: int) -> dict[str, torch.Tensor]:
    """One micro-batch of ``phase``'s loss and its gradients, the draws fixed by ``seed``."""
    trainer.enter_phase(phase)
    model = unwrapped(trainer, phase)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = trainer.recipe.loss(phase, None, trainer.models)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    norm = sum(float(b[k].double().square().sum()) for k in a)
    return (diff / norm) ** 0.5


def count_checkpoints(monkeypatch) -> list[int]:
    """Counts torch checkpoint calls (diffusers' default function and the adapter-aware one both use it)."""
    calls = [0]
    original = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    return calls


# ---------------------------------------------------------------------------------------- teacher_dtype
def test_bf16_teacher_full_student(tmp_path, teacher_dir):
    trainer = sid_trainer(tmp_path, teacher_dir, teacher_dtype="bf16")
    assert {p.dtype for p in trainer.frozen["teacher"].parameters()} == {torch.bfloat16}
    for name in ADAPTERS:
        assert {p.dtype for p in unwrapped(trainer, name).parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.models.ema("generator").parameters()} == {torch.float32}
    grads = phase_gradients(trainer, "generator", seed=3)
    assert {g.dtype for g in grads.values()} == {torch.float32}
    assert all(torch.isfinite(g).all() for g in grads.values())
    logs = trainer.train_step()
    assert all(torch.isfinite(v) for v in logs.values())


def test_bf16_teacher_prediction_close_to_fp32(teacher_dir):
    fp32 = load_teacher(str(teacher_dir))
    bf16 = load_teacher(str(teacher_dir)).to(torch.bfloat16)
    torch.manual_seed(0)
    x0 = torch.randn(8, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.5, 10.0, 40.0, 80.0])
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)
    with torch.no_grad():
        y32, y16 = fp32(x, sigma), bf16(x, sigma)
    assert y16.dtype == torch.float32  # the Denoiser returns x's dtype
    err = float((y16 - y32).norm() / y32.norm())
    assert 0 < err < BF16_RTOL, err


def test_bf16_teacher_lora_adapters_stay_fp32(tmp_path, teacher_dir):
    trainer = sid_trainer(tmp_path, teacher_dir, student="lora", lora_rank=4, teacher_dtype="bf16")
    shared = unwrapped(trainer, "generator").shared
    base = {p.dtype for n, p in shared.named_parameters() if "lora_" not in n}
    adapters = {p.dtype for n, p in shared.named_parameters() if "lora_" in n}
    assert base == {torch.bfloat16} and adapters == {torch.float32}
    for phase in ADAPTERS:
        grads = phase_gradients(trainer, phase, seed=5)
        assert grads and all(phase in n.split(".") for n in grads)
        assert {g.dtype for g in grads.values()} == {torch.float32}
        assert any(float(g.abs().max()) > 0 for g in grads.values())
    logs = trainer.train_step()
    assert all(torch.isfinite(v) for v in logs.values())


def test_teacher_dtype_is_checked():
    from engine.config import parse_config
    from recipes.sid import SiDConfig

    with pytest.raises(SystemExit):
        parse_config(SiDConfig, ["--teacher_dtype", "int8"])


# ---------------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("student", ["full", "lora"])
def test_checkpointing_keeps_gradients(tmp_path, teacher_dir, monkeypatch, student):
    extra = {"lora_rank": 4} if student == "lora" else {}
    plain = sid_trainer(tmp_path / "plain", teacher_dir, student=student, **extra)
    ckpt = sid_trainer(tmp_path / "ckpt", teacher_dir, student=student, gradient_checkpointing=True, **extra)
    calls = count_checkpoints(monkeypatch)
    for phase, seed in (("fake_score", 11), ("generator", 12)):
        expected = phase_gradients(plain, phase, seed)
        assert calls[0] == 0
        got = phase_gradients(ckpt, phase, seed)
        assert calls[0] > 0, f"{phase}: no block was checkpointed"
        calls[0] = 0
        assert relative_error(got, expected) < CKPT_RTOL, phase


def test_checkpointing_covers_the_teacher(tmp_path, teacher_dir):
    trainer = sid_trainer(tmp_path, teacher_dir, gradient_checkpointing=True)
    for model in (trainer.frozen["teacher"], *(unwrapped(trainer, n) for n in ADAPTERS)):
        flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert flags and all(flags)


def test_lora_checkpointing_recomputes_under_the_adapter_that_ran(tmp_path, teacher_dir):
    """G runs, then f_psi (the shared model now carries f_psi's adapter), then G's output is backpropagated:
    diffusers' default checkpoint function recomputes G's blocks under f_psi's adapter (torch notices here
    because other tensors are saved; with the same graph shape the gradients would silently be f_psi's); the
    adapter-aware one gives the gradients of a run without checkpointing."""
    trainer = sid_trainer(tmp_path, teacher_dir, student="lora", lora_rank=4)
    views = {n: unwrapped(trainer, n) for n in ADAPTERS}
    shared = views["generator"].shared
    base = shared.model.get_base_model()
    torch.manual_seed(7)
    with torch.no_grad():  # non-zero B matrices: the two adapters differ from each other and from the base
        for n, p in shared.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    trainer.enter_phase("generator")

    def generator_grads() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 2.5)
        y = views["generator"](x, sigma)
        views["fake_score"](x, sigma)
        y.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in shared.named_parameters() if p.grad is not None}
        shared.zero_grad(set_to_none=True)
        return grads

    expected = generator_grads()
    assert expected and all("generator" in n.split(".") for n in expected)
    base.enable_gradient_checkpointing()  # diffusers' default function
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different number of tensors"):
        generator_grads()  # G's blocks re-run under f_psi's adapter, whose weights need no grad here
    shared.zero_grad(set_to_none=True)
    enable_adapter_checkpointing(shared)
    aware = relative_error(generator_grads(), expected)
    assert aware < CKPT_RTOL, aware


# ------------------------------------------------------------------------------------------- 8-bit Adam
def wider_teacher(folder) -> str:
    """A tiny teacher with tensors of >= 4096 values (bitsandbytes keeps smaller ones in 32-bit state)."""
    torch.manual_seed(0)
    unet = build_unet(8, 1, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    Denoiser(unet, edm_scheduler()).save_pretrained(folder)
    return str(folder)


def test_adam8bit_full_student(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    trainer = sid_trainer(tmp_path / "run", wider_teacher(tmp_path / "teacher"), optimizer="adam8bit")
    trainer.train_step()
    for name in ADAPTERS:
        optimizer = trainer.trained[name].optimizer.optimizer  # accelerate's wrapper around it
        assert isinstance(optimizer, bnb.optim.Adam8bit)
        assert optimizer.param_groups[0]["betas"] == trainer.config.adam_betas(name)
        large = [p for p in unwrapped(trainer, name).parameters() if p.numel() >= 4096]
        assert large
        for p in large:
            assert optimizer.state[p]["state1"].dtype == torch.uint8
            assert optimizer.state[p]["state2"].dtype == torch.uint8


def test_adam8bit_lora_plus(tmp_path, teacher_dir):
    bnb = pytest.importorskip("bitsandbytes")
    trainer = sid_trainer(
        tmp_path, teacher_dir, student="lora", lora_rank=4, loraplus_ratio=8, optimizer="adam8bit"
    )
    before = {n: p.detach().clone() for n, p in unwrapped(trainer, "generator").named_parameters()}
    trainer.train_step()
    for name in ADAPTERS:
        optimizer = trainer.trained[name].optimizer.optimizer
        assert isinstance(optimizer, bnb.optim.Adam8bit)
        lrs = sorted({g["lr"] for g in optimizer.param_groups if g["params"]})
        assert lrs[-1] == pytest.approx(8 * lrs[0])  # LoRA+: B at ratio x A's lr
    after = dict(unwrapped(trainer, "generator").named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved and all("lora_" in n for n in moved)


def test_adam8bit_without_bitsandbytes_is_explained(tmp_path, teacher_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        sid_trainer(tmp_path, teacher_dir, optimizer="adam8bit")


# ------------------------------------------------------------------------------------------ EMA on CPU
@pytest.mark.parametrize("student", ["full", "lora"])
def test_ema_on_cpu_resumes_exactly(tmp_path, teacher_dir, student):
    extra = dict(student=student, ema_device="cpu", max_steps=4, checkpoint_every=2, eval_samples=4)
    extra |= {"lora_rank": 4} if student == "lora" else {}
    straight = sid_trainer(tmp_path / "straight", teacher_dir, **extra)
    ema = straight.emas["generator"]
    tensors = ema.shadow.values() if student == "lora" else ema.module.parameters()
    assert {t.device.type for t in tensors} == {"cpu"}
    straight.fit()
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_2", tmp_path / "step_2")
    resumed = sid_trainer(tmp_path / "resumed", teacher_dir, resume_from=str(tmp_path / "step_2"), **extra)
    assert resumed.step == 2
    resumed.fit()
    a = load_file(tmp_path / "straight" / "checkpoints" / "step_4" / "ema_generator.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step_4" / "ema_generator.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    at_2 = load_file(tmp_path / "step_2" / "ema_generator.safetensors")
    assert any(not torch.equal(a[k], at_2[k]) for k in a)  # the EMA moved between the checkpoints


def test_ema_device_copies_and_averages():
    """engine.ema with a device: own storage (never the model's), and the half-life update."""
    from engine.ema import EMA, ParameterEMA

    model = torch.nn.Linear(3, 2)
    for ema in (
        EMA(model, 100, None, device="cpu"),
        ParameterEMA(model, ["weight"], 100, None, device="cpu"),
    ):
        tensors = dict(ema.module.named_parameters()) if isinstance(ema, EMA) else ema.shadow
        start = tensors["weight"].clone()
        assert tensors["weight"].device.type == "cpu"
        assert tensors["weight"].data_ptr() != model.weight.data_ptr()
        with torch.no_grad():
            model.weight.add_(1.0)
        torch.testing.assert_close(tensors["weight"], start)  # not aliased
        beta = ema.update(model, images_in_step=100, images_seen=1000)
        assert beta == pytest.approx(0.5)
        torch.testing.assert_close(tensors["weight"], start + 0.5)
        with torch.no_grad():
            model.weight.sub_(1.0)
