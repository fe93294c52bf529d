"""ConditionSource: the conditions a recipe trains and evaluates on, for unconditional, class and prompt teachers.

Prompt conditions are the cached embedding rows of the drawn prompts, placed in the Condition fields the family's
denoiser takes (SDXL's pooled text with the pipeline's own time ids); class conditions draw exactly as SiD always
did; dropout swaps in the null condition; mismatched settings fail at start-up, before any weights are loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_models import sid_trainer
from tiny_pipelines import IMAGE_SIZES

from distill.teachers import conditions as C
from distill.teachers.conditions import ConditionSource, check_conditioning
from distill.teachers.denoiser import Condition
from distill.teachers.edm import drop_labels
from distill.teachers.families import describe_teacher_source
from distill.teachers.prompts import encode_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a red car in the city", "a dog sitting on the grass", "a bowl of fruit"]
#: family -> (Condition.model_kwargs keys, Condition.added_cond_kwargs keys)
LAYOUT = {
    "sd": (set(), set()),
    "sdxl": (set(), {"text_embeds", "time_ids"}),
    "sd3": ({"pooled_projections"}, set()),
    "pixart": ({"encoder_attention_mask"}, set()),
    "sana": ({"encoder_attention_mask"}, set()),
    "flux": ({"pooled_projections"}, set()),
}
TEXT_FAMILIES = sorted(LAYOUT)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")  # a trailing blank line is skipped
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prompt_cache")


@pytest.fixture(scope="module")
def source(tiny_pipeline_dir, prompt_file, cache_dir):
    """Factory: the prompt ConditionSource of a tiny family's pipeline (built once per family and negative)."""
    built: dict[tuple[str, str], ConditionSource] = {}

    def make(family: str, negative_prompt: str = "") -> ConditionSource:
        if (family, negative_prompt) not in built:
            folder = str(tiny_pipeline_dir(family))
            built[family, negative_prompt] = ConditionSource.for_teacher(
                folder,
                describe_teacher_source(folder),
                prompts=str(prompt_file),
                negative_prompt=negative_prompt,
                cache_dir=cache_dir,
            )
        return built[family, negative_prompt]

    return make


