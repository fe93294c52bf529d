from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

from distill.cli import main as cli_main
from engine.images import make_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_and_say_when_to_use(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    assert path.read_text().startswith("#"), "each config opens with a comment on when to use it"


def test_expected_launch_configs_exist():
    names = {p.stem for p in (ROOT / "accelerate_configs").glob("*.yaml")}
    assert {"cpu_2proc", "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"} <= names


def test_grid_layout_and_values():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 1.0, 0.0)])
    grid = make_grid(images, nrow=2, pad=1)
    assert grid.shape == (1 + 2 * 3, 1 + 2 * 3, 1) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 4, 0] == 255 and grid[4, 1, 0] == 128
    with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
        make_grid(torch.zeros(2, 8, 8))


def test_cli_lists_and_rejects(capsys):
    assert cli_main([]) == 0
    assert "eval" in capsys.readouterr().out
    assert cli_main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli_main(["env"]) == 0
    assert "torch" in capsys.readouterr().out
