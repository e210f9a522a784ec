"""training.py: the wiring of one iteration (which batch each penalty sees, the lazy-regularisation
gains and Adam settings, the path-length mean stored back, which key logs which penalty), the EMA
and the learning-rate schedules."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import losses
import settings
import training
from settings import resolve_settings

DATA = SimpleNamespace(class_names=["AD", "NC"], channels=1)


def setup(**overrides):
    cfg = resolve_settings({k.upper(): v for k, v in overrides.items()}, "", "smoke")
    torch.manual_seed(0)
    run = training.build_run(cfg, DATA, torch.device("cpu"))
    real = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return cfg, run, real


class Recorder:
    """Wraps a function, keeping each call's arguments and result."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        result = self.fn(*args, **kwargs)
        self.calls.append((args, result))
        return result


def test_r1_is_taken_on_the_real_batch(monkeypatch):
    cfg, run, real = setup(loss="logistic", r1_gamma=1.0)
    spy = Recorder(losses.r1_penalty)
    monkeypatch.setattr(losses, "r1_penalty", spy)
    training.d_step(run, cfg, real, None, regularize=True)
    (args, _), = spy.calls
    assert torch.equal(args[1], real)


def test_the_gradient_penalty_sees_the_real_and_the_generated_batch(monkeypatch):
    cfg, run, real = setup(loss="wgan-gp")
    spy = Recorder(losses.gradient_penalty)
    monkeypatch.setattr(losses, "gradient_penalty", spy)
    training.d_step(run, cfg, real, None, regularize=True)
    (args, _), = spy.calls
    assert torch.equal(args[1], real) and args[2].shape == real.shape and not torch.allclose(args[2], real)


def test_d_scores_the_real_and_the_generated_batch_apart(monkeypatch):
    """D's main step scores both batches in one pass, with each batch's own minibatch-std groups:
    a real batch of one repeated slice must look as uniform to D as it does alone."""
    cfg, run, real = setup(loss="logistic")
    real = real[:1].repeat(8, 1, 1, 1)
    spy = Recorder(run.D.mbstd.forward)
    monkeypatch.setattr(run.D.mbstd, "forward", spy)
    training.d_step(run, cfg, real, None, regularize=False)
    out = spy.calls[-1][1]  # the outer call (its halves call forward too)
    assert out.shape[0] == 16 and (out[:8, -1] < 1e-3).all() and (out[8:, -1] > 1e-2).all()


@pytest.mark.parametrize("loss,weight", [("wgan-gp", "gp_lambda"), ("logistic", "r1_gamma")])
def test_the_d_penalty_gain_is_its_interval(monkeypatch, loss, weight):
    cfg, run, real = setup(loss=loss, r1_gamma=2.0, d_reg_interval=4)
    steps = Recorder(training.optimizer_step)
    monkeypatch.setattr(training, "optimizer_step", steps)
    stats = training.d_step(run, cfg, real, None, regularize=True)
    reg_loss = steps.calls[1][0][1]  # (optimiser, loss) of the penalty step
    scale = getattr(cfg, weight) / (2 if weight == "r1_gamma" else 1)  # R1 is gamma / 2 * |grad|^2
    logged = "r1" if loss == "logistic" else "gp"  # the key says which penalty it holds
    assert set(stats) & {"gp", "r1"} == {logged}
    assert reg_loss.item() == pytest.approx(stats[logged].item() * scale * 4, rel=1e-5)


def test_the_path_length_gain_is_its_interval_and_its_mean_is_stored_back(monkeypatch):
    cfg, run, real = setup(pl_interval=4, pl_weight=2.0, pl_decay=0.01)
    steps, penalties = Recorder(training.optimizer_step), Recorder(losses.path_length_penalty)
    monkeypatch.setattr(training, "optimizer_step", steps)
    monkeypatch.setattr(training, "path_length_penalty", penalties)
    assert run.pl_mean.item() == 0
    stats = training.g_step(run, cfg, None, len(real), regularize=True)
    reg_loss = steps.calls[1][0][1]
    assert reg_loss.item() == pytest.approx(stats["pl_penalty"].item() * 2.0 * 4, rel=1e-5)
    (_, (_, new_mean)), = penalties.calls
    assert run.pl_mean.item() == new_mean.item() > 0  # moved from 0 by the decay, and kept
    training.g_step(run, cfg, None, len(real), regularize=True)
    assert penalties.calls[1][0][2].item() == new_mean.item()  # the next penalty starts from it


