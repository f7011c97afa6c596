"""Updates with a non-finite or too large loss / gradient norm are skipped, counted, survived."""
import math

import pytest

from conftest import TINY_VAE, VAE, metrics, run_train, train_losses

pytestmark = pytest.mark.slow  # real training runs in real processes: minutes


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory):
    runs = {}
    for stage in (0, 2, 3):  # 0: the gate sees the NaN norm; 2/3: DeepSpeed's overflow check does
        d = tmp_path_factory.mktemp(f"nan{stage}") / "run"
        run_train(VAE, TINY_VAE + [f"run.dir={d}", "train.steps=8", f"engine.zero_stage={stage}",
                                   "train.debug.nan_loss_at_steps=[3]"])
        runs[stage] = d
    return runs


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_nonfinite_loss_skips_that_update_and_training_continues(nan_runs, stage):
    rows = {m["step"]: m for m in metrics(nan_runs[stage]) if "loss" in m}
    assert rows[3]["skipped"] and not math.isfinite(rows[3]["loss"])
    assert rows[3]["skip_reason"] in ("vae:loss_nonfinite", "vae:overflow")
    assert [rows[s]["skipped"] for s in (1, 2, 4, 5, 6, 7, 8)] == [False] * 7
    assert rows[8]["skips_total"] == 1
    assert all(math.isfinite(rows[s]["loss"]) for s in (4, 5, 6, 7, 8))


def test_a_skipped_update_leaves_weights_and_optimizer_untouched(nan_runs):
    # ZeRO-0 skips in the gate, ZeRO-2/3 inside DeepSpeed: both must be a true no-op
    # (no zero-gradient Adam step), so the runs continue identically.
    base = train_losses(nan_runs[0])
    for stage in (2, 3):
        other = train_losses(nan_runs[stage])
        for s in (4, 5, 6, 7, 8):
            assert abs(other[s] - base[s]) < 1e-5, (stage, s)


@pytest.mark.parametrize("key", ["train.skip.grad_norm_threshold=1e-9", "train.skip.loss_threshold=0.01"])
def test_too_many_consecutive_skips_abort_clearly(run_dir, key):
    p = run_train(VAE, TINY_VAE + [f"run.dir={run_dir}", "train.steps=20", key, "train.skip.max_consecutive=4"],
                  check=False)
    assert p.returncode == 3
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "4 consecutive updates skipped" in err[0]
    assert max(m["step"] for m in metrics(run_dir)) == 4
