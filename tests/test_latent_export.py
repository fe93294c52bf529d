"""A latent teacher's exported one-step student samples, under plain diffusers, what the toolkit samples.

Each family's tiny pipeline gives a student ``G`` (its denoiser, perturbed so it is not the teacher), exported
with ``export_latent_student``; ONE fresh ``python -I`` subprocess that cannot import the toolkit loads every
folder with ``DiffusionPipeline.from_pretrained`` and makes one image per family from fixed noise; the test
compares each with ``decode(student_sample(G, z, step_sigmas, cond))`` mapped to [0, 1] as the pipelines do,
``cond`` from the pipeline's own ``encode_prompt``.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from test_family_denoisers import _text_conditions
from tiny_pipelines import _update_json, call_kwargs, tiny_pixart

from distill.evaluation.text2image import load_prompt_pipeline
from distill.export import latent_pipeline
from distill.export.latent import export_latent_student
from distill.sampling.student import student_sample
from distill.teachers.calls import flux_pack
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.latents import LatentCodec

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("sd", "sd_v", "sdxl", "pixart", "pixart_flow", "ldm_vq", "dit", "sd3", "flux", "sana")
SIGMA0 = {"flow": 3.0, "vp": 2.5}  # not table sigmas: the timestep is fractional
#: families whose pipeline draws its own noise from a generator (no latents argument)
GENERATOR_ONLY = ("ldm_vq", "dit")

SCRIPT = r"""
import importlib, json, sys
from pathlib import Path
# a machine without onestep-toolkit: drop the venv's editable-install finder (python -I already ignores
# PYTHONPATH and the working directory)
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_importer_cache.clear()
for name in ("distill", "engine", "finetune", "recipes"):
    try:
        module = importlib.import_module(name)
    except ImportError:
        continue
    raise SystemExit(f"the toolkit is importable: {name} from {module.__file__}")
