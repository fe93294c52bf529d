"""benchmarks/sid_activations.py: the meta-device count of saved activation bytes equals the count on real
tensors (whose CPU attention kernel keeps what the GPU's fused kernels keep), with and without checkpointing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports `common` from beside it
import sid_activations  # noqa: E402


def real_saved_bytes(model: torch.nn.Module, inputs: dict) -> int:
    """Distinct non-parameter storages autograd saves in one real forward (no checkpointing)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    inputs["sample"].requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


@pytest.mark.slow
def test_meta_count_matches_real_tensors_and_checkpointing_saves(monkeypatch):
    torch.manual_seed(0)
    real, make_inputs = sid_activations.cifar_unet(32)  # 2.2M parameters, attention at 16x16
    want = real_saved_bytes(real, make_inputs(2))
    with torch.device("meta"):
        meta, _ = sid_activations.cifar_unet(32)
    held, block, n_params = sid_activations.saved_bytes(meta, make_inputs(2), torch.float32)
    assert n_params == sum(p.numel() for p in real.parameters())
    assert block == 0
    assert held == pytest.approx(
        want, rel=0.05
    )  # measured: 2.6% above (meta's attention keeps a few more views)
    ckpt_held, ckpt_block, _ = sid_activations.saved_bytes(
        meta, make_inputs(2), torch.float32, checkpointing=True
    )
    assert (
        0 < ckpt_block < ckpt_held < held / 2
    )  # checkpointing keeps block inputs, recomputes one block at a time
    assert not meta.is_gradient_checkpointing  # turned off again
    # without the fused-kernel stand-in, meta's math attention path keeps the L x L matrices: a wrong count
    monkeypatch.setattr(sid_activations, "flash_like_sdpa", torch.nn.functional.scaled_dot_product_attention)
    math_path, _, _ = sid_activations.saved_bytes(meta, make_inputs(2), torch.float32)
    assert math_path > 1.2 * want
    monkeypatch.undo()
    bf16, _, _ = sid_activations.saved_bytes(meta.to(torch.bfloat16), make_inputs(2), torch.bfloat16)
    assert bf16 == pytest.approx(held / 2, rel=0.1)
