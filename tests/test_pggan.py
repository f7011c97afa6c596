"""PGGAN's parts (issue 14, in progress): the official G_paper / D_paper parameter counts and
channel table, the equalised learning rate, pixel norm, minibatch stddev against a direct
computation, the fade-in at alpha = 0 and 1, the official schedule (images shown -> resolution,
alpha, batch, learning rate, optimiser resets), and WGAN-GP against a brute-force Jacobian and
finite differences through the double backward."""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from framework.errors import UserError
from framework.models.pggan.loss import d_loss, g_loss, gradient_norms
from framework.models.pggan.networks import (Discriminator, EqualizedConv2d, Generator, channel_table,
                                             downscale2d, minibatch_stddev, parameter_count, pixel_norm,
                                             upscale2d)
from framework.models.pggan.schedule import Schedule, ScheduleConfig


def official_counts(resolution: int, channels: int = 3) -> tuple[int, int]:
    """The parameters of G_paper and D_paper by their layer lists (official networks.py), summed by
    hand: weights and one bias per output channel (G's 4x4 dense: per feature map)."""
    nf = lambda s: min(8192 // 2 ** s, 512)  # noqa: E731
    top = int(math.log2(resolution))
    conv = lambda i, o, k=3: i * o * k * k + o  # noqa: E731
    g = 512 * nf(1) * 16 + nf(1) + conv(nf(1), nf(1))
    d = conv(nf(1) + 1, nf(1)) + nf(1) * 16 * nf(0) + nf(0) + nf(0) + 1
    for r in range(2, top + 1):
        g += conv(nf(r - 1), channels, 1)  # toRGB
        d += conv(channels, nf(r - 1), 1)  # fromRGB
        if r > 2:
            g += conv(nf(r - 2), nf(r - 1)) + conv(nf(r - 1), nf(r - 1))
            d += conv(nf(r - 1), nf(r - 1)) + conv(nf(r - 1), nf(r - 2))
    return g, d


def test_the_1024_px_networks_have_the_papers_23_1_million_parameters():
    g, d = Generator(1024), Discriminator(1024)
    assert (parameter_count(g), parameter_count(d)) == official_counts(1024) == (23_079_115, 23_087_249)
    for n in (parameter_count(g), parameter_count(d)):
        assert abs(n - 23.1e6) <= 0.05e6  # the paper's Table 2: 23.1 M each
    assert g.latent == 512


@pytest.mark.parametrize("resolution", [32, 256])
def test_smaller_targets_have_the_counts_of_their_layer_lists(resolution):
    assert (parameter_count(Generator(resolution)), parameter_count(Discriminator(resolution))) == \
        official_counts(resolution)


def test_the_channel_table():
    assert channel_table(256) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64}
    assert channel_table(1024)[512] == 32 and channel_table(1024)[1024] == 16
    g = Generator(256)
    assert g.blocks["64x64"]["Conv1"].weight.shape[0] == 256 and g.torgb["256x256"].weight.shape[1] == 64


def test_weights_are_unit_normal_and_scaled_at_run_time():
    torch.manual_seed(0)
    conv = EqualizedConv2d(64, 32, 3)
    assert abs(float(conv.weight.detach().std()) - 1) < 0.02 and float(conv.bias.detach().abs().max()) == 0
    assert conv.scale == pytest.approx(math.sqrt(2) / math.sqrt(64 * 9), rel=1e-12)  # He's std, at run time
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight * conv.scale, conv.bias, padding=1), rtol=0, atol=0)
    g = Generator(32)
    assert g.blocks["4x4"]["Dense"].scale == pytest.approx(math.sqrt(2) / 4 / math.sqrt(512))
    assert g.torgb["32x32"].scale == pytest.approx(1 / math.sqrt(512))


def test_pixel_norm_gives_unit_mean_square_over_channels():
    y = pixel_norm(torch.randn(3, 16, 5, 5) * 7)
    torch.testing.assert_close(y.pow(2).mean(1), torch.ones(3, 5, 5), rtol=1e-5, atol=1e-5)


