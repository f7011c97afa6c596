"""FFCV end to end: the converter, real .beton files, the sharded deterministic loader."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, VAE, env
from framework.data import EvalShard, GlobalOrder
from framework.data.loader import BetonInfo, EvalLoader, TrainLoader
from framework.data.sources import Source
from framework.data.turbojpeg import Decoder
from framework.data.write import write_beton
from framework.errors import UserError, run_cli

N = 203


def numbered_images(n=N, res=16, seed=0):
    """Random RGB images whose first pixel spells their index: (n, res, res, 3) uint8."""
    x = np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256
    x[:, 0, 0, 1] = np.arange(n) // 256
    return x


def index_of(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0, 0, 0].long() + 256 * batch[:, 1, 0, 0].long()).tolist()


@pytest.fixture(scope="module")
def raw_beton(tmp_path_factory):
    x = numbered_images()
    splits = np.zeros(N, np.int64)
    splits[::4] = 1  # 51 validation images
    path = tmp_path_factory.mktemp("raw") / "numbered.beton"
    write_beton(Source("numbered", np.arange(N), splits, arrays=x), path, 16, "raw", progress=False)
    return path, x, splits


def train_loader(path, rank=0, world=1, batch=4, accum=1, seed=0):
    info = BetonInfo(path)
    return TrainLoader(info, GlobalOrder(info.ids("train"), batch, world, rank, accum, seed), 3, 2)


def test_raw_mode_reads_back_byte_identical(raw_beton):
    path, x, splits = raw_beton
    ld = train_loader(path)
    for step in range(5):
        batch = ld.batch(step)[0]["image"]
        (idx,) = ld.indices(step)
        assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 16, 16)
        assert torch.equal(batch, torch.from_numpy(x[idx]).permute(0, 3, 1, 2))


def test_jpg_mode_equals_a_plain_libjpeg_turbo_decode(tmp_path):
    x = numbered_images(40, res=32, seed=1)
    path = tmp_path / "j.beton"
    write_beton(Source("j", np.zeros(40, np.int64), np.zeros(40, np.int64), arrays=x), path, 32, "jpg", 85,
                progress=False)
    info = BetonInfo(path)
    ld = train_loader(path, batch=8)
    dec = Decoder(fast_dct=True)  # FFCV decodes with TJFLAG_FASTDCT
    for step in range(3):
        batch = ld.batch(step)[0]["image"]
        (idx,) = ld.indices(step)
        for img, i in zip(batch, idx):
            ref = dec.decode(info.stored_jpeg(int(i)))
            assert torch.equal(img, torch.from_numpy(ref).permute(2, 0, 1))
        assert not torch.equal(batch, torch.from_numpy(x[idx]).permute(0, 3, 1, 2))  # it is lossy


def test_two_ranks_read_disjoint_shards_covering_each_epoch(raw_beton):
    path, _, splits = raw_beton
    train_ids = set(np.flatnonzero(splits == 0).tolist())
    ranks = [train_loader(path, r, 2, batch=5, accum=2) for r in range(2)]
    spe = ranks[0].steps_per_epoch
    epochs = []
    for e in range(2):
        seen = []
        for s in range(e * spe, (e + 1) * spe):
            per_rank = [[i for mb in ld.batch(s) for i in index_of(mb["image"])] for ld in ranks]
            assert not set(per_rank[0]) & set(per_rank[1])
            seen += per_rank[0] + per_rank[1]
        assert len(seen) == len(set(seen)) == spe * 20 and set(seen) <= train_ids
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    again = train_loader(path, 0, 2, batch=5, accum=2)
    assert [index_of(mb["image"]) for mb in again.batch(spe + 1)] == [list(map(int, m)) for m in ranks[0].indices(spe + 1)]


def test_resume_mid_epoch_reads_the_remaining_batches(raw_beton):
    path, _, _ = raw_beton
    full = train_loader(path, batch=6)
    spe = full.steps_per_epoch
    straight = [index_of(full.batch(s)[0]["image"]) for s in range(spe + 4)]
    resumed = train_loader(path, batch=6)
    k = spe // 2
    assert [index_of(resumed.batch(s)[0]["image"]) for s in range(k, spe + 4)] == straight[k:]


def test_evaluation_over_two_ranks_sees_every_image_once(raw_beton):
    path, _, splits = raw_beton
    info = BetonInfo(path)
    seen, counts = [], []
    for r in range(2):
        ev = EvalLoader(info, EvalShard(info.ids("val"), 8, 2, r), 3, 2)  # 51 images, batch 8
        batches = list(ev)
        counts.append(len(batches))
        for x, n in batches:
            seen += index_of(x["image"][:n])
            assert x["index"][:n].tolist() == index_of(x["image"][:n])  # the loader's own index field
    assert sorted(seen) == np.flatnonzero(splits == 1).tolist()
    assert counts[0] == counts[1]


# -- the converter -------------------------------------------------------------------------------

def write_ffcv():
    spec = importlib.util.spec_from_file_location("write_ffcv", REPO / "tools" / "write_ffcv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture
def messy_folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "cats").mkdir(parents=True)
    (d / "dogs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / "cats" / f"c{i}.png")
        Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(d / "dogs" / f"d{i}.jpg", quality=90)
    good = (d / "dogs" / "d0.jpg").read_bytes()
    (d / "dogs" / "a_truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "cats" / "b_empty.png").write_bytes(b"")
    (d / "cats" / "a_text.png").write_text("this is not a picture\n")
    return d


def test_bad_images_fail_by_default_naming_the_first(messy_folder, tmp_path, capsys):
    out = tmp_path / "o.beton"
    assert run_cli(write_ffcv(), [str(messy_folder), str(out), "--resolution", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cats/a_text.png" in err[0] and "3 bad file(s)" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".o.beton*"))


def test_bad_images_skipped_on_request_and_listed(messy_folder, tmp_path, capsys):
    out = tmp_path / "o.beton"
    rc = run_cli(write_ffcv(), [str(messy_folder), str(out), "--resolution", "16", "--on-error", "skip",
                                "--val-fraction", "0", "--no-progress"])
    assert rc == 0
    assert "12 images (12 train, 0 val), 3 skipped" in capsys.readouterr().out
    listed = (tmp_path / "o.beton.skipped.txt").read_text()
    assert all(n in listed for n in ("a_truncated.jpg", "b_empty.png", "a_text.png"))
    info = BetonInfo(out)
    assert info.num_images == 12 and sorted(set(info.labels.tolist())) == [0, 1]  # cats, dogs
    assert set(info.heights.tolist()) == {16}


def test_existing_output_is_never_touched_without_overwrite(messy_folder, tmp_path, capsys):
    out = tmp_path / "o.beton"
    out.write_bytes(b"precious")
    assert run_cli(write_ffcv(), [str(messy_folder), str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def test_missing_input_folder(tmp_path):
    p = subprocess.run([sys.executable, "tools/write_ffcv.py", str(tmp_path / "nowhere"), str(tmp_path / "o.beton")],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: input folder not found:")
    assert len(p.stderr.strip().splitlines()) == 1


def test_recipe_pointing_at_a_missing_beton(tmp_path):
    p = subprocess.run([sys.executable, "-m", "framework.train", VAE, f"run.dir={tmp_path / 'r'}",
                        f"data.path={tmp_path / 'missing.beton'}"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "key 'data.path' names a file that does not exist" in p.stderr
    assert not (tmp_path / "r").exists()


def test_bundled_photos_are_256px_crops(tmp_path):
    from framework.data import sources

    s = sources.photos(64, 12, 0.25, seed=3)
    assert s.arrays.shape == (12, 64, 64, 3) and (s.splits == 1).sum() == 3
    assert len(set(s.labels.tolist())) > 1
    again = sources.photos(64, 12, 0.25, seed=3)
    assert np.array_equal(s.arrays, again.arrays)


def test_flip_mirrors_some_images_the_same_way_for_the_same_seed_and_epoch(raw_beton):
    path, x, _ = raw_beton
    info = BetonInfo(path)

    def flipped(seed, step):
        ld = TrainLoader(info, GlobalOrder(info.ids("train"), 16, 1, 0, 1, seed), 3, 2, flip=True)
        batch = ld.batch(step)[0]["image"]
        (idx,) = ld.indices(step)
        plain = torch.from_numpy(x[idx]).permute(0, 3, 1, 2)
        same = [torch.equal(b, p) for b, p in zip(batch, plain)]
        mirrored = [torch.equal(b, p.flip(-1)) for b, p in zip(batch, plain)]
        assert all(s or m for s, m in zip(same, mirrored))
        return mirrored

    a = flipped(0, 1)
    assert 0 < sum(a) < len(a)
    assert flipped(0, 1) == a
    spe = len(info.ids("train")) // 16
    assert flipped(0, 1 + spe) != a or flipped(1, 1) != a  # a new epoch or seed flips other images


def test_a_batch_holds_the_fields_the_task_reads(raw_beton):
    path, x, splits = raw_beton
    info = BetonInfo(path)
    ld = TrainLoader(info, GlobalOrder(info.ids("train"), 4, 1, 0, 1, 0), 3, 2, fields=("image", "label", "index"))
    for step in range(3):
        (b,) = ld.batch(step)
        (idx,) = ld.indices(step)
        assert sorted(b) == ["image", "index", "label"]
        assert b["index"].tolist() == list(map(int, idx)) == index_of(b["image"])
        assert b["label"].tolist() == info.labels[idx].tolist()
    with pytest.raises(UserError, match="has no field"):
        TrainLoader(info, GlobalOrder(info.ids("train"), 4, 1, 0, 1, 0), 3, 2, fields=("image", "codes"))


def test_a_beton_cut_short_is_refused(raw_beton, tmp_path):
    path, _, _ = raw_beton
    data = Path(path).read_bytes()
    for cut in (64, 4096, len(data) // 2):
        bad = tmp_path / f"cut{cut}.beton"
        bad.write_bytes(data[:-cut])
        with pytest.raises(UserError, match="damaged .beton|not a readable"):
            BetonInfo(bad)


def test_no_ffcv_epoch_thread_outlives_its_loader_and_torch_keeps_its_threads():
    """An evaluation pass abandoned after one batch, and a training loader closed, leave no FFCV
    epoch thread running (one torn down at exit aborted finished runs), and FFCV does not change
    torch's intra-op thread count."""
    import threading

    from conftest import MNIST_BETON
    from framework.data.loader import BetonInfo, EvalLoader, TrainLoader

    before = torch.get_num_threads()
    earlier = set(threading.enumerate())  # other tests' loaders, still open, are theirs
    info = BetonInfo(MNIST_BETON)
    first = next(iter(EvalLoader(info, EvalShard(info.ids("val"), 16, 1, 0), 1, 2)))
    assert first[1] == 16
    train = TrainLoader(info, GlobalOrder(info.ids("train"), 8, 1, 0), 1, 2)
    train.batch(0)
    train.close()
    alive = [t for t in set(threading.enumerate()) - earlier if type(t).__name__ == "EpochIterator" and t.is_alive()]
    assert alive == [] and torch.get_num_threads() == before


