"""SiD with LoRA students (fake score and generator as adapters on one shared frozen teacher).

Gradients through adapter switching equal those of three separate networks; only adapters are trained, averaged
and checkpointed; the exported adapter plugs into the original teacher (plain peft and the one-liner) and
reproduces the trained EMA student; bad settings fail clearly; two processes train and resume.
"""

import copy
import json

import pytest
import torch
from launch_utils import ROOT, accelerate_launch
from peft import PeftModel, get_peft_model
from tiny_models import sid_trainer, tiny_text_unet

from distill.pipelines import OneStepPipeline, load_adapter_student
from distill.sid.lora_student import ADAPTERS, AdapterView, add_sid_adapters
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.loading import load_teacher
from engine.trainer import Trainer
from finetune.loraplus import loraplus_learning_rates

pytestmark = pytest.mark.usefixtures("one_thread")


def make(tmp_path, teacher, **kw) -> Trainer:
    return sid_trainer(tmp_path, teacher, **{"student": "lora", "lora_rank": 4, **kw})


def shared_model(trainer: Trainer) -> Denoiser:
    return trainer.trained["generator"].module.shared


def flags(module: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters()}


# ------------------------------------------------------------------------------ gradients through switching
def separate_copy(teacher_dir, shared: Denoiser, adapter: str, merge: bool) -> Denoiser:
    """A network of its own holding only ``adapter`` with the shared model's weights (optionally merged)."""
    net = load_teacher(str(teacher_dir))
    config = copy.deepcopy(shared.model.peft_config[adapter])
    net.model = get_peft_model(net.model, config, adapter_name=adapter)
    source = dict(shared.model.named_parameters())
    with torch.no_grad():
        for name, p in net.model.named_parameters():
            p.copy_(source[name])
            p.requires_grad_(False)
    assert sum(".lora_" in n for n, _ in net.model.named_parameters()) > 0
    if merge:
        net.model = net.model.merge_and_unload()
    return net


def phase_grads(trainer: Trainer, phase: str, models) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    out = trainer.recipe.loss(phase, None, models)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "class_cfg"])
def test_gradients_through_adapter_switching_equal_separate_networks(
    tmp_path, teacher_dir, class_teacher_dir, conditional
):
    folder = class_teacher_dir if conditional else teacher_dir
    kw = {"guidance_scale": 2.0, "label_dropout": 0.5} if conditional else {}
    trainer = make(tmp_path, folder, **kw)
    shared = shared_model(trainer)
    with torch.no_grad():  # non-zero B for both adapters, so that f_psi != G != f_phi and the test can fail
        torch.manual_seed(1)
        for name, p in shared.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.3)
    teacher = load_teacher(str(folder))
    views = {name: trainer.models[name] for name in ("teacher", *ADAPTERS)}
    assert list(trainer.frozen["teacher"].parameters()) == []  # the teacher view owns nothing

    for phase, other in (("generator", "fake_score"), ("fake_score", "generator")):
        trainer.enter_phase(phase)
        before = flags(shared)
        trained_names = trainer.trained[phase].parameters
        # the teacher view is the original teacher, bit for bit; no view call changes a requires_grad flag
        x = torch.randn(3, 1, 8, 8)
        sigma = torch.tensor([0.3, 2.0, 10.0])
        cond = Condition(class_labels=torch.tensor([1, 2, 3])) if conditional else None
        with torch.no_grad():
            assert torch.equal(views["teacher"](x, sigma, cond), teacher(x, sigma, cond))
            outs = [views[n](x, sigma, cond) for n in ADAPTERS]
            assert not torch.allclose(outs[0], outs[1])
        assert flags(shared) == before
        shared_names = [n.removeprefix("denoiser.") for n in trained_names]
        assert all(before[n] for n in shared_names) and sum(before.values()) == len(shared_names)

        loss = phase_grads(trainer, phase, trainer.models)
        assert flags(shared) == before
        named = dict(trainer.models[phase].named_parameters())
        got = {n.removeprefix("denoiser."): named[n].grad.clone() for n in trained_names}
        assert all(p.grad is None for n, p in named.items() if n not in trained_names)
        trainer.trained[phase].optimizer.zero_grad(set_to_none=True)

        reference = {
            "teacher": teacher,
            phase: separate_copy(folder, shared, phase, merge=False),
            other: separate_copy(folder, shared, other, merge=True),
        }
        for n, p in reference[phase].named_parameters():
            p.requires_grad_(".lora_" in n)
        ref_loss = phase_grads(trainer, phase, reference)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        want = {n: p.grad for n, p in reference[phase].named_parameters() if p.requires_grad}
        assert set(want) == set(got) and len(got) > 0
        scale = max(g.abs().max() for g in want.values())
        assert scale > 0
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5 * float(scale), msg=n)

        # sensitivity: had the fake score been the teacher (no switching), the gradient would differ
        if phase == "generator":
            wrong = {**reference, "fake_score": teacher}
            for p in reference[phase].parameters():
                p.grad = None
            phase_grads(trainer, phase, wrong)
            diff = max(
                (p.grad - got[n]).abs().max()
                for n, p in reference[phase].named_parameters()
                if p.requires_grad
            )
            assert diff > 1e-3 * float(scale)