def test_minibatch_stddev_equals_a_direct_computation():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 2, 2)
    out = minibatch_stddev(x, 4)
    assert out.shape == (8, 4, 2, 2)
    torch.testing.assert_close(out[:, :3], x)
    for i in range(8):
        group = [j for j in range(8) if j % 2 == i % 2]  # 2 groups of 4: sample i in group i mod 2
        s = x[group]
        std = torch.sqrt(((s - s.mean(0)) ** 2).mean(0) + 1e-8).mean()
        torch.testing.assert_close(out[i, 3], torch.full((2, 2), float(std)))
    assert torch.equal(minibatch_stddev(x[:3], 4)[:, 3], minibatch_stddev(x[:3], 3)[:, 3])  # a batch below G
    with pytest.raises(ValueError, match="not a multiple"):
        minibatch_stddev(x[:6], 4)


@pytest.mark.parametrize("level", [3, 5])
def test_fading_in_starts_at_the_previous_resolution_and_ends_at_the_new_block(level):
    torch.manual_seed(2)
    g, d = Generator(32), Discriminator(32)
    z = torch.randn(4, 512)
    with torch.no_grad():
        # alpha = 0: the previous resolution's output upsampled (G), the input pooled into it (D)
        torch.testing.assert_close(g(z, level, 0.0), upscale2d(g(z, level - 1, 1.0)), rtol=0, atol=0)
        img = torch.randn(4, 3, 2 ** level, 2 ** level)
        torch.testing.assert_close(d(img, level, 0.0), d(downscale2d(img), level - 1, 1.0), rtol=0, atol=0)
        # alpha = 1: the new block alone (the previous RGB layers do not matter)
        before_g, before_d = g(z, level, 1.0), d(img, level, 1.0)
        mid_g, mid_d = g(z, level, 0.3), d(img, level, 0.3)
        g.torgb[f"{2 ** (level - 1)}x{2 ** (level - 1)}"].weight.add_(1.0)
        d.fromrgb[f"{2 ** (level - 1)}x{2 ** (level - 1)}"].weight.add_(1.0)
        torch.testing.assert_close(g(z, level, 1.0), before_g, rtol=0, atol=0)
        torch.testing.assert_close(d(img, level, 1.0), before_d, rtol=0, atol=0)
        assert not torch.allclose(g(z, level, 0.3), mid_g) and not torch.allclose(d(img, level, 0.3), mid_d)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        Generator(100)
    with pytest.raises(ValueError, match="16 px at level 3"):
        Discriminator(32)(torch.randn(4, 3, 16, 16), 3)


# -- the schedule -----------------------------------------------------------------------------------

def test_the_schedule_grows_and_fades_as_the_official_one():
    s = Schedule(ScheduleConfig(phase_images=100, fade_images=100, batch=4, minibatch_repeats=1), 32)
    # (images shown, level, alpha): 4 px stable, the fade into 8 px, 8 px stable, ..., 32 px from 600 on
    for images, level, alpha in ((0, 2, 1.0), (99, 2, 1.0), (100, 2, 1.0), (101, 3, 0.01), (150, 3, 0.5),
                                 (200, 3, 1.0), (350, 4, 0.5), (599, 5, 0.99), (600, 5, 1.0), (10_000, 5, 1.0)):
        p = s.at_images(images)
        assert (p.level, p.resolution) == (level, 2 ** level) and p.alpha == pytest.approx(alpha), images
    assert s.at_images(100).lod == 3.0 and s.at_images(101).lod == pytest.approx(2.99)  # the fade begins after 100


