"""PGGAN on real engines in real processes: 2 ranks on ZeRO-2 and ZeRO-3 (and 1 rank on ZeRO-1) equal 1
rank with the same global batch across a phase boundary where the minibatch changes and the
optimisers reset (the gradient penalty's double backward through DeepSpeed on every stage); a run
killed in the middle of a fade resumes with the same alpha and exactly the same losses; the smoke
recipe grows to 32 px and its samples there are closer to the digits than an untrained model's;
bad input is one line, exit 2; the tools work on a PGGAN run."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import (MNIST_BETON, REPO, assert_same_losses, digit_frechet, env, kill9, metrics, run_train,
                      start_train, wait_for)

PGGAN = str(REPO / "recipes" / "pggan" / "mnist5k_smoke.yaml")
STEPS = 10
# 32 px networks of 16/16/8/4 maps; 4 px for 32 images at a minibatch of 16, then 64 images fading in 8 px
# at 8: steps 0-2 at 4 px (the schedule is re-read every step), the fade from step 3 (alpha 0.25 ..
# 0.875, the minibatch 16 -> 8 and both optimisers reset), 8 px alone from step 9 (reset again)
TINY_PG = [f"data.path={MNIST_BETON}", "data.resolution=32", "model.latent=16", "model.fmap_base=64",
           "model.fmap_max=16", "model.schedule.phase_images=32", "model.schedule.fade_images=64",
           "model.schedule.batch=8", "model.schedule.batch_per_resolution={4: 16, 8: 8, 16: 8}", "model.schedule.minibatch_repeats=1",
           f"train.steps={STEPS}", "train.log_every=1", "train.progress=false", "train.sample_every=0",
           "train.checkpoint_every=0", "train.ema=0.999"]
KEYS = ("loss", "gen/loss", "w_distance", "gradient_penalty", "real_score", "fake_score", "resolution", "alpha",
        "kimg")


def expected_phases():
    return ([(4.0, 1.0, 0.016), (4.0, 1.0, 0.032), (4.0, 1.0, 0.048)]
            + [(8.0, a / 8, 0.048 + 0.008 * (k + 1)) for k, a in enumerate(range(2, 8))]
            + [(8.0, 1.0, 0.104)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 rank, 2 micro-batches, ZeRO-0: the global batches of 2 ranks."""
    d = tmp_path_factory.mktemp("pg") / "run"
    run_train(PGGAN, TINY_PG + [f"run.dir={d}", "engine.zero_stage=0", "engine.grad_accum=2"])
    return d


@pytest.mark.slow
def test_the_schedule_grows_fades_and_changes_the_minibatch(reference):
    rows = [m for m in metrics(reference) if "loss" in m]
    got = [(m["resolution"], m["alpha"], round(m["kimg"], 6)) for m in rows]
    assert got == [(r, pytest.approx(a), pytest.approx(k)) for r, a, k in expected_phases()]
    assert all(math.isfinite(m["loss"]) and m["gradient_penalty"] >= 0 for m in rows)
    state = json.loads((reference / "checkpoints" / f"step_{STEPS:08d}" / "trainer.json").read_text())
    assert state["samples_seen"] == 104 and state["step"] == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("stage,nproc", [(2, 2), (3, 2), (1, 1)])
def test_every_zero_stage_equals_one_rank_across_the_phase_boundary(reference, tmp_path, stage, nproc):
    d = tmp_path / "run"
    run_train(PGGAN, TINY_PG + [f"run.dir={d}", f"engine.zero_stage={stage}", f"engine.grad_accum={3 - nproc}"],
              nproc=nproc)
    assert_same_losses(reference, d, KEYS)


@pytest.mark.slow
def test_killed_in_the_middle_of_a_fade_resumes_with_the_same_alpha_and_losses(reference, run_dir):
    ck = run_dir / "checkpoints"
    args = TINY_PG + [f"run.dir={run_dir}", "engine.zero_stage=0", "engine.grad_accum=2"]
    proc = start_train(PGGAN, args + ["train.checkpoint_every=1", "train.debug.sleep_after_step_s=1"])
    wait_for(lambda: (ck / "step_00000005" / "trainer.json").exists(), proc)
    kill9(proc)
    assert not (ck / f"step_{STEPS:08d}").exists()
    task = torch.load(ck / "step_00000005" / "task_rank0.pt", weights_only=False)
    assert (task["step"], task["resolution"], task["alpha"], task["images"]) == (5, 8, 0.375, 64)
    p = run_train(PGGAN, args + ["train.checkpoint_every=1"])
    assert "resumed from" in p.stdout
    assert_same_losses(reference, run_dir, KEYS, tol=0)  # bit-identical, fp32 on the CPU
    # a changed schedule is refused before anything is written
    before = sorted(p.name for p in ck.iterdir())
    p = run_train(PGGAN, args + ["model.schedule.fade_images=128", "train.steps=12"], check=False)
    assert p.returncode == 2 and "model.schedule.fade_images" in p.stderr
    assert sorted(p.name for p in ck.iterdir()) == before


