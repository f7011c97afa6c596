"""Checkpoints: exact continuation, kill -9 at any moment, SIGUSR2 -> checkpoint + requeue status."""
import signal

import pytest

from conftest import TINY_VAE, VAE, kill9, metrics, run_train, start_train, train_losses, wait_for
from framework.trainer import EXIT_REQUEUE

pytestmark = pytest.mark.slow  # real training runs in real processes: minutes

STEPS = 20


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full") / "run"
    run_train(VAE, TINY_VAE + [f"run.dir={d}", f"train.steps={STEPS}"])
    return train_losses(d)



def assert_each_step_once(run_dir):
    steps = [m["step"] for m in metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, STEPS + 1))


def test_resume_after_kill_continues_exactly(uninterrupted, run_dir):
    ck = run_dir / "checkpoints"
    proc = start_train(VAE, TINY_VAE + [f"run.dir={run_dir}", f"train.steps={STEPS}", "train.checkpoint_every=10",
                                        "train.debug.sleep_after_step_s=0.5"])
    wait_for(lambda: (ck / "step_00000010" / "trainer.json").exists(), proc)
    kill9(proc)
    assert not (ck / "step_00000020").exists()
    p = run_train(VAE, TINY_VAE + [f"run.dir={run_dir}", f"train.steps={STEPS}", "train.checkpoint_every=10"])
    assert "at step 10" in p.stdout
    assert train_losses(run_dir) == uninterrupted  # bit-identical, fp32 on the CPU
    assert_each_step_once(run_dir)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(uninterrupted, run_dir):
    ck = run_dir / "checkpoints"
    proc = start_train(VAE, TINY_VAE + [f"run.dir={run_dir}", f"train.steps={STEPS}", "train.checkpoint_every=5",
                                        "train.debug.sleep_in_checkpoint_s=2"])
    wait_for(lambda: (ck / ".tmp_step_00000010" / "vae").exists(), proc)
    kill9(proc)
    assert (ck / "step_00000005" / "trainer.json").exists()
    assert not (ck / "step_00000010").exists()
    p = run_train(VAE, TINY_VAE + [f"run.dir={run_dir}", f"train.steps={STEPS}", "train.checkpoint_every=5"])
    assert "at step 5" in p.stdout
    assert not list(ck.glob(".tmp_*"))
    assert train_losses(run_dir) == uninterrupted
    assert_each_step_once(run_dir)


def test_sigusr2_writes_a_checkpoint_and_exits_for_requeue(uninterrupted, run_dir):
    proc = start_train(VAE, TINY_VAE + [f"run.dir={run_dir}", f"train.steps={STEPS}",
                                        "train.debug.sleep_after_step_s=0.3"])
    mfile = run_dir / "metrics.jsonl"
    wait_for(lambda: mfile.exists() and len(mfile.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    done = max(m["step"] for m in metrics(run_dir))
    assert 3 <= done < STEPS
    assert (run_dir / "checkpoints" / f"step_{done:08d}" / "trainer.json").exists()
    assert "requeued" in out
    # the requeued attempt picks up from there and ends where an uninterrupted run ends
    run_train(VAE, TINY_VAE + [f"run.dir={run_dir}", f"train.steps={STEPS}"])
    assert train_losses(run_dir) == uninterrupted


def test_resume_with_another_world_size_is_refused(run_dir):
    run_train(VAE, TINY_VAE + [f"run.dir={run_dir}", "train.steps=2"], nproc=2)
    p = run_train(VAE, TINY_VAE + [f"run.dir={run_dir}", "train.steps=4"], check=False)
    assert p.returncode == 2
    assert "world size (2 -> 1)" in p.stderr and "train.steps (2 -> 4)" in p.stderr
    assert len(p.stderr.strip().splitlines()[-1]) > 0 and "Traceback" not in p.stderr
    assert (run_dir / "checkpoints" / "step_00000002" / "trainer.json").exists()
    assert "steps: 2\n" in (run_dir / "recipe.yaml").read_text()  # the refused attempt changed nothing
