from dataclasses import dataclass

import pytest

from engine.config import TrainConfig, parse_config, save_config


@dataclass
class RecipeConfig(TrainConfig):
    lr: float = 1e-4
    sizes: list[int] | None = None
    name: str | None = None


def test_yaml_then_cli_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 7\nlr: 3e-3\nmixed_precision: bf16\nsizes: [1, 2]\ndeterministic: true\n")
    cfg = parse_config(RecipeConfig, ["--config", str(path), "--max_steps", "9", "--seed", "5"])
    assert cfg.max_steps == 9  # command line wins
    assert cfg.lr == pytest.approx(3e-3) and isinstance(cfg.lr, float)  # YAML's "3e-3" string is typed
    assert (
        cfg.mixed_precision == "bf16" and cfg.seed == 5 and cfg.sizes == [1, 2] and cfg.deterministic is True
    )
    assert cfg.name is None


def test_every_field_settable_both_ways(tmp_path):
    cfg = parse_config(
        RecipeConfig, ["--output_dir", str(tmp_path), "--name", "x", "--resume_from", "latest"]
    )
    save_config(cfg, tmp_path / "resolved.yaml")
    again = parse_config(RecipeConfig, ["--config", str(tmp_path / "resolved.yaml")])
    assert again == cfg


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_step: 7\n")
    with pytest.raises(ValueError, match=r"max_step.*Did you mean 'max_steps'"):
        parse_config(RecipeConfig, ["--config", str(path)])


def test_unknown_cli_key_is_named():
    with pytest.raises(ValueError, match="learning_rate"):
        parse_config(RecipeConfig, ["--learning_rate", "1"])


def test_bad_choice_and_bad_value():
    with pytest.raises(SystemExit):
        parse_config(RecipeConfig, ["--mixed_precision", "fp8"])
    with pytest.raises(ValueError, match="batch_size=0"):
        parse_config(RecipeConfig, ["--batch_size", "0"])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_config(RecipeConfig, ["--config", str(tmp_path / "nope.yaml")])
