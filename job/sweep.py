"""Sweeps: a YAML file of settings to try, expanded into trials that are each a resumable run of
`cnn-job train` in a folder of their own under the sweep's root (`<root>/trial-NNN/`).

A trial is a pure function of the file: grid combinations × random draws × seeds, in that order.
One process runs one trial (a pod of an Indexed Job, or a child of `sweep run --parallel`), so
each trial keeps every guarantee of a training run: resume, one writer, exit 75 on a signal.
The root holds the expanded plan (`sweep.json`, the sweep's identity) and each trial a small
status file (`trial.json`), which is all the report reads.

Early stopping needs no controller either: a trial records each epoch's metric in its own
`trial.json`, and at each rung reads its siblings' records and decides by itself whether to go on
(`EarlyStop`; the training loop asks at each epoch's start through `Trial.after_epochs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from job.config import SETTING_KINDS, TrainConfig, setting_kind
from job.errors import JobError, StorageUnavailable, first_line, strip_userinfo
from job.lease import lease_for
from job.preemption import PREEMPTED_EXIT_CODE, SIGNALS, Interrupted
from job.progress import follow_up
from job.storage import (
    DEFAULT_STORAGE_RETRY_S,
    LocalStore,
    S3Store,
    open_store,
    parse_s3_uri,
    read_object,
    uri_kind,
)

SWEEP_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
SECTIONS = ("name", "dataset", "checkpoint_uri", "fixed", "grid", "random", "seeds", "early_stop")
SWEEPS_OWN = SETTING_KINDS["run"]  # set by the sweep for every trial
MAX_TRIALS = 10_000  # a plan is built (and every trial checked) by each trial's process
# What a trial.json can say (written by the trial, or by `--parallel` for a child that ended
# without saying), and, last, what only the report says of a trial.
STATUSES = ("running", "finished", "pruned", "stopped", "unavailable", "failed")
STATUS_ORDER = ("finished", "pruned", "pending", "running", "unavailable", "stopped",
                "stopped (killed)", "failed")
ELSEWHERE = "running elsewhere"  # --parallel's word for a trial another live job holds
FAILED_EXIT_CODE = 1
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# ----------------------------------------------------------------------------------------------
# the plan: the file, checked and expanded


@dataclass
class Plan:
    name: str
    dataset: str
    root: str
    fixed: dict
    swept: list[str]  # option names, in the order the file sweeps them
    log_scale: list[str]  # options drawn on a log scale (the report's plot uses a log axis)
    trials: list[dict]  # each trial's swept settings
    source: str  # the file
    early_stop: EarlyStop | None = None
    sections: dict = dataclasses.field(default_factory=dict)  # swept option → grid, random, seeds
    environment: dict = dataclasses.field(default_factory=dict)  # `where` settings of CNN_JOB_*

    def identity(self) -> dict:
        """What `sweep.json` holds: a root belongs to one plan (its early stopping included:
        trials of one root decide by one rule)."""
        return {"name": self.name, "dataset": self.dataset, "fixed": self.fixed,
                "swept": self.swept, "log_scale": self.log_scale,
                **({"early_stop": dataclasses.asdict(self.early_stop)} if self.early_stop else {}),
                "trials": [{"trial": index, "settings": settings}
                           for index, settings in enumerate(self.trials)]}

    def shared(self, option: str, default=None):
        """A setting every trial shares: the file's `fixed`, else the environment's."""
        return self.fixed.get(option, self.environment.get(option, default))

    @property
    def endpoint_url(self) -> str | None:
        return self.shared("s3_endpoint_url")

    def store(self, uri: str) -> LocalStore | S3Store:
        """The root's or a trial's folder or prefix, retried as the trials' storage_retry_s says
        (their own budget, for `--parallel`'s bookkeeping too)."""
        return open_store(uri, self.endpoint_url, option="checkpoint_uri",
                          retry_s=self.shared("storage_retry_s", DEFAULT_STORAGE_RETRY_S))

    def trial_uri(self, index: int) -> str:
        return trial_uri(self.root, index)

    def own(self, index: int) -> dict:
        """The `run` settings the sweep gives trial `index`: its dataset, its own folder and W&B
        name, and its own checkpoints resumed."""
        return {"dataset": self.dataset, "checkpoint_uri": self.trial_uri(index),
                "run_name": f"{self.name}-trial-{index:03d}", "resume": "auto",
                "overwrite": False}

    def from_environment(self, index: int) -> dict:
        """The `where` settings of CNN_JOB_* variables that trial `index` takes: those its file
        does not set."""
        return {option: value for option, value in self.environment.items()
                if option not in self.fixed and option not in self.trials[index]}

    def config(self, index: int) -> TrainConfig:
        """Trial `index` as `cnn-job train` would run it: the file's settings, and where the
        file sets none, the `where` settings of the environment's CNN_JOB_* variables; in its own
        checkpoint folder, under its own run name."""
        return TrainConfig(**self.from_environment(index), **self.fixed, **self.trials[index],
                           **self.own(index))

    def sources(self, index: int) -> dict:
        """What made trial `index`: the file's settings by section, and the CNN_JOB_* variables
        it took (trial.json's `sources`)."""
        made = {"fixed": self.fixed, "grid": {}, "random": {}, "seeds": {}}
        for option, value in self.trials[index].items():
            made[self.sections[option]][option] = value
        return {**made, "environment": as_variables(self.from_environment(index))}

    def check_index(self, index: int) -> None:
        if not 0 <= index < len(self.trials):
            raise JobError(f"trial {index} is not in sweep {self.name}: its {len(self.trials)} "
                           f"trials are 0 to {len(self.trials) - 1} (see cnn-job sweep plan "
                           f"{self.source})")


def as_variables(settings: dict) -> dict:
    """Settings as the CNN_JOB_* variables that gave them, their values as JSON holds them (URIs
    without credentials)."""
    return {f"CNN_JOB_{option.upper()}": strip_userinfo(str(value) if isinstance(value, Path)
                                                        else value)
            for option, value in settings.items()}


def trial_uri(root: str, index: int) -> str:
    return f"{root.rstrip('/')}/trial-{index:03d}"


def load_plan(path: str, environment: dict | None = None) -> Plan:
    """The sweep file, checked against TrainConfig (every trial's settings built) and expanded;
    one JobError line for anything wrong with it. Reads the file only: creates nothing.
    `environment`: the settings CNN_JOB_* variables give, as `cnn-job train` parses them; a
    `where` one applies where the file sets none, any other is refused unless the sweep gives
    every trial that value."""
    where = f"sweep file {path}"
    document = _parse_yaml(read_object(path, "sweep file"), where)
    if not isinstance(document, dict):
        raise JobError(f"{where}: expected a mapping with {', '.join(SECTIONS)}")
    unknown = [key for key in document if key not in SECTIONS]
    if unknown:
        raise JobError(f"{where}: unknown section {unknown[0]!r}; a sweep file has "
                       f"{', '.join(SECTIONS)}")
    name = str(document.get("name") or Path(path).stem)
    dataset = document.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        raise JobError(f"{where}: dataset is required (mnist or cifar10)")
    root = _root(document, name, where)

    fixed = _options(document.get("fixed"), "fixed", where)
    fixed = {option: _value(option, value, f"{where}: fixed") for option, value in fixed.items()}
    grid = _options(document.get("grid"), "grid", where)
    for option, values in grid.items():
        if not isinstance(values, list) or not values:
            raise JobError(f"{where}: grid: {option} must be a list of one value or more, "
                           f"e.g. [{_example(option)}]")
        grid[option] = [_value(option, value, f"{where}: grid") for value in values]
    count, draw_seed, ranges = _random_ranges(document.get("random"), where)
    seeds = document.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds:
            raise JobError(f"{where}: seeds must be a list of one seed or more, e.g. [0, 1]")
        seeds = [_value("seed", seed, f"{where}: seeds") for seed in seeds]
    early_stop = _early_stop(document.get("early_stop"), where)
    _check_trial_count([len(values) for values in grid.values()], count,
                       len(seeds) if seeds is not None else 1, where)
    draws = _draw(count, draw_seed, ranges)

    sections = [("fixed", fixed), ("grid", grid), ("random", ranges),
                ("seeds", {"seed": seeds} if seeds is not None else {})]
    for (first, a), (second, b) in itertools.combinations(sections, 2):
        if both := [option for option in a if option in b]:
            raise JobError(f"{where}: {both[0]} is in both {first} and {second}; give it in one")

    swept = [*grid, *ranges, *(["seed"] if seeds is not None else [])]
    trials = [{**dict(zip(grid, combination)), **draw, **({"seed": seed} if seed is not None else {})}
              for combination in itertools.product(*grid.values())
              for draw in draws
              for seed in (seeds if seeds is not None else [None])]
    sections_of = {**dict.fromkeys(grid, "grid"), **dict.fromkeys(ranges, "random"),
                   **({"seed": "seeds"} if seeds is not None else {})}
    plan = Plan(name, dataset, root, fixed, swept,
                [option for option, (_, _, scale) in ranges.items() if scale == "log"], trials, path,
                early_stop, sections_of)
    plan.environment = _environment(plan, environment or {})
    for index, settings in enumerate(trials):  # every trial as train would take it, or refused
        try:
            plan.config(index)
        except JobError as error:
            described = f" ({describe(settings)})" if settings else ""
            raise JobError(f"{where}: trial {index}{described}: {error}") from None
        except TypeError as error:  # a value TrainConfig cannot even compare
            raise JobError(f"{where}: trial {index}: {first_line(error, 200)}") from None
    return plan


def _environment(plan: Plan, environment: dict) -> dict:
    """The `where` settings of `environment` (option → value); one JobError line for a setting
    of another kind whose value is not the one the sweep gives every trial."""
    for option, value in environment.items():
        if setting_kind(option) == "where":
            continue
        variable, shown = f"CNN_JOB_{option.upper()}", _yaml_text(value)
        if setting_kind(option) == "run":
            given = {_yaml_text(plan.own(index)[option]) for index in range(len(plan.trials))}
            if given != {shown}:
                raise JobError(
                    f"{variable}={shown}: a sweep gives each trial its own {option} "
                    f"({_listed(given)}); unset {variable} to run sweep {plan.source}")
            continue
        given = {_yaml_text(trial[option]) if option in trial else None
                 for trial in ({**plan.fixed, **settings} for settings in plan.trials)}
        if None in given:
            raise JobError(
                f"{variable}={shown} would change the trials' results, which come from the sweep "
                f"file alone: put {option}: {shown} in the fixed settings of {plan.source}, or "
                f"unset {variable}")
        if given != {shown}:
            raise JobError(
                f"{variable}={shown} differs from the {option} that {plan.source} gives its "
                f"trials ({_listed(given)}): a trial's result comes from its sweep file; unset "
                f"{variable}")
    return {option: value for option, value in environment.items()
            if setting_kind(option) == "where"}


def _yaml_text(value) -> str:
    """A setting's value as a sweep file would write it."""
    return str(value).lower() if isinstance(value, bool) else format_value(value)


def _listed(values: set[str]) -> str:
    shown = sorted(values)
    return ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")


def _root(document: dict, name: str, where: str) -> str:
    """The file's checkpoint_uri (default runs/sweeps/NAME), refused here, at `plan`, as any
    command would refuse it."""
    if "checkpoint_uri" not in document:
        return str(Path("runs", "sweeps", name))
    root = document["checkpoint_uri"]
    if not isinstance(root, str) or not root.strip():
        raise JobError(f"{where}: checkpoint_uri is empty; give a folder or s3://BUCKET/PREFIX, "
                       f"or leave it out for runs/sweeps/{name}")
    try:
        in_s3 = uri_kind(root, "checkpoint_uri", allowed=("local", "s3")) == "s3"
    except JobError as error:
        raise JobError(f"{where}: {error}") from None
    if in_s3:
        try:
            parse_s3_uri(root)
        except JobError as error:
            raise JobError(f"{where}: checkpoint_uri {error}") from None
    return root


def _parse_yaml(data: bytes, where: str):
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        """PyYAML keeps a key's last value silently: a second `lr` or `dataset` is refused."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: the loader itself refuses it
                    continue
                if duplicate:
                    raise JobError(f"{where}: {key} is given twice (line "
                                   f"{key_node.start_mark.line + 1}); give each key once")
                seen.add(key)
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(data, Loader=UniqueKeys)  # a SafeLoader: plain data only
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or first_line(error, 200)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JobError(f"{where} is not valid YAML: {problem}{at}") from None


def _options(section, section_name: str, where: str) -> dict:
    """A section's option names, `-` or `_` alike, as TrainConfig's field names."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise JobError(f"{where}: {section_name} must be a mapping of train options")
    options = {}
    for key, value in section.items():
        option = str(key).replace("-", "_")
        if option in SWEEPS_OWN:
            raise JobError(f"{where}: {section_name}: {key} is the sweep's own (dataset and "
                           "checkpoint_uri at the top of the file; run names are trial names; a "
                           "trial resumes its own checkpoints)")
        if option not in _FIELDS:
            close = difflib.get_close_matches(option, _FIELDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise JobError(f"{where}: {section_name}: unknown option {key!r}{hint}; the options "
                           "are cnn-job train's (see cnn-job train --help)")
        if option in options:
            raise JobError(f"{where}: {section_name}: {key} is given twice")
        options[option] = value
    return options


def _kind(option: str) -> str:
    """The option's type, from TrainConfig's annotation: int, float, bool, str or Path."""
    return str(_FIELDS[option].type).split("|")[0].strip()


def _value(option: str, value, where: str):
    """A YAML value as the option's type (PyYAML reads 1e-3 as a string, and off as false)."""
    kind, optional = _kind(option), "None" in str(_FIELDS[option].type)
    if value is None and optional:
        return None
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if kind in ("str", "Path"):
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
    wanted = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(kind, "text")
    raise JobError(f"{where}: {option} {value!r} is not {wanted}")


def _example(option: str) -> str:
    return {"int": "128, 256", "float": "0.001, 0.01", "bool": "true, false"}.get(_kind(option),
                                                                                   "a, b")


def _check_trial_count(grid_sizes: list[int], count: int, seeds: int, where: str) -> None:
    """Before anything is drawn: a plan of more than MAX_TRIALS is refused."""
    trials = math.prod(grid_sizes) * count * seeds
    if trials > MAX_TRIALS:
        grid = " × ".join(map(str, grid_sizes)) or "1"
        raise JobError(
            f"{where}: {trials} trials (grid {grid} × random {count} × seeds {seeds}) is more "
            f"than a sweep's {MAX_TRIALS}; split it into sweeps of at most {MAX_TRIALS} trials, "
            "each a file with its own checkpoint_uri (one per value of a grid option, or the "
            "random draws split by count with another random seed each)")


def _random_ranges(section, where: str) -> tuple[int, int, dict]:
    """The random section checked: `count`, `seed` and the ranges, option → (min, max, scale)."""
    if section is None:
        return 1, 0, {}
    if not isinstance(section, dict):
        raise JobError(f"{where}: random must be a mapping of count, seed and option ranges")
    count, seed = section.get("count"), section.get("seed", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise JobError(f"{where}: random: count must be a whole number, at least 1 (got {count!r})")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise JobError(f"{where}: random: seed must be a whole number (got {seed!r})")
    ranges = {}
    options = _options({k: v for k, v in section.items() if k not in ("count", "seed")},
                       "random", where)
    if not options:
        raise JobError(f"{where}: random draws no option; give one as lr: {{min: 0.001, max: "
                       "0.03, scale: log}")
    for option, spec in options.items():
        label = f"{where}: random: {option}"
        if _kind(option) not in ("int", "float"):
            raise JobError(f"{label} is not a number option; sweep it in grid instead")
        if not isinstance(spec, dict) or not {"min", "max"} <= set(spec) or set(spec) - {
                "min", "max", "scale"}:
            raise JobError(f"{label} must be {{min: LOW, max: HIGH, scale: linear|log}}")
        low, high = (_value(option, spec[bound], label) for bound in ("min", "max"))
        scale = spec.get("scale", "linear")
        if low is None or high is None:
            raise JobError(f"{label}: min and max must be numbers")
        if scale not in ("linear", "log"):
            raise JobError(f"{label}: scale must be linear or log (got {scale!r})")
        if low > high:
            raise JobError(f"{label}: min {low} is greater than max {high}")
        if scale == "log" and low <= 0:
            raise JobError(f"{label}: a log scale needs min > 0 (got {low})")
        ranges[option] = (low, high, scale)
    return count, seed, ranges


def _draw(count: int, seed: int, ranges: dict) -> list[dict]:
    """`count` draws from `random.Random(seed)`, each option in the file's order."""
    rng = random.Random(seed)
    draws = []
    for _ in range(count):
        draw = {}
        for option, (low, high, scale) in ranges.items():
            if scale == "log":
                value = math.exp(rng.uniform(math.log(low), math.log(high)))
            else:
                value = rng.uniform(low, high)
            # ints to the nearest one in range; floats to 6 significant digits, to print cleanly
            draw[option] = (min(high, max(low, round(value))) if _kind(option) == "int"
                            else float(f"{value:.6g}"))
        draws.append(draw)
    return draws


# ----------------------------------------------------------------------------------------------
# early stopping: the rule a trial applies by itself, from the records of its siblings

METRICS = {"val_acc": "higher", "val_loss": "lower"}  # the trial.json metrics, and which is better
EARLY_STOP_KEYS = ("method", "metric", "min_epochs", "reduction_factor", "min_trials")


@dataclass(frozen=True)
class EarlyStop:
    """`asha`: rungs at min_epochs × reduction_factor^k epochs; at a rung a trial goes on if its
    metric is among the best max(1, n // reduction_factor) of the n trials recorded at that epoch
    (itself included). `median`: at every epoch from min_epochs on, a trial goes on unless its
    metric is worse than the median of the other trials' at that epoch. Neither prunes at an
    epoch with fewer than min_trials records (itself included), nor at a trial's last epoch; a
    tie goes on. docs/sweeps.md says it in full."""

    method: str
    metric: str
    min_epochs: int
    reduction_factor: int | None  # ASHA's; None for median stopping
    min_trials: int

    def checks_at(self, epoch: int, epochs: int) -> bool:
        """Whether a trial of `epochs` decides after epoch `epoch`: at a rung."""
        if not self.min_epochs <= epoch < epochs:
            return False
        if self.method == "median":
            return True
        rung = self.min_epochs
        while rung < epoch:
            rung *= self.reduction_factor
        return rung == epoch

    def decide(self, epoch: int, value: float, others: list[float]) -> dict:
        """The decision at `epoch` for a trial whose metric is `value`, the other trials'
        records at that epoch being `others`: a pure function of them, recorded as it is."""
        higher = METRICS[self.metric] == "higher"
        trials = len(others) + 1
        decision = {"epoch": epoch, "value": value, "trials": trials, "threshold": None}
        if trials < self.min_trials or (not others and self.method == "median"):
            return {**decision, "decision": "go on",
                    "reason": f"{trials} of min_trials {self.min_trials} recorded at epoch {epoch}"}
        show = _metric_text(self.metric)
        if self.method == "asha":
            keep = max(1, trials // self.reduction_factor)
            threshold = sorted([value, *others], reverse=higher)[keep - 1]
            worse = value < threshold if higher else value > threshold
            cut = "the best" if keep == 1 else f"the {_ordinal(keep)} best"
            reason = (f"{self.metric} {show(value)} is {'not ' if worse else ''}among the best "
                      f"{keep} of the {trials} trials at epoch {epoch} ({cut}: "
                      f"{show(threshold)}; ASHA keeps 1 in {self.reduction_factor})")
        else:
            threshold = statistics.median(others)
            worse = value < threshold if higher else value > threshold
            reason = (f"{self.metric} {show(value)} is {'' if worse else 'not '}worse than the "
                      f"median {show(threshold)} of the {len(others)} other trials at epoch "
                      f"{epoch}")
        return {**decision, "threshold": threshold, "decision": "pruned" if worse else "go on",
                "reason": reason}


def _metric_text(metric: str) -> Callable[[float], str]:
    return (lambda value: f"{value:.2%}") if metric == "val_acc" else (lambda value: f"{value:.4f}")


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _early_stop(section, where: str) -> EarlyStop | None:
    if section is None:
        return None
    label = f"{where}: early_stop"
    if not isinstance(section, dict):
        raise JobError(f"{label} must be a mapping, e.g. {{method: asha, metric: val_acc, "
                       "min_epochs: 1, reduction_factor: 3}")
    section = {str(key).replace("-", "_"): value for key, value in section.items()}
    if unknown := [key for key in section if key not in EARLY_STOP_KEYS]:
        raise JobError(f"{label}: unknown key {unknown[0]!r}; it takes {', '.join(EARLY_STOP_KEYS)}")
    method, metric = section.get("method"), section.get("metric", "val_acc")
    if method not in ("asha", "median"):
        raise JobError(f"{label}: method must be asha or median (got {method!r})")
    if metric not in METRICS:
        raise JobError(f"{label}: metric must be {' or '.join(METRICS)} (got {metric!r})")
    if method == "median" and "reduction_factor" in section:
        raise JobError(f"{label}: reduction_factor is ASHA's; median stopping has none")

    def whole(key: str, default: int, least: int) -> int:
        value = section.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise JobError(f"{label}: {key} must be a whole number, at least {least} "
                           f"(got {value!r})")
        return value

    reduction_factor = whole("reduction_factor", 3, 2) if method == "asha" else None
    return EarlyStop(method, metric, whole("min_epochs", 1, 1), reduction_factor,
                     whole("min_trials", reduction_factor or 3, 1))


def describe(settings: dict) -> str:
    return ", ".join(f"{option} {format_value(value)}" for option, value in settings.items())


def format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------
# the root: the plan written once, and refused when it changed


def claim(plan: Plan) -> None:
    """Write the plan as the root's `sweep.json` if it has none; refuse a root whose plan is
    another file's (or this file's before an edit)."""
    store = plan.store(plan.root)
    wanted = plan.identity()
    existing = store.read(SWEEP_FILE) or _create(store, SWEEP_FILE, _encode(wanted))
    if existing is None:
        return
    try:
        found = json.loads(existing)
    except ValueError:
        found = None
    if found != wanted:
        differing = ([key for key in wanted if found.get(key) != wanted[key]]
                     if isinstance(found, dict) else ["everything"])
        raise JobError(
            f"{store.location(SWEEP_FILE)} holds another sweep's plan ({', '.join(differing)} "
            f"differ from {plan.source}'s): a root is one sweep; give this file another "
            "checkpoint_uri, or run the original file")


def _create(store: LocalStore | S3Store, name: str, data: bytes) -> bytes | None:
    """Create `name` only if it does not exist (of two trials starting at once, one writes it);
    None when this call created it, else what is there."""
    if isinstance(store, S3Store):
        from botocore.exceptions import ClientError

        with store.errors(name):
            try:
                store.client.put_object(Bucket=store.bucket, Key=store.key(name), Body=data,
                                        IfNoneMatch="*")
                return None
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                    raise
        return store.read(name)
    staged = f".{name}.{os.getpid()}.new"
    try:
        store.write(staged, data)  # complete and flushed before it gets its name
        try:
            os.link(store.folder / staged, store.folder / name)  # fails if it exists
            return None
        except FileExistsError:
            return store.read(name)
        finally:
            store.delete(staged)
    except OSError as error:
        raise JobError(f"cannot write {store.location(name)} ({error.strerror or error}); "
                       "give the sweep a writable checkpoint_uri") from None


def _encode(document: dict) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


# ----------------------------------------------------------------------------------------------
# one trial, in this process


def read_status(store: LocalStore | S3Store, name: str = TRIAL_FILE) -> dict | None:
    """The trial's `trial.json` (`name` in `store`), None when it has none; one JobError line
    when it holds anything but a status this job writes."""
    location = store.location(name)
    try:
        data = store.read(name)
    except OSError as error:  # a local file's: S3's arrive as JobErrors already
        raise JobError(f"cannot read {location} ({error.strerror or error})") from None
    if data is None:
        return None
    try:
        status = json.loads(data)
    except ValueError:
        status = None
    if problem := _status_problem(status):
        raise JobError(f"{location} is not a trial status this job wrote ({problem}); move it "
                       "away and run the trial again (its checkpoints resume it)")
    return status


def _status_problem(status) -> str | None:
    """What is wrong with a trial.json's document, or None."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(status, dict):
        return "not a JSON object"
    if status.get("status") not in STATUSES:
        return f"status {status.get('status')!r} is not one of {', '.join(STATUSES)}"
    for key in ("trial", "epochs", "steps"):
        if key in status and not (isinstance(status[key], int) and number(status[key])):
            return f"{key} {status[key]!r} is not a whole number"
    for key in ("val_acc", "train_seconds"):
        if status.get(key) is not None and not number(status[key]):
            return f"{key} {status[key]!r} is not a number"
    for key in ("settings", "sources"):
        if not isinstance(status.get(key, {}), dict):
            return f"{key} is not a mapping"
    if status.get("error") is not None and not isinstance(status["error"], str):
        return "error is not text"
    for key in ("history", "rungs"):
        entries = status.get(key, [])
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("epoch"), int) for e in entries):
            return f"{key} is not a list of epochs"
        if not all(value is None or number(value) for e in entries
                   for name, value in e.items() if name in METRICS or name == "value"):
            return f"{key} holds a metric that is not a number"
    pruned = status.get("pruned")
    if pruned is not None and not (isinstance(pruned, dict) and isinstance(pruned.get("epoch"), int)
                                   and isinstance(pruned.get("reason"), str)):
        return "pruned is not an epoch and a reason"
    return None


def write_status(store: LocalStore | S3Store, status: dict) -> dict:
    status = {**status, "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        store.write(TRIAL_FILE, _encode(status))
    except OSError as error:
        raise JobError(f"cannot write {store.location(TRIAL_FILE)} "
                       f"({error.strerror or error})") from None
    return status


def _epoch_record(entry: dict) -> dict:
    """A history entry of the run (checkpoint.RunState's) as trial.json keeps it."""
    return {key: entry.get(key) for key in ("epoch", "step", "train_loss", "val_loss", "val_acc")}


class Trial:
    """Trial `index` while it trains in this process: its `trial.json`, kept up to date with each
    epoch's metrics, and its early stopping. `train(cfg, trial)` takes it for two things only:
    the W&B config keys in `tracking`, and `after_epochs`, which the loop calls at the start of
    each epoch with the epochs done (so a resumed trial decides where it resumes too)."""

    def __init__(self, plan: Plan, index: int, cfg: TrainConfig, store: LocalStore | S3Store,
                 status: dict) -> None:
        self.plan, self.index, self.epochs, self.store = plan, index, cfg.epochs, store
        self.status = status
        self.pruned: dict | None = None  # {"epoch", "reason"} once the rule stopped it
        self.tracking = {"sweep": plan.name, "sweep_trial": index}

    def record(self, **changes) -> None:
        self.status = write_status(self.store, {**self.status, **changes})

    def after_epochs(self, history: list[dict]) -> str | None:
        """Record the epochs done; at a rung, apply the sweep's rule (or take the decision
        recorded there before: a trial decides once at each rung). Returns why the trial goes no
        further, or None."""
        records = [_epoch_record(entry) for entry in history]
        epoch = records[-1]["epoch"] if records else 0
        changes = {}
        if records != self.status.get("history"):
            changes = {"history": records, "epochs": epoch, "steps": records[-1]["step"],
                       "val_acc": records[-1]["val_acc"]}
        rule = self.plan.early_stop
        decision = None
        if rule and rule.checks_at(epoch, self.epochs):
            decision = next((r for r in self.status.get("rungs", []) if r["epoch"] == epoch), None)
            if decision is None:
                decision = rule.decide(epoch, records[-1][rule.metric], self._others(epoch))
                changes["rungs"] = [*self.status.get("rungs", []), decision]
        if changes:
            self.record(**changes)
        if decision and decision["decision"] == "pruned":
            self.pruned = {"epoch": epoch, "reason": decision["reason"]}
            return f"pruned at epoch {epoch}: {decision['reason']}"
        return None

    def _others(self, epoch: int) -> list[float]:
        """The other trials' metric at `epoch`, from their trial.json as it is now, whatever
        their status (running, finished, stopped, pruned later), read through the root's store
        (one S3 client for them all)."""
        root, metric = self.plan.store(self.plan.root), self.plan.early_stop.metric
        values = []
        for index in range(len(self.plan.trials)):
            if index == self.index:
                continue
            status = read_status(root, f"{trial_uri('', index).lstrip('/')}/{TRIAL_FILE}") or {}
            values += [entry[metric] for entry in status.get("history", [])
                       if entry["epoch"] == epoch and entry.get(metric) is not None]
        return values


def run_trial(plan: Plan, index: int,
              run_training: Callable[[TrainConfig, Trial], dict]) -> dict:
    """Trial `index`, exactly as `cnn-job train` with its settings, in this process (signals and
    exit statuses as train's); its status file written at the start, after each epoch and at the
    end. Returns the status ("finished", "pruned" or "stopped"), with the run's summary under
    "summary" when it trained. A pruned trial is not trained again: its status is returned."""
    plan.check_index(index)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise JobError("a sweep trial is one process: run it without torchrun")
    cfg = plan.config(index)
    claim(plan)
    store = plan.store(cfg.checkpoint_uri)
    previous = read_status(store) or {}
    if previous.get("status") == "pruned":
        return previous  # the rule decided: rerunning gives the same, so nothing runs
    lease = lease_for(store, cfg.lease_seconds, log=lambda message: None)
    if lease.is_held():
        raise JobError(f"trial {index:03d} ({store.uri}) is being run by a live job "
                       f"({lease.holder()}): one trial has one writer; wait for it to end")
    # training seconds of the earlier processes that reported them (a killed one did not)
    earlier_s = 0.0 if previous.get("status") == "running" else previous.get("train_seconds") or 0.0
    trial = Trial(plan, index, cfg, store, {
        "trial": index, "status": "running", "settings": plan.trials[index],
        "epochs": previous.get("epochs", 0), "steps": previous.get("steps", 0),
        "val_acc": previous.get("val_acc"), "train_seconds": earlier_s, "error": None,
        "history": previous.get("history", []), "rungs": previous.get("rungs", []),
        "pruned": None, "sources": plan.sources(index)})
    trial.record()
    os.environ.setdefault("WANDB_RUN_GROUP", plan.name)  # wandb.init reads it: one group a sweep
    try:
        summary = run_training(cfg, trial)
    except StorageUnavailable:
        raise  # its status file is out of reach too; the trial's retry resumes it
    except JobError as error:
        trial.record(status="failed", error=first_line(error, 300))
        raise JobError(f"trial {index:03d} failed: {error}") from None
    except (Interrupted, KeyboardInterrupt):
        trial.record(status="stopped")
        raise
    except Exception as error:
        trial.record(status="failed", error=f"{type(error).__name__}: {first_line(error, 300)}")
        raise
    ended = ("stopped" if summary.get("preempted_by") else "pruned" if trial.pruned
             else "finished")
    trial.record(status=ended, epochs=summary["epochs"], steps=summary["steps"],
                 val_acc=summary["final_val_acc"], pruned=trial.pruned,
                 history=[_epoch_record(entry) for entry in summary["history"]],
                 train_seconds=round(earlier_s + (summary["train_seconds"] or 0.0), 3))
    return {**trial.status, "summary": summary}


def trial_line(status: dict) -> str:
    """A trial's last line: its accuracy, where it stopped, or its error."""
    name = f"trial {status['trial']:03d}"
    accuracy = "-" if status.get("val_acc") is None else f"{status['val_acc']:.2%}"
    if status["status"] == "finished":
        return (f"{name} finished: val_acc {accuracy}, epochs {status['epochs']} "
                f"({describe(status['settings']) or 'the fixed settings'})")
    if status["status"] == "pruned":
        return (f"{name} pruned at epoch {status['pruned']['epoch']}: "
                f"{status['pruned']['reason']}; its checkpoints are kept")
    if status["status"] == "stopped":
        return (f"{name} stopped at epoch {status['epochs']}, step {status['steps']} (val_acc "
                f"{accuracy}): run it again to resume (exit status {PREEMPTED_EXIT_CODE})")
    if status["status"] == ELSEWHERE:
        return f"{name} is being run by a live job elsewhere: its trial.json is left as it is"
    return f"{name} {status['status']}: {status.get('error') or 'no error recorded'}"


def trial_from_environment() -> int:
    """The trial of a pod of a Kubernetes Indexed Job: JOB_COMPLETION_INDEX."""
    index = os.environ.get("JOB_COMPLETION_INDEX")
    if index is None:
        raise JobError("which trial? pass --trial N, or --parallel K to run them all, or set "
                       "JOB_COMPLETION_INDEX (a Kubernetes Indexed Job sets it)")
    try:
        return int(index)
    except ValueError:
        raise JobError(f"JOB_COMPLETION_INDEX {index!r} is not a trial number") from None


# ----------------------------------------------------------------------------------------------
# every trial on this machine, K at a time, each a child process

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_parallel(plan: Plan, parallel: int, say: Callable[[str], None]) -> int:
    """Run the trials not finished, pruned or held by another live job, `parallel` at a time as
    `cnn-job sweep run FILE --trial N` children. Returns the exit status: 0 all finished or
    pruned, 1 one failed, 69 one found storage out of reach, 75 stopped or not run."""
    if parallel < 1:
        raise JobError("--parallel must be at least 1")
    claim(plan)
    stores = [plan.store(plan.trial_uri(i)) for i in range(len(plan.trials))]
    lease_s = plan.config(0).lease_seconds
    outcome: dict[int, dict] = {}
    todo = []
    for index, store in enumerate(stores):
        status = read_status(store)
        if status and status["status"] in ("finished", "pruned"):
            outcome[index] = status
            accuracy = "-" if status.get("val_acc") is None else f"{status['val_acc']:.2%}"
            say(f"trial {index:03d} finished already (val_acc {accuracy}): skipped"
                if status["status"] == "finished" else
                f"trial {index:03d} pruned already at epoch {status['pruned']['epoch']}: skipped "
                "(a pruned trial is not run again)")
        elif _held(store, lease_s):
            outcome[index] = {**(status or {}), "trial": index, "status": ELSEWHERE}
            say(f"{trial_line(outcome[index])}: skipped")
        else:
            todo.append(index)
    gpus = _visible_gpus(plan) if todo else []
    threads = max(1, len(os.sched_getaffinity(0)) // parallel)
    running: dict[int, tuple[subprocess.Popen, int, threading.Thread]] = {}  # trial → child
    free_slots = list(range(parallel))
    stop: list[int] = []  # the signal that stopped the sweep
    end_with_parent = _end_with_parent(os.getpid())

    def forward(signum, frame) -> None:
        if not stop:
            say(f"{signal.Signals(signum).name}: stopping the running trials, starting no more")
        stop.append(signum)
        for child, _, _ in list(running.values()):
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
    try:
        while (todo and not stop) or running:
            while todo and free_slots and not stop:
                index, slot = todo.pop(0), free_slots.pop(0)
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                env.pop("JOB_COMPLETION_INDEX", None)
                if gpus and plan.config(index).device != "cpu":
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                else:
                    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
                # The child holds its pipe's reading end too, never reading it: if this process
                # dies, the child's last lines (it is stopping: see _end_with_parent) land in
                # the pipe's buffer instead of failing it with a broken pipe.
                reading, writing = os.pipe()
                try:
                    child = subprocess.Popen(
                        [sys.executable, "-m", "job", "sweep", "run", plan.source, "--trial",
                         str(index)], stdout=writing, stderr=subprocess.STDOUT, env=env,
                        pass_fds=(reading,), preexec_fn=end_with_parent,
                        start_new_session=True)  # a terminal's Ctrl-C reaches it once: forwarded
                finally:
                    os.close(writing)
                reader = threading.Thread(
                    target=_relay, args=(os.fdopen(reading, errors="replace"),
                                         f"trial {index:03d} | "), daemon=True)
                reader.start()
                running[index] = (child, slot, reader)
                say(f"trial {index:03d} started ({describe(plan.trials[index]) or 'fixed settings'})")
                if stop:  # a signal between the start and the bookkeeping
                    child.send_signal(stop[-1])
            for index, (child, slot, reader) in list(running.items()):
                if child.poll() is None:
                    continue
                reader.join()
                del running[index]
                free_slots.append(slot)
                outcome[index] = _ended(stores[index], index, child.returncode, lease_s)
                say(trial_line(outcome[index]))
            time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return _sum_up(plan, outcome, say)


def _end_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """The children's pre-exec: Linux's parent-death signal, SIGTERM, so that a child whose
    `--parallel` parent is killed outright (kill -9, OOM) stops as a preempted trial does
    (checkpoint, trial.json `stopped`, exit 75) instead of training on unwatched. None where
    prctl does not exist."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before the call: stop before starting
            os._exit(PREEMPTED_EXIT_CODE)

    return preexec


def _relay(stream, prefix: str) -> None:
    with stream:
        for line in stream:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()


def _held(store: LocalStore | S3Store, lease_s: float) -> bool:
    """Whether another live job holds the trial (a local folder's lock, a fresh S3 lease)."""
    return lease_for(store, lease_s, log=lambda message: None).is_held() is True


def _ended(store, index: int, returncode: int, lease_s: float) -> dict:
    """The status of a child that exited. What it wrote stands when it matches its exit status;
    a trial another live job holds is left as it is (the child was refused: exit 2); otherwise
    the exit status is recorded: 69 as `unavailable` (storage out of reach: resumable), 75 as
    `stopped` (a signal before the trial could say), anything else, or a death by a signal (OOM,
    SIGKILL), as `failed`. A trial.json out of this process's reach too is `unavailable`: its
    outcome is unknown here, and the next run resumes or skips it as it finds it."""
    try:
        status = read_status(store)
    except StorageUnavailable as error:
        return {"trial": index, "status": "unavailable", "error": first_line(error, 300)}
    wrote = status["status"] if status else None
    if (returncode, wrote) in ((0, "finished"), (0, "pruned"), (PREEMPTED_EXIT_CODE, "stopped")):
        return status
    if returncode == JobError.exit_code and _held(store, lease_s):
        return {**(status or {}), "trial": index, "status": ELSEWHERE}
    status = status or {"trial": index, "settings": {}, "epochs": 0, "steps": 0,
                        "val_acc": None, "train_seconds": None}
    if returncode == StorageUnavailable.exit_code:
        ended = {"status": "unavailable", "error": "storage out of reach (exit status 69): run "
                 "the sweep again to resume it"}
    elif returncode == PREEMPTED_EXIT_CODE:
        ended = {"status": "stopped", "error": None}
    elif wrote == "failed" and returncode > 0:
        return status  # with its own error line
    else:
        how = (f"killed by {signal.Signals(-returncode).name}" if returncode < 0
               else f"exit status {returncode}")
        ended = {"status": "failed", "error": how}
    try:
        return write_status(store, {**status, **ended})
    except StorageUnavailable:  # out of reach for this process too: said, not recorded
        return {**status, **ended}


def _sum_up(plan: Plan, outcome: dict[int, dict], say: Callable[[str], None]) -> int:
    names = ("finished", "pruned", "stopped", "unavailable", ELSEWHERE, "failed")
    counts = {name: [i for i, s in outcome.items() if s["status"] == name] for name in names}
    not_run = len(plan.trials) - len(outcome)
    said = [f"{len(counts[name])} {name}" for name in names if counts[name]]
    said += [f"{not_run} not run"] if not_run else []
    report_command = follow_up(["cnn-job", "sweep", "report", plan.root], plan.endpoint_url,
                               plan.root)
    say(f"sweep {plan.name}: {', '.join(said)}, of {len(plan.trials)}; {report_command}")
    for index in counts["failed"]:
        say(f"failed: {trial_line(outcome[index])}")
    if counts["failed"]:
        return FAILED_EXIT_CODE
    if counts["unavailable"]:
        return StorageUnavailable.exit_code
    return PREEMPTED_EXIT_CODE if counts["stopped"] or counts[ELSEWHERE] or not_run else 0


def _visible_gpus(plan: Plan) -> list[str]:
    """The GPUs trial slots are spread over (CUDA_VISIBLE_DEVICES' own list when set); none
    when the sweep trains on the CPU."""
    if plan.fixed.get("device") == "cpu":
        return []
    import torch

    count = torch.cuda.device_count()
    listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


# ----------------------------------------------------------------------------------------------
# the report: sweep.json and every trial.json, never a checkpoint


def report(root: str, endpoint_url: str | None = None) -> tuple[dict, list[dict]]:
    """The plan and one row per trial, best first: finished by val_acc, pruned ones by their
    last val_acc, then pending, running, unavailable, stopped and failed ones. Anything in the
    root but what a sweep writes is one JobError line."""
    store = open_store(root, endpoint_url, option="URI")
    if isinstance(store, LocalStore) and store.folder.exists() and not store.folder.is_dir():
        raise JobError(f"{root} is a file, not a sweep's root: give the sweep's checkpoint_uri, "
                       f"the folder that holds {SWEEP_FILE}")
    try:
        data = store.read(SWEEP_FILE)
    except OSError as error:  # a local file's: S3's arrive as JobErrors already
        raise JobError(f"cannot read {store.location(SWEEP_FILE)} "
                       f"({error.strerror or error})") from None
    if data is None:
        raise JobError(f"{root} holds no sweep (no {SWEEP_FILE}): give the checkpoint_uri of a "
                       "sweep file that ran")
    plan = _checked_plan(data, store.location(SWEEP_FILE))
    lease_s = plan["fixed"].get("lease_seconds") or 30.0
    rows = []
    for trial in plan["trials"]:
        trial_store = open_store(trial_uri(root, trial["trial"]), endpoint_url, option="URI")
        status = read_status(trial_store) or {"status": "pending", "epochs": 0}
        row = {"trial": trial["trial"], "status": status["status"], "settings": trial["settings"],
               "epochs": status.get("epochs", 0), "val_acc": status.get("val_acc"),
               "train_seconds": status.get("train_seconds"), "error": status.get("error"),
               "pruned": status.get("pruned"), "history": status.get("history", []),
               "rungs": status.get("rungs", []), "sources": status.get("sources"),
               "updated": status.get("updated"),
               "uri": trial_store.uri}
        if row["status"] == "running" and lease_for(trial_store, lease_s, print).is_held() is False:
            row["status"] = "stopped (killed)"  # its writer is gone without saying so
        rows.append(row)
    rows.sort(key=lambda r: (STATUS_ORDER.index(r["status"]),
                             -(r["val_acc"] or 0) if r["status"] in ("finished", "pruned") else 0,
                             r["trial"]))
    return plan, rows


def _checked_plan(data: bytes, location: str) -> dict:
    """sweep.json as `claim` writes it, or one JobError line."""
    try:
        plan = json.loads(data)
        ok = (isinstance(plan["name"], str) and isinstance(plan["fixed"], dict)
              and all(isinstance(name, str) for name in plan["swept"])
              and isinstance(plan["log_scale"], list)
              and isinstance(plan.get("early_stop", {}), dict)
              and all(isinstance(t["trial"], int) and isinstance(t["settings"], dict)
                      for t in plan["trials"]))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise JobError(f"{location} is not a sweep plan this job wrote")
    return plan