def test_lazy_regularisation_adam_settings():
    cfg, run, _ = setup(loss="logistic", d_reg_interval=16, pl_interval=4)
    c_d, c_g = 16 / 17, 4 / 5
    assert run.opt_D.param_groups[0]["betas"] == pytest.approx((0.0, 0.99 ** c_d))
    assert run.opt_G.param_groups[0]["betas"] == pytest.approx((0.0, 0.99 ** c_g))
    training.set_learning_rates(run, cfg)
    assert run.opt_D.param_groups[0]["lr"] == pytest.approx(cfg.d_lr * c_d)
    assert run.opt_G.param_groups[0]["lr"] == pytest.approx(cfg.g_lr * c_g)


def test_mode_seeking_joins_g_s_loss_with_its_weight(monkeypatch):
    """G's one optimiser step takes its loss plus weight x the penalty of that step's own batch."""
    cfg, run, real = setup(mode_seeking=0.5)
    steps, penalties = Recorder(training.optimizer_step), Recorder(losses.mode_seeking_penalty)
    scored = Recorder(training.discriminate)
    monkeypatch.setattr(training, "optimizer_step", steps)
    monkeypatch.setattr(training, "mode_seeking_penalty", penalties)
    monkeypatch.setattr(training, "discriminate", scored)
    stats = training.g_step(run, cfg, None, len(real), regularize=False)
    (args, penalty), = penalties.calls
    assert args[0].shape == real.shape and args[0].requires_grad  # the batch G is trained on
    assert args[0] is scored.calls[0][0][1]  # the very images D scored for G's loss
    (_, loss), = [call[0] for call in steps.calls]
    assert loss.item() == pytest.approx(stats["loss_gen"].item() + 0.5 * penalty.item(), rel=1e-5)
    assert stats["mode_seeking"].item() == penalty.item()
    cfg, run, real = setup()
    assert "mode_seeking" not in training.g_step(run, cfg, None, len(real), regularize=False)


@pytest.mark.parametrize("base,full", [(0.5, 0.2), (0.0, 0.3), (0.4, 0.0)])
def test_mode_seeking_full_takes_over_once_growth_reaches_full_resolution(monkeypatch, base, full):
    """While G grows it pays MODE_SEEKING; once it draws at full resolution, MODE_SEEKING_FULL."""
    cfg, run, real = setup(mode_seeking=base, mode_seeking_full=full, progressive=True, progressive_start=16,
                           progressive_kimg=1.0)
    steps, penalties = Recorder(training.optimizer_step), Recorder(losses.mode_seeking_penalty)
    monkeypatch.setattr(training, "optimizer_step", steps)
    monkeypatch.setattr(training, "mode_seeking_penalty", penalties)
    for nimg, weight in [(700, base), (5000, full)]:  # 16x16 fading into 32x32; then grown
        run.nimg = nimg
        training.set_growth_level(run, cfg)
        steps.calls.clear(), penalties.calls.clear()
        stats = training.g_step(run, cfg, None, len(real), regularize=False)
        assert ("mode_seeking" in stats) == (weight > 0) == bool(penalties.calls)
        extra = weight * penalties.calls[0][1].item() if weight else 0.0
        assert steps.calls[0][0][1].item() == pytest.approx(stats["loss_gen"].item() + extra, rel=1e-5)


def test_mode_seeking_full_unset_keeps_mode_seeking_at_every_level():
    cfg = resolve_settings({"MODE_SEEKING": 0.3}, "", "smoke")
    assert cfg.mode_seeking_full == -1
    assert training.mode_seeking_weight(cfg, None) == training.mode_seeking_weight(cfg, 1.5) == 0.3


@pytest.mark.parametrize("batch,kimg", [(32, 10.0), (16, 0.5), (64, 2.0)])
def test_ema_beta_half_life(batch, kimg):
    beta = training.ema_beta(batch, kimg, 0.0, nimg=0)
    assert beta ** (kimg * 1000 / batch) == pytest.approx(0.5, rel=1e-9)


def test_ema_beta_rampup():
    full = training.ema_beta(32, 10.0, 0.0, nimg=1000)
    early = training.ema_beta(32, 10.0, 0.05, nimg=1000)  # half-life capped at 50 images
    assert early < full
    assert early ** (50 / 32) == pytest.approx(0.5, rel=1e-9)
    late = training.ema_beta(32, 10.0, 0.05, nimg=10**9)  # cap no longer binds
    assert late == pytest.approx(full, rel=1e-12)
    assert training.ema_beta(32, 10.0, 0.05, nimg=0) == pytest.approx(0.0, abs=1e-12)  # first step copies


