"""Model cards of every exporter: Hub metadata (license, pipeline_tag, model-index, base_model never a local
path), runnable usage snippets, and the card ``onestep publish`` uploads (repo id instead of the folder)."""

from __future__ import annotations

import json
import re

import pytest
from huggingface_hub import ModelCard
from tiny_models import tiny_edm_teacher, tiny_text_unet

from distill.export.adapter import save_sid_adapter
from distill.export.flow import export_flow_model
from distill.export.generator import export_generator
from distill.export.model_card import card_for_repo, describe_teacher, write_model_card
from distill.export.publish import PublishError, files_to_push, publish
from distill.sid.lora_student import add_sid_adapters
from distill.teachers.denoiser import Denoiser

pytestmark = pytest.mark.usefixtures("one_thread")

FACTS = {"method": "SiD", "alpha": 1.2, "final_fd": 1.5, "best_fd": 1.25, "final_precision": 0.9,
         "final_recall": float("nan"), "final_num_samples": 64.0}  # fmt: skip


def card(folder) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def snippet(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def metric_values(model_card: ModelCard) -> dict[str, float]:
    return {r.metric_name: r.metric_value for r in model_card.data.eval_results or []}


@pytest.fixture()
def my_teacher_dir(tmp_path):
    return tiny_edm_teacher(tmp_path / "my_teacher")


@pytest.fixture()
def student(tmp_path, my_teacher_dir):
    teacher = Denoiser.from_pretrained(my_teacher_dir)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"png")
    return export_generator(
        teacher, tmp_path / "student", [2.5], str(my_teacher_dir), "SiD (test)", FACTS, str(grid)
    )


def test_student_card_metadata_and_local_teacher(student, my_teacher_dir):
    c = card(student)
    assert c.data.license == "apache-2.0"
    assert c.data.pipeline_tag == "unconditional-image-generation"
    assert c.data.library_name == "diffusers"
    assert {"onestep-toolkit", "diffusers", "sid", "one-step"} <= set(c.data.tags)
    assert c.data.base_model is None  # a local teacher never becomes base_model
    assert metric_values(c) == {
        "final_fd": 1.5,
        "best_fd": 1.25,
        "final_precision": 0.9,
    }  # NaN recall left out
    assert {r.metric_type for r in c.data.eval_results} == {"fd", "precision"}
    assert c.data.to_dict()["onestep"]["alpha"] == 1.2
    assert "# One-step SiD student of my_teacher" in c.text
    assert "`my_teacher`, a local folder" in c.text
    assert str(my_teacher_dir) not in c.text and str(my_teacher_dir.resolve()) not in c.content
    assert (student / "samples.png").read_bytes() == b"png" and "![samples](samples.png)" in c.text


def test_student_snippet_runs_as_written(student):
    code = snippet(card(student).text)
    assert code.startswith("import torch\n") and f'"{student.resolve()}"' in code
    scope: dict = {}
    exec(code, scope)
    assert scope["images"].shape == (16, 1, 8, 8)


def test_class_conditional_flow_card_snippet_and_title(tmp_path):
    my_teacher_dir = tiny_edm_teacher(tmp_path / "cls_teacher", num_classes=3)
    model = Denoiser.from_pretrained(my_teacher_dir)
    folder = export_flow_model(
        model,
        tmp_path / "flow",
        [80.0],
        any_steps=True,
        base_model=str(my_teacher_dir),
        title=f"1-rectified flow of {my_teacher_dir}",
        method="reflow",
        facts={"final_fd_2step": 3.0},
    )
    c = card(folder)
    assert "# 1-rectified flow of cls_teacher\n" in c.text
    assert str(my_teacher_dir) not in c.content and c.data.base_model is None
    assert metric_values(c) == {"final_fd_2step": 3.0}
    code = snippet(c.text)
    assert "class_labels=torch.arange(16) % 3" in code
    scope: dict = {}
    exec(code, scope)
    assert scope["images"].shape == (16, 1, 8, 8)


def test_hub_teachers_become_base_model(tmp_path, my_teacher_dir):
    path = write_model_card(tmp_path / "a", "x", "m", {"fd": 2.0}, base_model="org/teacher")
    assert ModelCard.load(path).data.base_model == "org/teacher"
    # a local folder that records its hub id
    config = my_teacher_dir / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_name_or_path": "org/recorded"}))
    assert describe_teacher(str(my_teacher_dir)).base_model == "org/recorded"
    default = describe_teacher("default")
    assert default.base_model is None and default.name == "default_teacher"


def test_teacher_card_signature_still_works(tmp_path):
    """recipes/teacher.py: folder, title, method, facts, command; eval figures become the model-index."""
    path = write_model_card(
        tmp_path, title="EDM teacher", method="EDM", facts={"eval_fd_nfe35": 2.7, "eval_nfe_nfe35": 35.0},
        command="accelerate launch recipes/teacher.py",
    )  # fmt: skip
    c = ModelCard.load(path)
    assert metric_values(c) == {"eval_fd_nfe35": 2.7}
    assert c.data.license == "apache-2.0" and c.data.base_model is None
    assert "accelerate launch recipes/teacher.py" in c.text
    other = write_model_card(tmp_path / "b", "t", "m", {}, license="mit", pipeline_tag="text-to-image")
    assert ModelCard.load(other).data.license == "mit"
    assert ModelCard.load(other).data.pipeline_tag == "text-to-image"


def test_text_conditioned_adapter_card(tmp_path):

    from distill.teachers.builders import edm_scheduler

    unet = tiny_text_unet(seed=0)
    shared = add_sid_adapters(Denoiser(unet, edm_scheduler()), rank=2, alpha=4.0)
    teacher = tmp_path / "text_teacher"
    teacher.mkdir()
    folder = save_sid_adapter(
        shared.model, tmp_path / "adapter", "generator", [2.5], str(teacher), "SiD", FACTS
    )
    c = card(folder)
    assert c.data.pipeline_tag == "text-to-image" and c.data.base_model is None
    assert "# One-step LoRA adapter for text_teacher" in c.text
    code = snippet(c.text)
    assert code.startswith("import torch\n") and "encoder_hidden_states=prompt_embeds" in code
    hub = card_for_repo(c.content, folder, "me/adapter", download=True)
    assert 'snapshot_download("me/adapter")' in hub and "from huggingface_hub import snapshot_download" in hub
    assert '"path/to/text_teacher"' in hub and str(tmp_path) not in hub


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, operations))


def test_publish_uploads_a_card_that_loads_the_repo(student, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    FakeApi.calls = []
    local_before = (student / "README.md").read_text()
    assert publish(student, "me/student", token="t") == "https://huggingface.co/me/student"
    (_, repo, kw), (_, repo2, ops) = FakeApi.calls
    assert repo == repo2 == "me/student" and kw["exist_ok"]
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in ops}
    assert set(uploaded) == set(files_to_push(student))
    hub = ModelCard(uploaded["README.md"].decode())
    code = snippet(hub.text)
    assert 'OneStepPipeline.from_pretrained("me/student")' in code and "import torch" in code
    assert str(student.resolve()) not in hub.content and str(student) not in hub.content
    assert metric_values(hub) == metric_values(card(student))
    assert (student / "README.md").read_text() == local_before  # the local card keeps its local path
    # a card naming the folder by a relative path (older exports) is rewritten too
    monkeypatch.chdir(student.parent)
    old = local_before.replace(str(student.resolve()), "student")
    assert 'from_pretrained("me/student")' in card_for_repo(old, student, "me/student")
    with pytest.raises(PublishError, match="organisation/name"):
        publish(student, "bad", token="t")
