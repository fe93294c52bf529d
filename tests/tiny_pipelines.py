"""Tiny random-weight pipelines of every model family users bring as teachers, built from configs and saved
with ``save_pretrained`` (nothing downloaded, nothing calls the hub).

Each builder mirrors the layout of the family's real hub folder at toy width: the same pipeline class, the
same component classes (text encoders, tokenizers, VAE kind, scheduler kind and prediction type, learned sigma,
legacy ``Transformer2DModel`` class names where the hub still has them; schedulers as diffusers' conversion
scripts write them), so a recipe that loads these folders meets what it meets on a real teacher. Widths are of
the order of diffusers' own ``get_dummy_components()`` tests; the
tokenizers, which those tests download (hf-internal-testing/tiny-random-clip, tiny-random-t5, dummy-gemma), are
built here from small vocabularies with transformers' own tokenizer classes.

Every builder is seeded (same folder content on every call) and returns the folder. Latent families work on
8 x 8 latents and make :data:`IMAGE_SIZE` x :data:`IMAGE_SIZE` images (VAE factor 2), except Sana
(:data:`SANA_IMAGE_SIZE`, VAE factor 4); :func:`tiny_pixel_ddpm` makes :data:`PIXEL_SIZE` x :data:`PIXEL_SIZE`
pixels. :data:`FAMILIES` names every variant for the conftest factory fixture ``tiny_pipeline_dir``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LDMPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

IMAGE_SIZE = 16  # pixels of every latent family's image: 8 x 8 latents through a VAE that downsamples by 2
SANA_IMAGE_SIZE = 32  # SanaPipeline refuses sizes not divisible by 32 (its real VAE downsamples by 32)
PIXEL_SIZE = 32  # pixels of the DDPM family
TEXT_DIM = 32  # hidden width of every tiny text encoder
T5_DIM = 64  # SD3 zero-pads its CLIP embeddings (2 x 32 wide) up to the T5 width, so T5 must be at least 64

# every word the tokenizers know whole; other text still tokenizes (bytes / characters), only longer
WORDS = (
    "a an the of and with in on at photo painting picture drawing portrait cat cats dog dogs bird car house "
    "tree flower man woman person red blue green yellow black white small big cute sitting standing grass "
    "street city sky sea beach mountain forest"
).split()
STABLE_DIFFUSION_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ------------------------------------------------------------------------------------------------ tokenizers
def _whole_word_merges(words: list[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges under which each word (a list of base symbols) becomes one token; new tokens join ``vocab``.

    Runs BPE itself: the earliest known merge applies first (as in the tokenizer); only when none applies is the
    leftmost pair added as a new, last-ranked merge, so merges learnt for one word never split another."""
    ranks: dict[tuple[str, str], int] = {}
    for pieces in words:
        while len(pieces) > 1:
            pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
            rank, i = min(pairs)
            if rank == len(
                ranks
            ):  # no known merge applies (min() then picked i = 0): learn the leftmost pair
                ranks[(pieces[0], pieces[1])] = rank
            merged = pieces[i] + pieces[i + 1]
            vocab.setdefault(merged, len(vocab))
            pieces = [*pieces[:i], merged, *pieces[i + 2 :]]
    return list(ranks)


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE in CLIP's own vocabulary layout: the 256 byte symbols, the same with the ``</w>``
    end-of-word suffix, merges that make each of :data:`WORDS` one token, then ``<|startoftext|>`` / ``<|endoftext|>`` last
    (pad = eos = unk = ``<|endoftext|>``, 77 tokens, as openai/clip-vit-large-patch14)."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate([*alphabet, *(s + "</w>" for s in alphabet)])}
    merges = _whole_word_merges([[*w[:-1], w[-1] + "</w>"] for w in WORDS], vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """T5's SentencePiece-style Unigram (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``▁``-prefixed pieces) over
    :data:`WORDS` plus single characters, with T5's 100 ``<extra_id_*>`` tokens at the end."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in WORDS]
    vocab += [("▁" + c, -6.0) for c in chars] + [(c, -7.0) for c in chars]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=512)


def gemma_tokenizer() -> GemmaTokenizer:
    """Gemma's BPE with byte fallback (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4, the 256
    ``<0xNN>`` byte tokens, ``▁`` for a space, ``<bos>`` first) with merges that make each of :data:`WORDS`
    one token, with and without the ``▁`` of a preceding space (Gemma adds no prefix space)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += ["▁", *(chr(c) for c in range(33, 127))]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _whole_word_merges([*(["▁", *w] for w in WORDS), *(list(w) for w in WORDS)], vocab)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=2048)


