"""Faults and bad input: strict resume, damaged checkpoints and data, a full disk, signals during the
first evaluation, a kill before the first checkpoint. Each ends in one line and exit status 2, or
in a run that continues exactly; nothing already written is lost."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import (MNIST_BETON, REPO, TINY_VAE, VAE, env, kill9, metrics, run_train, start_train, train_losses,
                      wait_for)
from framework.checkpoint import read_state, verify_files
from framework.trainer import EXIT_REQUEUE

pytestmark = pytest.mark.slow  # real training runs in real processes: minutes

STEPS = 6
BASE = TINY_VAE + [f"train.steps={STEPS}", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("finished") / "run"
    run_train(VAE, BASE + [f"run.dir={d}"])
    return d


def snapshot(d):
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file() and "tb" not in f.parts}


def last_line(p):
    return p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("change,named", [
    ("data.batch_size=16", "data.batch_size (8 -> 16)"),
    ("model.width=16", "model.width (8 -> 16)"),
    ("engine.zero_stage=0", "engine.zero_stage (2 -> 0)"),
    ("run.seed=1", "run.seed (0 -> 1)"),
])
def test_resume_with_a_changed_training_key_is_refused_and_changes_nothing(finished, tmp_path, change, named):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    before = snapshot(d)
    p = run_train(VAE, BASE + [f"run.dir={d}", "train.steps=9", change], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert named in last_line(p) and "train.steps (6 -> 9)" in last_line(p)
    assert "train.resume_changed=allow" in last_line(p) and "Traceback" not in p.stderr
    assert snapshot(d) == before


def test_allowed_changes_resume_and_are_recorded(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    first = (d / "recipe.yaml").read_text()
    p = run_train(VAE, BASE + [f"run.dir={d}", "train.steps=8", "train.resume_changed=allow"])
    assert "resumed from" in p.stdout and "train.steps (6 -> 8)" in p.stderr
    assert (d / "recipe.yaml").read_text() == first  # the first run's recipe is kept
    extra = (d / "recipe.resume-1.yaml").read_text()
    assert "train.steps (6 -> 8)" in extra and "steps: 8" in extra
    assert [m for m in metrics(d) if m.get("event") == "resume_changed"]
    assert sorted(train_losses(d)) == list(range(1, 9))


def test_a_changed_model_shape_allowed_is_still_one_line(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    p = run_train(VAE, BASE + [f"run.dir={d}", "model.width=16", "train.resume_changed=allow"], check=False)
    assert p.returncode == 2 and "do not fit this recipe's model" in last_line(p), p.stderr[-3000:]


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "ema missing": lambda ck: (ck / "ema_rank0.pt").unlink(),
    "model cut short": lambda ck: _truncate(ck / "vae" / "mp_rank_00_model_states.pt"),
    "optimizer cut short": lambda ck: _truncate(next((ck / "vae").glob("*optim_states.pt"))),
    "rng cut short": lambda ck: _truncate(ck / "rng_rank0.pt"),
    "trainer.json empty": lambda ck: (ck / "trainer.json").write_text(""),
    "trainer.json cut": lambda ck: (ck / "trainer.json").write_text((ck / "trainer.json").read_text()[:40]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, damage):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    DAMAGE[damage](d / "checkpoints" / f"step_{STEPS:08d}")
    p = run_train(VAE, BASE + [f"run.dir={d}"])
    assert "at step 3" in p.stdout, p.stderr[-3000:]
    assert "warning:" in p.stderr and "passing over step_00000006" in p.stderr
    assert train_losses(d) == train_losses(finished)  # steps 4-6 again, bit-identical


def test_tools_refuse_a_damaged_checkpoint_in_one_line(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    ck = d / "checkpoints" / f"step_{STEPS:08d}"
    _truncate(ck / "vae" / "mp_rank_00_model_states.pt")
    p = subprocess.run([sys.executable, "tools/sample.py", str(ck), "--n", "4"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "mp_rank_00_model_states.pt: unreadable" in last_line(p), p.stderr[-2000:]


def test_a_damaged_beton_is_refused_before_training(tmp_path):
    bad = tmp_path / "cut.beton"
    data = MNIST_BETON.read_bytes()
    bad.write_bytes(data[: len(data) - 5000])
    p = run_train(VAE, TINY_VAE + [f"run.dir={tmp_path / 'run'}", f"data.path={bad}", "train.steps=2"], check=False)
    assert p.returncode == 2 and "damaged .beton" in last_line(p), p.stderr[-2000:]
    assert not (tmp_path / "run").exists()



def test_sigterm_during_the_first_evaluation_checkpoints_and_exits_for_requeue(tmp_path):
    d = tmp_path / "run"
    args = TINY_VAE + [f"run.dir={d}", "train.steps=4", "train.eval_every=2"]
    proc = start_train(VAE, args + ["train.debug.sleep_in_eval_s=3"])
    wait_for(lambda: (d / "recipe.yaml").exists(), proc)
    time.sleep(1.0)  # inside the step-0 evaluation (it sleeps 3 s)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    ck = d / "checkpoints" / "step_00000000"
    verify_files(ck, read_state(ck))
    run_train(VAE, args)
    steps = [m["step"] for m in metrics(d)]
    assert steps.count(0) == 1 and sorted(train_losses(d)) == [1, 2, 3, 4]


def test_a_kill_before_the_first_checkpoint_does_not_repeat_the_step0_line(tmp_path):
    d = tmp_path / "run"
    args = TINY_VAE + [f"run.dir={d}", "train.steps=4", "train.eval_every=2"]
    proc = start_train(VAE, args + ["train.debug.sleep_after_step_s=2"])
    mfile = d / "metrics.jsonl"
    wait_for(lambda: mfile.exists() and '"step": 1,' in mfile.read_text(), proc)
    kill9(proc)
    assert not list((d / "checkpoints").glob("step_*"))
    run_train(VAE, args)
    steps = [m["step"] for m in metrics(d)]
    assert steps.count(0) == 1 and [s for s in steps if s] == [1, 2, 2, 3, 4, 4]  # train + val at 2 and 4


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (the disk that fills up)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_earlier_checkpoint(small_disk):
    d = small_disk / "run"
    proc = start_train(VAE, TINY_VAE + [f"run.dir={d}", "train.steps=40", "train.checkpoint_every=2",
                                        "train.keep_checkpoints=0", "train.debug.sleep_after_step_s=0.4"])
    ck2 = d / "checkpoints" / "step_00000002"
    wait_for(lambda: (ck2 / "trainer.json").exists(), proc)
    with open(small_disk / "filler", "wb") as f:  # fill the disk to the last block
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert "disk full" in line and "Traceback" not in err, err[-3000:]
    verify_files(ck2, read_state(ck2))  # the earlier checkpoint is whole
    assert not list((d / "checkpoints").glob(".tmp_*"))
    json.loads((ck2 / "trainer.json").read_text())


def test_a_changed_zero_stage_allowed_is_still_one_line(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    p = run_train(VAE, BASE + [f"run.dir={d}", "engine.zero_stage=1", "train.resume_changed=allow"], check=False)
    assert p.returncode == 2 and "written on ZeRO-2, this run is ZeRO-1" in last_line(p), p.stderr[-3000:]


def test_when_every_checkpoint_is_damaged_the_run_does_not_start_afresh(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    for ck in (d / "checkpoints").glob("step_*"):
        (ck / "rng_rank0.pt").unlink()
    before = snapshot(d)
    p = run_train(VAE, BASE + [f"run.dir={d}"], check=False)
    assert p.returncode == 2 and "none of its 2 checkpoint(s) can be loaded" in last_line(p), p.stderr[-3000:]
    assert snapshot(d) == before


def test_a_changed_data_file_is_refused(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    data = tmp_path / "copy.beton"
    shutil.copyfile(MNIST_BETON, data)  # the same images, but another file (its time differs)
    p = run_train(VAE, BASE + [f"run.dir={d}", f"data.path={data}"], check=False)
    assert p.returncode == 2 and f"data file {data} (modified since)" in last_line(p), p.stderr[-3000:]