def test_alpha_moves_every_minibatch_repeats_steps_and_the_optimisers_reset_at_each_integer_lod():
    cfg = ScheduleConfig(phase_images=64, fade_images=64, batch=8, minibatch_repeats=4)
    s = Schedule(cfg, 16)
    plan = s.plan(60)
    assert [p.images for p in plan[:3]] == [0, 8, 16]
    for k in range(0, 60, 4):  # constant within each group of 4 steps
        assert len({(p.level, p.alpha) for p in plan[k:k + 4]}) == 1
    resets = [i for i in range(1, 60) if Schedule.resets(plan[i - 1], plan[i])]
    # lod 2 until 64 images (step 8); the fade to 8 px until 128 (step 16), 8 px stable, fade to 16 px
    # from 192 (step 24) to 256 (step 32), then 16 px
    assert resets == [12, 16, 28, 32]  # the first group past each fade start (images 64 -> step 8 shows
    assert plan[-1].level == 4 and plan[-1].alpha == 1.0  # lod 2.0 still), and each fade's end
    assert s.steps_for(256) == 32


def test_per_resolution_batches_and_learning_rates():
    cfg = ScheduleConfig(phase_images=50, fade_images=50, batch=16, batch_per_resolution={"8": 12, 16: 7},
                         lr_g_per_resolution={16: 0.002}, minibatch_repeats=1)
    s = Schedule(cfg, 16, unit=2)
    assert [s.at_images(n).batch for n in (0, 60, 250)] == [16, 12, 6]  # 7 rounded down to the 2 ranks
    assert s.at_images(250).lr_g == 0.002 and s.at_images(250).lr_d == 0.001


@pytest.mark.parametrize("kw,target,message", [
    ({}, 48, "target must be a power of two >= 8"), ({}, 4, "target must be a power of two >= 8"),
    ({"phase_images": 0, "fade_images": 0}, 32, "a schedule of zero images"),
    ({"initial_resolution": 64}, 32, "initial_resolution' is 64"),
    ({"batch": 1}, 32, "is 1, fewer than world size x engine.grad_accum = 2"),
    ({"batch_per_resolution": {256: None}}, 32, "YAML reads 4:16 as the number 256"),
    ({"lr_g_per_resolution": {8: -1.0}}, 32, "8: -1.0 is not a positive float")])
def test_bad_schedules_are_one_line(kw, target, message):
    with pytest.raises(UserError, match=message):
        Schedule(ScheduleConfig(**kw), target, unit=2)


# -- WGAN-GP ----------------------------------------------------------------------------------------

def tiny_d():
    torch.manual_seed(3)
    return Discriminator(8, channels=1, fmap_base=64, fmap_max=8).double()


def test_the_gradient_penalty_equals_a_brute_force_jacobian():
    d = tiny_d()
    mixed = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: d(x, 3, 0.7), mixed)  # (4 scores, 4, 1, 8, 8)
    want = jac.sum(0).flatten(1).norm(dim=1)  # the gradient of the sum: the groups couple the samples
    torch.testing.assert_close(gradient_norms(d, mixed, 3, 0.7).double(), want, rtol=1e-6, atol=1e-9)
    assert (jac[0, 1].abs().sum() > 0)  # minibatch stddev: sample 1 enters sample 0's score


def test_the_discriminator_loss_and_its_double_backward_match_finite_differences():
    d = tiny_d()
    real, fake = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    u = torch.rand(4, dtype=torch.float64)
    loss, terms = d_loss(d, real, fake, u, 3, 1.0)
    with torch.no_grad():
        rs, fs = d(real, 3, 1.0), d(fake, 3, 1.0)
    mixed = real + (fake - real) * u.view(-1, 1, 1, 1)
    gp = (gradient_norms(d, mixed, 3, 1.0, create_graph=False).double() - 1) ** 2
    torch.testing.assert_close(loss.double(), (fs - rs + 10 * gp + 0.001 * rs ** 2).mean(), rtol=1e-6, atol=1e-9)
    assert float(terms["w_distance"]) == pytest.approx(float((rs - fs).mean()), rel=1e-6)
    loss.backward()
    w = d.blocks["8x8"]["Conv0"].weight
    for idx in ((0, 0, 1, 1), (3, 2, 0, 2)):
        analytic = float(w.grad[idx])
        h = 1e-6  # float64; small enough that no leaky ReLU changes side
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                w[idx] += sign * h
            vals.append(float(d_loss(d, real, fake, u, 3, 1.0)[0].detach()))
            with torch.no_grad():
                w[idx] -= sign * h
        assert analytic == pytest.approx((vals[0] - vals[1]) / (2 * h), rel=1e-4, abs=1e-7)
    g, _ = g_loss(d, fake, 3, 1.0)
    assert float(g.detach()) == pytest.approx(-float(fs.mean()), rel=1e-9)


