"""Which images each rank reads: disjoint shards, deterministic order per (seed, epoch)."""
import numpy as np
import torch

from framework.data import EvalShard, GlobalOrder, to_model_input

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