# ------------------------------------------------------------------------------------------- text encoders
def clip_text_encoder(tokenizer: CLIPTokenizer, with_projection: bool = False, seed: int = 0):
    """CLIPTextModel(WithProjection), hidden :data:`TEXT_DIM`, 2 layers (SDXL reads the penultimate one), with
    the tokenizer's real bos/eos/pad ids so the pooled output is taken at the eos token as in real CLIP."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_text_encoder(tokenizer: T5Tokenizer, d_model: int = TEXT_DIM, seed: int = 0) -> T5EncoderModel:
    """T5 v1.1 encoder (gated-gelu, as in the T5-XXL that SD3/Flux/PixArt use), ``d_model`` wide, 2 layers."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def gemma2_text_encoder(tokenizer: GemmaTokenizer, seed: int = 0) -> Gemma2Model:
    """Gemma2Model (Sana's text encoder class), hidden :data:`TEXT_DIM`, 2 layers."""
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return Gemma2Model(config).eval()


# -------------------------------------------------------------------------------------------------- VAEs
def kl_vae(latent_channels: int = 4, seed: int = 0, **config) -> AutoencoderKL:
    """AutoencoderKL with two blocks (downsamples by 2), widths (8, 16), mid-block attention kept."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=IMAGE_SIZE,
        **config,
    ).eval()


def vq_vae(seed: int = 0) -> VQModel:
    """VQModel as CompVis/ldm-celebahq-256 (3 latent channels), two blocks, a 32-entry codebook."""
    torch.manual_seed(seed)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=3,
        num_vq_embeddings=32,
        vq_embed_dim=3,
        sample_size=IMAGE_SIZE,
    ).eval()


def dc_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderDC:
    """AutoencoderDC (Sana's deep-compression VAE) with three stages (downsamples by 4: SanaPipeline wants
    images divisible by 32, so :data:`SANA_IMAGE_SIZE` still gives 8 x 8 latents), as diffusers' Sana test."""
    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()


# ---------------------------------------------------------------------------------------------- helpers
def _save(pipe, folder: Path | str) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _update_json(path: Path, **entries) -> None:
    data = json.loads(path.read_text())
    data.update(entries)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _legacy_transformer_class(folder: Path) -> None:
    """Write ``Transformer2DModel`` as the transformer's class, as the DiT and PixArt-alpha hub folders still do
    (diffusers remaps it on load from ``norm_type``); loaders that build the class by name must cope."""
    _update_json(folder / "model_index.json", transformer=["diffusers", "Transformer2DModel"])
    _update_json(folder / "transformer" / "config.json", _class_name="Transformer2DModel")


