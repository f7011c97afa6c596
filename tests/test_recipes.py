"""Recipes: base extension, overrides, and one-line errors that name the key and the file."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import MNIST_BETON, REPO, VAE, env
from framework.config import load_recipe
from framework.errors import UserError


def write(path, text):
    path.write_text(text)
    return path


def test_base_and_overrides_merge(tmp_path):
    child = write(tmp_path / "child.yaml", f"base: {VAE}\nrun: {{dir: {tmp_path}/x}}\nmodel: {{width: 12}}\n"
                  f"data: {{path: {MNIST_BETON}}}\n")
    r = load_recipe(child, ["engine.zero_stage=3", "train.steps=7"])
    assert r.model.width == 12 and r.model.latent_dim == 32  # from the child / from the base
    assert r.engine.zero_stage == 3 and r.train.steps == 7
    assert r.run.dir == f"{tmp_path}/x"


@pytest.mark.parametrize("overrides, expected", [
    (["model.widht=3"], "unknown key 'model.widht' (did you mean 'model.width'?)"),
    (["engine.zero_stag=1"], "did you mean 'engine.zero_stage'?"),
    (["trian.steps=3"], "unknown key 'trian"),
    (["train.steps=many"], "key 'train.steps' has the wrong type"),
    (["engine.precision=fp8"], "key 'engine.precision' is 'fp8'"),
    (["engine.zero_stage=4"], "key 'engine.zero_stage' is 4"),
    (["model.family=nope"], "known families"),
    (["data.path=/no/such/file.beton"], "key 'data.path' names a file that does not exist"),
    (["train.steps"], "must look like key=value"),
])
def test_bad_override_names_the_key(overrides, expected):
    with pytest.raises(UserError, match=None) as e:
        load_recipe(VAE, [f"data.path={MNIST_BETON}", *overrides])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_key_in_file_names_the_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", f"base: {VAE}\ndata: {{path: {MNIST_BETON}}}\nengine: {{optimiser: {{lr: 1}}}}\n")
    with pytest.raises(UserError) as e:
        load_recipe(bad)
    assert str(bad) in str(e.value) and "engine.optimiser" in str(e.value) and "engine.optimizer" in str(e.value)


def test_missing_base_file_is_named(tmp_path):
    bad = write(tmp_path / "bad.yaml", "base: ../nowhere/else.yaml\n")
    with pytest.raises(UserError, match="key 'base' names a file that does not exist"):
        load_recipe(bad)


def test_missing_required_value(tmp_path):
    bad = write(tmp_path / "bad.yaml", f"model: {{family: vae}}\ndata: {{path: {MNIST_BETON}}}\n")
    with pytest.raises(UserError, match="missing required value for key 'run.dir'"):
        load_recipe(bad)


@pytest.mark.parametrize("overrides, expected", [
    (["model.widht=3"], "model.widht"),
    (["train.steps=x"], "train.steps"),
])
def test_cli_bad_recipe_exits_2_and_creates_nothing(tmp_path, overrides, expected):
    run_dir = tmp_path / "never"
    p = subprocess.run([sys.executable, "-m", "framework.train", VAE, f"run.dir={run_dir}",
                        f"data.path={MNIST_BETON}", *overrides],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0]
    assert not run_dir.exists()


def test_cli_missing_recipe_file(tmp_path):
    p = subprocess.run([sys.executable, "-m", "framework.train", str(tmp_path / "none.yaml")], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "recipe file not found" in p.stderr


def test_every_recipe_in_the_repo_loads():
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        r = load_recipe(path, [f"data.path={MNIST_BETON}"])
        assert OmegaConf.select(r, "model.family")