# -- the task's reals and state -------------------------------------------------------------------

def official_fade_lod(x: np.ndarray, lod: float) -> np.ndarray:
    """process_reals' FadeLOD on NCHW images of the level (numpy, as the TF graph reshapes)."""
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5), keepdims=True)
    y = np.tile(y, (1, 1, 1, 2, 1, 2)).reshape(n, c, h, w)
    frac = lod - math.floor(lod)
    return x + (y - x) * frac


def dataset_tool_halving(x: np.ndarray, times: int) -> np.ndarray:
    """dataset_tool.py's lower levels of detail (before its rounding to uint8): 2x2 means."""
    for _ in range(times):
        x = (x[:, :, 0::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 0::2] + x[:, :, 1::2, 1::2]) * 0.25
    return x


@pytest.mark.parametrize("level,alpha", [(2, 1.0), (3, 0.25), (4, 0.6), (5, 1.0)])
def test_the_reals_of_a_level_are_the_official_lower_lod_faded(level, alpha):
    from framework.models.pggan.task import fade_reals

    x = np.random.default_rng(level).uniform(-1, 1, (3, 2, 32, 32))
    lod = 5 - level + 1 - alpha  # the official lod of (level, alpha)
    want = official_fade_lod(dataset_tool_halving(x, 5 - level), lod)
    got = fade_reals(torch.from_numpy(x), level, alpha).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-12


def test_the_mixing_factors_are_uniform():
    from framework.models.pggan.task import uniform_from_normal

    u = uniform_from_normal(torch.randn(200_000, generator=torch.Generator().manual_seed(0))).numpy()
    assert 0 < u.min() and u.max() < 1
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / len(u)
    assert np.abs(hist - 0.1).max() < 0.004


def pggan_task(*overrides, world=1, recipe="mnist5k_smoke"):
    from types import SimpleNamespace

    from conftest import MNIST_BETON, REPO
    from framework.config import load_recipe
    from framework.models import build_task

    r = load_recipe(str(REPO / "recipes" / "pggan" / f"{recipe}.yaml"), [f"data.path={MNIST_BETON}", *overrides],
                    check_files=False)
    return build_task(r, SimpleNamespace(world_size=world, rank=0))


def test_a_checkpoints_phase_is_checked_against_the_schedule_on_resume():
    task = pggan_task()
    task._trained = 400  # in the fade to 32 px (steps 316-435)
    state = task.state_dict()
    assert (state["resolution"], state["step"]) == (32, 400) and 0 < state["alpha"] < 1
    same = pggan_task()
    same.load_state_dict(state)
    assert same.current(0) == (5, state["alpha"])
    with pytest.raises(ValueError, match="stopped at step 400 with .* this recipe's schedule gives"):
        pggan_task("model.schedule.fade_images=4000").load_state_dict(state)
    pggan_task("model.schedule.fade_images=4000", "train.resume_changed=allow").load_state_dict(state)
    pggan_task(world=2).load_state_dict(state)  # another world: batches round differently, not compared
    assert pggan_task().current(0) == (5, 1.0)  # untrained: the target resolution


def test_the_per_step_batches_and_learning_rates_reach_the_spine():
    task = pggan_task()
    b = task.global_batches(task.recipe.train.steps)
    assert b.tolist() == [p.batch for p in task.plan] and set(b.tolist()) == {32, 16}
    assert task.lr("gen", 0) == task.lr("disc", 558) == 1e-3
    resets = [s for s in range(1, 559) if task.reset_optimizer("gen", s)]
    assert len(resets) == 6 and task.reset_optimizer("disc", resets[0])  # start and end of three fades


