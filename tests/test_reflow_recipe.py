"""The reflow recipe end to end on tiny teachers of both kinds, exports reloading, and a 2-process launch."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from launch_utils import ROOT, accelerate_launch
from tiny_models import tiny_flow_teacher

from distill.pipelines import OneStepPipeline, RectifiedFlowPipeline
from distill.reflow import stages
from distill.reflow.flow import interpolate, sample_flow_times, straightness, velocity_from_denoiser
from distill.reflow.pairs import load_pairs, open_pairs
from distill.teachers.denoiser import Denoiser
from distill.teachers.loading import load_teacher
from engine.trainer import Trainer
from recipes import reflow as reflow_recipe

FAST = [
    "--num_pairs", "32", "--pairs_shard_size", "8", "--pairs_batch_size", "8", "--pairs_nfe", "3",
    "--batch_size", "8", "--reflow_steps", "3", "--distill_steps", "2", "--eval_samples", "16",
    "--eval_nfes", "1", "2", "--straightness_samples", "8", "--straightness_steps", "4", "--log_with", "none",
    "--progress_bar", "false", "--later_pairs_steps", "2",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparable with the 1-thread subprocesses


def test_all_stages_on_a_diffusion_teacher_then_rerun_skips(tmp_path, teacher_dir, capsys):
    args = ["--teacher", str(teacher_dir), "--output_dir", str(tmp_path), *FAST]
    summary = reflow_recipe.main(args)
    assert set(summary) == {"pairs_r1", "reflow_r1", "distill"}
    assert summary["pairs_r1"]["pairs"] == 32 and summary["pairs_r1"]["complete"]
    reflow = summary["reflow_r1"]
    assert reflow["training_steps"] == 3 and reflow["pairs_seen"] == 24
    assert {"final_fd", "final_fd_2step"} <= set(reflow)
    # straightness before (the teacher) and after (the exported 2-RF), measured again on the same 8 paths
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(12345))
    t_max = reflow["t_max"]
    for key, folder in (
        ("straightness_before", teacher_dir),
        ("straightness_after", tmp_path / "reflow_r1" / "model"),
    ):
        model = load_teacher(str(folder))
        want = straightness(lambda x_t, t, m=model: velocity_from_denoiser(m, x_t, t), z, 4, t_max)
        assert reflow[key] == pytest.approx(want, rel=1e-5), key
    assert reflow["straightness_after"] != reflow["straightness_before"]  # two different models were measured
    student = tmp_path / "distill" / "student"
    card = (student / "README.md").read_text()
    assert "library_name: diffusers" in card and "rectified-flow" in card and "num_steps: 1" in card
    assert json.loads((tmp_path / "summary.json").read_text())["distill"]["init"] == str(
        tmp_path / "reflow_r1" / "model"
    )
    capsys.readouterr()
    again = reflow_recipe.main(args)  # everything present: pairs complete, both exports done
    assert "already exported" in capsys.readouterr().out
    assert again["distill"]["training_steps"] == 2


def test_conditional_flow_teacher_two_rounds_and_two_step_student(tmp_path):
    teacher = tiny_flow_teacher(tmp_path / "teacher", num_classes=3)
    args = ["--teacher", str(teacher), "--output_dir", str(tmp_path / "run"), *FAST]
    args += [
        "--guidance_scale",
        "2.0",
        "--rectified_k",
        "3",
        "--num_steps",
        "2",
        "--loss",
        "pseudo_huber",
    ]
    summary = reflow_recipe.main(args + ["--time_distribution", "logit_normal"])
    assert set(summary) == {"pairs_r1", "reflow_r1", "pairs_r2", "reflow_r2", "distill"}
    first, second = (
        open_pairs(tmp_path / "run" / "pairs_r1").spec,
        open_pairs(tmp_path / "run" / "pairs_r2").spec,
    )
    assert first.source_kind == "flow" and first.sampler == "heun" and first.guidance_scale == 2.0
    assert second.sampler == "flow_euler" and second.guidance_scale == 1.0 and second.nfe == 2
    assert second.source == str(tmp_path / "run" / "reflow_r1" / "model")
    ds, _ = load_pairs(tmp_path / "run" / "pairs_r2")
    assert ds["label"][:8].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert summary["distill"]["init"] == str(tmp_path / "run" / "reflow_r2" / "model")
    pipe = RectifiedFlowPipeline.from_pretrained(str(tmp_path / "run" / "distill" / "student"))
    assert not pipe.config.any_steps and len(pipe.config.step_sigmas) == 2
    out = pipe(
        batch_size=3, class_labels=[0, 1, 2], output_type="pt", generator=torch.Generator().manual_seed(0)
    )
    assert out.images.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        pipe(batch_size=1, num_inference_steps=3)


def direct_loss(recipe, student, batch, mode: str) -> torch.Tensor:
    """The stage's loss from its formula, drawing the times as the recipe does (call after the same seed)."""
    x, z = batch["sample"].float(), batch["noise"].float()
    n, t_max = len(x), recipe.t_max
    if mode == "reflow":  # U-shaped times on [t_min, t_max]; x_t on the straight line; v onto z - x
        t = sample_flow_times(n, "u_shaped", 1e-3, t_max, 0.0, 1.0, 4.0)
        x_t = interpolate(x, z, t)
    else:  # the 2-step grid t_max, t_max / 2; the first step starts from pure noise t_max z
        idx = torch.randint(2, (n,))
        t = torch.tensor([t_max, t_max / 2])[idx]
        x_t = torch.where((idx == 0).view(-1, 1, 1, 1), t.view(-1, 1, 1, 1) * z, interpolate(x, z, t))
    tb = t.view(-1, 1, 1, 1)
    v = (x_t - student(x_t / (1 - tb), t / (1 - t))) / tb
    if mode == "reflow":
        return (v - (z - x)).square().mean()
    return (x_t - tb * v - x).square().mean()