# --------------------------------------------------------------------------------- what is trained, resume
def test_only_adapters_are_trained_optimised_and_averaged(tmp_path, teacher_dir):
    trainer = make(
        tmp_path,
        teacher_dir,
        loraplus_ratio=4.0,
        lr_generator=2e-4,
        lr_fake_score=1e-4,
        adam_beta1_generator=0.9,
    )
    shared = shared_model(trainer)
    params = dict(trainer.trained["generator"].module.named_parameters())
    for name in ADAPTERS:
        tm = trainer.trained[name]
        assert tm.sync == "all_reduce" and tm.module.shared is shared
        assert tm.parameters and all(f".{name}." in n and ".lora_" in n for n in tm.parameters)
        in_optimiser = {id(p) for g in tm.optimizer.param_groups for p in g["params"]}
        assert in_optimiser == {id(params[n]) for n in tm.parameters}
        base_lr = 2e-4 if name == "generator" else 1e-4
        assert loraplus_learning_rates(tm.optimizer) == pytest.approx({"A": base_lr, "B": 4 * base_lr})
        beta1 = 0.9 if name == "generator" else 0.0
        assert all(g["betas"] == (beta1, 0.999) for g in tm.optimizer.param_groups)
    assert set(trainer.emas) == {"generator"}
    assert set(trainer.emas["generator"].shadow) == set(trainer.trained["generator"].parameters)
    n_adapter = sum(params[n].numel() for name in ADAPTERS for n in trainer.trained[name].parameters)
    assert n_adapter < 0.5 * sum(p.numel() for p in shared.parameters())

    base_before = {n: p.detach().clone() for n, p in shared.named_parameters() if ".lora_" not in n}
    adapters_before = {n: p.detach().clone() for n, p in shared.named_parameters() if ".lora_" in n}
    trainer.fit()
    after = dict(shared.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base_before.items())  # the teacher never changes
    for name in ADAPTERS:
        changed = [
            n
            for n in trainer.trained[name].parameters
            if not torch.equal(
                after[n.removeprefix("denoiser.")], adapters_before[n.removeprefix("denoiser.")]
            )
        ]
        assert changed, name
    step = tmp_path / "checkpoints" / "step_2"
    assert (step / "trained_generator.safetensors").is_file() and (
        step / "ema_generator.safetensors"
    ).is_file()
    assert (step / "trained_fake_score.safetensors").is_file()


def test_resume_continues_exactly(tmp_path, teacher_dir):
    straight = make(tmp_path / "a", teacher_dir, max_steps=4, checkpoint_every=2)
    straight.fit()
    resumed = make(
        tmp_path / "b", teacher_dir, max_steps=4, resume_from=str(tmp_path / "a" / "checkpoints" / "step_2")
    )
    assert resumed.step == 2
    resumed.fit()
    for name in ADAPTERS:
        a, b = straight.trained_parameters(name), resumed.trained_parameters(name)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name
    ema_a, ema_b = straight.emas["generator"].shadow, resumed.emas["generator"].shadow
    assert all(torch.equal(ema_a[n], ema_b[n]) for n in ema_a)


# ------------------------------------------------------------------------------------- plug-in adapter
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, class_teacher_dir):
    out = tmp_path_factory.mktemp("run")
    trainer = make(
        out,
        class_teacher_dir,
        max_steps=3,
        step_sigmas=[2.5, 0.8],
        guidance_scale=1.5,
        lora_export_merged=True,
    )
    trainer.fit()
    return trainer, out


def one_step_ema_samples(trainer: Trainer, z, labels) -> torch.Tensor:
    """The trained EMA generator's first step, G(sigma_0 z; sigma_0), as the recipe evaluates it."""
    sigma0 = trainer.recipe.config.step_sigmas[0]
    with trainer.recipe.ema_generator(trainer) as g, torch.no_grad():
        sigma = torch.full((z.shape[0],), sigma0)
        return g(z * sigma0, sigma, Condition(class_labels=labels)).clamp(-1, 1)


