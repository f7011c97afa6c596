"""GLANN on real engines in real processes, through the smoke recipes of recipes/glann/ (VGG16 and
LPIPS's trunk have random weights, named as such). GLO: each image's code is the one its own
gradient moved, on a shuffled loader sharded over 2 ranks; the codes are back on the unit sphere
after each epoch on ZeRO-2 and ZeRO-3 (the optimizer's master copy included); 2 ranks on ZeRO-2
and ZeRO-3 equal 1 rank with 2 micro-batches across an epoch boundary (projection, optimizer
reset); a killed run resumes with the same table and losses; reconstructions get closer to their
images; the Laplacian L1 trains. IMLE over the codes: 2 ranks = 1, the checkpointed assignment is
the brute-force one, a killed run resumes exactly, the mapped samples approach the codes, samples
G(T(e)) beat an untrained model's. Pixel IMLE: the same under L2 and LPIPS. sample.py's grids
(samples, interpolations) and eval_fid.py on GLANN runs; bad input."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, assert_same_losses, kill9, metrics, mnist300_beton, run_train, start_train, wait_for

pytestmark = pytest.mark.slow

RECIPE = str(REPO / "recipes" / "glann" / "mnist5k_smoke_glo.yaml")
LR = 0.01


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return mnist300_beton(tmp_path_factory.mktemp("m300") / "m300.beton")  # 268 training images


def tiny(beton, *extra):
    return [f"data.path={beton}", "data.batch_size=8", "train.progress=false", "train.log_every=1",
            "train.sample_every=0", "train.checkpoint_every=0", "model.glo.vgg_weights=random", *extra]


def table(run_dir, step):
    s = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "glo" / "mp_rank_00_model_states.pt",
                   map_location="cpu", weights_only=False)
    return s["module"]["table.emb.weight"]


def build(beton, world, monkeypatch):
    """The task the trainer builds at step 0 (same seed, same order of construction)."""
    from framework.config import load_recipe
    from framework.trainer import _seed_everything

    r = load_recipe(RECIPE, tiny(beton))
    _seed_everything(r.run.seed)
    from framework.models.glann.task import Task

    return r, Task(r, SimpleNamespace(world_size=world, rank=0))


def test_each_image_keeps_its_own_code_on_a_sharded_shuffled_loader(beton, tmp_path, monkeypatch):
    d = tmp_path / "run"
    run_train(RECIPE, tiny(beton, f"run.dir={d}", "train.steps=1"), nproc=2)
    after = table(d, 1)
    r, task = build(beton, 2, monkeypatch)
    before = task.glo.table.emb.weight.detach().clone()
    from framework.data.loader import BetonInfo, TrainLoader
    from framework.data.order import GlobalOrder

    info = BetonInfo(beton)
    vgg = task.distance.eval()
    grads = torch.zeros_like(before)
    for rank in range(2):  # each rank's micro-batch: its own BatchNorm statistics, its share of the mean
        ld = TrainLoader(info, GlobalOrder(info.ids("train"), 8, 2, rank, 1, r.run.seed), 1, 1, False,
                         ("image", "index"))
        (batch,) = ld.batch(0)
        ld.close()
        rows = torch.from_numpy(task.row_of[batch["index"].numpy()])
        task.glo.zero_grad()
        x = batch["image"].float() / 255
        loss = vgg(task.glo(rows), x).mean() / 2
        loss.backward()
        grads += task.glo.table.emb.weight.grad
    moved = (after != before).any(1)
    assert moved.sum() == 16 and torch.equal(moved, grads.abs().sum(1) > 0)  # exactly the batch's 16 rows
    want = before - LR * grads / (grads.abs() + 1e-8)  # Adam's first step: -lr g / (|g| + eps)
    assert torch.allclose(after[moved], want[moved], atol=2e-5), (after[moved] - want[moved]).abs().max()


def _loaded_table(d, step, load):
    loaded = load(d / "checkpoints" / f"step_{step:08d}", ema=False)
    return loaded.modules["glo"].table.emb.weight.detach()


KEYS = ("loss", "rec_l1", "lr")


@pytest.fixture(scope="module")
def reference(beton, tmp_path_factory):
    """1 rank, 2 micro-batches, ZeRO-0, across the first epoch boundary."""
    d = tmp_path_factory.mktemp("glo") / "run"
    run_train(RECIPE, tiny(beton, f"run.dir={d}", "train.steps=18", "engine.zero_stage=0", "engine.grad_accum=2"))
    return d


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_equal_one_rank_and_the_codes_return_to_the_sphere_after_each_epoch(beton, reference, tmp_path,
                                                                                       stage):
    """268 images / 16 a step: epochs of 16 steps, the projection after step 16, a fresh optimizer
    at step 17; on ZeRO-3 the projection must reach the partitioned fp32 master too."""
    d = tmp_path / "run"
    run_train(RECIPE, tiny(beton, f"run.dir={d}", "train.steps=18", "train.checkpoint_every=16",
                           f"engine.zero_stage={stage}"), nproc=2)
    assert_same_losses(reference, d, KEYS)
    from framework.eval.checkpoints import load  # any stage: the tools' loader assembles ZeRO-3 shards

    w16, w18 = _loaded_table(d, 16, load), _loaded_table(d, 18, load)
    assert torch.allclose(w16.norm(dim=1), torch.ones(len(w16)), atol=1e-6)
    norms = w18.norm(dim=1)
    # steps 17 and 18 moved their 32 codes from the sphere; the rest stay unit exactly
    assert ((norms - 1).abs() < 1e-6).sum() == len(w18) - 32
    assert norms.min() > 0.5  # the moved ones start from the sphere, not from the tiny initial codes


def test_killed_run_resumes_with_the_same_table(beton, reference, run_dir):
    ck = run_dir / "checkpoints"
    args = tiny(beton, f"run.dir={run_dir}", "train.steps=18", "engine.zero_stage=0", "engine.grad_accum=2")
    proc = start_train(RECIPE, args + ["train.checkpoint_every=1", "train.debug.sleep_after_step_s=1"])
    wait_for(lambda: (ck / "step_00000005" / "trainer.json").exists(), proc)  # the epoch boundary is ahead
    kill9(proc)
    assert not (ck / "step_00000016").exists()
    p = run_train(RECIPE, args + ["train.checkpoint_every=18"])
    assert "resumed from" in p.stdout
    assert_same_losses(reference, run_dir, KEYS, tol=0)
    assert torch.equal(table(run_dir, 18), table(reference, 18))


@pytest.fixture(scope="module")
def glo_run(beton, tmp_path_factory):
    """A GLO run of 5 epochs (85 steps of 16) on the 268 training digits."""
    d = tmp_path_factory.mktemp("glo_run") / "run"
    run_train(RECIPE, tiny(beton, f"run.dir={d}", "train.steps=85", "data.batch_size=16"))
    return d


def test_reconstructions_get_closer_to_their_images(glo_run):
    """Measured here: reconstruction L1 (in [-1, 1]) 0.972 at step 1, 0.091 over steps 81-85 (5 epochs)."""
    d = glo_run
    rows = [m for m in metrics(d) if "rec_l1" in m]
    first, last = rows[0]["rec_l1"], np.mean([m["rec_l1"] for m in rows[-5:]])
    print({"rec_l1 first": first, "last 5": last})
    assert last < 0.35 * first
    assert (d / "samples" / "step_00000085.png").exists()  # the official 'gaussian' grid


# -- the IMLE stage -------------------------------------------------------------------------------

IMLE = str(REPO / "recipes" / "glann" / "mnist5k_smoke_imle.yaml")
IMLE_KEYS = ("loss", "nn_distance", "round", "lr")


def imle(beton, glo_run, *extra):
    return [f"data.path={beton}", f"model.glo_run={glo_run}", "data.batch_size=8", "train.progress=false",
            "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0", *extra]


@pytest.fixture(scope="module")
def imle_reference(beton, glo_run, tmp_path_factory):
    """1 rank, 2 micro-batches, ZeRO-0: 3 rounds of 8 steps (refresh_every 8) and an epoch boundary."""
    d = tmp_path_factory.mktemp("imle") / "run"
    run_train(IMLE, imle(beton, glo_run, f"run.dir={d}", "train.steps=20", "model.imle.refresh_every=8",
                         "engine.zero_stage=0", "engine.grad_accum=2"))
    return d


@pytest.mark.parametrize("stage", [2, 3])
def test_imle_on_two_ranks_equals_one_rank_and_finds_the_brute_force_nearest_samples(beton, glo_run, imle_reference,
                                                                                     tmp_path, stage):
    """Round 2 is searched at step 16 with T after 16 steps: recomputed here (ZeRO-2) from checkpoint
    16's T, the seeded noise of round 2 mapped in chunks of the global batch, and a float64 brute force."""
    d = tmp_path / "run"
    run_train(IMLE, imle(beton, glo_run, f"run.dir={d}", "train.steps=20", "model.imle.refresh_every=8",
                         "train.checkpoint_every=16", f"engine.zero_stage={stage}"), nproc=2)
    assert_same_losses(imle_reference, d, IMLE_KEYS)
    rounds = [m["round"] for m in metrics(d) if "round" in m]
    assert rounds == [0] * 8 + [1] * 8 + [2] * 4
    if stage != 2:
        return
    from framework.models.glann.networks import Mapping
    from framework.task import draw_base

    state = torch.load(d / "checkpoints" / "step_00000020" / "task_rank0.pt", weights_only=False)
    t = Mapping(32, 64)
    t.load_state_dict(torch.load(d / "checkpoints" / "step_00000016" / "mapping" / "mp_rank_00_model_states.pt",
                                 map_location="cpu", weights_only=False)["module"])
    g = torch.Generator().manual_seed(draw_base(0, 0x1E, 2))
    e = torch.randn(2 * 268, 32, generator=g)
    with torch.no_grad():
        mapped = torch.cat([t(e[i:i + 16]) for i in range(0, len(e), 16)])
    glo = torch.load(sorted((glo_run / "checkpoints").iterdir())[-1] / "glo" / "mp_rank_00_model_states.pt",
                     map_location="cpu", weights_only=False)["module"]["table.emb.weight"]
    codes = glo / glo.norm(dim=1, keepdim=True)  # projected onto the sphere when loaded
    d2 = (codes.double().unsqueeze(1) - mapped.double().unsqueeze(0)).pow(2).sum(-1)
    assert state["round"] == 2 and torch.equal(state["index"], d2.argmin(1))
    assert torch.allclose(state["noise"], e[state["index"]])
    assert abs(state["distance"] - float(d2.min(1).values.mean())) < 1e-5


