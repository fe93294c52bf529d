import dataclasses
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from engine.config import TrainConfig, field_help, parse_config, save_config


@dataclass
class RecipeConfig(TrainConfig):
    lr: float = 1e-4
    sizes: list[int] | None = None
    name: str | None = None


@dataclass
class HelpedConfig(TrainConfig):
    """A recipe config for the --help test."""

    lr: float = field(default=3e-4, metadata={"help": "Learning rate of the model."})
    widths: list[int] = field(default_factory=lambda: [32, 64], metadata={"help": "Channels per level."})
    mode: Literal["fast", "exact"] = field(default="fast", metadata={"help": "How to run."})
    max_steps: int = 77  # a shared field whose default the recipe changes, without its own help


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


def test_help_lists_every_field_with_type_default_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(HelpedConfig, ["--max_steps", "5", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("usage: ")
    for f in dataclasses.fields(HelpedConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = (
            repr(default)
            if isinstance(default, str)
            else str(default).lower()
            if isinstance(default, bool)
            else str(default)
        )
        line = next((ln for ln in out.splitlines() if ln.startswith(f"  --{f.name} ")), None)
        assert line is not None, f"--help does not list {f.name}"
        assert f"(default: {shown}" in line, line
        assert field_help(HelpedConfig, f.name) in " ".join(out.split()), f.name
    assert (
        "  --mode {fast,exact} (default: 'fast')" in out and "  --widths list[int] (default: [32, 64])" in out
    )
    assert "  --resume_from str | None (default: None)" in out
    # the recipe's own fields first, then the shared ones; a changed shared default says so and keeps its help
    assert out.index("--widths") < out.index("--output_dir")
    assert "--max_steps int (default: 77; TrainConfig's: 1000)" in out
    assert field_help(HelpedConfig, "max_steps") == field_help(TrainConfig, "max_steps") != ""
    assert "A recipe config for the --help test." in out
    with pytest.raises(SystemExit):
        parse_config(HelpedConfig, ["-h"])
    assert "--num_threads" in capsys.readouterr().out


def _demo_config():
    from recipes.engine_demo import DemoConfig

    return DemoConfig


def _recipe_config(module: str, name: str):
    def load():
        return getattr(__import__(f"recipes.{module}", fromlist=[name]), name)

    return load


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda: TrainConfig, id="TrainConfig"),
        pytest.param(_demo_config, id="engine_demo"),
        pytest.param(_recipe_config("sid", "SiDConfig"), id="sid"),
        pytest.param(_recipe_config("reflow", "ReflowConfig"), id="reflow"),
        pytest.param(_recipe_config("lora", "LoraRecipeConfig"), id="lora"),
        pytest.param(_recipe_config("teacher", "TeacherConfig"), id="teacher"),
    ],
)
def test_every_recipe_config_field_has_help(load):
    config_cls = load()
    missing = [f.name for f in dataclasses.fields(config_cls) if not field_help(config_cls, f.name).strip()]
    assert not missing, f"{config_cls.__name__} fields without metadata help: {missing}"


@dataclass
class RenamedConfig(TrainConfig):
    renamed_keys: ClassVar[dict[str, str]] = {"tmax": "max_timestep", "rank": "lora_rank"}
    max_timestep: float = 800.0
    lora_rank: int = 4


def test_renamed_keys_are_answered_with_the_new_name(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("max_steps: 3\ntmax: 700\n")
    with pytest.raises(
        ValueError, match=re.escape(f"config key 'tmax' in {path} was renamed to 'max_timestep'")
    ):
        parse_config(RenamedConfig, ["--config", str(path)])
    for argv in (["--rank", "8"], ["--rank=8"]):
        with pytest.raises(
            ValueError, match="config key 'rank' in the command line was renamed to 'lora_rank'"
        ):
            parse_config(RenamedConfig, argv)
    assert parse_config(RenamedConfig, ["--lora_rank", "8"]).lora_rank == 8
    # an unknown key that is not a renamed one still gets the close-match hint
    with pytest.raises(ValueError, match="Did you mean 'lora_rank'"):
        parse_config(RenamedConfig, ["--lora_rnak", "8"])


def test_renamed_keys_must_point_from_a_gone_key_to_a_field():
    @dataclass
    class Broken(TrainConfig):
        renamed_keys: ClassVar[dict[str, str]] = {"seed": "max_steps"}

    with pytest.raises(TypeError, match="'seed' -> 'max_steps'"):
        parse_config(Broken, ["--max_steps", "2"])


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: 7\nlr: [1e-3, 2e-3\nseed: 1\n")
    with pytest.raises(ValueError) as info:
        parse_config(RecipeConfig, ["--config", str(path)])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:3:5: not valid YAML")
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no scanner traceback chained
    path.write_text("max_steps: 7\n  lr: 1e-3\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:5: not valid YAML")):
        parse_config(RecipeConfig, ["--config", str(path)])


def test_yaml_top_level_must_be_a_mapping_and_keys_unique(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- max_steps: 7\n- lr: 1e-3\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} must hold a mapping.*got a list"):
        parse_config(RecipeConfig, ["--config", str(path)])
    path.write_text("max_steps\n")
    with pytest.raises(ValueError, match="got a str"):
        parse_config(RecipeConfig, ["--config", str(path)])
    path.write_text("lr: 1e-3\nmax_steps: 7\nlr: 2e-3\n")
    with pytest.raises(
        ValueError, match=r"list.yaml:3:1: not valid YAML.*'lr' appears twice \(lines 1 and 3\)"
    ):
        parse_config(RecipeConfig, ["--config", str(path)])
    path.write_text("# only a comment\n")
    assert parse_config(RecipeConfig, ["--config", str(path)]) == RecipeConfig()
