"""Reflow pair generation shows a progress bar over the pairs it writes (main process), and can be silenced."""

import pytest
from tiny_models import tiny_edm_teacher
from tqdm.auto import tqdm

from distill.reflow import pairs as pairs_module
from distill.reflow.pairs import generate_pairs, make_spec
from distill.teachers.denoiser import Denoiser

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pair_generation_progress_bar(tmp_path, capsys, monkeypatch):
    updates = []

    class RecordingBar(tqdm):
        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(pairs_module, "tqdm", RecordingBar)
    teacher = Denoiser.from_pretrained(tiny_edm_teacher(tmp_path / "t")).eval().requires_grad_(False)
    spec = make_spec(teacher, "tiny", 16, nfe=3, shard_size=8, batch_size=4)
    generate_pairs(teacher, spec, tmp_path / "pairs", log=lambda msg: None)
    err = capsys.readouterr().err
    assert "pairs: 16 teacher samples at NFE 3" in err and "16/16" in err
    assert updates == [4, 4, 4, 4]  # one step per solved chunk of batch_size, inside the 8-pair shards
    more = make_spec(teacher, "tiny", 20, nfe=3, shard_size=8, batch_size=4)
    generate_pairs(teacher, more, tmp_path / "pairs", log=lambda msg: None, progress_bar=False)
    assert "pairs:" not in capsys.readouterr().err
