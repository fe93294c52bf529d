"""Every shipped YAML config parses into its recipe's config class (unknown or mistyped keys would fail)."""

import dataclasses
from pathlib import Path

import pytest

from engine.config import parse_config
from recipes.lora import LoraRecipeConfig
from recipes.reflow import ReflowConfig
from recipes.sid import SiDConfig
from recipes.teacher import TeacherConfig
from recipes.vae import VAEConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG_CLASSES = {
    "sid": SiDConfig,
    "teacher": TeacherConfig,
    "reflow": ReflowConfig,
    "lora": LoraRecipeConfig,
    "vae": VAEConfig,
}


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config_parses(path):
    prefix = path.stem.split("_")[0]
    assert prefix in CONFIG_CLASSES, (
        f"{path.name}: no recipe config class for the prefix {prefix!r}; name configs <recipe>_<what>.yaml "
        f"with a recipe from {sorted(CONFIG_CLASSES)}, or register the new recipe here"
    )
    config = parse_config(CONFIG_CLASSES[prefix], ["--config", str(path)])
    assert config.output_dir.startswith("outputs/")


def test_default_teacher_ships_in_the_package():
    from distill.teachers.loading import DEFAULT_TEACHER, load_teacher

    if not (DEFAULT_TEACHER / "unet").is_dir():
        pytest.fail(f"default teacher missing at {DEFAULT_TEACHER}")
    teacher = load_teacher("default")
    assert teacher.parameterization == "edm" and teacher.in_channels == 1 and teacher.sample_size == 8
    assert (DEFAULT_TEACHER / "README.md").read_text().count("recipes/teacher.py") >= 1


@pytest.mark.parametrize(
    "config_class", [SiDConfig, ReflowConfig, TeacherConfig, VAEConfig], ids=lambda c: c.__name__
)
def test_every_setting_has_help(config_class):
    """`recipes/X.py --help` prints each setting's meaning: no field may lack a help string."""
    missing = [f.name for f in dataclasses.fields(config_class) if not f.metadata.get("help")]
    assert not missing, f"{config_class.__name__} fields without help: {missing}"


@pytest.mark.parametrize("config_class", [SiDConfig, ReflowConfig], ids=lambda c: c.__name__)
def test_renamed_keys_name_old_keys_and_current_fields(config_class):
    names = {f.name for f in dataclasses.fields(config_class)}
    assert config_class.renamed_keys
    for old, new in config_class.renamed_keys.items():
        assert old not in names and new in names, (old, new)
