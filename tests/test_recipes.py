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


def test_every_recipe_in_the_repo_loads_as_the_family_of_its_folder():
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        r = load_recipe(path, [f"data.path={MNIST_BETON}"])
        assert OmegaConf.select(r, "model.family") == path.parent.name, path


def test_every_numeric_key_of_every_schema_has_a_range():
    from framework.config import RANGES, Recipe, numeric_keys
    from framework.models import FAMILIES, family_module

    for family in FAMILIES:
        mod = family_module(family)
        schema = OmegaConf.structured(Recipe(model=mod.ModelConfig()))
        keys = numeric_keys(schema)
        missing = [k for k in keys if k not in RANGES and not (k.startswith("model.") and k[6:] in mod.RANGES)]
        assert not missing, (family, missing)
    assert "train.debug.nan_loss_at_steps" in RANGES  # a list (empty by default) has its range too


@pytest.mark.parametrize("override,expected", [
    ("train.ema=1.5", "key 'train.ema' is 1.5; it must be in [0, 1)"),
    ("train.sample_temperature=0", "key 'train.sample_temperature' is 0.0; it must be > 0"),
    ("data.num_bits=9", "key 'data.num_bits' is 9; it must be in [1, 8]"),
    ("data.eval_batch_size=-1", "key 'data.eval_batch_size' is -1; it must be >= 0"),
    ("engine.optimizer.betas=[0.9,1.2]", "key 'engine.optimizer.betas' is 1.2; it must be in [0, 1)"),
    ("model.num_latent_per_group=0", "key 'model.num_latent_per_group' is 0; it must be >= 1"),
    ("model.kl_anneal_portion=2", "key 'model.kl_anneal_portion' is 2.0; it must be in [0, 1]"),
    ("data.channels=2", "key 'data.channels' is 2; expected 1 (grey) or 3 (RGB)"),
    ("train.keep_checkpoints=-2", "key 'train.keep_checkpoints' is -2; it must be >= 0"),
])
def test_values_out_of_range_are_refused_naming_the_key(override, expected):
    with pytest.raises(UserError) as e:
        load_recipe(REPO / "recipes" / "nvae" / "mnist5k.yaml", [f"data.path={MNIST_BETON}", override])
    assert expected in str(e.value)


@pytest.mark.parametrize("tool,args,expected", [
    ("model_summary.py", ["recipes/vae/mnist5k.yaml", "--batch", "-1"], "--batch is -1; it must be >= 0"),
    ("write_ffcv.py", ["bundled:mnist5k", "unused.beton", "--quality", "101"], "--quality is 101; it must be in [1, 100]"),
    ("write_ffcv.py", ["bundled:mnist5k", "unused.beton", "--val-fraction", "1.5"], "--val-fraction is 1.5"),
    ("sample.py", ["runs/none", "--n", "0"], "--n is 0; it must be in [1, 4096]"),
    ("eval_bpd.py", ["runs/none", "--chunk", "-3"], "--chunk is -3; it must be >= 0"),
    ("profile_sampling.py", ["recipes/nvae/mnist.yaml", "--warmup", "-1"], "--warmup is -1; it must be >= 0"),
    ("recalibrate_bn.py", ["runs/none", "--iters", "0"], "--iters is 0; it must be >= 1"),
])
def test_tool_flags_out_of_range_are_one_line(tool, args, expected):
    p = subprocess.run([sys.executable, f"tools/{tool}", *args], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and expected in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    assert not (REPO / "unused.beton").exists()


def test_channels_that_do_not_match_the_beton_are_refused(tmp_path):
    p = subprocess.run([sys.executable, "-m", "framework.train", VAE, f"data.path={MNIST_BETON}", "data.channels=3",
                        f"run.dir={tmp_path / 'r'}"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "holds grey images" in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    assert not (tmp_path / "r").exists()