def test_exported_adapter_plugs_into_the_original_teacher(trained_run, class_teacher_dir):
    trainer, out = trained_run
    folder = out / "student"
    info = json.loads((folder / "onestep_adapter.json").read_text())
    assert info["step_sigmas"] == [2.5, 0.8] and info["teacher"] == str(class_teacher_dir)
    card = (folder / "README.md").read_text()
    assert (
        "lora_rank: 4" in card and "from_teacher_and_adapter" in card and "generated_images_seen: 12" in card
    )
    assert not (folder / "pytorch_lora_weights.safetensors").exists()  # UNet2DModel: peft format only
    z = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3, 9])
    want = one_step_ema_samples(trainer, z, labels)

    # plain peft on the untouched teacher, one step at step_sigmas[0]
    teacher = load_teacher(str(class_teacher_dir))
    teacher.model = PeftModel.from_pretrained(teacher.model, str(folder))
    sigma = torch.full((5,), 2.5)
    with torch.no_grad():
        got = teacher(z * 2.5, sigma, Condition(class_labels=labels)).clamp(-1, 1)
        torch.testing.assert_close(got, want)
        with teacher.model.disable_adapter():  # the same object is still the teacher
            plain = load_teacher(str(class_teacher_dir))
            c = Condition(class_labels=labels)
            torch.testing.assert_close(teacher(z, sigma, c), plain(z, sigma, c), rtol=0, atol=0)

    # the one-liner, with the adapter attached or merged, for one and for both trained steps
    for merge in (False, True):
        pipe = OneStepPipeline.from_teacher_and_adapter(str(class_teacher_dir), str(folder), merge=merge)
        assert isinstance(pipe.unet, PeftModel) != merge
        got = pipe(batch_size=5, noise=z, class_labels=labels, num_inference_steps=1, output_type="pt").images
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        gen = torch.Generator().manual_seed(5)
        two = pipe(batch_size=5, noise=z, class_labels=labels, generator=gen, output_type="pt").images
        assert two.shape == (5, 1, 8, 8) and torch.isfinite(two).all()
    assert load_adapter_student(None, folder).config.step_sigmas == [2.5, 0.8]

    # the merged full checkpoint written at the end of training
    merged = OneStepPipeline.from_pretrained(str(out / "student_merged"))
    got = merged(batch_size=5, noise=z, class_labels=labels, num_inference_steps=1, output_type="pt").images
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_conditional_unet_adapter_also_loads_with_diffusers(tmp_path):

    from distill.export.adapter import save_sid_adapter
    from distill.teachers.builders import edm_scheduler

    shared = add_sid_adapters(Denoiser(tiny_text_unet(seed=0), edm_scheduler()), rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in shared.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.2)
    save_sid_adapter(shared.model, tmp_path, "generator", [2.5], "tiny-text-teacher", "SiD", {})
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    x, ehs = torch.randn(2, 1, 8, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        want = AdapterView(shared, "generator")(
            x, torch.tensor([0.5, 3.0]), Condition(encoder_hidden_states=ehs)
        )
        diffusers_unet = tiny_text_unet(seed=0)
        diffusers_unet.load_lora_adapter(str(tmp_path), prefix="unet", use_safetensors=True)
        got = Denoiser(diffusers_unet, edm_scheduler())(
            x, torch.tensor([0.5, 3.0]), Condition(encoder_hidden_states=ehs)
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        peft_unet = PeftModel.from_pretrained(tiny_text_unet(seed=0), str(tmp_path))
        got = Denoiser(peft_unet, edm_scheduler())(
            x, torch.tensor([0.5, 3.0]), Condition(encoder_hidden_states=ehs)
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ errors, precision
def test_bad_settings_fail_clearly(tmp_path, teacher_dir):
    with pytest.raises(ValueError, match="lora_targets entry 'to_qq' matches no"):
        make(tmp_path, teacher_dir, lora_targets=["conv1", "to_qq"])
    with pytest.raises(ValueError, match="lora_rank=0 must be >= 1"):
        make(tmp_path, teacher_dir, lora_rank=0)
    with pytest.raises(ValueError, match="loraplus_ratio=0.5"):
        make(tmp_path, teacher_dir, loraplus_ratio=0.5)
    with pytest.raises(ValueError, match="BASE weight.*shared teacher"):
        make(tmp_path, teacher_dir, lora_init="lora_ga")
    trainer = make(tmp_path, teacher_dir, lora_targets=["conv1"])
    names = trainer.trained["generator"].parameters
    assert names and all(".conv1.lora_" in n for n in names)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_stay_finite(tmp_path, teacher_dir, precision):
    trainer = make(tmp_path, teacher_dir, mixed_precision=precision)
    before = [p.detach().clone() for p in trainer.trained_parameters("fake_score")]
    for _ in range(3):
        logs = trainer.train_step()
        assert all(torch.isfinite(v) for v in logs.values())
    shared = shared_model(trainer)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in shared.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trained_parameters("fake_score")))


@pytest.mark.distributed
def test_two_processes_then_resume(tmp_path, teacher_dir):
    args = [
        "--teacher",
        str(teacher_dir),
        "--output_dir",
        str(tmp_path),
        "--student",
        "lora",
        "--lora_rank",
        "4",
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
    assert (tmp_path / "checkpoints" / "step_3" / "trained_generator.safetensors").is_file()
    assert (tmp_path / "student" / "adapter_model.safetensors").is_file()


def test_ema_student_is_evaluated_in_fp32_under_bf16(tmp_path, teacher_dir):
    """Training runs under autocast; the EMA adapter, swapped in for evaluation, runs in fp32 like its export."""
    trainer = make(tmp_path, teacher_dir, mixed_precision="bf16")
    conv = next(m for m in shared_model(trainer).modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    hook = conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    trainer.train_step()
    assert set(seen) == {torch.bfloat16}
    seen.clear()
    z = torch.randn(2, *trainer.recipe.shape)
    with trainer.recipe.ema_generator(trainer) as ema, torch.no_grad():
        ema(2.5 * z, torch.full((2,), 2.5), None)
    hook.remove()
    assert seen and set(seen) == {torch.float32}
