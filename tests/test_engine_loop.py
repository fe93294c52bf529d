import json
import logging
import math
import re

import pytest
import torch
from toy_recipe import ToyConfig, ToyRecipe, critic_loss, final_weights, generator_loss, toy_data, toy_models

from engine.checkpoint import list_checkpoints, resolve_resume
from engine.ema import EMA
from engine.trainer import Trainer


def make(tmp_path, **kw) -> Trainer:
    base = dict(output_dir=str(tmp_path), log_with="none", progress_bar=False, batch_size=8, max_steps=10)
    cfg = ToyConfig(**{**base, **kw})
    return Trainer(cfg, ToyRecipe(cfg))


def reference_one_step(cfg: ToyConfig) -> dict[str, torch.Tensor]:
    """One SGD step of each phase on the full dataset as one batch, written out by hand."""
    models = toy_models(cfg)
    x = toy_data(cfg)
    for phase, loss_fn in (("critic", critic_loss), ("generator", generator_loss)):
        net = models[phase]
        net.zero_grad()
        loss_fn(models, x).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= cfg.lr * p.grad
    return {f"{n}.{k}": v for n in ("critic", "generator") for k, v in models[n].state_dict().items()}


def assert_weights_close(got: dict, want: dict, exact: bool = False):
    for key, value in want.items():
        if exact:
            assert torch.equal(got[key], value), key
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_accumulation_equals_full_batch(tmp_path):
    trainer = make(
        tmp_path,
        optimizer="sgd",
        dataset_size=16,
        batch_size=4,
        gradient_accumulation_steps=4,
        shuffle=False,
        max_steps=1,
    )
    trainer.train_step()
    assert_weights_close(final_weights(trainer), reference_one_step(trainer.config))


def test_accumulation_test_can_fail(tmp_path):
    """Guard: a step on only the first micro-batch must NOT match the full-batch reference."""
    trainer = make(tmp_path, optimizer="sgd", dataset_size=16, batch_size=4, shuffle=False, max_steps=1)
    trainer.train_step()
    with pytest.raises(AssertionError):
        assert_weights_close(final_weights(trainer), reference_one_step(trainer.config))


def test_frozen_and_idle_models_hold_no_gradients(tmp_path):
    trainer = make(tmp_path)
    teacher = trainer.frozen["teacher"]
    seen = {}

    def spy(phase, batch, models, loss=trainer.recipe.loss):
        out = loss(phase, batch, models)
        seen[phase] = {
            n: [p.requires_grad for p in trainer.accelerator.unwrap_model(tm.module).parameters()]
            for n, tm in trainer.trained.items()
        }
        return out

    trainer.recipe.loss = spy
    trainer.train_step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert all(seen["generator"]["generator"]) and not any(seen["generator"]["critic"])
    assert all(seen["critic"]["critic"]) and not any(seen["critic"]["generator"])
    teacher_ids = {id(p) for p in teacher.parameters()}
    for tm in trainer.trained.values():
        held = {id(p) for g in tm.optimizer.param_groups for p in g["params"]}
        assert not held & teacher_ids
        assert all(p.grad is None for p in trainer.accelerator.unwrap_model(tm.module).parameters())


def test_optimizer_holding_frozen_param_is_refused(tmp_path):
    cfg = ToyConfig(output_dir=str(tmp_path), log_with="none")
    recipe = ToyRecipe(cfg)
    setup = recipe.setup

    def bad_setup(trainer):
        parts = setup(trainer)
        parts.trained["critic"].optimizer.add_param_group(
            {"params": list(parts.frozen["teacher"].parameters())}
        )
        return parts

    recipe.setup = bad_setup
    with pytest.raises(ValueError, match="frozen"):
        Trainer(cfg, recipe)


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_module"])
def test_resume_after_crash_equals_uninterrupted(tmp_path, shared):
    common = dict(
        shared=shared,
        max_steps=60,
        checkpoint_every=10,
        checkpoints_total_limit=10,
        ema_halflife_images=200,
        dataset_size=64,
        batch_size=8,
    )
    straight = make(tmp_path / "a", **common)
    straight.fit()
    want = final_weights(straight)

    crashing = make(tmp_path / "b", crash_at_step=35, **common)
    with pytest.raises(RuntimeError, match="injected crash"):
        crashing.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "b")][-1] == "step_30"
    resumed = make(tmp_path / "b", resume_from="latest", **common)
    assert resumed.step == 30 and resumed.stream.position == 30 * 1 % 8  # mid-epoch
    resumed.fit()
    got = final_weights(resumed)
    assert set(got) == set(want)
    assert_weights_close(got, want, exact=True)
    # and the check is sensitive: a run that lost its data position ends elsewhere
    lost = make(tmp_path / "b", resume_from=str(tmp_path / "b/checkpoints/step_30"), **common)
    lost.stream.load_state_dict({"epoch": 0, "position": 0})
    lost.fit()
    assert not torch.equal(final_weights(lost)["generator.0.weight"], want["generator.0.weight"])