def test_ema_update_lerps_params_and_copies_buffers():
    torch.manual_seed(0)
    ema, model = _Net(), _Net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.norm.running_mean.copy_(torch.tensor([5.0, -5.0]))
        model.norm.num_batches_tracked.fill_(7)
    before = [p.detach().clone() for p in ema.parameters()]
    target = [p.detach().clone() for p in model.parameters()]
    beta = 0.75
    training.ema_update(ema, model, beta)
    for e, b, t in zip(ema.parameters(), before, target):
        assert torch.allclose(e, beta * b + (1 - beta) * t, atol=1e-6)
    for p, t in zip(model.parameters(), target):
        assert torch.equal(p, t)  # the trained model is untouched
    assert torch.equal(ema.norm.running_mean, torch.tensor([5.0, -5.0]))
    assert ema.norm.num_batches_tracked.item() == 7


def test_ema_update_works_on_generator():
    import modules
    torch.manual_seed(0)
    kw = dict(z_dim=8, w_dim=8, mapping_layers=1, resolution=32, img_channels=1, channel_base=128, channel_max=8)
    G, G_ema = modules.Generator(**kw), modules.Generator(**kw)
    G.mapping.w_avg.fill_(3.0)
    training.ema_update(G_ema.requires_grad_(False), G, 0.0)  # beta 0: a plain copy
    for a, b in zip(G_ema.state_dict().values(), G.state_dict().values()):
        assert torch.equal(a, b)


def lr_cfg(**kw):
    base = dict(lr_schedule="constant", lr_cycle_steps=100, lr_cycle_min=0.1, lr_step_epochs=10, lr_step_factor=0.5)
    base.update(kw)
    return SimpleNamespace(**base)


def test_lr_factor_constant():
    cfg = lr_cfg()
    assert {training.lr_factor(cfg, s, e) for s, e in [(0, 0), (1234, 7), (10**6, 999)]} == {1.0}


def test_lr_factor_cyclic():
    cfg = lr_cfg(lr_schedule="cyclic", lr_cycle_steps=100, lr_cycle_min=0.1)
    f = lambda step: training.lr_factor(cfg, step, 0)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(50) == pytest.approx(0.55)
    assert f(100) == pytest.approx(1.0)
    assert f(150) == pytest.approx(0.55)
    assert f(200) == pytest.approx(0.1)
    assert f(300) == pytest.approx(1.0)
    values = [f(s) for s in range(0, 401)]
    assert min(values) == pytest.approx(0.1) and max(values) == pytest.approx(1.0)


def test_lr_factor_step():
    cfg = lr_cfg(lr_schedule="step", lr_step_epochs=10, lr_step_factor=0.5)
    assert training.lr_factor(cfg, 0, 0) == 1.0
    assert training.lr_factor(cfg, 999, 9) == 1.0
    assert training.lr_factor(cfg, 999, 10) == pytest.approx(0.5)
    assert training.lr_factor(cfg, 999, 25) == pytest.approx(0.25)
    assert training.lr_factor(cfg, 0, 30) == pytest.approx(0.125)


def test_wgan_r1_adds_an_r1_penalty_to_the_gradient_penalty():
    """WGAN-GP with a small R1 penalty on the reals as well."""
    data = SimpleNamespace(class_names=["AD", "NC"], channels=1)
    real = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    stats = {}
    for gamma in (0.0, 5.0):
        cfg = settings.resolve_settings({"LOSS": "wgan-gp", "WGAN_R1_GAMMA": gamma}, "", "smoke")
        torch.manual_seed(0)
        run = training.build_run(cfg, data, torch.device("cpu"))
        torch.manual_seed(1)
        stats[gamma] = training.d_step(run, cfg, real, None, regularize=True)
    assert "r1" not in stats[0.0] and stats[5.0]["r1"] > 0
    assert stats[0.0]["gp"] == stats[5.0]["gp"]  # the same gradient penalty, logged as gp
    assert stats[5.0]["grad_d_reg"] != stats[0.0]["grad_d_reg"]  # and the R1 term in the update
    only_r1 = settings.resolve_settings({"LOSS": "wgan-gp", "GP_LAMBDA": 0, "WGAN_R1_GAMMA": 1.0}, "", "smoke")
    assert training.reg_intervals(only_r1)["D"] == only_r1.d_reg_interval


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)


def test_older_checkpoints_histories_take_todays_keys():
    """Before the keys said which penalty they hold, `plp` was the path-length penalty and `gp` held R1
    under the logistic loss."""
    h = {"loss_gen": torch.zeros(3), "gp": torch.ones(3), "plp": torch.full((3,), 2.0)}
    logistic = training.history_of(dict(history=h, config=dict(loss="logistic")))
    assert set(logistic) == {"loss_gen", "r1", "pl_penalty"} and logistic["r1"].sum() == 3
    wgan = training.history_of(dict(history=h, config=dict(loss="wgan-gp")))
    assert set(wgan) == {"loss_gen", "gp", "pl_penalty"} and wgan["pl_penalty"].sum() == 6
    assert set(training.HISTORY_KEYS) >= {"gp", "r1", "pl_penalty"}


