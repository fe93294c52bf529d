"""Publishing (offline error paths, the file list it would push), `onestep eval`, and the teacher recipe."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import tiny_edm_teacher

from distill.evaluation.commands import main as eval_main
from distill.evaluation.commands import sample_main
from distill.evaluation.metrics import DigitsEvaluator, frechet_distance, precision_recall
from distill.evaluation.quality import GRID_SAMPLES, evaluate_sampler
from distill.export.generator import export_generator
from distill.export.publish import PublishError, files_to_push, publish
from distill.export.publish import main as publish_main
from distill.pipelines import OneStepPipeline
from distill.sampling.ode import sample
from distill.teachers.builders import build_unet, edm_scheduler
from distill.teachers.denoiser import Denoiser
from engine.trainer import Trainer
from recipes import teacher as teacher_recipe


@pytest.fixture()
def student(tmp_path):
    teacher = Denoiser.from_pretrained(tiny_edm_teacher(tmp_path / "teacher"))
    return export_generator(teacher, tmp_path / "student", [2.5], "local/teacher", "test", {"alpha": 1.0})


def test_files_to_push_lists_the_export(student):
    files = files_to_push(student)
    assert "model_index.json" in files and "README.md" in files
    assert "unet/diffusion_pytorch_model.safetensors" in files and "scheduler/scheduler_config.json" in files


def test_publish_refuses_incomplete_or_pickled_folders(tmp_path, student):
    with pytest.raises(PublishError, match="not a folder"):
        files_to_push(tmp_path / "missing")
    (student / "README.md").unlink()
    with pytest.raises(PublishError, match="README.md"):
        files_to_push(student)
    (student / "README.md").write_text("card")
    (student / "unet" / "extra.bin").write_bytes(b"x")
    with pytest.raises(PublishError, match="pickled"):
        files_to_push(student)


def test_publish_offline_says_why(student, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        publish(student, "me/student")
    assert publish_main([str(student), "--repo_id", "me/student"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PublishError, match="no hub token"):
        publish(student, "me/student")
    with pytest.raises(PublishError, match="organisation/name"):
        publish(student, "no-slash")
    assert publish_main([str(student), "--repo_id", "me/student", "--dry_run"]) == 0
    assert "model_index.json" in capsys.readouterr().out


def test_eval_command_on_student_matches_a_direct_computation(student, capsys):
    assert eval_main(["--model", str(student), "--num-samples", "64"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["nfe"] == 1 and out["num_samples"] == 64
    # the same 64 samples (seed 0) through the pipeline and the metrics module directly
    pipe = OneStepPipeline.from_pretrained(str(student))
    images = pipe(batch_size=64, generator=torch.Generator().manual_seed(0), output_type="pt").images
    evaluator = DigitsEvaluator()
    fake_fd_features, fake_pr_features, _ = evaluator.features(images)
    assert out["fd"] == pytest.approx(frechet_distance(evaluator.real_features, fake_fd_features), rel=1e-9)
    precision, recall = precision_recall(evaluator.real_pr_features, fake_pr_features, k=3)
    assert (out["precision"], out["recall"]) == (precision, recall)
    assert "eval: 64 samples at NFE 1" in captured.err and "64/64 samples" in captured.err


def test_eval_command_on_teacher_matches_evaluate_sampler(tmp_path, capsys):
    teacher = tiny_edm_teacher(tmp_path / "teacher")
    assert eval_main(["--model", str(teacher), "--nfe", "3", "--num-samples", "32", "--no-progress"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    direct, _ = evaluate_sampler(Denoiser.from_pretrained(teacher), 32, nfe=3, seed=0, progress_bar=False)
    assert out["nfe"] == 3 and out["fd"] == pytest.approx(direct["fd"], rel=1e-9)
    assert out["precision"] == direct["precision"] and out["recall"] == direct["recall"]
    assert "samples [" not in captured.err  # --no-progress: no bar
    with pytest.raises(FileNotFoundError, match="nope"):
        eval_main(["--model", str(tmp_path / "nope")])


def test_eval_command_on_other_shapes_reports_statistics_of_a_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("distill.evaluation.quality._SKIP_NOTED", set())
    torch.manual_seed(0)
    unet = build_unet(16, 3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    Denoiser(unet, edm_scheduler()).save_pretrained(tmp_path / "rgb")
    assert eval_main(["--model", str(tmp_path / "rgb"), "--nfe", "1", "--num-samples", "500"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert "fd" not in out and out["num_samples"] == GRID_SAMPLES
    teacher = Denoiser.from_pretrained(tmp_path / "rgb")
    direct = sample(teacher, GRID_SAMPLES, nfe=1, generator=torch.Generator().manual_seed(0)).images.clamp(
        -1, 1
    )
    assert out["mean"] == pytest.approx(float(direct.mean()), rel=1e-5)
    assert out["std"] == pytest.approx(float(direct.std()), rel=1e-5)
    assert "FD/precision/recall skipped for 3x16x16" in captured.err


@pytest.mark.parametrize(
    ("command", "defaults"),
    [
        (
            eval_main,
            ["(default: default)", "(default: 35)", "(default: heun)", "(default: 5000)", "(default: 0)"],
        ),
        (sample_main, ["(default: 35)", "(default: 100)", "(default: samples.png)"]),
    ],
)
def test_eval_and_sample_help_show_defaults(command, defaults, capsys):
    with pytest.raises(SystemExit) as exit_:
        command(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in defaults:
        assert default in text
    assert "onestep eval --model default --nfe 35" in text  # the usage examples survive the formatter


def test_sample_command_writes_the_grid(student, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert sample_main(["--model", str(student), "--num-samples", "9", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and "wrote" in captured.out and "9 samples, 1 NFE" in captured.out
    assert "sample: 9 samples at NFE 1" in captured.err


def test_teacher_recipe_trains_and_exports_a_loadable_teacher(tmp_path):
    cfg = teacher_recipe.TeacherConfig(
        output_dir=str(tmp_path),
        block_out_channels=[8, 16],
        layers_per_block=1,
        batch_size=16,
        max_steps=3,
        eval_samples=32,
        eval_nfe=3,
        log_with="none",
        progress_bar=False,
        class_conditional=True,
    )
    trainer = Trainer(cfg, teacher_recipe.TeacherRecipe(cfg))
    metrics = trainer.fit()
    loaded = Denoiser.from_pretrained(tmp_path / "teacher")
    # the final figures are those of the exported (EMA) teacher, recomputed here
    again, _ = evaluate_sampler(loaded, 32, nfe=3, seed=0, num_classes=10, progress_bar=False)
    assert metrics["nfe"] == 3 and metrics["fd"] == pytest.approx(again["fd"], rel=1e-5)
    assert loaded.parameterization == "edm" and loaded.num_class_embeds == 11
    ema = trainer.models.ema("teacher")
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([3, 10])
    from distill.teachers.denoiser import Condition

    torch.testing.assert_close(
        loaded(x, 1.0, Condition(class_labels=labels)), ema(x, 1.0, Condition(class_labels=labels))
    )
    card = ModelCard.load(tmp_path / "teacher" / "README.md")
    assert "accelerate launch recipes/teacher.py" in card.text and "--max_steps 3" in card.text
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["eval_fd_nfe3"] == pytest.approx(metrics["fd"]) and card.data.license == "apache-2.0"