@pytest.mark.parametrize("mode", ["reflow", "distill"])
def test_loss_and_exports_reproduce_the_recipe(tmp_path, teacher_dir, mode):
    cfg = reflow_recipe.parse_config(
        reflow_recipe.ReflowConfig,
        ["--teacher", str(teacher_dir), "--output_dir", str(tmp_path), *FAST, "--num_steps", "2"],
    )
    stages.run_pairs(cfg, 1)
    stage = replace(cfg, output_dir=str(tmp_path / mode), max_steps=2)
    export = tmp_path / mode / "model"
    recipe = reflow_recipe.ReflowRecipe(stage, mode, str(teacher_dir), tmp_path / "pairs_r1", export)
    trainer = Trainer(stage, recipe)

    pairs, _ = load_pairs(tmp_path / "pairs_r1")
    batch = pairs.with_format("torch", columns=["noise", "sample"])[:8]
    student = trainer.models["student"]
    for seed in range(3):
        torch.manual_seed(seed)
        got = recipe.loss("student", batch, trainer.models)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, direct_loss(recipe, student, batch, mode))

    trainer.fit()
    ema = trainer.models.ema("student")
    z = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    pipe = RectifiedFlowPipeline.from_pretrained(str(export))
    for nfe in (1, 3) if mode == "reflow" else (2,):
        want = recipe.sample(ema, z, None, nfe).clamp(-1, 1)
        torch.testing.assert_close(
            pipe(batch_size=5, noise=z, num_inference_steps=nfe, output_type="pt").images, want
        )
    # the one-step sampler is the one OneStepPipeline (SiD's export) runs at sigma_max
    one = OneStepPipeline.from_pretrained(str(export))
    got = one(batch_size=5, noise=z, num_inference_steps=1, output_type="pt").images
    torch.testing.assert_close(got, recipe.sample(ema, z, None, 1).clamp(-1, 1))
    assert any(
        not torch.equal(a, b)
        for a, b in zip(ema.parameters(), Denoiser.from_pretrained(teacher_dir).parameters())
    )


@pytest.mark.distributed
def test_two_processes_generate_the_same_pairs_and_train(tmp_path, teacher_dir):
    args = [
        "--teacher",
        str(teacher_dir),
        "--output_dir",
        str(tmp_path / "two"),
        *FAST,
        "--distill_steps",
        "1",
    ]
    accelerate_launch(ROOT / "recipes" / "reflow.py", args)
    manifest = json.loads((tmp_path / "two" / "pairs_r1" / "manifest.json").read_text())
    assert {s["process"] for s in manifest["shards"].values()} == {0, 1}
    state = json.loads(
        (tmp_path / "two" / "distill" / "checkpoints" / "step_1" / "trainer_state.json").read_text()
    )
    assert state["num_processes"] == 2 and state["images_seen"] == 16
    cfg = reflow_recipe.parse_config(
        reflow_recipe.ReflowConfig,
        ["--teacher", str(teacher_dir), "--output_dir", str(tmp_path / "one"), *FAST],
    )
    stages.run_pairs(cfg, 1)
    two, _ = load_pairs(tmp_path / "two" / "pairs_r1")
    one, _ = load_pairs(tmp_path / "one" / "pairs_r1")
    assert two["index"][:].tolist() == list(range(32))
    np.testing.assert_array_equal(two["noise"][:].numpy(), one["noise"][:].numpy())
    np.testing.assert_allclose(two["sample"][:].numpy(), one["sample"][:].numpy(), atol=1e-5)
    assert (tmp_path / "two" / "distill" / "student" / "reflow_export.json").is_file()


def test_config_is_checked_and_the_stages_planned():
    with pytest.raises(ValueError, match="round=3"):
        reflow_recipe.ReflowConfig(rectified_k=3, round=3)
    with pytest.raises(ValueError, match="rectified_k=0"):
        reflow_recipe.ReflowConfig(rectified_k=0)
    with pytest.raises(ValueError, match=r"adam_beta2=1\.0 must be in \[0, 1\)"):
        reflow_recipe.ReflowConfig(adam_beta2=1.0)
    with pytest.raises(ValueError, match=r"adam_beta1=-0\.1 must be in"):
        reflow_recipe.ReflowConfig(adam_beta1=-0.1)
    with pytest.raises(ValueError, match="num_steps=0"):
        reflow_recipe.ReflowConfig(num_steps=0)
    with pytest.raises(ValueError, match=r"eval_nfes=\[1, 0\]"):
        reflow_recipe.ReflowConfig(eval_nfes=[1, 0])
    plan = stages.plan(reflow_recipe.ReflowConfig(rectified_k=3))
    assert plan == [("pairs", 1), ("reflow", 1), ("pairs", 2), ("reflow", 2), ("distill", 2)]
    assert stages.plan(reflow_recipe.ReflowConfig(rectified_k=1)) == [("pairs", 1), ("distill", 1)]
