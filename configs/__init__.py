"""The config files, also loadable by name: ``configs.load("gla_340m")`` is the ConfigDict that
``python train.py --config=configs/gla_340m.py`` starts from (benchmarks and tests use this)."""

import importlib.util
import os

import ml_collections

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def load(name: str) -> ml_collections.ConfigDict:
    """get_config() of configs/NAME.py; a name with no such file raises FileNotFoundError."""
    path = os.path.join(DIRECTORY, f"{name}.py")
    if name.startswith("_") or not os.path.isfile(path):
        known = sorted(f[:-3] for f in os.listdir(DIRECTORY) if f.endswith(".py") and f[0] != "_")
        raise FileNotFoundError(f"no config {name!r} in {DIRECTORY}; known: {known}")
    spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