def test_checkpoint_is_atomic_and_pruned(tmp_path, monkeypatch):
    trainer = make(tmp_path, max_steps=4, checkpoint_every=1, checkpoints_total_limit=2)
    trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_4"]
    state = json.loads((tmp_path / "checkpoints/step_4/trainer_state.json").read_text())
    assert state["step"] == 4

    def dying_save_state(output_dir, **kw):
        (tmp_path / "checkpoints" / ".tmp-step_5" / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(trainer.accelerator, "save_state", dying_save_state)
    trainer.step = 5
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_4"]
    assert (tmp_path / "checkpoints" / ".tmp-step_5").is_dir()  # the half-written one stays hidden
    assert resolve_resume("latest", tmp_path).name == "step_4"
    (tmp_path / "checkpoints" / ".tmp-step_9").mkdir()
    (tmp_path / "checkpoints" / "step_x").mkdir()
    assert resolve_resume("latest", tmp_path).name == "step_4"


def test_bad_resume_path_fails_before_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        make(tmp_path, resume_from=str(tmp_path / "missing"))


@pytest.mark.parametrize("mode", ["zero", "skip", "error"])
def test_nonfinite_gradients(tmp_path, mode):
    trainer = make(tmp_path, nonfinite_grads=mode)
    loss = trainer.recipe.loss

    def poisoned(phase, batch, models):
        out = loss(phase, batch, models)
        if phase == "generator":
            return out[0] * float("nan"), out[1]
        return out

    trainer.recipe.loss = poisoned
    before = {k: v.clone() for k, v in final_weights(trainer).items()}
    if mode == "error":
        with pytest.raises(FloatingPointError, match="generator"):
            trainer.train_step()
        return
    trainer.train_step()
    after = final_weights(trainer)
    assert trainer.nonfinite_steps == {"critic": 0, "generator": 1}
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(after["critic.0.weight"], before["critic.0.weight"])
    if mode == "skip":
        assert torch.equal(after["generator.0.weight"], before["generator.0.weight"])


def test_ema_halflife_in_images(tmp_path):
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, halflife_images=1000, rampup_ratio=None)
    assert ema.beta(1000, 5000) == pytest.approx(0.5)
    ramp = EMA(net, halflife_images=1000, rampup_ratio=0.05)
    assert ramp.beta(10, 2000) == pytest.approx(0.5 ** (10 / 100))
    old = ema.module.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, 1000, 5000)
    torch.testing.assert_close(ema.module.weight, 0.5 * old + 0.5 * net.weight.detach())
    ema.save(tmp_path / "e.safetensors")
    other = EMA(torch.nn.Linear(2, 2), 1000)
    other.load(tmp_path / "e.safetensors")
    assert torch.equal(other.module.weight, ema.module.weight)


def test_trainer_ema_follows_generator(tmp_path):
    trainer = make(tmp_path, ema_halflife_images=64, max_steps=3)
    g0 = {k: v.clone() for k, v in trainer.emas["generator"].module.state_dict().items()}
    trainer.train_step()
    gen = trainer.accelerator.unwrap_model(trainer.trained["generator"].module).state_dict()
    beta = 0.5 ** (8 / min(64, 8 * 0.05))
    for k, v in trainer.emas["generator"].module.state_dict().items():
        torch.testing.assert_close(v, beta * g0[k] + (1 - beta) * gen[k])