def test_the_checkpointed_assignment_is_each_codes_nearest_sample_and_resumes_exactly(beton, glo_run,
                                                                                       imle_reference, run_dir):
    ck = run_dir / "checkpoints"
    args = imle(beton, glo_run, f"run.dir={run_dir}", "train.steps=20", "model.imle.refresh_every=8",
                "engine.zero_stage=0", "engine.grad_accum=2")
    proc = start_train(IMLE, args + ["train.checkpoint_every=1", "train.debug.sleep_after_step_s=1"])
    wait_for(lambda: (ck / "step_00000003" / "trainer.json").exists(), proc)  # in the middle of round 0
    kill9(proc)
    assert not (ck / "step_00000008").exists()
    state = torch.load(ck / "step_00000003" / "task_rank0.pt", weights_only=False)
    assert state["round"] == 0 and state["noise"].shape == (268, 32) and state["index"].max() < 2 * 268
    p = run_train(IMLE, args + ["train.checkpoint_every=20"])
    assert "resumed from" in p.stdout
    assert_same_losses(imle_reference, run_dir, IMLE_KEYS, tol=0)


def test_imle_pulls_the_mapped_samples_towards_the_codes(beton, glo_run, tmp_path):
    """Measured here: the mean squared distance from each code to its nearest mapped sample falls
    from 3.35 (round 0, T untrained) to 1.13 in round 11 (12 rounds of 16 steps); 500 samples
    G(T(e)) score 266 in the digit classifier's features, an untrained model's 1,966."""
    d = tmp_path / "run"
    run_train(IMLE, imle(beton, glo_run, f"run.dir={d}", "train.steps=192", "data.batch_size=16"))
    by_round = {}
    for m in metrics(d):
        if "round" in m:
            by_round[m["round"]] = m["nn_distance"]
    print("nn_distance by round:", by_round)
    assert len(by_round) == 12 and by_round[11] < 0.5 * by_round[0]
    # samples G(T(e)) against an untrained model's (a GLO run of one step, T at random) on the
    # digit classifier's features (the FID test's stand-in for Inception)
    from conftest import digit_frechet

    raw = tmp_path / "glo1"
    run_train(RECIPE, tiny(beton, f"run.dir={raw}", "train.steps=1"))
    scores = digit_frechet({"trained": (d, ()), "untrained": (IMLE, [f"data.path={beton}", f"model.glo_run={raw}"])})
    assert scores["trained"] < 0.5 * scores["untrained"], scores


