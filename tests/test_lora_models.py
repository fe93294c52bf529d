"""LoRA-GA's core guarantees on tiny models (tests/tiny_models.py): unchanged output at initialisation, the first step following the full gradient, and the original-base round
trip of the saved adapter (peft and diffusers loaders)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import UNET_TARGETS, tiny_bert, tiny_unet
from torch import nn

import finetune.loraga
from finetune.export import save_adapter
from finetune.loraga import LoraGAError, LoraGAOptions, apply_lora_ga, lora_ga_factors, lora_ga_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def text_batches(seed: int = 0, n: int = 2, size: int = 4, vocab: int = 64, labels: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(5, vocab, (size, 10), generator=g),
            "labels": torch.randint(0, labels, (size,), generator=g),
        }
        for _ in range(n)
    ]


def unet_loss(model: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g)
    t = torch.rand(x.shape[0], generator=g)
    return (model(x + noise, t).sample - noise).pow(2).mean()


# ----------------------------------------------------------------------------------------------- init
def test_output_unchanged_at_init_linear_and_conv():
    base = tiny_bert()
    ids = text_batches(1, 1, 8)[0]["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear")
    )
    batches = text_batches()
    initial = apply_lora_ga(model, batches, lambda b: model(**b).loss)
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (
        len(initial) == 13
    )  # q, k, v, o, up, down x 2 layers + pooler ("all-linear", refused by peft's LoRA-GA)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_B["default"].weight.abs().sum() > 0  # a real init, not plain LoRA's B = 0

    unet = tiny_unet()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = unet(x, torch.full((4,), 0.3)).sample
    punet = get_peft_model(unet, LoraConfig(r=2, lora_alpha=4, target_modules=UNET_TARGETS))
    initial = apply_lora_ga(punet, [x], lambda b: unet_loss(punet, b))
    punet.eval()
    with torch.no_grad():
        after = punet(x, torch.full((4,), 0.3)).sample
    assert any(k.endswith("conv1") for k in initial)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()


def _factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    rows = layer.get_base_layer().weight.shape[0]
    a = layer.lora_A["default"].weight.reshape(layer.r["default"], -1)
    return a, layer.lora_B["default"].weight.reshape(rows, -1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """In float64 without an epsilon (torch's cosine_similarity clamps norms below 1e-8: these are ~1e-9)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_randomized_svd_above_the_exact_size_gives_the_exact_factors_subspaces(monkeypatch):
    """Above EXACT_SVD_MAX_DIM the factors come from the authors' randomized SVD (q = 4r, 4 power iterations);
    on a gradient-like matrix (a power-law spectrum, as the sum over tokens of dy^T x gives) each factor spans
    what the exact SVD's does: A0 the top r right singular vectors, B0 the next r left ones."""
    rank, rows, cols = 8, 384, 1024
    assert min(rows, cols) > finetune.loraga.EXACT_SVD_MAX_DIM
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, rows, generator=g))
    spectrum = torch.arange(1, rows + 1, dtype=torch.float32) ** -1.5
    grad = (u * spectrum) @ v.t()
    a_fast, b_fast = lora_ga_factors(grad, rank)
    monkeypatch.setattr(finetune.loraga, "EXACT_SVD_MAX_DIM", 10**9)
    a_exact, b_exact = lora_ga_factors(grad, rank)
    assert a_fast.shape == a_exact.shape == (rank, cols) and b_fast.shape == b_exact.shape == (rows, rank)
    assert torch.allclose(
        a_fast.norm(dim=1), a_exact.norm(dim=1), rtol=1e-5
    )  # the paper's scale, unit vectors
    for fast, exact in ((a_fast, a_exact), (b_fast.t(), b_exact.t())):
        overlap = torch.linalg.svdvals(
            fast @ exact.t() / exact.norm(dim=1).square()[0]
        )  # cosines of the angles
        assert overlap.min() > 0.999, overlap
    wrong = torch.linalg.svdvals(a_fast @ v[:, rank : 2 * rank] / a_fast.norm(dim=1)[0])
    assert wrong.max() < 1e-2  # and the check can fail: A0 is not the next r right vectors