def first_layer_dtypes(models: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, torch.dtype]:
    seen = {}
    hooks = [
        m[0].register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(k, o.dtype))
        for k, m in models.items()
    ]
    with torch.no_grad():
        for model in models.values():
            model(x)
    for hook in hooks:
        hook.remove()
    return seen


def test_ema_copy_runs_in_its_own_precision_under_bf16(tmp_path):
    """accelerate's autocast forward stays on the trained model and is not copied into the EMA (evaluated, exported)."""
    trainer = make(tmp_path, ema_halflife_images=64, max_steps=1, mixed_precision="bf16")
    models = {
        "trained": trainer.accelerator.unwrap_model(trainer.trained["generator"].module),
        "ema": trainer.emas["generator"].module,
    }
    x = torch.randn(4, models["ema"][0].in_features)
    assert first_layer_dtypes(models, x) == {"trained": torch.bfloat16, "ema": torch.float32}
    trainer.train_step()  # the EMA's update and the loop leave the trained model's autocast in place
    assert first_layer_dtypes(models, x) == {"trained": torch.bfloat16, "ema": torch.float32}


def test_tensorboard_logs_and_sample_grid(tmp_path):
    trainer = make(tmp_path, log_with="tensorboard", max_steps=4, log_every=2)
    trainer.fit()
    path = trainer.log_images("samples", torch.rand(5, 1, 8, 8) * 2 - 1, upscale=2)
    assert path.is_file() and path.parent.name == "samples"
    events = list((tmp_path / "logs").rglob("events.out.tfevents*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "generator/loss" in acc.Tags()["scalars"]
    assert all(math.isfinite(e.value) for e in acc.Scalars("critic/loss"))


def test_shared_parameters_need_explicit_subsets(tmp_path):
    cfg = ToyConfig(output_dir=str(tmp_path), log_with="none", shared=True)
    recipe = ToyRecipe(cfg)
    setup = recipe.setup

    def sloppy(trainer):
        parts = setup(trainer)
        parts.trained["critic"].parameters = None
        return parts

    recipe.setup = sloppy
    with pytest.raises(ValueError, match="share parameters"):
        Trainer(cfg, recipe)


def test_lr_decays_linearly_over_the_run_and_resumes_exactly(tmp_path):
    common = dict(
        optimizer="sgd",
        max_steps=10,
        lr_decay_start=0.5,
        lr_decay_final=0.1,
        checkpoint_every=4,
        checkpoints_total_limit=10,
        dataset_size=64,
        batch_size=8,
    )

    def record(trainer):
        lrs, run_phase = [], trainer._run_phase

        def spy(phase, micro_batches):
            if phase == "generator":
                lrs.append(trainer.trained[phase].optimizer.param_groups[0]["lr"])
            return run_phase(phase, micro_batches)

        trainer._run_phase = spy
        return lrs

    straight = make(tmp_path / "a", **common)
    lrs = record(straight)
    straight.fit()
    lr = straight.config.lr
    factors = [1.0] * 6 + [1 - 0.9 * (k / 10 - 0.5) / 0.5 for k in range(6, 10)]  # step k uses k / max_steps
    assert lrs == pytest.approx([lr * f for f in factors])

    crashing = make(tmp_path / "b", crash_at_step=6, **common)
    with pytest.raises(RuntimeError, match="injected crash"):
        crashing.fit()
    resumed = make(tmp_path / "b", resume_from="latest", **common)
    assert resumed.step == 4
    resumed_lrs = record(resumed)
    resumed.fit()
    assert resumed_lrs == pytest.approx(lrs[4:])
    assert_weights_close(final_weights(resumed), final_weights(straight), exact=True)

    # a time budget counts too: progress is the larger share, and the decay follows it
    timed = make(tmp_path / "c", **{**common, "max_steps": 1000, "max_minutes": 10.0})
    timed._time_used = 0.75
    assert timed.progress() == 0.75
    timed.train_step()
    assert timed.trained["critic"].optimizer.param_groups[0]["lr"] == pytest.approx(lr * (1 - 0.9 * 0.5))


def test_resume_with_another_lr_uses_the_configured_one(tmp_path, capsys):
    """A second stage resumed at a lower lr trains at that lr (the checkpoint's optimiser state holds the old
    one), under the engine's decay too, and says so; Adam's moments still come from the checkpoint."""
    common = dict(max_steps=8, checkpoint_every=4, lr_decay_start=0.5, lr_decay_final=0.1, dataset_size=64)
    make(tmp_path, **common).fit()
    step_4 = str(tmp_path / "checkpoints/step_4")
    resumed = make(tmp_path, resume_from=step_4, **{**common, "lr": 0.01})
    assert (
        "learning rate 0.05 in the checkpoint, 0.01 from this run's configuration" in capsys.readouterr().out
    )
    moments = resumed.trained["critic"].optimizer.state_dict()["state"]
    assert moments and all(int(v["step"]) == 4 for v in moments.values())  # Adam's state was resumed
    used = []
    for _ in range(4):
        resumed.train_step()
        used.append(resumed.trained["critic"].optimizer.param_groups[0]["lr"])
    assert used == pytest.approx([0.01 * (1 - 0.9 * (k / 8 - 0.5) / 0.5) for k in range(4, 8)])
    # the same lr keeps the checkpoint's state as it was and prints nothing
    make(tmp_path, resume_from=step_4, **common)
    assert "learning rate" not in capsys.readouterr().out


def test_lr_decay_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="lr_decay_start=1.5"):
        make(tmp_path, lr_decay_start=1.5)
    with pytest.raises(ValueError, match="lr_decay_final=-0.1"):
        make(tmp_path, lr_decay_final=-0.1)


def test_lr_warmup_then_decay_is_the_product_of_both(tmp_path):
    """Warm-up counts steps, decay counts the share of the run; the engine applies both to every trained model."""
    trainer = make(
        tmp_path, optimizer="sgd", max_steps=10, lr_warmup_steps=4, lr_decay_start=0.5, lr_decay_final=0.1
    )
    lrs = []
    for _ in range(10):
        trainer.train_step()
        lrs.append(trainer.trained["critic"].optimizer.param_groups[0]["lr"])
    lr = trainer.config.lr
    warm = [min(1.0, (k + 1) / 4) for k in range(10)]
    decay = [1.0] * 6 + [1 - 0.9 * (k / 10 - 0.5) / 0.5 for k in range(6, 10)]
    assert lrs == pytest.approx([lr * w * d for w, d in zip(warm, decay)])
    assert lrs[0] == pytest.approx(lr / 4)


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            {"lr_decay_start": 0.5},
            "lr_decay_start=0.5, lr_warmup_steps=0 but the recipe gives 'critic' its own",
        ),
        (
            {"lr_warmup_steps": 5},
            "lr_decay_start=1.0, lr_warmup_steps=5 but the recipe gives 'critic' its own",
        ),
    ],
)
def test_engine_lr_schedule_refuses_a_recipe_scheduler(tmp_path, setting, message):
    cfg = ToyConfig(output_dir=str(tmp_path), log_with="none", **setting)
    recipe = ToyRecipe(cfg)
    setup = recipe.setup

    def setup_with_scheduler(trainer):
        parts = setup(trainer)
        critic = parts.trained["critic"]
        critic.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(critic.optimizer, lambda s: 1.0)
        return parts

    recipe.setup = setup_with_scheduler
    with pytest.raises(ValueError, match=re.escape(message)):
        Trainer(cfg, recipe)


def test_resume_latest_without_checkpoint_warns_and_starts_fresh(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="engine")
    trainer = make(tmp_path, resume_from="latest", max_steps=2)
    want = f"resume_from=latest: no checkpoint in {tmp_path / 'checkpoints'}; starting a fresh run"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [want]
    assert trainer.step == 0
    # the run's setup is logged once at the start: distribution, processes, device, precision, threads
    (setup,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert setup.startswith("distributed_type=NO, 1 process, device=cpu, mixed_precision=no, ")
    assert f"{torch.get_num_threads()} torch thread" in setup
    trainer.fit()
    caplog.clear()
    resumed = make(tmp_path, resume_from="latest", max_steps=3)
    assert resumed.step == 2 and not [r for r in caplog.records if r.levelno == logging.WARNING]
