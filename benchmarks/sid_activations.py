"""Activation bytes per sample of one network's forward, counted without running it, for docs/scaling.md.

Each network is built from its published config on the ``meta`` device (no weights allocated, nothing
downloaded) and run forward once on meta inputs with the input requiring grad, as the networks run in SiD's
generator step (G's loss backpropagates through G, the teacher and f_psi). A ``saved_tensors_hooks`` pack hook
sums the bytes of every distinct storage autograd saves for backward, parameters excluded: the activation memory
one forward holds until its backward. SiD's generator step holds three such forwards (G, teacher, f_psi on G's
output); benchmarks/sid_memory.py measures the real per-sample slope on the 35.7M UNet it builds, which calibrates
the count (docs/scaling.md).

    python benchmarks/sid_activations.py                       # all networks, fp32 and bf16 weights, batch 1
    python benchmarks/sid_activations.py --nets sd15 --dtype bf16

Prints ``RESULT net=.. params=.. dtype=.. checkpointing=.. sample=.. saved_mb_per_sample=..
block_recompute_mb_per_sample=..``: with ``checkpointing=True`` (diffusers' gradient checkpointing, as
``gradient_checkpointing: true`` turns on) the held bytes are what is saved outside the checkpointed blocks plus
the blocks' inputs, and the largest block's recomputation adds the second figure during backward.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import print_result


def cifar_unet(width: int = 128) -> tuple[torch.nn.Module, Callable[[int], dict]]:
    """benchmarks/sid_memory.py's teacher (35.7M parameters at width 128), 32x32x3."""
    from sid_memory import cifar_unet as build

    unet = build(width)
    return unet, lambda n: {"sample": torch.randn(n, 3, 32, 32), "timestep": torch.ones(n)}


def sd15_unet() -> tuple[torch.nn.Module, Callable[[int], dict]]:
    """Stable Diffusion 1.5's UNet (0.86B), 512 px = 64x64x4 latents, 77 CLIP tokens of 768."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    return unet, lambda n: {
        "sample": torch.randn(n, 4, 64, 64),
        "timestep": torch.ones(n),
        "encoder_hidden_states": torch.randn(n, 77, 768),
    }


def sdxl_unet() -> tuple[torch.nn.Module, Callable[[int], dict]]:
    """SDXL's UNet (2.6B), 1024 px = 128x128x4 latents, 77 tokens of 2048, pooled 1280 + 6 time ids."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    return unet, lambda n: {
        "sample": torch.randn(n, 4, 128, 128),
        "timestep": torch.ones(n),
        "encoder_hidden_states": torch.randn(n, 77, 2048),
        "added_cond_kwargs": {"text_embeds": torch.randn(n, 1280), "time_ids": torch.randn(n, 6)},
    }


def flux_transformer() -> tuple[torch.nn.Module, Callable[[int], dict]]:
    """FLUX.1-dev's transformer (11.9B), 1024 px = 64x64 packed latent tokens of 64, 512 T5 tokens of 4096."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    return model, lambda n: {
        "hidden_states": torch.randn(n, 4096, 64),
        "encoder_hidden_states": torch.randn(n, 512, 4096),
        "pooled_projections": torch.randn(n, 768),
        "timestep": torch.ones(n),
        "img_ids": torch.zeros(4096, 3),
        "txt_ids": torch.zeros(512, 3),
        "guidance": torch.ones(n),
    }


NETS = {"cifar35m": cifar_unet, "sd15": sd15_unet, "sdxl": sdxl_unet, "flux": flux_transformer}
SAMPLE = {"cifar35m": "32x32x3", "sd15": "512px", "sdxl": "1024px", "flux": "1024px"}


class FlashLikeAttention(torch.autograd.Function):
    """``scaled_dot_product_attention`` as the fused kernels run it on GPUs (flash / memory-efficient): saves
    q, k, v, the output and a float32 log-sum-exp per query for backward, never the L x L attention matrix. On
    the meta device torch falls back to the math path, which saves that matrix (checked on CPU, whose fused
    kernel saves what this saves: the count then equals the real one)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        raise NotImplementedError("counting only")


def flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    return FlashLikeAttention.apply(query, key, value)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _cast(value, dtype: torch.dtype):
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value.to("meta", dtype if value.is_floating_point() else value.dtype)


def _counter(params: set[int], into: dict[int, int]):
    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params:
            into[key] = t.untyped_storage().nbytes()
        return t

    return pack


def saved_bytes(
    model: torch.nn.Module, inputs: dict, dtype: torch.dtype, checkpointing: bool = False
) -> tuple[int, int, int]:
    """(bytes held from the forward until its backward, bytes one checkpointed block adds while it is recomputed
    (0 without checkpointing), parameter count) of one forward of ``model`` on ``inputs``.

    Without checkpointing: the distinct non-parameter storages autograd saves. With diffusers' gradient
    checkpointing: what is saved outside the checkpointed blocks, plus the blocks' inputs (a non-reentrant
    checkpoint keeps them for the recomputation); the largest block's own saved bytes are returned apart, as
    backward recomputes one block at a time.
    """
    params = {_storage_key(p) for p in model.parameters()}
    seen: dict[int, int] = {}
    block_max = [0]

    def counted_checkpoint(block, *args):
        for a in args:
            if isinstance(a, torch.Tensor) and _storage_key(a) not in params:
                seen[_storage_key(a)] = a.untyped_storage().nbytes()
        inner: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(_counter(params, inner), lambda t: t):
            block(*args)  # the recomputation's saved tensors (free on meta)
        block_max[0] = max(block_max[0], sum(inner.values()))
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    if checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=counted_checkpoint)
    first = next(iter(inputs))
    inputs = _cast(inputs, dtype)
    inputs[first].requires_grad_(True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = flash_like_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(_counter(params, seen), lambda t: t):
            model.train()(**inputs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        if checkpointing:
            model.disable_gradient_checkpointing()
    return sum(seen.values()), block_max[0], sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    for name in args.nets:
        with torch.device("meta"):
            model, make_inputs = NETS[name]()
        for d in args.dtype:
            dtype = torch.float32 if d == "fp32" else torch.bfloat16
            model.to(dtype)
            for ckpt in (False, True):
                held, block, n_params = saved_bytes(model, make_inputs(args.batch_size), dtype, ckpt)
                print_result(
                    net=name,
                    params=n_params,
                    dtype=d,
                    checkpointing=ckpt,
                    sample=SAMPLE[name],
                    saved_mb_per_sample=held / args.batch_size / 2**20,
                    block_recompute_mb_per_sample=block / args.batch_size / 2**20,
                )


if __name__ == "__main__":
    main()