def _first_step_alignment(build, loss_of, targets, rank: int = 2, init: str = "lora_ga"):
    """Per layer: (cos(dW, -G_2r), |dW| / |lr s^2 c^2 G_2r|, cos(dW, -G)) for one SGD step from the init, with
    dW = s (B1 A1 - B0 A0) = s (dB A0 + B0 dA + dB dA) computed from the steps (no cancellation in W)."""
    base = build()
    batch = loss_of["batch"]
    full = copy.deepcopy(base)
    loss_of["fn"](full, batch).backward()
    lr = 1e-3
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    if init == "lora_ga":
        apply_lora_ga(model, [batch], lambda b: loss_of["fn"](model, b))
    layers = lora_ga_layers(model)
    loss_of["fn"](model, batch).backward()
    full_params = dict(full.named_parameters())
    results = {}
    for name, layer in layers.items():
        a0, b0 = _factors(layer)
        da = -lr * layer.lora_A["default"].weight.grad.reshape(a0.shape)
        db = -lr * layer.lora_B["default"].weight.grad.reshape(b0.shape)
        delta = (layer.scaling["default"] * (db @ a0 + b0 @ da + db @ da)).detach()
        key = name.removeprefix("base_model.model.") + ".weight"
        grad = full_params[key].grad.reshape(full_params[key].shape[0], -1)
        u, s, vh = torch.linalg.svd(grad, full_matrices=False)
        g2r = u[:, : 2 * rank] @ torch.diag(s[: 2 * rank]) @ vh[: 2 * rank]
        c2 = grad.shape[0] ** 0.5 / 16.0
        scale = layer.scaling["default"] ** 2 * c2 * lr
        cos, cos_full = _cosine(delta, -g2r), _cosine(delta, -grad)
        results[name] = (cos, (delta.norm() / (scale * g2r.norm())).item(), cos_full)
    return results


def test_first_step_is_the_rank_2r_projection_of_the_full_step():
    text = {"batch": text_batches(3, 1, 8)[0], "fn": lambda m, b: m(**b).loss}
    ga = _first_step_alignment(tiny_bert, text, ["query", "value", "dense"])
    for name, (cos, ratio, _) in ga.items():
        assert cos > 0.999 and abs(ratio - 1) < 0.02, (name, cos, ratio)
    plain = _first_step_alignment(tiny_bert, text, ["query", "value", "dense"], init="plain")
    mean = lambda r, i: sum(v[i] for v in r.values()) / len(r)  # noqa: E731
    assert mean(ga, 2) > mean(plain, 2) + 0.2, (mean(ga, 2), mean(plain, 2))

    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    conv = {"batch": x, "fn": lambda m, b: unet_loss(m, b)}
    ga = _first_step_alignment(tiny_unet, conv, ["conv1", "conv2"])
    for name, (cos, ratio, _) in ga.items():
        assert cos > 0.999 and abs(ratio - 1) < 0.02, (name, cos, ratio)