def test_a_batch_schedule_reads_each_steps_images_across_pieces_and_on_resume(raw_beton):
    """A growing GAN's minibatch (16, then 12, then 4 and 16 again; 2 ranks): one FFCV loader per
    micro-batch size, pieces cut at epoch ends and size changes, a restart in the middle of one."""
    path, x, splits = raw_beton
    info = BetonInfo(path)
    batches = [16] * 11 + [12] * 5 + [4] * 9 + [16] * 4

    def loader(rank):
        return TrainLoader(info, GlobalOrder(info.ids("train"), 0, 2, rank, 1, 0, batches=batches), 3, 2)

    ranks = [loader(r) for r in range(2)]
    straight = []
    for s, g in enumerate(batches):
        per_rank = [ld.batch(s)[0]["image"] for ld in ranks]
        for ld, b in zip(ranks, per_rank):
            assert b.shape[0] == g // 2 and index_of(b) == list(map(int, ld.indices(s)[0]))
        straight.append(index_of(per_rank[1]))
    assert len(ranks[1]._loaders) == 3  # micro-batches of 8, 6 and 2
    for ld in ranks:
        ld.close()
    again = loader(1)
    for s in (13, 7):  # mid-piece, then back to an earlier one (a restart either way)
        assert [index_of(again.batch(t)[0]["image"]) for t in range(s, len(batches))] == straight[s:]
    again.close()