def brute_force_plan(s: Schedule, steps: int):
    """The official loop: every minibatch_repeats steps the schedule is read at the images shown."""
    out, images, cur = [], 0, None
    for k in range(steps):
        if k % s.cfg.minibatch_repeats == 0:
            cur = s.at_images(images)
        out.append((images, cur.lod, cur.level, cur.alpha, cur.batch, cur.lr_g, cur.lr_d))
        images += cur.batch
    return out, images


@pytest.mark.parametrize("kw,target", [
    (dict(phase_images=64, fade_images=64, batch=8, minibatch_repeats=4), 16),
    (dict(phase_images=100, fade_images=0, batch=6, batch_per_resolution={4: 30}, minibatch_repeats=1), 32),
    (dict(phase_images=0, fade_images=50, batch=4, batch_per_resolution={8: 10}, minibatch_repeats=3), 32),
    (dict(phase_images=70, fade_images=30, batch=5, batch_per_resolution={4: 12, 16: 7}, minibatch_repeats=2,
          lr_g_per_resolution={16: 0.002}, initial_resolution=8), 64),
])
def test_the_compact_plan_equals_the_official_loop(kw, target):
    s = Schedule(ScheduleConfig(**kw), target)
    steps = 400
    want, shown = brute_force_plan(s, steps)
    plan = s.plan(steps)
    got = [(p.images, p.lod, p.level, p.alpha, p.batch, p.lr_g, p.lr_d) for p in plan]
    assert got == want and plan.batches().tolist() == [w[4] for w in want]
    runs = plan.runs()
    keys = [(w[2], w[3] < 1, w[4]) for w in want]
    assert [k for k, _ in runs] == [0] + [i for i in range(1, steps) if keys[i] != keys[i - 1]]
    assert plan.resolutions() == sorted({2 ** w[2] for w in want})
    for total in (1, 137, shown - 1, shown):
        brute = next(k for k in range(steps + 1) if sum(w[4] for w in want[:k]) >= total)
        assert s.steps_for(total) == brute, total


def test_a_1024_px_run_of_millions_of_steps_is_planned_compactly():
    cfg = ScheduleConfig(phase_images=800_000, fade_images=800_000, batch=16, batch_per_resolution={256: 14, 512: 6,
                                                                                                    1024: 3})
    s = Schedule(cfg, 1024)
    steps = s.steps_for(19_000_000)  # the paper's run (preset-v1)
    plan = s.plan(steps)
    assert steps > 3_000_000 and plan.group_batches.nbytes < 8 * steps / 3
    assert [(p.resolution, p.batch) for _, p in plan.runs()][-2:] == [(1024, 3), (1024, 3)]
    assert plan[steps - 1].images + 3 >= 19_000_000 > plan[steps - 1].images


def test_the_paper_recipes_follow_the_official_schedules():
    t = pggan_task(recipe="celebahq256")  # preset-v2-8gpus to 256 px
    runs = [(p.images, p.resolution, p.alpha < 1, p.batch, p.lr_g) for _, p in t.plan.runs()]
    assert runs[0] == (0, 4, False, 512, 1e-3) and runs[-1][1:] == (256, False, 32, 2e-3)
    assert abs(runs[-1][0] - 7_200_000) < 32 * 4 and len(runs) == 13  # 4 px, then a fade and a phase each
    last = t.plan[-1]
    assert 12_000_000 <= last.images + last.batch < 12_000_000 + 32
    t = pggan_task(recipe="celebahq1024")  # the paper's run (preset-v1)
    assert [p.batch for _, p in t.plan.runs()][-4:] == [6, 6, 3, 3] and t.plan[-1].resolution == 1024
    assert abs(sum(p.numel() for p in t.gen.parameters()) - 23.1e6) <= 0.05e6 and t.disc.mbstd_group_size == 16
    assert pggan_task(recipe="photos256_smoke").plan[-1].resolution == 256
