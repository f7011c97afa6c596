"""The family interface, through the tests' toy family (tests/toy_family.py) and the real ones:
fields, frozen modules, per-engine settings, inactive engines, owned state, set-level metrics,
capabilities declared and refused in one line, ZeRO stages declared."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import MNIST_BETON, NVAE, REPO, TINY_TOY, TINY_VAE, TOY, VAE, env, metrics, run_train, train_losses
from framework.config import load_recipe
from framework.errors import UserError

STEPS = 6


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy") / "run"
    run_train(TOY, TINY_TOY + [f"run.dir={d}", f"train.steps={STEPS}", "train.checkpoint_every=3"])
    return d


def test_engines_have_their_own_settings_and_inactive_steps(toy_run):
    recs = {m["step"]: m for m in metrics(toy_run) if "loss" in m}
    # head starts at step index 2 (the family's start_step) and is inactive on odd step indices
    assert sorted(s for s, m in recs.items() if "head/loss" in m) == [3, 5]
    assert all(recs[s]["head/lr"] == 0.01 for s in (3, 5))  # its own lr, constant schedule
    assert recs[1]["lr"] == pytest.approx(0.01)  # enc: the recipe's lr and cosine schedule
    assert recs[6]["lr"] < recs[3]["lr"] < recs[1]["lr"]


def test_set_level_and_per_image_metrics_cover_the_split_once(toy_run):
    from framework.data.loader import BetonInfo

    info = BetonInfo(MNIST_BETON)
    val = info.ids("val")
    ev = [m for m in metrics(toy_run) if "val/mse" in m][-1]
    assert ev["val/images_counted"] == len(val)
    assert ev["val/index"] == pytest.approx(float(np.mean(val)))  # every val image exactly once
    p = np.bincount(info.labels[val], minlength=10) / len(val)
    assert ev["val/label_entropy"] == pytest.approx(-sum(q * math.log(q) for q in p if q > 0))


def test_frozen_module_is_not_checkpointed_and_no_sample_grid_without_sample(toy_run):
    ck = toy_run / "checkpoints" / f"step_{STEPS:08d}"
    state = json.loads((ck / "trainer.json").read_text())
    assert state["engines"] == ["enc", "head"]
    assert not any("features" in f for f in state["files"])
    assert not list((toy_run / "samples").glob("step_*.png"))  # the toy family has no `sample`
    assert (toy_run / "samples" / f"recon_step_{STEPS:08d}.png").is_file()  # but it visualizes


def test_owned_state_and_losses_continue_exactly_on_resume(toy_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(toy_run, d)
    shutil.rmtree(d / "checkpoints" / f"step_{STEPS:08d}")
    p = run_train(TOY, TINY_TOY + [f"run.dir={d}", f"train.steps={STEPS}", "train.checkpoint_every=3"])
    assert "at step 3" in p.stdout
    for key in ("loss", "head/loss", "batches_seen", "index_sum"):
        assert train_losses(d, key) == train_losses(toy_run, key), key
    assert train_losses(d, "batches_seen")[4] == 4.0  # restored, not counted again from 0


def test_frozen_module_loads_from_another_run(toy_run):
    r = load_recipe(TOY, TINY_TOY + ["run.dir=unused", f"model.features_from={toy_run}"])
    from framework.distributed import DistEnv
    from framework.models import build_task

    task = build_task(r, DistEnv(0, 0, 1, "127.0.0.1", 0, "single"))
    ck = toy_run / "checkpoints" / f"step_{STEPS:08d}" / "enc" / "mp_rank_00_model_states.pt"
    saved = torch.load(ck, map_location="cpu", weights_only=False)["module"]
    assert torch.equal(task.features.conv.weight, saved["enc.conv.weight"])


def tool(name, *args):
    return subprocess.run([sys.executable, f"tools/{name}", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("name,path,what,able", [
    ("sample.py", "TOY_RUN", "cannot draw samples", "dcgan, glann, nvae, pggan, prior, vae"),
    ("eval_bpd.py", "TOY_RUN", "cannot give importance weights or model code grids", "nvae, prior"),
    ("profile_sampling.py", VAE, "cannot sample through a prior or model code grids", "nvae, prior"),
    ("recalibrate_bn.py", "TOY_RUN", "cannot recalibrate BatchNorm", "nvae"),
])
def test_tool_on_a_family_without_the_capability_is_one_line(name, path, what, able, toy_run):
    p = tool(name, str(toy_run) if path == "TOY_RUN" else path)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert what in err[-1] and "Traceback" not in p.stderr
    assert f"families that can: {able})" in err[-1]


def test_zero_stages_are_declared_by_the_family():
    with pytest.raises(UserError, match="family 'nvae' supports ZeRO 0, 1, 2"):
        load_recipe(NVAE, [f"data.path={MNIST_BETON}", "engine.zero_stage=3"])


def test_per_engine_blocks_are_validated(tmp_path):
    with pytest.raises(UserError, match="not a per-engine setting"):
        from framework.config import engine_config

        engine_config(load_recipe(TOY, TINY_TOY + ["run.dir=x", "engine.engines.head.bogus=1"]), "head")
    p = run_train(TOY, TINY_TOY + [f"run.dir={tmp_path / 'r'}", "engine.engines.nope.clip=1"], check=False)
    assert p.returncode == 2 and "family 'toy' has no engine 'nope'" in p.stderr
    p = run_train(VAE, TINY_VAE + [f"run.dir={tmp_path / 'v'}", "train.steps=2", "engine.engines.vae.optimizer.lr=0.5",
                                   "engine.engines.vae.schedule.warmup_steps=0"])
    assert train_losses(tmp_path / "v", "lr")[1] == pytest.approx(0.5 * (1 + math.cos(0)) / 2)


PROBE = r"""
import json, sys
from framework.config import load_recipe
from framework.trainer import Trainer
t = Trainer(load_recipe(sys.argv[1], sys.argv[2:]))
t.fit()
steps = [int(st["step"]) for st in t.engines["head"].gate.state.values()]
print("PROBE" + json.dumps(sorted(set(steps))))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_an_engine_optimizer_state_is_reset_when_the_family_asks(tmp_path, stage):
    def adam_steps(*extra):
        p = subprocess.run([sys.executable, "-c", PROBE, TOY, *TINY_TOY, f"run.dir={tmp_path / str(len(extra))}",
                            "train.steps=7", f"engine.zero_stage={stage}", *extra], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=300)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("PROBE")]
        assert line, p.stderr[-3000:]
        return json.loads(line[0][5:])

    assert adam_steps() == [3]  # head trains at step indices 2, 4, 6
    assert adam_steps("model.head_reset_at=4") == [2]  # moments cleared before index 4: 4 and 6 remain