# -------------------------------------------------------------------------------- original base round trip
def _train_steps(model: nn.Module, loss, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"use_dora": True},
        {"use_rslora": True, "rank_pattern": {"query": 3}, "alpha_pattern": {"value": 5}},
    ],
    ids=["lora", "dora", "rslora_patterns"],
)
def test_lora_ga_adapter_loads_on_the_original_base(tmp_path, extra):
    pretrained = tiny_bert()
    base = copy.deepcopy(pretrained)
    config = LoraConfig(
        task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value", "dense"], **extra
    )
    model = get_peft_model(base, config)
    batches = text_batches()
    initial = apply_lora_ga(model, batches, lambda b: model(**b).loss)
    _train_steps(model, lambda: model(**batches[0]).loss)
    ids = text_batches(9, 1, 8)[0]["input_ids"]
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        assert (tuned - pretrained(input_ids=ids).logits).abs().max() > 1e-2  # training changed the model
    save_adapter(model, tmp_path / "adapter", initial=initial)
    loaded = PeftModel.from_pretrained(copy.deepcopy(pretrained), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        again = loaded(input_ids=ids).logits
    assert torch.allclose(tuned, again, atol=1e-5), (tuned - again).abs().max()
    if not extra:  # the unconverted adapter is wrong on the original base: the conversion matters
        save_adapter(model, tmp_path / "raw")
        raw = PeftModel.from_pretrained(copy.deepcopy(pretrained), str(tmp_path / "raw")).eval()
        with torch.no_grad():
            assert (raw(input_ids=ids).logits - tuned).abs().max() > 1e-3


def test_conversion_matches_peft_for_linear_layers(tmp_path):
    """Our rank-2r conversion equals peft's path_initial_model_for_weight_conversion where peft supports it."""
    base = tiny_bert()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    initial = apply_lora_ga(model, text_batches(), lambda b: model(**b).loss)
    model.save_pretrained(str(tmp_path / "init"))  # the init adapter (init_lora_weights=True), peft's route
    _train_steps(model, lambda: model(**text_batches()[0]).loss, steps=2)
    model.save_pretrained(
        str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    save_adapter(model, tmp_path / "ours", initial=initial)
    from safetensors.torch import load_file

    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert torch.allclose(theirs[key], ours[key]), key


def test_unet_adapter_loads_with_peft_and_diffusers(tmp_path):
    """Conv layers: a UNet2DModel through PeftModel, a UNet2DConditionModel through diffusers' loader."""
    from diffusers import UNet2DConditionModel

    pretrained = tiny_unet()
    model = get_peft_model(
        copy.deepcopy(pretrained), LoraConfig(r=2, lora_alpha=4, target_modules=UNET_TARGETS)
    )
    x = torch.randn(4, 1, 8, 8)
    initial = apply_lora_ga(model, [x], lambda b: unet_loss(model, b))
    _train_steps(model, lambda: unet_loss(model, x, seed=1))
    t = torch.full((4,), 0.5)
    with torch.no_grad():
        tuned = model(x, t).sample
    save_adapter(model, tmp_path / "adapter", initial=initial, diffusers_prefix="unet")
    loaded = PeftModel.from_pretrained(copy.deepcopy(pretrained), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(tuned, loaded(x, t).sample, atol=1e-5)

    torch.manual_seed(0)
    cond = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    pristine = copy.deepcopy(cond)
    targets = [*UNET_TARGETS, "to_q", "to_k", "to_v", "to_out.0"]
    model = get_peft_model(cond, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    text = torch.randn(4, 3, 8)
    run = lambda m, b: (m(b, torch.full((4,), 0.5), text).sample - b).pow(2).mean()  # noqa: E731
    initial = apply_lora_ga(model, [x], lambda b: run(model, b))
    _train_steps(model, lambda: run(model, x))
    with torch.no_grad():
        tuned = model(x, t, text).sample
    save_adapter(model, tmp_path / "cond", initial=initial, diffusers_prefix="unet")
    # what pipeline.load_lora_weights(folder) does for the UNet (it asks for safetensors)
    pristine.load_lora_adapter(str(tmp_path / "cond"), prefix="unet", adapter_name="ft", use_safetensors=True)
    with torch.no_grad():
        again = pristine(x, t, text).sample
    assert torch.allclose(tuned, again, atol=1e-5), (tuned - again).abs().max()


# ------------------------------------------------------------------------------------------ refusals
def test_lora_ga_refuses_what_it_cannot_initialise():
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["word_embeddings", "query"]))
    with pytest.raises(LoraGAError, match="embedding"):
        lora_ga_layers(model)

    model = get_peft_model(tiny_bert(), LoraConfig(r=20, target_modules=["query"]))
    with pytest.raises(LoraGAError, match="2 \\* rank"):
        lora_ga_layers(model)

    class Quantized(nn.Linear):
        quant_state = object()

    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    net[2] = Quantized(8, 8)
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["2"]))
    with pytest.raises(LoraGAError, match="quantized"):
        lora_ga_layers(model)

    net = nn.ModuleDict({"used": nn.Linear(8, 8), "unused": nn.Linear(8, 8)})
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["used", "unused"]))
    x = torch.randn(4, 8)
    with pytest.raises(LoraGAError, match="no gradient reached"):
        apply_lora_ga(model, [x], lambda b: model.base_model.model["used"](b).sum(), LoraGAOptions())
    assert not any(p.requires_grad for n, p in model.named_parameters() if not re.search("lora_", n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_ga_reports_its_step0_output_change_exact_only_on_a_float32_base(dtype):
    """The reported change (per adapted layer) tracks the real one (the logits): ~1e-6 on fp32; on bf16 the
    rounded offset base W - s B0 A0 moves both by orders of magnitude more (issue 22), and the report shows it."""
    from tiny_models import tiny_llama

    base = tiny_llama().to(dtype)
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=16, target_modules="all-linear"),
    )
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, 60, (4, 12), generator=g) for _ in range(2)]
    report: dict = {}
    apply_lora_ga(model, batches, lambda b: model(input_ids=b, labels=b).loss, report=report)
    probe = torch.randint(5, 60, (4, 12), generator=g)
    with torch.no_grad():
        change = (
            (model.eval()(input_ids=probe).logits.float() - base(input_ids=probe).logits.float()).abs().max()
        )
    assert report["base_dtypes"] == [str(dtype)]
    if dtype == torch.float32:
        assert report["output_change"] < 1e-4 and change < 1e-5
        assert "model_output_change" not in report  # the two whole-model forwards are spent only where needed
    else:
        assert report["output_change"] > 1e-2 and change > 1e-3
        assert report["model_output_change"] > 1e-3  # the first gradient batch, in eval mode
    assert report["output_change"] > 0  # each layer's probe (a few rows of the first example) re-ran


def test_output_change_replays_a_probe_recorded_under_bf16_autocast():
    """LoRA-GA's exactness probe recorded under bf16 mixed precision (bf16 input, fp32 layer) is replayed under the
    same autocast: no dtype error ("Input type BFloat16 and bias type float"), and an unchanged layer reads ~0."""
    from peft import LoraConfig, get_peft_model

    from finetune.loraga import lora_ga_layers, output_change

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), LoraConfig(r=2, target_modules=["0"]))
    layers = lora_ga_layers(model)
    (name, layer) = next(iter(layers.items()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(4, 16).to(torch.bfloat16)
        before = layer(x)
    assert before.dtype == torch.bfloat16
    assert output_change(layers, {name: (x, before)}) == 0.0
