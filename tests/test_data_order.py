"""Which images each rank reads: disjoint shards, deterministic order per (seed, epoch)."""
import numpy as np
import pytest
import torch

from framework.data import EvalShard, GlobalOrder, to_model_input
from framework.errors import UserError

IDS = np.arange(103) * 3  # the split's image indices into the file need not be contiguous


def order(rank, world, seed=0, accum=1, batch=5):
    return GlobalOrder(IDS, batch, world, rank, accum, seed)


def test_shards_disjoint_and_cover_each_global_batch():
    one = order(0, 1, batch=10)
    two = [order(r, 2, batch=5) for r in range(2)]
    for step in range(one.steps_per_epoch * 2):
        a = [set(two[r].indices(step)[0]) for r in range(2)]
        assert not (a[0] & a[1])
        assert a[0] | a[1] == set(one.indices(step)[0])
        assert a[0] <= set(IDS)


def test_each_image_at_most_once_per_epoch_and_order_changes():
    w = [order(r, 2, accum=2) for r in range(2)]
    spe = w[0].steps_per_epoch
    epoch0 = [i for s in range(spe) for r in range(2) for mb in w[r].indices(s) for i in mb]
    epoch1 = [i for s in range(spe, 2 * spe) for r in range(2) for mb in w[r].indices(s) for i in mb]
    assert len(epoch0) == len(set(epoch0)) == spe * 20
    assert epoch0 != epoch1
    assert [list(m) for m in order(0, 2, accum=2).indices(spe + 3)] == [list(m) for m in w[0].indices(spe + 3)]
    assert list(order(0, 2, seed=1).indices(0)[0]) != list(w[0].indices(0)[0])


def test_eval_shards_cover_every_image_exactly_once():
    for world in (1, 2, 3):
        seen, counts = [], []
        for r in range(world):
            shard = EvalShard(IDS, 8, world, r)
            counts.append(len(shard))
            seen += list(shard.mine)
        assert sorted(seen) == list(IDS)
        assert len(set(counts)) == 1  # the same number of batches on every rank (ZeRO-3 forward)


def test_num_bits_quantisation():
    x = torch.tensor([0, 7, 8, 255], dtype=torch.uint8).reshape(1, 1, 1, 4)
    assert torch.allclose(to_model_input(x, 8, "cpu").flatten(), torch.tensor([-1.0, 7 / 255 * 2 - 1, 8 / 255 * 2 - 1, 1.0]))
    assert torch.allclose(to_model_input(x, 5, "cpu").flatten(), torch.tensor([-1.0, -1.0, 1 / 31 * 2 - 1, 1.0]))


def scheduled(rank, world, batches, accum=1, seed=0):
    return GlobalOrder(IDS, 0, world, rank, accum, seed, batches=batches)


def test_a_constant_batch_schedule_is_the_fixed_order():
    fixed = order(0, 2, accum=2)
    steps = fixed.steps_per_epoch * 3 + 2
    same = scheduled(0, 2, [20] * steps, accum=2)
    for s in range(steps):
        assert [list(m) for m in same.indices(s)] == [list(m) for m in fixed.indices(s)]
        assert same.epoch_of(s) == fixed.epoch_of(s) and same.micro_at(s) == 5
    assert same.images_before(steps) == 20 * steps


def test_a_changing_batch_keeps_shards_disjoint_and_each_epoch_without_repeats():
    batches = [16] * 7 + [12] * 9 + [4] * 30 + [16] * 5  # 103 images: epochs of 6, 8+, 25 ... steps
    one = scheduled(0, 1, batches)
    two = [scheduled(r, 2, batches) for r in range(2)]
    by_epoch: dict = {}
    for s, g in enumerate(batches):
        a = [set(two[r].indices(s)[0]) for r in range(2)]
        assert len(a[0]) == len(a[1]) == g // 2 and not (a[0] & a[1])
        assert a[0] | a[1] == set(one.indices(s)[0])
        by_epoch.setdefault(one.epoch_of(s), []).extend(one.indices(s)[0].tolist())
    for e, seen in by_epoch.items():
        assert len(seen) == len(set(seen)) <= len(IDS)
    # a step takes the next epoch's first ids exactly when its batch no longer fits: 6 x 16 = 96 fit
    assert [one.epoch_of(s) for s in range(8)] == [0] * 6 + [1] * 2
    assert list(one.indices(6)[0]) == list(one.permutation(1)[:16])
    # a piece (FFCV's unit) is a run of one epoch and one micro-batch size; its ids are the steps'
    for s in (0, 5, 6, 7, 8, 20, 46, 50):
        first, end = one.piece(s)
        assert first <= s < end and len({one.epoch_of(t) for t in range(first, end)}) == 1
        assert len({batches[t] for t in range(first, end)}) == 1
        assert list(two[1].rank_piece(s)) == [i for t in range(s, end) for i in two[1].indices(t)[0]]


@pytest.mark.parametrize("batches,message", [([16, 15], "step 1 is 15, not a positive multiple of world 2"),
                                             ([16, 0], "step 1 is 0"), ([104], "fewer than the largest global batch"),
                                             ([], "no steps")])
def test_bad_batch_schedules_are_one_line(batches, message):
    with pytest.raises(UserError, match=message):
        scheduled(0, 2, batches)
