"""A two-engine (GAN-shaped) task trains on every ZeRO stage."""
import json
import subprocess
import sys

import pytest

from conftest import DCGAN, REPO, TINY_GAN, env, run_train, train_losses

pytestmark = pytest.mark.slow  # real training runs in real processes: minutes

STEPS = 4


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    d = tmp_path_factory.mktemp("gan0") / "run"
    run_train(DCGAN, TINY_GAN + [f"run.dir={d}", f"train.steps={STEPS}", "engine.zero_stage=0"], nproc=2)
    return d


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gan_trains_the_same_on_every_zero_stage(stage, stage0, tmp_path):
    d = tmp_path / "run"
    run_train(DCGAN, TINY_GAN + [f"run.dir={d}", f"train.steps={STEPS}", f"engine.zero_stage={stage}"], nproc=2)
    for key in ("loss", "disc/loss"):
        ref, got = train_losses(stage0, key), train_losses(d, key)
        assert sorted(got) == list(range(1, STEPS + 1))
        for s in ref:
            assert abs(ref[s] - got[s]) < 1e-5, (stage, key, s)
    assert (d / "samples" / f"step_{STEPS:08d}.png").exists()
    assert (d / "checkpoints" / f"step_{STEPS:08d}" / "disc").is_dir()
    assert (d / "checkpoints" / f"step_{STEPS:08d}" / "gen").is_dir()


PROBE = r"""
import json, sys
from framework.config import load_recipe
from framework.trainer import Trainer
r = load_recipe(sys.argv[1], sys.argv[2:])
t = Trainer(r)
disc = t.engines["disc"].module
micro = t.train_data.batch(0)
t._train_engine("gen", micro, 0)
out = {
    "disc_grads": [None if p.grad is None else float(p.grad.abs().sum()) for p in disc.parameters()],
    "requires_grad_restored": all(p.requires_grad for p in disc.parameters()),
    "gen_grad_norm": t.engines["gen"].last.grad_norm,
}
print("PROBE" + json.dumps(out))
"""


def test_generator_step_does_not_reach_the_discriminator_on_zero0(tmp_path):
    p = subprocess.run([sys.executable, "-c", PROBE, DCGAN, *TINY_GAN, f"run.dir={tmp_path / 'run'}",
                        "engine.zero_stage=0"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("PROBE")]
    assert line, p.stderr[-3000:]
    out = json.loads(line[0][5:])
    assert all(g is None or g == 0.0 for g in out["disc_grads"])
    assert out["requires_grad_restored"]
    assert out["gen_grad_norm"] > 0