def _equal(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _assert_rows(cond: Condition, embeds: dict[str, torch.Tensor], family: str) -> None:
    """``cond`` holds exactly ``embeds`` (the PromptEmbeddings rows) in the family's fields."""
    model_keys, added_keys = LAYOUT[family]
    assert cond.class_labels is None
    _equal(cond.encoder_hidden_states, embeds["encoder_hidden_states"])
    assert set(cond.model_kwargs or {}) == model_keys
    assert set(cond.added_cond_kwargs or {}) == added_keys
    for k in model_keys:
        _equal(cond.model_kwargs[k], embeds[k])
    if added_keys:
        _equal(cond.added_cond_kwargs["text_embeds"], embeds["text_embeds"])


# ---------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_prompt_conditions_are_the_cached_rows_of_the_drawn_prompts(source, family):
    src = source(family)
    assert src.kind == "prompts" and src.num_prompts == len(PROMPTS) and src.has_null
    cond, null = src.sample(6, "cpu", generator=torch.Generator().manual_seed(0))
    drawn = torch.randint(0, len(PROMPTS), (6,), generator=torch.Generator().manual_seed(0))
    assert len(set(drawn.tolist())) > 1  # the check below can tell rows apart
    assert cond.batch_size == null.batch_size == 6
    _assert_rows(cond, src.embeddings.embeds(drawn), family)
    _assert_rows(null, src.embeddings.null(6), family)
    assert "txt_ids" not in (cond.model_kwargs or {})  # Flux's ids are built by the Denoiser
    # the same null as the pipeline's: the negative prompt's row, the same for every sample
    for k, v in null.tensors().items():
        assert (v == v[:1]).all(), k
    assert src.prompt_texts(drawn) == [PROMPTS[i] for i in drawn]
    # Condition machinery works on them: the CFG batch and moving
    both = Condition.cat(cond, null)
    assert (
        both.batch_size == 12 and both.to("cpu", torch.float64).encoder_hidden_states.dtype == torch.float64
    )


def test_negative_prompt_is_the_null_condition(source):
    plain, negative = source("sd"), source("sd", negative_prompt="blurry")
    assert plain.embeddings.folder != negative.embeddings.folder
    _, null = negative.sample(2, "cpu")
    _equal(null.encoder_hidden_states, negative.embeddings.null(2)["encoder_hidden_states"])
    assert not torch.equal(null.encoder_hidden_states, plain.sample(2, "cpu")[1].encoder_hidden_states)
    # the training rows do not depend on the negative prompt
    idx = torch.arange(len(PROMPTS))
    _equal(negative.fixed(idx)[0].encoder_hidden_states, plain.fixed(idx)[0].encoder_hidden_states)
    assert "negative 'blurry'" in negative.describe()


def test_sdxl_time_ids_are_the_pipelines_own(source, tiny_pipeline_dir):
    src = source("sdxl")
    pipe = DiffusionPipeline.from_pretrained(str(tiny_pipeline_dir("sdxl")))
    size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2  # what a plain pipe(prompt) uses
    want = pipe._get_add_time_ids(
        size,
        (0, 0),
        size,
        torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    assert src.image_size == size
    cond, null = src.sample(3, "cpu")
    for c in (cond, null):
        _equal(c.added_cond_kwargs["time_ids"], want.repeat(3, 1))
    # another image size gives its own time ids
    other = ConditionSource.prompts(src.embeddings, (48, 64), "sdxl")
    want = pipe._get_add_time_ids(
        (48, 64), (0, 0), (48, 64), torch.float32, pipe.text_encoder_2.config.projection_dim
    )
    _equal(other.fixed(torch.arange(2))[0].added_cond_kwargs["time_ids"], want.repeat(2, 1))
    with pytest.raises(ValueError, match="time_ids need the image size"):
        ConditionSource.prompts(src.embeddings, None, "sdxl")


def test_fixed_conditions_are_deterministic_and_cycle_the_prompts(source):
    src = source("pixart")
    idx = torch.arange(10)
    first, null = src.fixed(idx)
    again, _ = src.fixed(idx)
    _assert_rows(first, src.embeddings.embeds(idx % len(PROMPTS)), "pixart")
    _assert_rows(null, src.embeddings.null(10), "pixart")
    for k, v in first.tensors().items():
        _equal(v, again.tensors()[k])
    # a later chunk of the same indices is the same rows (evaluation splits its samples in chunks)
    _equal(src.fixed(idx[6:])[0].encoder_hidden_states, first.encoder_hidden_states[6:])


def test_prompt_dropout(source):
    src = source("sd")
    cond, null = src.sample(1000, "cpu", generator=torch.Generator().manual_seed(1))
    assert src.drop(cond, null, 0.0) is cond  # p = 0 draws nothing, changes nothing
    _equal(src.drop(cond, null, 1.0).encoder_hidden_states, null.encoder_hidden_states)
    dropped = src.drop(cond, null, 0.3, generator=torch.Generator().manual_seed(2))
    is_null = (dropped.encoder_hidden_states == null.encoder_hidden_states).flatten(1).all(1)
    is_cond = (dropped.encoder_hidden_states == cond.encoder_hidden_states).flatten(1).all(1)
    assert (is_null ^ is_cond).all()  # each row is its prompt or the null, never a mix
    assert 0.23 < is_null.float().mean() < 0.37  # binomial(1000, 0.3): sd 0.0145
    want = torch.rand(1000, generator=torch.Generator().manual_seed(2)) < 0.3
    assert torch.equal(is_null, want)
    # the mask moves with the rows in every field (SDXL's pooled text too; time ids are equal anyway)
    xl = source("sdxl")
    c, n = xl.sample(64, "cpu", generator=torch.Generator().manual_seed(3))
    d = xl.drop(c, n, 0.5, generator=torch.Generator().manual_seed(4))
    rows = (d.encoder_hidden_states == n.encoder_hidden_states).flatten(1).all(1)
    pooled = (d.added_cond_kwargs["text_embeds"] == n.added_cond_kwargs["text_embeds"]).all(1)
    assert torch.equal(rows, pooled) and 0 < rows.sum() < 64
    with pytest.raises(ValueError, match="needs the null"):
        src.drop(cond, None, 0.5)
    with pytest.raises(ValueError, match=r"p=1.5 must be in \[0, 1\]"):
        src.drop(cond, null, 1.5)


def test_describe_names_the_prompts_and_the_cache(source, cache_dir):
    line = source("sd").describe()
    assert line.startswith(f"conditions: {len(PROMPTS)} prompts from prompts.txt (StableDiffusionPipeline")
    assert str(cache_dir) in line and "negative ''" in line


# ---------------------------------------------------------------------------------------------- classes
def test_class_conditions_draw_as_sid_always_did():
    src = ConditionSource.classes(10, 10)
    torch.manual_seed(3)
    cond, null = src.sample(64, "cpu")
    after = torch.rand(1)
    torch.manual_seed(3)
    want = torch.randint(0, 10, (64,), device="cpu")
    assert torch.equal(cond.class_labels, want) and torch.equal(after, torch.rand(1))  # same RNG use
    assert torch.equal(null.class_labels, torch.full((64,), 10))
    with_gen, _ = src.sample(64, "cpu", generator=torch.Generator().manual_seed(5))
    assert torch.equal(
        with_gen.class_labels, torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(5))
    )
    fixed, fixed_null = src.fixed(torch.arange(25))
    assert torch.equal(fixed.class_labels, torch.arange(25) % 10) and (fixed_null.class_labels == 10).all()
    assert src.describe() == "conditions: 10 classes, null class 10"


def test_label_dropout_is_drop_labels():
    src = ConditionSource.classes(10, 10)
    cond, null = src.sample(500, "cpu", generator=torch.Generator().manual_seed(0))
    labels = cond.class_labels
    got = src.drop(cond, null, 0.4, generator=torch.Generator().manual_seed(7)).class_labels
    assert torch.equal(got, drop_labels(labels, 0.4, 10, generator=torch.Generator().manual_seed(7)))
    assert 0.3 < (got == 10).float().mean() < 0.5
    torch.manual_seed(8)
    got = src.drop(cond, null, 0.4).class_labels
    torch.manual_seed(8)
    assert torch.equal(got, drop_labels(labels, 0.4, 10))  # the global RNG, as fake_score_step always used
    assert src.drop(cond, null, 0.0).class_labels is labels
    assert (src.drop(cond, None, 1.0).class_labels == 10).all()  # labels need no null condition


def test_classes_without_a_null_class_and_unconditional_teachers():
    src = ConditionSource.classes(10, None)
    cond, null = src.sample(8, "cpu")
    assert null is None and src.fixed(torch.arange(3))[1] is None and not src.has_null
    with pytest.raises(ValueError, match="no null class"):
        src.drop(cond, null, 0.1)
    assert src.describe() == "conditions: 10 classes, no null class"
    none = ConditionSource.unconditional()
    state = torch.get_rng_state()
    assert none.sample(8, "cpu") == (None, None) and none.fixed(torch.arange(4)) == (None, None)
    assert torch.equal(state, torch.get_rng_state())  # an unconditional teacher draws nothing
    assert none.drop(None, None, 0.5) is None and not none.has_null


# ----------------------------------------------------------------------------------- start-up errors
def test_a_text_teacher_without_prompts_is_refused(tiny_pipeline_dir):
    folder = str(tiny_pipeline_dir("sd"))
    with pytest.raises(
        ValueError, match=r"teacher .*\(StableDiffusionPipeline\) is conditioned on text: pass --prompts FILE"
    ):
        ConditionSource.for_teacher(folder, describe_teacher_source(folder))


def test_prompts_for_a_teacher_without_text_are_refused(teacher_dir, class_teacher_dir, prompt_file):
    for folder, what in ((teacher_dir, "unconditional"), (class_teacher_dir, "class-conditional")):
        family = describe_teacher_source(folder)
        with pytest.raises(ValueError, match=rf"prompts=.*is {what} and takes no prompts"):
            ConditionSource.for_teacher(str(folder), family, prompts=str(prompt_file), num_classes=10)
        with pytest.raises(ValueError, match="negative_prompt='ugly'.* takes no prompts"):
            check_conditioning(str(folder), family, None, negative_prompt="ugly")
    family = describe_teacher_source(class_teacher_dir)
    assert (
        ConditionSource.for_teacher(str(class_teacher_dir), family, num_classes=10, null_label=10).kind
        == "classes"
    )
    assert ConditionSource.for_teacher(str(teacher_dir), describe_teacher_source(teacher_dir)).kind == "none"


def test_a_missing_prompt_file_is_named_before_any_encoder_loads(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(C, "encode_prompts", lambda *a, **k: pytest.fail("encoded despite a missing file"))
    folder = str(tiny_pipeline_dir("sd"))
    missing = tmp_path / "nope" / "prompts.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ConditionSource.for_teacher(folder, describe_teacher_source(folder), prompts=str(missing))


def test_the_main_process_encodes_first(tiny_pipeline_dir, prompt_file, cache_dir):
    events = []

    class Accelerator:
        device = torch.device("cpu")

        def main_process_first(self):
            import contextlib

            @contextlib.contextmanager
            def ctx():
                events.append("enter")
                yield
                events.append("exit")

            return ctx()

    folder = str(tiny_pipeline_dir("sd"))
    src = ConditionSource.for_teacher(
        folder,
        describe_teacher_source(folder),
        prompts=str(prompt_file),
        accelerator=Accelerator(),
        cache_dir=cache_dir,
    )
    assert events == ["enter", "exit"]
    want = encode_prompts(folder, PROMPTS, cache_dir=cache_dir)
    assert src.embeddings.folder == want.folder  # the one cache every process reads


# ------------------------------------------------------------------------------------------ the SiD recipe
def test_sid_refuses_prompts_for_a_teacher_without_text_before_loading(
    tmp_path, teacher_dir, prompt_file, monkeypatch
):
    loads = []
    monkeypatch.setattr("recipes.sid.load_teacher", lambda *a, **k: loads.append(a))
    with pytest.raises(ValueError, match="is unconditional and takes no prompts"):
        sid_trainer(tmp_path, teacher_dir, prompts=str(prompt_file))
    assert loads == []


def test_sid_class_teacher_conditions_are_the_class_source(tmp_path, class_teacher_dir):
    trainer = sid_trainer(tmp_path, class_teacher_dir, guidance_scale=2.0)
    recipe = trainer.recipe
    assert recipe.conditions.kind == "classes" and recipe.conditions.null_label == 10
    assert recipe.quality.conditions is None and torch.equal(recipe.quality.labels, torch.arange(16) % 10)
    assert "10 classes, null class 10" in recipe.describe()


def test_sid_refuses_a_text_teacher_without_prompts_before_loading(tmp_path, tiny_pipeline_dir, monkeypatch):
    loads = []
    monkeypatch.setattr("recipes.sid.load_teacher", lambda *a, **k: loads.append(a))
    with pytest.raises(
        ValueError, match=r"\(StableDiffusionPipeline\) is conditioned on text: pass --prompts"
    ):
        sid_trainer(tmp_path, tiny_pipeline_dir("sd"))
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        sid_trainer(tmp_path, tiny_pipeline_dir("sd"), prompts=str(missing))
    assert loads == []


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_sid_trains_on_prompts_with_guidance_and_prompt_dropout(
    tmp_path, tiny_pipeline_dir, prompt_file, cache_dir, family
):
    """Two SiD iterations on each text family's tiny pipeline (latents), guided by the negative prompt: f_psi is
    trained on the null prompt (dropout 1), G's loss on the drawn prompts with their null for CFG."""
    trainer = sid_trainer(
        tmp_path,
        tiny_pipeline_dir(family),
        prompts=str(prompt_file),
        prompt_cache_dir=str(cache_dir),
        guidance_scale=2.0,
        guidance_scale_fake_train=1.0,
        label_dropout=1.0,
        batch_size=2,
        eval_samples=4,
        **({"resolution": IMAGE_SIZES[family]} if family == "flux" else {}),  # Flux configures no size
    )
    recipe = trainer.recipe
    assert recipe.conditions.kind == "prompts" and recipe.drops_labels  # f_psi is guided in G's loss
    assert f"{len(PROMPTS)} prompts from prompts.txt" in recipe.describe()
    embeddings = recipe.conditions.embeddings
    null_row = embeddings.null(1)["encoder_hidden_states"]
    # evaluation: the prompts cycled over the fixed samples
    fixed = recipe.quality.conditions(torch.arange(6))
    _assert_rows(fixed, embeddings.embeds(torch.arange(6) % len(PROMPTS)), family)
    seen = []  # (is f_psi, condition, null, scales) of every scored call
    original = recipe.guided

    def spy(model, x, sigma, cond, null, *scales):
        seen.append((model is trainer.models["fake_score"], cond, null, scales))
        return original(model, x, sigma, cond, null, *scales)

    recipe.guided = spy
    for _ in range(2):
        logs = trainer.train_step()
        assert logs and all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values()), logs
    assert trainer.step == 2
    train = [c for fake, c, _, scales in seen if fake and len(scales) == 1]  # f_psi's own loss
    assert len(train) == 2 and all((c.encoder_hidden_states == null_row).all() for c in train)  # dropout 1
    scored = [(c, n) for fake, c, n, scales in seen if len(scales) == 2 or not fake]  # G's loss
    assert len(scored) == 4
    for c, n in scored:
        assert n is not None and not (c.encoder_hidden_states == null_row).flatten(1).all(1).any()
        _assert_rows(n, embeddings.null(2), family)


def test_sid_fit_on_a_text_teacher_exports_a_student(tmp_path, tiny_pipeline_dir, prompt_file, cache_dir):
    trainer = sid_trainer(
        tmp_path,
        tiny_pipeline_dir("sd"),
        prompts=str(prompt_file),
        prompt_cache_dir=str(cache_dir),
        guidance_scale=2.0,
        batch_size=2,
        eval_samples=4,
    )
    trainer.fit()
    assert trainer.step == 2
    assert (tmp_path / "student" / "model_index.json").is_file()
    assert trainer.recipe.card_facts(trainer, {})["num_prompts"] == len(PROMPTS)


def test_sid_sdxl_time_ids_follow_the_resolution(tmp_path, tiny_pipeline_dir, prompt_file, cache_dir):
    trainer = sid_trainer(
        tmp_path,
        tiny_pipeline_dir("sdxl"),
        prompts=str(prompt_file),
        prompt_cache_dir=str(cache_dir),
        resolution=48,
        batch_size=2,
        eval_samples=4,
    )
    assert trainer.recipe.shape[-2:] == (48 // 2, 48 // 2)  # the tiny VAE halves the side
    _, cond, null = trainer.recipe.latents()
    want = torch.tensor([[48.0, 48, 0, 0, 48, 48]]).repeat(2, 1)
    _equal(cond.added_cond_kwargs["time_ids"], want)
    _equal(null.added_cond_kwargs["time_ids"], want)


def test_sid_evaluates_fashion_prompts_with_the_shipped_classifier(tmp_path, tiny_pipeline_dir):
    """eval_metrics=fashion: SiD's evaluation scores its decoded samples with the shipped Fashion-MNIST
    classifier (FD against the shipped statistics, prompt alignment by the prompt's class)."""
    from distill.fashion_mnist import caption

    prompts = tmp_path / "fashion.txt"
    prompts.write_text("\n".join(caption(label, 0) for label in range(10)) + "\n")
    trainer = sid_trainer(
        tmp_path,
        tiny_pipeline_dir("sd"),
        prompts=str(prompts),
        prompt_cache_dir=str(tmp_path / "cache"),
        eval_metrics="fashion",
        batch_size=2,
        eval_samples=20,
    )
    trainer.fit()
    last = trainer.recipe.quality.history[-1]
    assert {"fd", "align", "precision", "recall"} <= set(last), last
    assert 0.0 <= last["align"] <= 1.0 and last["fd"] > 0