# ---------------------------------------------------------------------------------------------- families
def tiny_sd(folder: Path | str, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """StableDiffusionPipeline. ``epsilon``: SD 1.5's layout (PNDM scheduler); ``v_prediction``: SD 2.1's
    (DDIM scheduler, linear attention projections)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    v = prediction_type == "v_prediction"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
        use_linear_projection=v,
    ).eval()
    scheduler_config = dict(STABLE_DIFFUSION_BETAS, set_alpha_to_one=False, steps_offset=1)
    if v:
        scheduler = DDIMScheduler(**scheduler_config, clip_sample=False, prediction_type=prediction_type)
    else:
        scheduler = PNDMScheduler(**scheduler_config, skip_prk_steps=True)
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=kl_vae(seed=seed),
        text_encoder=clip_text_encoder(tokenizer, seed=seed),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipe, folder)


def tiny_sdxl(folder: Path | str, seed: int = 0) -> Path:
    """StableDiffusionXLPipeline: CLIPTextModel + CLIPTextModelWithProjection (their penultimate hidden states
    concatenated, 64 wide), pooled embeds and size/crop time ids through ``addition_embed_type="text_time"``,
    Euler scheduler as stabilityai/stable-diffusion-xl-base-1.0."""
    torch.manual_seed(seed)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_DIM,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_DIM,  # 6 time ids + pooled text
    ).eval()
    scheduler = EulerDiscreteScheduler(
        **STABLE_DIFFUSION_BETAS, steps_offset=1, timestep_spacing="leading", interpolation_type="linear"
    )
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=kl_vae(seed=seed, scaling_factor=0.13025),
        text_encoder=clip_text_encoder(tokenizer, seed=seed),
        text_encoder_2=clip_text_encoder(tokenizer, with_projection=True, seed=seed + 1),
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return _save(pipe, folder)


def tiny_sd3(folder: Path | str, seed: int = 0) -> Path:
    """StableDiffusion3Pipeline: SD3Transformer2DModel (patch 2), two CLIPTextModelWithProjection (pooled 64),
    a T5 encoder, a 16-channel VAE with SD3's scaling/shift and no quant convs, FlowMatchEuler with shift 3.

    Users drop T5 at load time (``from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``; SD3 then
    feeds zeros in its place), so the folder has it as the hub's does: a folder saved without it would not load
    with a plain ``from_pretrained``."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_DIM,
        pos_embed_max_size=16,
    ).eval()
    tokenizer = clip_tokenizer()
    t5_tok = t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=kl_vae(
            16,
            seed=seed,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=clip_text_encoder(tokenizer, with_projection=True, seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(tokenizer, with_projection=True, seed=seed + 1),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_text_encoder(t5_tok, d_model=T5_DIM, seed=seed),
        tokenizer_3=t5_tok,
    )
    return _save(pipe, folder)


def tiny_pixart(
    folder: Path | str, legacy_class_name: bool = True, seed: int = 0, flow: bool = False
) -> Path:
    """PixArtAlphaPipeline: PixArtTransformer2DModel (ada_norm_single) with learned sigma (8 = 2 x 4 output
    channels), a T5 encoder, DPM-Solver++ as PixArt-alpha/PixArt-XL-2-1024-MS; ``legacy_class_name`` writes
    the hub's ``Transformer2DModel`` class name. ``flow``: a flow-matching PixArtSigmaPipeline instead, as the
    shipped ``fashion-flow`` teacher (4 output channels, DPM-Solver on flow sigmas with ``flow_prediction``)."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=TEXT_DIM,
        in_channels=4,
        out_channels=4 if flow else 8,
        cross_attention_dim=24,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    tokenizer = t5_tokenizer()
    scheduler = (
        DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.0)
        if flow
        else DPMSolverMultistepScheduler()
    )
    pipe = (PixArtSigmaPipeline if flow else PixArtAlphaPipeline)(
        tokenizer=tokenizer,
        text_encoder=t5_text_encoder(tokenizer, seed=seed),
        vae=kl_vae(seed=seed),
        transformer=transformer,
        scheduler=scheduler,
    )
    folder = _save(pipe, folder)
    if legacy_class_name:
        _legacy_transformer_class(folder)
    return folder


def tiny_sana(folder: Path | str, seed: int = 0) -> Path:
    """SanaPipeline: SanaTransformer2DModel (linear attention, patch 1), a Gemma2 text encoder with a Gemma
    tokenizer, AutoencoderDC, and DPM-Solver on flow sigmas (``flow_prediction``) as Sana's hub folders."""
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=TEXT_DIM,
    ).eval()
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    tokenizer = gemma_tokenizer()
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=gemma2_text_encoder(tokenizer, seed=seed),
        vae=dc_vae(4, seed=seed),
        transformer=transformer,
        scheduler=scheduler,
    )
    return _save(pipe, folder)


def tiny_flux(folder: Path | str, seed: int = 0) -> Path:
    """FluxPipeline as FLUX.1-dev: FluxTransformer2DModel with ``guidance_embeds=True`` (distilled guidance),
    CLIPTextModel (pooled) + T5, a 16-channel VAE with Flux's scaling/shift (2 x 2 patches packed into 64
    transformer channels), FlowMatchEuler with resolution-dependent shift."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    tokenizer, t5_tok = clip_tokenizer(), t5_tokenizer()
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=kl_vae(
            16,
            seed=seed,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=clip_text_encoder(tokenizer, seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=t5_text_encoder(t5_tok, seed=seed),
        tokenizer_2=t5_tok,
    )
    return _save(pipe, folder)


def tiny_dit(folder: Path | str, legacy_class_name: bool = True, seed: int = 0) -> Path:
    """DiTPipeline: class-conditional DiTTransformer2DModel (ada_norm_zero) with learned sigma (8 = 2 x 4
    output channels), a KL VAE, DDIM on DiT's linear betas, and ``id2label`` ("class 0", ...) in
    model_index.json as facebook/DiT-XL-2-256 has it (``save_pretrained`` leaves it out). 1000 classes, as
    ImageNet, because DiTPipeline's null class for guidance is fixed at 1000; ``legacy_class_name`` as for
    :func:`tiny_pixart`."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    ).eval()
    scheduler = DDIMScheduler(
        beta_schedule="linear", clip_sample=False
    )  # as scripts/convert_dit_to_diffusers.py
    id2label = {str(i): f"class {i}" for i in range(1000)}
    pipe = DiTPipeline(transformer=transformer, vae=kl_vae(seed=seed), scheduler=scheduler, id2label=id2label)
    folder = _save(pipe, folder)
    _update_json(folder / "model_index.json", id2label=id2label)
    if legacy_class_name:
        _legacy_transformer_class(folder)
    return folder