import torch
from diffusers import DiffusionPipeline
torch.set_num_threads(1)
jobs = json.loads(Path(sys.argv[1]).read_text())
for job in jobs:
    pipe = DiffusionPipeline.from_pretrained(job["folder"], trust_remote_code=job["trust"])
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(job["kwargs"], num_inference_steps=1)
    if job["latents"]:
        kwargs.update(latents=torch.load(job["latents"]), guidance_scale=1.0, output_type="pt")
    else:
        kwargs["generator"] = torch.Generator().manual_seed(0)
        kwargs["output_type"] = "np"
        if "class_labels" in kwargs:
            kwargs["guidance_scale"] = 1.0
    images = pipe(**kwargs).images
    if not isinstance(images, torch.Tensor):  # DiT / LDM return NHWC numpy
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    torch.save({"images": images.float(), "pipeline": type(pipe).__name__}, job["out"])
"""


def _student(folder: Path) -> Denoiser:
    g = Denoiser.from_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    return g.eval()


def _noise(g: Denoiser) -> torch.Tensor:
    shape = (1, g.sample_channels, 8, 8)  # every tiny family works on 8 x 8 latents
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))  # = LDM/DiT's draw from seed 0


@pytest.fixture(scope="module")
def exports(tiny_pipeline_dir, tmp_path_factory):
    """family -> (teacher folder, student G, step sigmas, noise z, exported folder)."""
    root = tmp_path_factory.mktemp("latent_exports")
    out = {}
    for family in FAMILIES:
        teacher = tiny_pipeline_dir(family)
        g = _student(teacher)
        sigmas = [SIGMA0[g.kind]]
        folder = export_latent_student(g, root / family, sigmas, str(teacher), "SiD", {"method": "SiD"})
        out[family] = (teacher, g, sigmas, _noise(g), folder)
    return out


@pytest.fixture(scope="module")
def pipeline_images(exports, tmp_path_factory):
    """family -> (images, pipeline class) from plain diffusers in one isolated subprocess."""
    work = tmp_path_factory.mktemp("plain_diffusers")
    jobs = []
    for family, (_, _, _, z, folder) in exports.items():
        latents = None
        if family not in GENERATOR_ONLY:
            latents = str(work / f"{family}_latents.pt")
            torch.save(flux_pack(z) if family == "flux" else z, latents)
        trust = isinstance(json.loads((folder / "model_index.json").read_text())["_class_name"], list)
        jobs.append(
            {
                "folder": str(folder),
                "trust": trust,
                "kwargs": call_kwargs(family),
                "latents": latents,
                "out": str(work / f"{family}.pt"),
            }
        )
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-I", "-c", SCRIPT, str(work / "jobs.json")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {f: torch.load(work / f"{f}.pt") for f in exports}


def _condition(family: str, teacher: Path) -> Condition | None:
    if family == "dit":
        return Condition(class_labels=torch.tensor(call_kwargs(family)["class_labels"]))
    if family == "ldm_vq":
        return None
    pipe = DiffusionPipeline.from_pretrained(teacher).to(torch.float32)
    return _text_conditions(pipe, family)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_diffusers_samples_the_student(family, exports, pipeline_images):
    teacher, g, sigmas, z, folder = exports[family]
    with torch.no_grad():
        x0 = student_sample(g, z, sigmas, _condition(family, teacher))
        expected = (LatentCodec.from_teacher(str(teacher)).decode(x0) / 2 + 0.5).clamp(0, 1)
    got = pipeline_images[family]["images"]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    teacher_class = json.loads((teacher / "model_index.json").read_text())["_class_name"]
    pipeline_class = pipeline_images[family]["pipeline"]
    assert pipeline_class in (teacher_class, f"OneStep{teacher_class.removesuffix('Pipeline')}Pipeline")
    # the student, not the teacher: the teacher's own x0 gives another image
    with torch.no_grad():
        teacher_x0 = student_sample(Denoiser.from_pretrained(teacher), z, sigmas, _condition(family, teacher))
    assert (teacher_x0 - x0).abs().max() > 1e-3


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", ["sdxl", "flux", "pixart_flow"])
def test_folder_is_the_teachers_with_the_students_denoiser_and_a_card(family, exports):
    teacher, g, sigmas, _, folder = exports[family]
    denoiser = "unet" if family == "sdxl" else "transformer"
    shipped = {"flux": "OneStepFluxPipeline", "pixart_flow": "OneStepPixArtSigmaPipeline"}
    index = json.loads((folder / "model_index.json").read_text())
    for name, value in json.loads((teacher / "model_index.json").read_text()).items():
        if isinstance(value, list) and value[0] is not None and name not in (denoiser, "scheduler"):
            assert _files(folder / name) == _files(teacher / name), name  # byte-identical copies
            assert index[name] == value
    assert _files(folder / denoiser) != _files(teacher / denoiser)
    reloaded = Denoiser.from_pretrained(folder)  # the student's weights, under the student's scheduler
    for a, b in zip(reloaded.parameters(), g.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    card = (folder / "README.md").read_text()
    assert "One-step SiD student of" in card and str(teacher) not in card.split("## Use")[0]
    assert "num_inference_steps=1, guidance_scale=1.0" in card
    assert not (folder / "onestep_eval.json").exists()  # metrics are declared for Fashion-MNIST teachers only
    if family == "sdxl":
        assert index["_class_name"] == "StableDiffusionXLPipeline" and "trust_remote_code" not in card
        assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
        assert not (folder / "onestep_latent_pipeline.py").exists()
    else:
        assert index["_class_name"] == ["onestep_latent_pipeline", shipped[family]]
        assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        assert "trust_remote_code=True" in card
        assert "import distill" not in (folder / "onestep_latent_pipeline.py").read_text()


@pytest.mark.parametrize("family", ["pixart_flow", "sd3"])
def test_toolkit_loads_a_shipped_folder_with_its_own_class(family, exports, pipeline_images):
    """The evaluation's loader builds the toolkit's copy of the shipped class (no code from the folder runs, no
    trust_remote_code); its ``__call__`` shows the teacher pipeline's parameters and samples what plain
    diffusers sampled."""
    _, _, _, z, folder = exports[family]
    pipe = load_prompt_pipeline(folder)
    assert type(pipe) is getattr(latent_pipeline, pipeline_images[family]["pipeline"])
    params = inspect.signature(pipe.__call__).parameters
    assert {"prompt", "sigmas", "max_sequence_length"} <= set(params)
    with torch.no_grad():
        images = pipe(
            **call_kwargs(family), latents=z, num_inference_steps=1, guidance_scale=1.0, output_type="pt"
        )
    torch.testing.assert_close(images.images, pipeline_images[family]["images"], atol=1e-6, rtol=0)


def test_flow_pixart_alpha_k_step_student(tmp_path):
    """A flow-trained PixArt-alpha teacher's 2-step deterministic student exports as OneStepPixArtAlphaPipeline
    (in-process, through the toolkit's copy of the class) and samples ``student_sample(..., deterministic=True)``."""
    teacher = tiny_pixart(tmp_path / "teacher", legacy_class_name=False, flow=True)
    _update_json(teacher / "model_index.json", _class_name="PixArtAlphaPipeline")  # same components as sigma
    g = _student(teacher)
    sigmas = [3.0, 0.5]
    folder = export_latent_student(
        g, tmp_path / "student", sigmas, str(teacher), "reflow", {}, deterministic=True
    )
    pipe = load_prompt_pipeline(folder)
    assert type(pipe) is latent_pipeline.OneStepPixArtAlphaPipeline
    z = _noise(g)
    with torch.no_grad():
        got = pipe(
            **call_kwargs("pixart"), latents=z, num_inference_steps=2, guidance_scale=1.0, output_type="pt"
        )
        cond = _text_conditions(DiffusionPipeline.from_pretrained(teacher), "pixart")[0]
        x0 = student_sample(g, z, sigmas, cond, deterministic=True)
        want = (LatentCodec.from_teacher(str(teacher)).decode(x0) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(got.images, want, atol=1e-4, rtol=0)
    assert "num_inference_steps=2, guidance_scale=1.0" in (folder / "README.md").read_text()


def test_shipped_pipeline_refuses_another_step_count(exports):
    pipe = DiffusionPipeline.from_pretrained(exports["dit"][4], trust_remote_code=True)
    with pytest.raises(ValueError, match="exactly 1 step\\(s\\); got num_inference_steps=4"):
        pipe([1], num_inference_steps=4)


def test_refusals_are_named_before_writing(exports, tiny_pipeline_dir, tmp_path):
    teacher, g, _, _, _ = exports["sd"]
    with pytest.raises(NotImplementedError, match="2-step student; only one-step .*fresh noise"):
        export_latent_student(g, tmp_path / "a", [2.5, 0.5], str(teacher), "SiD", {})
    pixel = tiny_pipeline_dir("ddpm")
    with pytest.raises(NotImplementedError, match="'DDPMPipeline'.*latent students export for"):
        export_latent_student(Denoiser.from_pretrained(pixel), tmp_path / "b", [2.5], str(pixel), "SiD", {})
    with pytest.raises(
        ValueError, match="StableDiffusion3Pipeline students need a flow denoiser, got 'vp-eps"
    ):
        export_latent_student(g, tmp_path / "c", [2.5], str(tiny_pipeline_dir("sd3")), "SiD", {})
    # a PixArt teacher's kind (read from its scheduler) decides: a flow-trained one needs a flow student
    with pytest.raises(ValueError, match="PixArtSigmaPipeline students need a flow denoiser, got 'vp-eps"):
        export_latent_student(g, tmp_path / "d", [2.5], str(tiny_pipeline_dir("pixart_flow")), "SiD", {})
    assert not any(tmp_path.iterdir())
