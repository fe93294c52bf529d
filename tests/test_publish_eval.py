"""Publishing (offline error paths, the file list it would push), `onestep eval`, and the teacher recipe."""

import json

import pytest
import torch
from tiny_models import tiny_edm_teacher

from distill.evaluation.commands import main as eval_main
from distill.export.generator import export_generator
from distill.export.publish import PublishError, files_to_push, publish
from distill.export.publish import main as publish_main
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


def test_eval_command_on_student_and_teacher(tmp_path, student, capsys):
    assert eval_main(["--model", str(student), "--num-samples", "64"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["nfe"] == 1 and out["num_samples"] == 64 and out["fd"] > 0
    assert eval_main(["--model", str(tmp_path / "teacher"), "--nfe", "3", "--num-samples", "32"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["nfe"] == 3
    with pytest.raises(FileNotFoundError, match="nope"):
        eval_main(["--model", str(tmp_path / "nope")])


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
    assert metrics["nfe"] == 3 and "fd" in metrics
    loaded = Denoiser.from_pretrained(tmp_path / "teacher")
    assert loaded.parameterization == "edm" and loaded.num_class_embeds == 11
    ema = trainer.models.ema("teacher")
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([3, 10])
    from distill.teachers.denoiser import Condition

    torch.testing.assert_close(
        loaded(x, 1.0, Condition(class_labels=labels)), ema(x, 1.0, Condition(class_labels=labels))
    )
    card = (tmp_path / "teacher" / "README.md").read_text()
    assert "accelerate launch recipes/teacher.py" in card and "--max_steps 3" in card