def tiny_ldm(folder: Path | str, vae: str = "vq", seed: int = 0) -> Path:
    """Unconditional LDMPipeline: UNet2DModel on 8 x 8 latents, DDIM. ``vae="vq"``: a VQModel as
    CompVis/ldm-celebahq-256; ``"kl"``: an AutoencoderKL in the ``vqvae`` slot (LDMPipeline only calls
    ``decode`` and ``config.scaling_factor``, which AutoencoderKL has too)."""
    if vae not in ("vq", "kl"):
        raise ValueError(f"vae must be 'vq' or 'kl', got {vae!r}")
    autoencoder = vq_vae(seed) if vae == "vq" else kl_vae(seed=seed)
    channels = autoencoder.config.latent_channels
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False
    )
    return _save(LDMPipeline(vqvae=autoencoder, unet=unet, scheduler=scheduler), folder)


def tiny_pixel_ddpm(folder: Path | str, seed: int = 0) -> Path:
    """DDPMPipeline on 32 x 32 x 3 pixels (google/ddpm-cifar10-32's layout at toy width)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=PIXEL_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    return _save(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), folder)


# family name -> builder(folder) -> folder, for the ``tiny_pipeline_dir`` fixture and parametrized tests
FAMILIES: dict[str, Callable[[Path | str], Path]] = {
    "sd": tiny_sd,
    "sd_v": partial(tiny_sd, prediction_type="v_prediction"),
    "sdxl": tiny_sdxl,
    "sd3": tiny_sd3,
    "pixart": tiny_pixart,
    "pixart_flow": partial(tiny_pixart, legacy_class_name=False, flow=True),
    "sana": tiny_sana,
    "flux": tiny_flux,
    "dit": tiny_dit,
    "ldm_vq": partial(tiny_ldm, vae="vq"),
    "ldm_kl": partial(tiny_ldm, vae="kl"),
    "ddpm": tiny_pixel_ddpm,
}

# family name -> the side in pixels of the image its pipeline makes from 8 x 8 latents (32 x 32 pixels for DDPM)
IMAGE_SIZES: dict[str, int] = {
    **dict.fromkeys(FAMILIES, IMAGE_SIZE),
    "sana": SANA_IMAGE_SIZE,
    "ddpm": PIXEL_SIZE,
}
PROMPT_FAMILIES = ("sd", "sd_v", "sdxl", "sd3", "pixart", "pixart_flow", "sana", "flux")


def call_kwargs(family: str, condition: str | int | None = None) -> dict:
    """Keyword arguments for one call of ``family``'s pipeline at its tiny size: a prompt (text families,
    ``condition`` or "a photo of a cat"), ``class_labels`` (DiT, ``condition`` or class 1) or nothing
    (LDM/DDPM), with ``height``/``width`` where the pipeline's default is not the tiny size (Flux defaults to
    256 px; PixArt and Sana bin sizes to >= 256 px unless ``use_resolution_binning=False``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    if family == "dit":
        return {"class_labels": [1 if condition is None else int(condition)]}
    if family not in PROMPT_FAMILIES:
        return {}
    kwargs: dict = {"prompt": "a photo of a cat" if condition is None else str(condition)}
    if family in ("pixart", "pixart_flow", "sana", "flux"):
        kwargs.update(height=IMAGE_SIZES[family], width=IMAGE_SIZES[family])
    if family in ("pixart", "pixart_flow", "sana"):
        kwargs["use_resolution_binning"] = False
    return kwargs
