"""StepContext.randn: each row's noise depends only on (seed, engine, phase, step, draw, the row's
key), so any split of a global batch over ranks and micro-batches draws the same noise, and a
rank draws only its own rows (its cost does not grow with the world size)."""
import numpy as np
import torch

from framework.task import StepContext


def ctx(world, rank, batch, micro=0, accum=1, step=3, stream="x", **kw):
    return StepContext(step=step, micro=micro, device=torch.device("cpu"), dtype=torch.float32, rank=rank,
                       world_size=world, batch_size=batch, grad_accum=accum, seed=7, stream=stream, **kw)


def draws(c, n=2):
    return [c.randn(3, 5) for _ in range(n)]


def test_one_by_2b_equals_two_by_b_equals_one_by_b_by_two_micro_batches():
    one = draws(ctx(1, 0, 8))
    two = [draws(ctx(2, r, 4)) for r in range(2)]
    acc = [draws(ctx(1, 0, 4, micro=m, accum=2)) for m in range(2)]
    for d in range(2):
        assert torch.equal(one[d], torch.cat([two[0][d], two[1][d]]))
        assert torch.equal(one[d], torch.cat([acc[0][d], acc[1][d]]))
    assert not torch.equal(one[0], one[1])  # a second draw is new noise


def test_streams_steps_and_phases_draw_different_noise():
    base = ctx(1, 0, 4).randn(10)
    assert not torch.equal(base, ctx(1, 0, 4, stream="y").randn(10))
    assert not torch.equal(base, ctx(1, 0, 4, step=4).randn(10))
    assert not torch.equal(base, ctx(1, 0, 4, phase="eval", rows=np.arange(4)).randn(10))
    assert torch.equal(base, ctx(1, 0, 4).randn(10))


def test_evaluation_noise_follows_the_image_not_the_rank():
    ids = np.array([11, 42, 7, 99])
    whole = ctx(1, 0, 4, phase="eval", rows=ids).randn(6)
    other = ctx(3, 2, 2, phase="eval", rows=ids[[2, 1]]).randn(6)  # another rank, batch and order
    assert torch.equal(other, whole[[2, 1]])


def test_a_rank_draws_only_its_rows_whatever_the_world_size():
    # 2^40 ranks x 2 rows x 10^6 values: drawing the global batch (the old way) cannot even be allocated
    c = ctx(2**40, 2**39 + 5, 2)
    x = c.randn(1000, 1000)
    assert x.shape == (2, 1000, 1000)
    small = ctx(2**40, 2**39 + 5, 2, rows=c.rows).randn(1000, 1000)
    assert torch.equal(x, small)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
