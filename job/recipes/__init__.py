"""The recipes: what `--net` trains on each dataset, and the one table that says which exist.

A recipe is one module of this package, read top to bottom: its defaults, its net, what it
builds for a run (optimiser, loss, batches and augmentation), what it does at step and epoch
boundaries, how it evaluates and what it adds to a checkpoint (see `base.Recipe`). RECIPES maps
(dataset, --net) to that module; a pair it lacks is refused in one line (`check`).

Adding a recipe is a module here and a line in RECIPES: the loop (job/train.py), evaluation,
export and the CLI ask the recipe and name no net.

This file imports no torch: `cnn-job train --help` and a refused setting answer at once. For
the same reason a recipe's DEFAULTS is a plain literal dict near the top of its module, read
here from the source (`defaults`) without importing the module.
"""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job.datasets import preset
from job.errors import JobError

if TYPE_CHECKING:
    from job.recipes.base import Recipe

RECIPES: dict[tuple[str, str], str] = {
    ("mnist", "seed"): "seed",
    ("cifar10", "seed"): "seed",
    ("cifar10", "fast"): "fast",
    ("mnist", "fast"): "fast_mnist",
    ("cifar10", "muon"): "muon",
}
NETS = tuple(dict.fromkeys(net for _, net in RECIPES))
# The settings each recipe's DEFAULTS gives: left out on the command line, they are the recipe's.
PER_RECIPE = ("epochs", "batch_size", "lr", "lr_schedule", "augment", "tta")
# Checkpoints written before --net existed hold no "net": they trained the seed recipe.
NET_BEFORE_RECIPES = "seed"


def check(dataset: str, net: str) -> None:
    """JobError (one line) unless a recipe trains `net` on `dataset`."""
    preset(dataset)  # an unknown dataset is named as such
    if (dataset, net) not in RECIPES:
        nets = [n for d, n in RECIPES if d == dataset]
        known = f"; --net is one of {', '.join(NETS)}" if net not in NETS else ""
        raise JobError(f"--net {net} has no recipe for {dataset}: train it with --net "
                       f"{' or '.join(nets)}{known}")


def saved_net(config: dict) -> str:
    """The --net of a run from its saved settings (a checkpoint's config)."""
    return config.get("net", NET_BEFORE_RECIPES)


def _source(dataset: str, net: str) -> Path:
    return Path(__file__).with_name(f"{RECIPES[dataset, net]}.py")


@functools.cache
def defaults(dataset: str, net: str) -> dict[str, Any]:
    """The recipe's DEFAULTS, read from its module's source (a literal dict) without importing it."""
    check(dataset, net)
    for node in ast.parse(_source(dataset, net).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULTS"
                                                for t in node.targets):
            found = ast.literal_eval(node.value)
            if set(found) != set(PER_RECIPE):
                raise RuntimeError(f"{_source(dataset, net)}: DEFAULTS must set exactly "
                                   f"{', '.join(PER_RECIPE)}")
            return found
    raise RuntimeError(f"{_source(dataset, net)} has no DEFAULTS literal")


def summary(dataset: str, net: str) -> str:
    """The first line of the recipe module's docstring: what --help says of it."""
    docstring = ast.get_docstring(ast.parse(_source(dataset, net).read_text())) or ""
    return docstring.splitlines()[0].rstrip(".") if docstring else RECIPES[dataset, net]


def default_text(setting: str) -> str:
    """--help's default of a per-recipe setting, e.g. "seed: 5; fast: 10 (cifar10), 1 (mnist)"."""
    def shown(value: Any) -> str:
        return f"{value:.7g}" if isinstance(value, float) else str(value)

    parts = []
    for net in NETS:
        values = {dataset: shown(defaults(dataset, net)[setting])
                  for dataset, n in RECIPES if n == net}
        if len(set(values.values())) == 1:
            parts.append(f"{net}: {next(iter(values.values()))}")
        else:
            parts.append(f"{net}: " + ", ".join(f"{v} ({d})" for d, v in values.items()))
    return "; ".join(parts)


def net_help() -> str:
    """--net's help: each recipe module once, with the datasets it trains."""
    modules: dict[str, list[tuple[str, str]]] = {}
    for (dataset, net), module in RECIPES.items():
        modules.setdefault(module, []).append((dataset, net))
    return "; ".join(f"{pairs[0][1]} ({', '.join(d for d, _ in pairs)}): {summary(*pairs[0])}"
                     for pairs in sorted(modules.values(), key=lambda p: NETS.index(p[0][1])))


def load(dataset: str, net: str) -> Recipe:
    """The recipe that trains `net` on `dataset` (importing its module, and torch)."""
    check(dataset, net)
    module = importlib.import_module(f"{__name__}.{RECIPES[dataset, net]}")
    return module.Recipe(preset(dataset))
