"""Exported students load with plain diffusers, in a process that cannot import the toolkit, and sample what
the toolkit's pipelines sample; the self-contained pipeline file repeats the toolkit's maths exactly."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from tiny_models import tiny_flow_teacher, tiny_unet

from distill.export import standalone_pipeline as standalone
from distill.export.adapter import export_merged, save_sid_adapter
from distill.export.flow import export_flow_model
from distill.export.generator import export_generator
from distill.pipelines import OneStepPipeline, RectifiedFlowPipeline, load_student
from distill.reflow.flow import flow_sigmas
from distill.sampling.student import student_sample
from distill.sid.lora_student import add_sid_adapters
from distill.teachers.denoiser import Condition, Denoiser

pytestmark = pytest.mark.usefixtures("one_thread")
TOOLKIT = ("distill", "engine", "finetune", "recipes")


# ------------------------------------------------------------------------------- the shipped file's maths
@pytest.mark.parametrize(
    "scheduler",
    [
        EDMEulerScheduler(sigma_data=0.5, prediction_type="epsilon"),
        EDMEulerScheduler(sigma_data=0.7, prediction_type="v_prediction"),
        DDPMScheduler(),
        DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction"),
        DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
        DDIMScheduler(rescale_betas_zero_snr=True),
        EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous"),
        FlowMatchEulerDiscreteScheduler(),
        DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
    ],
    ids=lambda s: f"{type(s).__name__}-{s.config.get('prediction_type', 'flow')}",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_x0_predictor_matches_the_toolkit_denoiser(scheduler, dtype):
    unet = tiny_unet(seed=1).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g, dtype=dtype) * 3
    # inside and outside a VP table (0.005 and 400 clamp the timestep), and fractional timesteps
    sigma = torch.tensor([0.005, 0.3, 0.8, 2.5, 80.0, 400.0])
    want = Denoiser(unet, scheduler)(x, sigma)
    with torch.no_grad():
        got = standalone.X0Predictor(scheduler)(unet, x, sigma)
        torch.testing.assert_close(standalone.X0Predictor(scheduler).timestep(sigma.to(dtype)),
                                   Denoiser(unet, scheduler).sigma_to_timestep(sigma.to(dtype)))  # fmt: skip
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_x0_predictor_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="Unsupported prediction_type 'sample' for EDMEulerScheduler"):
        standalone.X0Predictor(EDMEulerScheduler(prediction_type="sample"))


@pytest.mark.parametrize("deterministic", [False, True])
def test_sampling_loop_is_student_sample(deterministic):
    """The shipped loop and distill.sampling.student.student_sample take the same steps."""

    def denoiser(x, sigma, cond=None):  # any x -> x0 map that depends on x and sigma
        return torch.tanh(x) / (1 + sigma.view(-1, 1, 1, 1))

    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = [80.0, 5.0, 0.7]
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    want = student_sample(denoiser, z, sigmas, deterministic=deterministic,
                          fresh_noise=lambda: torch.randn(3, 1, 4, 4, generator=a))  # fmt: skip
    got = standalone.sample_steps(denoiser, z, sigmas, deterministic,
                                  fresh_noise=lambda: torch.randn(3, 1, 4, 4, generator=b))  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for n in range(1, 6):
        assert standalone.flow_step_sigmas(n, 80.0) == pytest.approx(flow_sigmas(n, 80.0), rel=1e-12)


def test_shipped_file_imports_only_torch_diffusers_and_the_standard_library():
    tree = ast.parse(Path(standalone.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    tops = {name.split(".")[0] for name in imported}
    assert not {t for t in tops if t not in ("torch", "diffusers") and t not in sys.stdlib_module_names}


# ---------------------------------------------------------------------------------------- the students
def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The teacher's weights moved a little, so a student differs from its teacher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def students(tmp_path_factory, teacher_dir, class_teacher_dir):
    """name -> exported folder: SiD 1- and 2-step, class-conditional, VP teacher, reflow, merged LoRA."""
    root = tmp_path_factory.mktemp("students")

    def sid(name, teacher, sigmas, seed):
        model = Denoiser.from_pretrained(teacher)
        _perturbed(model.model, seed)
        return export_generator(model, root / name, sigmas, str(teacher), "SiD", {"method": "SiD"})

    folders = {
        "sid_1step": sid("sid_1step", teacher_dir, [2.5], 1),
        "sid_2step": sid("sid_2step", teacher_dir, [2.5, 0.8], 2),
        "sid_class": sid("sid_class", class_teacher_dir, [2.5, 0.8], 3),
    }
    vp_teacher = Denoiser(tiny_unet(seed=4), DDPMScheduler(num_train_timesteps=1000))
    vp_teacher.save_pretrained(root / "vp_teacher")
    folders["sid_vp"] = sid("sid_vp", root / "vp_teacher", [80.0, 2.0], 5)

    flow = tiny_flow_teacher(root / "flow_teacher")
    folders["reflow"] = export_flow_model(
        _perturbed_denoiser(flow, 6),
        root / "reflow",
        flow_sigmas(1, 80.0),
        True,
        str(flow),
        "2-RF",
        "reflow",
        {},
    )

    lora = add_sid_adapters(Denoiser.from_pretrained(class_teacher_dir), rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".lora_B.generator." in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(7))
    adapter = save_sid_adapter(
        lora.model, root / "adapter", "generator", [2.5], str(class_teacher_dir), "SiD", {}
    )
    folders["lora_merged"] = export_merged(adapter, root / "lora_merged")
    return folders


def _perturbed_denoiser(folder: Path, seed: int) -> Denoiser:
    model = Denoiser.from_pretrained(folder)
    _perturbed(model.model, seed)
    return model


#: (student, call arguments); "seed" seeds the generator that draws SiD's re-noising noise
CASES = [
    ("sid_1step", {}),
    ("sid_2step", {"seed": 11}),
    ("sid_class", {"seed": 12, "class_labels": [0, 3, 9, 1]}),
    ("sid_vp", {"seed": 13}),
    ("reflow", {"num_inference_steps": 1}),
    ("reflow", {"num_inference_steps": 3}),
    ("lora_merged", {"class_labels": [2, 2, 5, 0]}),
]


def _noise(i: int) -> torch.Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(100 + i))


def _call(pipe, i: int, args: dict) -> torch.Tensor:
    args = dict(args)
    seed = args.pop("seed", None)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return pipe(batch_size=4, noise=_noise(i), generator=gen, output_type="pt", **args).images


def _direct(folder: Path, i: int, args: dict) -> torch.Tensor:
    """The same sample from the toolkit's Denoiser and student_sample, not through any pipeline."""
    config = json.loads((folder / "model_index.json").read_text())
    sigmas, rectified = config["step_sigmas"], config.get("any_steps", False)
    if rectified:
        sigmas = flow_sigmas(args["num_inference_steps"], sigmas[0])
    labels = args.get("class_labels")
    gen = torch.Generator().manual_seed(args.get("seed", 0))
    with torch.no_grad():
        x0 = student_sample(
            Denoiser.from_pretrained(folder),
            _noise(i),
            sigmas,
            None if labels is None else Condition(class_labels=torch.tensor(labels)),
            deterministic=rectified,
            fresh_noise=lambda: torch.randn(4, 1, 8, 8, generator=gen),
        )
    return x0.clamp(-1, 1)


CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoToolkit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {toolkit!r}:
                raise ImportError(f"{{name}} is blocked: this process plays a machine without onestep-toolkit")

    sys.meta_path.insert(0, NoToolkit())
    for name in {toolkit!r}:
        try:
            __import__(name)
        except ImportError:
            continue
        raise SystemExit(f"{{name}} is importable")

    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    out = {{}}
    for i, (folder, args) in enumerate(json.loads(sys.argv[1])):
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        assert type(pipe).__module__ == "diffusers_modules.local.onestep_pipeline", type(pipe).__module__
        seed = args.pop("seed", None)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(100 + i))
        out[str(i)] = pipe(batch_size=4, noise=noise, generator=gen, output_type="pt", **args).images
    torch.save(out, sys.argv[2])
    assert not [m for m in sys.modules if m.split(".")[0] in {toolkit!r}]
    """
).format(toolkit=TOOLKIT)


@pytest.mark.slow
def test_students_sample_the_same_with_plain_diffusers_in_a_process_without_the_toolkit(students, tmp_path):
    jobs = [(str(students[name]), args) for name, args in CASES]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(jobs), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plain = torch.load(tmp_path / "out.pt", weights_only=True)
    for i, (name, args) in enumerate(CASES):
        toolkit = _call(load_student(students[name]), i, args)
        direct = _direct(students[name], i, args)
        torch.testing.assert_close(toolkit, direct, rtol=1e-5, atol=1e-5, msg=f"{name} {args}")
        torch.testing.assert_close(plain[str(i)], toolkit, rtol=1e-5, atol=1e-5, msg=f"{name} {args}")
    # the cases differ from each other (a test that compared constants could not fail)
    assert not torch.allclose(plain["4"], plain["5"], atol=1e-3)


# -------------------------------------------------------------------------- folders, toolkit, old layout
def test_folder_ships_the_pipeline_file_and_the_toolkit_loads_its_own_class(students):
    folder = students["sid_2step"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["onestep_pipeline", "OneStepPipeline"]
    assert (folder / "onestep_pipeline.py").read_bytes() == Path(standalone.__file__).read_bytes()
    assert json.loads((students["reflow"] / "model_index.json").read_text())["_class_name"] == [
        "onestep_pipeline",
        "RectifiedFlowPipeline",
    ]
    # the toolkit builds its own classes without running the folder's file
    assert type(OneStepPipeline.from_pretrained(str(folder))) is OneStepPipeline
    assert type(load_student(students["reflow"])) is RectifiedFlowPipeline
    assert isinstance(load_student(students["reflow"]), OneStepPipeline)
    # diffusers runs a folder's code only when told to: that is why the card says trust_remote_code=True
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(str(folder))
    card = (folder / "README.md").read_text()
    assert f'DiffusionPipeline.from_pretrained("{folder.resolve()}", trust_remote_code=True)' in card


def test_folders_exported_before_the_file_was_shipped_still_load(students, tmp_path):
    new = students["sid_class"]
    old = tmp_path / "old"
    OneStepPipeline.from_pretrained(str(new)).save_pretrained(old)
    index = json.loads((old / "model_index.json").read_text())
    (old / "model_index.json").write_text(json.dumps({**index, "_class_name": "OneStepPipeline"}))
    (old / "onestep_pipeline.py").unlink()

    args = {"seed": 3, "class_labels": [1, 2, 3, 4]}
    want = _call(load_student(new), 0, args)
    for pipe in (load_student(old), OneStepPipeline.from_pretrained(str(old))):
        assert type(pipe) is OneStepPipeline
        torch.testing.assert_close(_call(pipe, 0, args), want, rtol=0, atol=0)
    # saving it again writes the new, self-contained layout
    again = tmp_path / "again"
    load_student(old).save_pretrained(again)
    assert json.loads((again / "model_index.json").read_text())["_class_name"][0] == "onestep_pipeline"
    assert (again / "onestep_pipeline.py").is_file()