@pytest.mark.parametrize("override,message", [
    (["model.glo_run=''"], "key 'model.glo_run' is empty"),
    (["model.stage=gan"], "key 'model.stage' is 'gan'; expected glo, imle or imle_pixels"),
    (["model.imle.samples_per_code=0"], "key 'model.imle.samples_per_code' is 0; it must be >= 1"),
    (["model.glo_run=NOWHERE"], "no such run or checkpoint folder"),
    (["data.path=OTHER"], "has codes for 268 images"),
])
def test_imle_bad_input_is_one_line_and_writes_nothing(beton, glo_run, tmp_path, override, message):
    other = mnist300_beton(tmp_path / "other.beton", val_every=4)  # 225 training images
    override = [o.replace("NOWHERE", str(tmp_path / "nowhere")).replace("OTHER", str(other)) for o in override]
    d = tmp_path / "run"
    p = run_train(IMLE, imle(beton, glo_run, f"run.dir={d}", "train.steps=2") + override, check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr[-2000:]
    assert not (d / "checkpoints").exists()


# -- tools on GLANN runs ----------------------------------------------------------------------------

def test_sample_tool_writes_samples_and_interpolations_between_training_codes(glo_run, imle_reference, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from conftest import env

    for run in (glo_run, imle_reference):
        p = subprocess.run([sys.executable, "tools/sample.py", str(run), "--n", "16", "--temperatures", "1",
                            "--interpolations", "4", "--interp-steps", "6"], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "4 interpolations of 6 steps" in p.stdout
        ck = sorted((run / "checkpoints").iterdir())[-1].name
        grid = Image.open(run / "samples" / f"{ck}_interp.png")
        assert grid.size == (6 * 32 + 7 * 2, 4 * 32 + 5 * 2)
    # GLO: each row starts and ends at the reconstruction of a training image's code
    from framework.eval.checkpoints import load
    from framework.eval.sampling import _generator

    loaded = load(glo_run, ema=False)
    loaded.add_frozen()
    ctx = loaded.ctx(12)
    with torch.no_grad():
        walk = loaded.task.interpolate(2, 6, _generator(0, 1), ctx).view(2, 6, -1)
        glo = loaded.modules["glo"].eval()
        recs = glo.generator(glo.table.emb.weight).flatten(1)
    for row in walk:
        for end in (row[0], row[-1]):
            assert (recs - end).abs().max(1).values.min() < 1e-5
        assert (row[2] - row[0]).abs().max() > 1e-3 and (row[2] - row[-1]).abs().max() > 1e-3


def test_eval_fid_scores_a_glann_run(imle_reference):
    """Random Inception weights (none ship here): the figure is not FID and the tool says so."""
    import json
    import subprocess
    import sys

    from conftest import env

    out = imle_reference / "fid.json"
    p = subprocess.run([sys.executable, "tools/eval_fid.py", str(imle_reference), "--n", "32", "--split", "val",
                        "--inception-weights", "random", "--metrics", "fid", "--out", str(out), "--no-progress"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["fid"] > 0 and report["n"] == 32, report


def test_the_laplacian_l1_trains_the_glo_stage(beton, tmp_path):
    d = tmp_path / "run"
    run_train(RECIPE, tiny(beton, f"run.dir={d}", "train.steps=24", "data.batch_size=16", "model.glo.loss=lap1"))
    losses = [m["loss"] for m in metrics(d) if "loss" in m]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses


# -- pixel IMLE -----------------------------------------------------------------------------------

PIXELS = str(REPO / "recipes" / "glann" / "mnist5k_smoke_imle_pixels.yaml")


def pixels(beton, *extra):
    return [f"data.path={beton}", "data.batch_size=8", "train.progress=false", "train.log_every=1",
            "train.sample_every=0", "train.checkpoint_every=0", "model.imle.lpips.vgg_weights=random", *extra]


@pytest.fixture(scope="module")
def pixel_reference(beton, tmp_path_factory):
    """1 rank, 2 micro-batches, ZeRO-0: rounds of 8 steps, L2 in pixels."""
    d = tmp_path_factory.mktemp("pix") / "run"
    run_train(PIXELS, pixels(beton, f"run.dir={d}", "train.steps=20", "model.imle.refresh_every=8",
                             "engine.zero_stage=0", "engine.grad_accum=2"))
    return d


def test_pixel_imle_on_two_ranks_equals_one_rank_and_finds_the_brute_force_nearest_samples(beton, pixel_reference,
                                                                                           tmp_path):
    d = tmp_path / "run"
    run_train(PIXELS, pixels(beton, f"run.dir={d}", "train.steps=20", "model.imle.refresh_every=8",
                             "train.checkpoint_every=16"), nproc=2)
    assert_same_losses(pixel_reference, d, IMLE_KEYS)
    from framework.data.loader import BetonInfo
    from framework.models.glann.networks import Generator
    from framework.models.glann.task import read_images
    from framework.task import draw_base

    state = torch.load(d / "checkpoints" / "step_00000020" / "task_rank0.pt", weights_only=False)
    g = Generator(64, 32, 1, do_bn=True)
    g.load_state_dict(torch.load(d / "checkpoints" / "step_00000016" / "generator" / "mp_rank_00_model_states.pt",
                                 map_location="cpu", weights_only=False)["module"])
    e = torch.randn(2 * 268, 64, generator=torch.Generator().manual_seed(draw_base(0, 0x1E, 2)))
    with torch.no_grad():  # training mode: BatchNorm over each chunk of the global batch
        fake = torch.cat([2 * g(e[i:i + 16]) - 1 for i in range(0, len(e), 16)]).flatten(1)
    info = BetonInfo(beton)
    real = read_images(info, info.ids("train"), 1).flatten(1).double() * (2 / 255) - 1
    d2 = (real.unsqueeze(1) - fake.double().unsqueeze(0)).pow(2).sum(-1)
    assert state["round"] == 2 and torch.equal(state["index"], d2.argmin(1))
    assert abs(state["distance"] - float(d2.min(1).values.mean())) < 1e-3


def test_pixel_imle_under_lpips_gives_the_same_run_on_two_ranks(beton, tmp_path):
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"w{nproc}"
        run_train(PIXELS, pixels(beton, f"run.dir={runs[nproc]}", "train.steps=4", "model.imle.refresh_every=2",
                                 "model.imle.samples_per_code=1", "model.imle.distance=lpips",
                                 f"engine.grad_accum={3 - nproc}"), nproc=nproc)
    assert_same_losses(runs[1], runs[2], IMLE_KEYS)
    rows = [m for m in metrics(runs[1]) if "nn_distance" in m]
    assert rows[0]["round"] == 0 and rows[-1]["round"] == 1 and rows[0]["nn_distance"] > 0


def test_pixel_imle_pulls_the_generated_samples_towards_the_images(beton, tmp_path):
    """Measured here: the mean squared L2 (in [-1, 1], summed over the 1,024 pixels) from each image
    to its nearest generated sample: 860 in round 0, 156 in round 3 (4 epochs of 16 steps; 133 after 8)."""
    d = tmp_path / "run"
    run_train(PIXELS, pixels(beton, f"run.dir={d}", "train.steps=64", "data.batch_size=16"))
    by_round = {m["round"]: m["nn_distance"] for m in metrics(d) if "round" in m}
    print("pixel nn_distance by round:", by_round)
    assert len(by_round) == 4 and by_round[3] < 0.4 * by_round[0]
