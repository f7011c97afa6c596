"""Two processes over gloo train the same model as one process with the same global batch."""
import pytest

from conftest import TINY_VAE, VAE, run_train, train_losses

pytestmark = pytest.mark.slow  # real training runs in real processes: minutes

STEPS = 10


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    d = tmp_path_factory.mktemp("one") / "run"
    run_train(VAE, TINY_VAE + [f"run.dir={d}", f"train.steps={STEPS}", "engine.zero_stage=0",
                               "data.batch_size=16"])
    return train_losses(d)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_processes_match_one_process(stage, one_process, tmp_path):
    d = tmp_path / "run"
    p = run_train(VAE, TINY_VAE + [f"run.dir={d}", f"train.steps={STEPS}", f"engine.zero_stage={stage}",
                                   "data.batch_size=8"], nproc=2)
    assert "world 2" in p.stdout and "global batch 16" in p.stdout
    two = train_losses(d)
    assert sorted(two) == list(range(1, STEPS + 1))
    for step, loss in one_process.items():
        assert abs(two[step] - loss) < 1e-5, (stage, step, two[step], loss)
    assert two[STEPS] < two[1]  # and it does learn
