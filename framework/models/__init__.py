"""The registry of model families: family name -> the module that holds its schema and task.

Adding a family touches framework/models/<family>/, recipes/<family>/ and one line here.
Each family module defines `ModelConfig` (a dataclass with a `family` field), `Task` and
`RANGES` (the valid range of every numeric key of ModelConfig). A family kept outside the
framework is registered with FRAMEWORK_FAMILIES="name=python.module[,name=module]" (the tests'
toy family is).
"""
from __future__ import annotations

import importlib
import os

from ..errors import UserError

FAMILIES = {
    "vae": "framework.models.vae",
    "dcgan": "framework.models.dcgan",
    "nvae": "framework.models.nvae",
    "vqgan": "framework.models.vqgan",
    "vqvae": "framework.models.vqvae",
    "prior": "framework.models.prior",
    "pggan": "framework.models.pggan",
    "glann": "framework.models.glann",
}


for _entry in filter(None, os.environ.get("FRAMEWORK_FAMILIES", "").split(",")):
    _name, _, _module = _entry.partition("=")
    FAMILIES[_name.strip()] = _module.strip()


def family_module(name: str, where: str = "recipe"):
    if name not in FAMILIES:
        raise UserError(f"{where}: key 'model.family' is {name!r}; known families: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name])


def model_schema(name: str, where: str = "recipe"):
    return family_module(name, where).ModelConfig


def build_task(recipe, env):
    return family_module(recipe.model.family).Task(recipe, env)