def data_of(real):
    """The dataset train_step reads: uint8 images and labels."""
    images = ((real + 1) * 127.5).round().to(torch.uint8)
    return SimpleNamespace(images=images, labels=torch.zeros(len(images), dtype=torch.long), class_names=["AD"],
                           channels=1)


def test_the_ema_step_uses_the_half_life_ramped_to_the_images_seen(monkeypatch):
    cfg, run, real = setup(ema_kimg=0.5, ema_rampup=0.05)
    run.nimg = 800  # ramp-up: a half-life of min(500, 0.05 * 800) = 40 images, not 500
    spy = Recorder(training.ema_update)
    monkeypatch.setattr(training, "ema_update", spy)
    training.train_step(run, cfg, data_of(real), torch.arange(8))
    (args, _), = spy.calls
    assert args[0] is run.G_ema and args[1] is run.G
    assert args[2] == pytest.approx(0.5 ** (cfg.batch_size / 40), rel=1e-12)


def test_the_path_length_penalty_sees_a_fraction_of_the_batch(monkeypatch):
    cfg, run, real = setup(pl_batch_shrink=4, pl_weight=1.0)
    spy = Recorder(losses.path_length_penalty)
    monkeypatch.setattr(training, "path_length_penalty", spy)
    training.g_step(run, cfg, None, len(real), regularize=True)
    (args, _), = spy.calls
    assert args[0].shape[0] == args[1].shape[0] == 8 // 4


def test_ada_moves_p_by_the_real_scores_every_iteration(monkeypatch):
    """r_t = E[sign(D(real))] (relative to the fakes for WGAN): the objective's real_sign gets D's
    real scores first, the same ones its loss gets, and p's heuristic records every iteration."""
    cfg, run, real = setup(augment="ada", loss="logistic")
    losses_seen, signs_seen = Recorder(run.objective.d_loss), Recorder(run.objective.real_sign)
    monkeypatch.setattr(run.objective, "d_loss", losses_seen)
    monkeypatch.setattr(run.objective, "real_sign", signs_seen)
    updates = Recorder(run.aug.update)
    monkeypatch.setattr(run.aug, "update", updates)
    for _ in range(3):
        training.train_step(run, cfg, data_of(real), torch.arange(8))
        run.step += 1
    assert len(signs_seen.calls) == len(updates.calls) == 3
    for (loss_args, _), (sign_args, sign) in zip(losses_seen.calls, signs_seen.calls):
        assert torch.equal(sign_args[0], loss_args[0]) and torch.equal(sign_args[1], loss_args[1])
        assert sign.item() == pytest.approx((sign_args[0] > 0).float().mean().item() * 2 - 1)


def test_g_step_leaves_d_trainable_again_except_what_freeze_d_fixes():
    cfg, run, real = setup(freeze_d=1)
    frozen = {id(p) for p in training.frozen_d_parameters(run.D, 1)}
    training.g_step(run, cfg, None, len(real), regularize=False)
    assert all(p.requires_grad == (id(p) not in frozen) for p in run.D.parameters())
    assert frozen and any(p.requires_grad for p in run.D.parameters())


def test_r1_grows_with_the_square_of_the_resolution_d_sees(monkeypatch):
    """--r1-gamma-res 16: R1 weighs R1_GAMMA at 16x16 and four times that at the 32x32 of this model."""
    cfg, run, real = setup(loss="logistic", r1_gamma=2.0, d_reg_interval=1, r1_gamma_res=16)
    steps = Recorder(training.optimizer_step)
    monkeypatch.setattr(training, "optimizer_step", steps)
    stats = training.d_step(run, cfg, real, None, regularize=True)
    assert steps.calls[1][0][1].item() == pytest.approx(stats["r1"].item() * 2.0 * 4 / 2, rel=1e-5)
    assert training.r1_scale(cfg, 64) == 16 and training.r1_scale(setup()[0], 64) == 1.0


def test_a_negative_r1_power_weakens_r1_at_the_higher_resolutions(monkeypatch):
    """--r1-gamma-res 16 --r1-gamma-power -2: a quarter of R1_GAMMA at the 32x32 of this model."""
    cfg, run, real = setup(loss="logistic", r1_gamma=2.0, d_reg_interval=1, r1_gamma_res=16, r1_gamma_power=-2.0)
    steps = Recorder(training.optimizer_step)
    monkeypatch.setattr(training, "optimizer_step", steps)
    stats = training.d_step(run, cfg, real, None, regularize=True)
    assert steps.calls[1][0][1].item() == pytest.approx(stats["r1"].item() * 2.0 / 4 / 2, rel=1e-5)
    assert training.r1_scale(cfg, 8) == 4 and training.r1_scale(cfg, 64) == 1 / 16
