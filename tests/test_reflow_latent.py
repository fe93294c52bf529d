"""Reflow on latent teachers, class-conditional (DiT) and text-conditioned (SD, InstaFlow-style): tiny
``--stage all`` runs, what the pairs hold, the conditions training sees, decoded grids, start-up refusals, and
the one-step exports sampled by plain diffusers (ONE fresh ``python -I`` subprocess without the toolkit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from test_family_denoisers import _text_conditions
from test_latent_export import SCRIPT, _student
from tiny_pipelines import call_kwargs

from distill.export.latent import export_latent_student
from distill.reflow import stages
from distill.reflow.flow import euler_on_sigmas, flow_sigmas, interpolate, sample_flow_times
from distill.reflow.pairs import load_pairs, open_pairs
from distill.sampling.ode import default_sigma_range, edm_heun_sample
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.latents import LatentCodec
from engine.trainer import Trainer
from recipes import reflow as reflow_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a red car in the city", "a dog sitting on the grass"]
GUIDANCE = 2.0
#: the distilled students' steps: DiT's exports as a 2-step deterministic student; the flow-trained PixArt's
#: one-step student exports through the shipped OneStepPixArtSigmaPipeline
NUM_STEPS = {"dit": 2, "sd": 1, "pixart_flow": 1}
FAST = [
    "--num_pairs", "4", "--pairs_shard_size", "4", "--pairs_batch_size", "4", "--pairs_nfe", "3",
    "--batch_size", "2", "--reflow_steps", "2", "--distill_steps", "2", "--eval_samples", "4",
    "--eval_nfes", "1", "--straightness_samples", "2", "--straightness_steps", "2", "--log_with", "none",
    "--progress_bar", "false", "--lr_warmup_steps", "0", "--guidance_scale", str(GUIDANCE),
]  # fmt: skip


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _args(teacher: Path, out: Path, prompt_file: Path | None, cache: Path) -> list[str]:
    args = ["--teacher", str(teacher), "--output_dir", str(out), *FAST]
    if prompt_file is not None:
        args += ["--prompts", str(prompt_file), "--prompt_cache_dir", str(cache)]
    return args


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir, prompt_file, tmp_path_factory):
    """family -> (teacher, output folder, summary, image shapes logged) of a ``--stage all`` run."""
    root = tmp_path_factory.mktemp("reflow_latent")
    out = {}
    for family in NUM_STEPS:
        shapes: list[tuple[int, ...]] = []
        original = Trainer.log_images

        def spy(self, tag, images, *a, _shapes=shapes, _original=original, **k):
            _shapes.append(tuple(images.shape[1:]))
            return _original(self, tag, images, *a, **k)

        Trainer.log_images = spy
        try:
            teacher = tiny_pipeline_dir(family)
            args = _args(teacher, root / family, None if family == "dit" else prompt_file, root / "cache")
            summary = reflow_recipe.main(args + ["--num_steps", str(NUM_STEPS[family])])
        finally:
            Trainer.log_images = original
        out[family] = (teacher, root / family, summary, shapes)
    return out


def test_all_stages_run_on_latents_and_grids_are_decoded(runs):
    for family, (_, folder, summary, shapes) in runs.items():
        assert set(summary) == {"pairs_r1", "reflow_r1", "distill"}, family
        assert summary["distill"]["training_steps"] == 2 and summary["reflow_r1"]["training_steps"] == 2
        spec = open_pairs(folder / "pairs_r1").spec
        assert spec.shape == [4 if family == "dit" else 4, 8, 8]  # latents, not 16x16 images
        assert spec.guidance_scale == GUIDANCE
        # every evaluation grid shows 16x16 RGB images decoded by the VAE, never 8x8 latents
        assert shapes and set(shapes) == {(3, 16, 16)}, (family, shapes)
        for export in (folder / "reflow_r1" / "model", folder / "distill" / "student"):
            assert (export / "model_index.json").is_file() and (export / "reflow_export.json").is_file()


def _sd_source(teacher: Path, prompt_file: Path, cache: Path):
    cfg = reflow_recipe.ReflowConfig(
        teacher=str(teacher), prompts=str(prompt_file), prompt_cache_dir=str(cache), log_with="none"
    )
    return stages.prompt_source(cfg, stages.check_teacher(str(teacher)), None)


def test_text_pairs_hold_prompt_rows_made_by_the_guided_teacher(runs, prompt_file):
    teacher, folder, _, _ = runs["sd"]
    spec = open_pairs(folder / "pairs_r1").spec
    source = _sd_source(teacher, prompt_file, folder.parent / "cache")
    assert spec.num_prompts == 3 and spec.prompt_cache_key == source.embeddings.meta["key"]
    ds, _ = load_pairs(folder / "pairs_r1")
    assert ds["prompt"][:].tolist() == [0, 1, 2, 0] and "label" not in ds.column_names
    # the stored latents are the teacher's Heun ODE (nfe 3 = 2 steps) guided by the prompt against "" ...
    pipe = DiffusionPipeline.from_pretrained(teacher).to(torch.float32)
    texts = [PROMPTS[i] for i in (0, 1, 2, 0)]
    cond, null = pipe.encode_prompt(texts, "cpu", 1, True, [""] * 4)
    model = Denoiser.from_pretrained(teacher).eval()
    z = ds["noise"][:]
    guided = edm_heun_sample(
        model,
        z,
        2,
        cond=Condition(encoder_hidden_states=cond),
        guidance_scale=GUIDANCE,
        null_cond=Condition(encoder_hidden_states=null),
        sigma_min=spec.sigma_min,
        sigma_max=spec.sigma_max,
    ).images
    torch.testing.assert_close(ds["sample"][:], guided, atol=1e-4, rtol=1e-4)
    plain = edm_heun_sample(
        model,
        z,
        2,
        cond=Condition(encoder_hidden_states=cond),
        sigma_min=spec.sigma_min,
        sigma_max=spec.sigma_max,
    ).images
    assert (plain - guided).abs().max() > 1e-3  # ... and guidance made a difference


def test_training_conditions_are_the_pairs_prompt_embeddings(runs, prompt_file, tmp_path):
    teacher, folder, _, _ = runs["sd"]
    args = _args(teacher, tmp_path, prompt_file, folder.parent / "cache")
    cfg = replace(reflow_recipe.parse_config(reflow_recipe.ReflowConfig, args), max_steps=1)
    recipe = reflow_recipe.ReflowRecipe(cfg, "reflow", str(teacher), folder / "pairs_r1", tmp_path / "model")
    trainer = Trainer(cfg, recipe)
    ds, _ = load_pairs(folder / "pairs_r1")
    batch = ds.with_format("torch", columns=["noise", "sample", "prompt"])[1:4]  # prompts 1, 2, 0
    pipe = DiffusionPipeline.from_pretrained(teacher).to(torch.float32)
    want, _ = pipe.encode_prompt([PROMPTS[i] for i in (1, 2, 0)], "cpu", 1, False)
    cond = recipe.pair_condition(batch)
    torch.testing.assert_close(cond.encoder_hidden_states, want)
    # the loss is the reflow loss with those conditions (no guidance), drawn as the recipe draws its times
    student = trainer.models["student"]
    x, z = batch["sample"].float(), batch["noise"].float()
    torch.manual_seed(0)
    got = recipe.loss("student", batch, trainer.models)
    torch.manual_seed(0)
    t = sample_flow_times(3, "u_shaped", 1e-3, recipe.t_max, 0.0, 1.0, 4.0)
    x_t, tb = interpolate(x, z, t), t.view(-1, 1, 1, 1)
    v = (x_t - student(x_t / (1 - tb), t / (1 - t), Condition(encoder_hidden_states=want))) / tb
    torch.testing.assert_close(got, (v - (z - x)).square().mean())


#: k-step deterministic exports: a standard pipeline (levels passed as sigmas), LDM/DiT's and the flow families'
#: shipped subclasses (SD3's; a flow-trained PixArt's, whose own loop also scales the model input)
MULTI_STEP = ("sd", "dit", "sd3", "pixart_flow")
STEPS = 3


@pytest.fixture(scope="module")
def multi_step_exports(tiny_pipeline_dir, tmp_path_factory):
    """family -> (teacher, student G, step sigmas, folder): a perturbed teacher exported as a 3-step
    deterministic (rectified-flow) student on the uniform flow-time grid."""
    root = tmp_path_factory.mktemp("multi_step")
    out = {}
    for family in MULTI_STEP:
        teacher = tiny_pipeline_dir(family)
        g = _student(teacher)
        sigmas = flow_sigmas(STEPS, default_sigma_range(g)[1])
        folder = export_latent_student(
            g, root / family, sigmas, str(teacher), "reflow", {"method": "reflow"}, deterministic=True
        )
        out[family] = (teacher, g, sigmas, folder)
    return out


def _job(folder: Path, family: str, work: Path, name: str, kwargs: dict, channels: int = 4) -> dict:
    latents = None
    if family not in ("dit", "ldm_vq"):
        latents = str(work / f"{name}_latents.pt")
        torch.save(_noise(channels), latents)
    trust = isinstance(json.loads((folder / "model_index.json").read_text())["_class_name"], list)
    return {
        "folder": str(folder),
        "trust": trust,
        "kwargs": kwargs,
        "latents": latents,
        "out": str(work / name),
    }


@pytest.fixture(scope="module")
def plain_images(runs, multi_step_exports, tmp_path_factory):
    """name -> images from plain diffusers, in one isolated subprocess: the reflow runs' one-step students
    (by family) and the k-step exports ("<family>_k")."""
    work = tmp_path_factory.mktemp("plain_reflow")
    jobs = [
        _job(
            folder / "distill" / "student", f, work, f, dict(call_kwargs(f), num_inference_steps=NUM_STEPS[f])
        )
        for f, (_, folder, _, _) in runs.items()
    ]
    for family, (_, g, sigmas, folder) in multi_step_exports.items():
        kwargs = dict(call_kwargs(family), num_inference_steps=STEPS)
        if (
            family == "sd"
        ):  # the standard pipeline takes the levels as its own sigmas argument (the card's call)
            kwargs["sigmas"] = [*sigmas, 0.0]
            assert (
                f"sigmas=[{', '.join(repr(s) for s in kwargs['sigmas'])}]"
                in (folder / "README.md").read_text()
            )
        jobs.append(_job(folder, family, work, f"{family}_k", kwargs, g.sample_channels))
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"), OMP_NUM_THREADS="1")
    script = SCRIPT.replace(
        'kwargs = dict(job["kwargs"], num_inference_steps=1)',
        'kwargs = dict({"num_inference_steps": 1}, **job["kwargs"])',
    )
    assert script != SCRIPT
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, str(work / "jobs.json")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {job["out"].rsplit("/", 1)[-1]: torch.load(job["out"]) for job in jobs}


def _noise(channels: int = 4) -> torch.Tensor:
    return torch.randn(
        (1, channels, 8, 8), generator=torch.Generator().manual_seed(0)
    )  # = DiT's draw from seed 0


@pytest.mark.parametrize("family", list(NUM_STEPS))
def test_plain_diffusers_samples_the_reflow_student(family, runs, plain_images):
    teacher, folder, summary, _ = runs[family]
    student = Denoiser.from_pretrained(folder / "distill" / "student").eval()
    if family == "sd":
        pipe = DiffusionPipeline.from_pretrained(teacher).to(torch.float32)
        cond = Condition(encoder_hidden_states=pipe.encode_prompt(PROMPTS[0], "cpu", 1, False)[0])
    elif family == "pixart_flow":
        cond = _text_conditions(DiffusionPipeline.from_pretrained(teacher).to(torch.float32), family)[0]
    else:
        cond = Condition(class_labels=torch.tensor(call_kwargs("dit")["class_labels"]))
    sigmas = flow_sigmas(NUM_STEPS[family], summary["distill"]["sigma_max"])
    assert summary["distill"]["num_steps"] == len(sigmas)
    with torch.no_grad():  # the toolkit's sampler: D(sigma_max z, sigma_max) then Euler steps, no guidance
        x0 = euler_on_sigmas(student, _noise(), sigmas, cond)
        want = (LatentCodec.from_teacher(str(teacher)).decode(x0) / 2 + 0.5).clamp(0, 1)
    got = plain_images[family]["images"]
    assert got.shape == want.shape == (1, 3, 16, 16)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    card = (folder / "distill" / "student" / "README.md").read_text()
    assert "rectified-flow" in card and f"num_inference_steps={NUM_STEPS[family]}" in card


@pytest.mark.parametrize("family", MULTI_STEP)
def test_plain_diffusers_samples_a_k_step_deterministic_student(family, multi_step_exports, plain_images):
    teacher, g, sigmas, _ = multi_step_exports[family]
    if family == "dit":
        cond = Condition(class_labels=torch.tensor(call_kwargs("dit")["class_labels"]))
    else:
        cond = _text_conditions(DiffusionPipeline.from_pretrained(teacher).to(torch.float32), family)[0]
    with torch.no_grad():  # STEPS Euler steps x' = x0 + s' (x - x0) / s, as the reflow student samples
        z = _noise(g.sample_channels)
        x0 = euler_on_sigmas(g, z, sigmas, cond)
        want = (LatentCodec.from_teacher(str(teacher)).decode(x0) / 2 + 0.5).clamp(0, 1)
        one = euler_on_sigmas(g, z, sigmas[:1], cond)
    got = plain_images[f"{family}_k"]["images"]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (one - x0).abs().max() > 1e-3  # the later steps changed the sample


def test_start_up_refusals_before_any_pair(tiny_pipeline_dir, prompt_file, tmp_path):
    sd = tiny_pipeline_dir("sd")
    with pytest.raises(ValueError, match=r"StableDiffusionPipeline.*is conditioned on text: pass --prompts"):
        reflow_recipe.main(["--teacher", str(sd), "--output_dir", str(tmp_path / "a"), *FAST])
    dit = tiny_pipeline_dir("dit")
    with pytest.raises(ValueError, match="takes no prompts"):
        reflow_recipe.main(
            ["--teacher", str(dit), "--output_dir", str(tmp_path / "c"), *FAST, "--prompts", str(prompt_file)]
        )
    assert not any((tmp_path / d).exists() for d in "ac")


def test_other_prompts_do_not_reuse_pairs(runs, tmp_path):
    teacher, folder, _, _ = runs["sd"]
    other = tmp_path / "other.txt"
    other.write_text("a blue house\na green tree\na small boat\n")
    args = _args(teacher, folder, other, folder.parent / "cache") + ["--stage", "pairs"]
    with pytest.raises(ValueError, match="holds pairs of a different spec.*prompt_cache_key"):
        reflow_recipe.main(args)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["fashion-sd", "fashion-flow"])
def test_reflow_runs_two_steps_on_each_shipped_teacher(teacher, tmp_path, monkeypatch):
    """InstaFlow's case on the shipped text-to-image teachers (issue 19): pairs from the guided teacher, 2 reflow
    and 2 distillation steps, and the exported one-step student generates from a prompt through the toolkit's
    prompt-pipeline loader (a plain StableDiffusionPipeline / the shipped OneStepPixArtSigmaPipeline)."""
    from distill.evaluation.text2image import declared_call_defaults, declared_metrics, load_prompt_pipeline
    from distill.fashion_mnist import all_captions
    from distill.teachers.loading import resolve_teacher_path

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    try:
        resolve_teacher_path(teacher)
    except FileNotFoundError as missing:
        pytest.skip(f"{teacher} is not shipped here: {missing}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(all_captions(k)[0] for k in range(10)) + "\n")
    out = tmp_path / "reflow"
    args = ["--teacher", teacher, "--output_dir", str(out), *FAST, "--prompts", str(prompts)]
    summary = reflow_recipe.main([*args, "--prompt_cache_dir", str(tmp_path / "prompt_cache")])
    assert summary["distill"]["num_steps"] == 1
    student = out / "distill" / "student"
    # the student declares the Fashion-MNIST metrics and its own sampler, for a flag-free `onestep eval`
    assert declared_metrics(student) == "fashion"
    assert declared_call_defaults(student) == {"num_inference_steps": 1, "guidance_scale": 1.0}
    pipe = load_prompt_pipeline(student)
    kwargs = {"use_resolution_binning": False} if teacher == "fashion-flow" else {}
    images = pipe(
        ["a photo of a sneaker", "a dress"],
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kwargs,
    ).images
    assert images.shape[0] == 2 and images.shape[-1] == 32 and torch.isfinite(images).all()
    assert images.std() > 1e-3  # an image, not a constant
