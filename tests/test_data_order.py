"""The loader: disjoint shards, deterministic order per (seed, epoch), every eval image once."""
import numpy as np
import torch

from framework.data.loader import EvalLoader, TrainLoader, to_model_input

IMAGES = np.repeat(np.arange(103, dtype=np.uint8), 4).reshape(103, 1, 2, 2)  # image i is all i


def loader(rank, world, seed=0, accum=1, batch=5):
    return TrainLoader(IMAGES, batch, world, rank, accum, seed)


def test_shards_disjoint_and_cover_each_global_batch():
    one = loader(0, 1, batch=10)
    two = [loader(r, 2, batch=5) for r in range(2)]
    for step in range(one.steps_per_epoch * 2):
        a = [set(two[r].indices(step)[0]) for r in range(2)]
        assert not (a[0] & a[1])
        assert a[0] | a[1] == set(one.indices(step)[0])


def test_each_image_at_most_once_per_epoch_and_order_changes():
    w = [loader(r, 2, accum=2) for r in range(2)]
    spe = w[0].steps_per_epoch
    epoch0 = [i for s in range(spe) for r in range(2) for mb in w[r].indices(s) for i in mb]
    epoch1 = [i for s in range(spe, 2 * spe) for r in range(2) for mb in w[r].indices(s) for i in mb]
    assert len(epoch0) == len(set(epoch0)) == spe * 20
    assert epoch0 != epoch1
    assert [list(m) for m in loader(0, 2, accum=2).indices(spe + 3)] == [list(m) for m in w[0].indices(spe + 3)]
    assert list(loader(0, 2, seed=1).indices(0)[0]) != list(w[0].indices(0)[0])


def test_batches_carry_the_indexed_images():
    ld = loader(1, 2)
    idx = ld.indices(4)[0]
    assert torch.equal(ld.batch(4)[0], torch.from_numpy(IMAGES[idx]))


def test_eval_loader_covers_every_image_exactly_once():
    for world in (1, 2, 3):
        seen, counts = [], []
        for r in range(world):
            ev = EvalLoader(IMAGES, 8, world, r)
            counts.append(len(ev))
            for x, n in ev:
                seen += [int(v) for v in x[:n, 0, 0, 0]]
        assert sorted(seen) == list(range(len(IMAGES)))
        assert len(set(counts)) == 1  # the same number of batches on every rank (ZeRO-3 forward)


def test_num_bits_quantisation():
    x = torch.tensor([0, 7, 8, 255], dtype=torch.uint8).reshape(1, 1, 1, 4)
    assert torch.allclose(to_model_input(x, 8, "cpu").flatten(), torch.tensor([-1.0, 7 / 255 * 2 - 1, 8 / 255 * 2 - 1, 1.0]))
    assert torch.allclose(to_model_input(x, 5, "cpu").flatten(), torch.tensor([-1.0, -1.0, 1 / 31 * 2 - 1, 1.0]))