@pytest.mark.slow
def test_bf16_on_zero2_trains_through_the_gradient_penalty(tmp_path):
    d = tmp_path / "run"
    run_train(PGGAN, TINY_PG + [f"run.dir={d}", "engine.precision=bf16", "engine.zero_stage=2"], nproc=2)
    rows = [m for m in metrics(d) if "loss" in m]
    assert len(rows) == STEPS and all(math.isfinite(m["loss"]) and math.isfinite(m["gen/loss"]) for m in rows)


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    (["data.resolution=48"], "key 'data.resolution' is 48; PGGAN's target must be a power of two >= 8"),
    (["data.resolution=64"], "key 'data.resolution' is 64 but"),  # the .beton holds 32 px digits
    (["model.schedule.phase_images=0", "model.schedule.fade_images=0"], "a schedule of zero images"),
    (["model.schedule.batch_per_resolution={4:16}"], "YAML reads 4:16 as the number 256"),
    (["model.schedule.batch_per_resolution={8: 6}"],
     "the micro-batch at 8 px is 6 images per rank, not a multiple of model.mbstd_group_size 4"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, override, message):
    d = tmp_path / "run"
    p = run_train(PGGAN, TINY_PG + [f"run.dir={d}", *override], check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr[-2000:]
    assert not (d / "checkpoints").exists() and not (d / "metrics.jsonl").exists()


@pytest.mark.slow
def test_the_smoke_recipe_grows_to_32_px_and_its_samples_approach_the_digits(tmp_path):
    """The whole smoke recipe (14,000 images, 4 -> 32 px). Measured here (2-core CPU, 500 EMA samples
    against the training split, Frechet distance of the digit classifier's features): trained 267,
    untrained 4,376 (held-out real digits: 2.5, tests/test_fid.py)."""
    d = tmp_path / "run"
    run_train(PGGAN, [f"run.dir={d}", f"data.path={MNIST_BETON}", "train.progress=false"])
    rows = [m for m in metrics(d) if "loss" in m]
    faded = {m["resolution"] for m in rows if m["alpha"] < 1}
    assert faded == {8.0, 16.0, 32.0} and (rows[-1]["resolution"], rows[-1]["alpha"]) == (32.0, 1.0)
    assert (d / "samples" / "step_00000559.png").exists()

    def at_32_px(name, loaded):  # the phase the checkpoint recorded / the target of untrained weights
        assert loaded.task.current(0) == (5, 1.0)

    scores = digit_frechet({"trained": (d, ()), "untrained": (PGGAN, [f"data.path={MNIST_BETON}"])}, on_load=at_32_px)
    assert scores["trained"] < 0.25 * scores["untrained"], scores


@pytest.mark.slow
def test_the_tools_work_on_a_pggan_run(reference, tmp_path):
    import subprocess
    import sys

    def tool(*args):
        p = subprocess.run([sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    out = tool("tools/sample.py", str(reference), "--n", "16", "--temperatures", "1.0", "--out", str(tmp_path / "g.png"))
    from PIL import Image

    im = np.asarray(Image.open(tmp_path / "g.png"))
    assert im.shape[:2] == (2 + 4 * 34, 2 + 4 * 34)  # 16 samples shown at the 32 px target ...
    cell = im[2:34, 2:34, 0].reshape(8, 4, 8, 4)
    assert (cell == cell[:, :1, :, :1]).all() and len(np.unique(cell)) > 1  # ... from the 8 px phase the run ended in
    assert "family pggan" in out
    out = tool("tools/model_summary.py", str(reference / "recipe.yaml"))
    assert "schedule:" in out and "from_step" in out and "images_shown:         104" in out
    out = tool("tools/eval_fid.py", str(reference), "--n", "64", "--batch-size", "32", "--split", "val",
               "--inception-weights", "random", "--metrics", "fid", "--out", str(tmp_path / "fid.json"))
    rec = json.loads((tmp_path / "fid.json").read_text())
    assert math.isfinite(rec["fid"]) and rec["n"] == 64
