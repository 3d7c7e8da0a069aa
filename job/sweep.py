"""Sweeps: a YAML file of settings to try, expanded into trials that are each a resumable run of
`cnn-job train` in a folder of their own under the sweep's root (`<root>/trial-NNN/`).

A trial is a pure function of the file: grid combinations × random draws × seeds, in that order.
One process runs one trial (a pod of an Indexed Job, or a child of `sweep run --parallel`), so
each trial keeps every guarantee of a training run: resume, one writer, exit 75 on a signal.
The root holds the expanded plan (`sweep.json`, the sweep's identity) and each trial a small
status file (`trial.json`), which is all the report reads.
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
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from job.config import TrainConfig
from job.errors import JobError, StorageUnavailable, first_line
from job.lease import lease_for
from job.preemption import PREEMPTED_EXIT_CODE, SIGNALS, Interrupted
from job.storage import LocalStore, S3Store, open_store, read_object

SWEEP_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
SECTIONS = ("name", "dataset", "checkpoint_uri", "fixed", "grid", "random", "seeds")
SWEEPS_OWN = ("dataset", "checkpoint_uri", "run_name")  # set by the sweep for every trial
STATUS_ORDER = ("finished", "pending", "running", "stopped", "stopped (killed)", "failed")
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

    def identity(self) -> dict:
        """What `sweep.json` holds: a root belongs to one plan."""
        return {"name": self.name, "dataset": self.dataset, "fixed": self.fixed,
                "swept": self.swept, "log_scale": self.log_scale,
                "trials": [{"trial": index, "settings": settings}
                           for index, settings in enumerate(self.trials)]}

    @property
    def endpoint_url(self) -> str | None:
        return self.fixed.get("s3_endpoint_url")

    def trial_uri(self, index: int) -> str:
        return trial_uri(self.root, index)

    def config(self, index: int) -> TrainConfig:
        """Trial `index` as `cnn-job train` would run it: the file's settings only, in its own
        checkpoint folder, under its own run name. Of the CNN_JOB_* variables only the cache
        folder reaches a trial, where the file does not set one: it is the machine's (a pod's
        /cache volume), and changes no result."""
        machine = {"cache_dir": Path(os.environ["CNN_JOB_CACHE_DIR"])} if (
            os.environ.get("CNN_JOB_CACHE_DIR") and "cache_dir" not in self.fixed) else {}
        return TrainConfig(dataset=self.dataset, **machine, **self.fixed, **self.trials[index],
                           checkpoint_uri=self.trial_uri(index),
                           run_name=f"{self.name}-trial-{index:03d}")

    def check_index(self, index: int) -> None:
        if not 0 <= index < len(self.trials):
            raise JobError(f"trial {index} is not in sweep {self.name}: its {len(self.trials)} "
                           f"trials are 0 to {len(self.trials) - 1} (see cnn-job sweep plan "
                           f"{self.source})")


def trial_uri(root: str, index: int) -> str:
    return f"{root.rstrip('/')}/trial-{index:03d}"


def load_plan(path: str) -> Plan:
    """The sweep file, checked against TrainConfig (every trial's settings built) and expanded;
    one JobError line for anything wrong with it. Reads the file only: creates nothing."""
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
    root = str(document.get("checkpoint_uri") or Path("runs", "sweeps", name))

    fixed = _options(document.get("fixed"), "fixed", where)
    fixed = {option: _value(option, value, f"{where}: fixed") for option, value in fixed.items()}
    grid = _options(document.get("grid"), "grid", where)
    for option, values in grid.items():
        if not isinstance(values, list) or not values:
            raise JobError(f"{where}: grid: {option} must be a list of one value or more, "
                           f"e.g. [{_example(option)}]")
        grid[option] = [_value(option, value, f"{where}: grid") for value in values]
    draws, ranges = _random_draws(document.get("random"), where)
    seeds = document.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds:
            raise JobError(f"{where}: seeds must be a list of one seed or more, e.g. [0, 1]")
        seeds = [_value("seed", seed, f"{where}: seeds") for seed in seeds]

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
    plan = Plan(name, dataset, root, fixed, swept,
                [option for option, (_, _, scale) in ranges.items() if scale == "log"], trials, path)
    for index, settings in enumerate(trials):  # every trial as train would take it, or refused
        try:
            plan.config(index)
        except JobError as error:
            described = f" ({describe(settings)})" if settings else ""
            raise JobError(f"{where}: trial {index}{described}: {error}") from None
        except TypeError as error:  # a value TrainConfig cannot even compare
            raise JobError(f"{where}: trial {index}: {first_line(error, 200)}") from None
    return plan


def _parse_yaml(data: bytes, where: str):
    import yaml

    try:
        return yaml.safe_load(data)
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
                           "checkpoint_uri at the top of the file; run names are trial names)")
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


def _random_draws(section, where: str) -> tuple[list[dict], dict]:
    """`count` draws from `random.Random(seed)`, each option in the file's order; and the
    ranges: option → (min, max, scale)."""
    if section is None:
        return [{}], {}
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
    return draws, ranges


def describe(settings: dict) -> str:
    return ", ".join(f"{option} {format_value(value)}" for option, value in settings.items())


def format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------
# the root: the plan written once, and refused when it changed


def claim(plan: Plan) -> None:
    """Write the plan as the root's `sweep.json` if it has none; refuse a root whose plan is
    another file's (or this file's before an edit)."""
    store = open_store(plan.root, plan.endpoint_url, option="checkpoint_uri")
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


def read_status(store: LocalStore | S3Store) -> dict | None:
    try:
        data = store.read(TRIAL_FILE)
        return json.loads(data) if data else None
    except (OSError, ValueError):
        return None


def write_status(store: LocalStore | S3Store, status: dict) -> dict:
    status = {**status, "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        store.write(TRIAL_FILE, _encode(status))
    except OSError as error:
        raise JobError(f"cannot write {store.location(TRIAL_FILE)} "
                       f"({error.strerror or error})") from None
    return status


def run_trial(plan: Plan, index: int, run_training: Callable[[TrainConfig], dict]) -> dict:
    """Trial `index`, exactly as `cnn-job train` with its settings, in this process (signals and
    exit statuses as train's); its status file written at the start and at the end. Returns
    the status ("finished" or "stopped") with the run's summary under "summary"."""
    plan.check_index(index)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise JobError("a sweep trial is one process: run it without torchrun")
    cfg = plan.config(index)
    claim(plan)
    store = open_store(cfg.checkpoint_uri, cfg.s3_endpoint_url)
    lease = lease_for(store, cfg.lease_seconds, log=lambda message: None)
    if lease.is_held():
        raise JobError(f"trial {index:03d} ({store.uri}) is being run by a live job "
                       f"({lease.holder()}): one trial has one writer; wait for it to end")
    previous = read_status(store) or {}
    # training seconds of the earlier processes that reported them (a killed one did not)
    earlier_s = 0.0 if previous.get("status") == "running" else previous.get("train_seconds") or 0.0
    status = {"trial": index, "status": "running", "settings": plan.trials[index],
              "epochs": previous.get("epochs", 0), "steps": previous.get("steps", 0),
              "val_acc": previous.get("val_acc"), "train_seconds": earlier_s, "error": None}
    write_status(store, status)
    os.environ.setdefault("WANDB_RUN_GROUP", plan.name)  # wandb.init reads it: one group a sweep
    try:
        summary = run_training(cfg)
    except StorageUnavailable:
        raise  # its status file is out of reach too; the trial's retry resumes it
    except JobError as error:
        write_status(store, {**status, "status": "failed", "error": first_line(error, 300)})
        raise JobError(f"trial {index:03d} failed: {error}") from None
    except (Interrupted, KeyboardInterrupt):
        write_status(store, {**status, "status": "stopped"})
        raise
    except Exception as error:
        write_status(store, {**status, "status": "failed",
                             "error": f"{type(error).__name__}: {first_line(error, 300)}"})
        raise
    ended = "stopped" if summary.get("preempted_by") else "finished"
    status = write_status(store, {
        **status, "status": ended, "epochs": summary["epochs"], "steps": summary["steps"],
        "val_acc": summary["final_val_acc"],
        "train_seconds": round(earlier_s + (summary["train_seconds"] or 0.0), 3)})
    return {**status, "summary": summary}


def trial_line(status: dict) -> str:
    """A trial's last line: its accuracy, where it stopped, or its error."""
    name = f"trial {status['trial']:03d}"
    accuracy = "-" if status.get("val_acc") is None else f"{status['val_acc']:.2%}"
    if status["status"] == "finished":
        return (f"{name} finished: val_acc {accuracy}, epochs {status['epochs']} "
                f"({describe(status['settings']) or 'the fixed settings'})")
    if status["status"] == "stopped":
        return (f"{name} stopped at epoch {status['epochs']}, step {status['steps']} (val_acc "
                f"{accuracy}): run it again to resume (exit status {PREEMPTED_EXIT_CODE})")
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


def run_parallel(plan: Plan, parallel: int, say: Callable[[str], None]) -> int:
    """Run the trials not finished yet `parallel` at a time as `cnn-job sweep run FILE --trial
    N` children. Returns the exit status: 0 all finished, 1 one failed, 75 stopped or not run."""
    if parallel < 1:
        raise JobError("--parallel must be at least 1")
    claim(plan)
    stores = [open_store(plan.trial_uri(i), plan.endpoint_url) for i in range(len(plan.trials))]
    outcome: dict[int, dict] = {}
    todo = []
    for index, store in enumerate(stores):
        status = read_status(store)
        if status and status.get("status") == "finished":
            outcome[index] = status
            say(f"trial {index:03d} finished already (val_acc {status['val_acc']:.2%}): skipped")
        else:
            todo.append(index)
    gpus = _visible_gpus(plan) if todo else []
    threads = max(1, len(os.sched_getaffinity(0)) // parallel)
    running: dict[int, tuple[subprocess.Popen, int, threading.Thread]] = {}  # trial → child
    free_slots = list(range(parallel))
    stop: list[int] = []  # the signal that stopped the sweep

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
                child = subprocess.Popen(
                    [sys.executable, "-m", "job", "sweep", "run", plan.source, "--trial", str(index)],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                    start_new_session=True)  # a terminal's Ctrl-C reaches it once: forwarded
                reader = threading.Thread(target=_relay, args=(child, f"trial {index:03d} | "),
                                          daemon=True)
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
                outcome[index] = _ended(stores[index], index, child.returncode)
                say(trial_line(outcome[index]))
            time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return _sum_up(plan, outcome, say)


def _relay(child: subprocess.Popen, prefix: str) -> None:
    for line in child.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def _ended(store, index: int, returncode: int) -> dict:
    """The status of a child that exited; one killed before it could say (OOM, SIGKILL) is
    recorded as failed, with how it ended."""
    status = read_status(store) or {"trial": index, "settings": {}, "epochs": 0, "steps": 0,
                                    "val_acc": None, "train_seconds": None}
    if status.get("status") in (None, "running") or (returncode not in (0, PREEMPTED_EXIT_CODE)
                                                    and status.get("status") != "failed"):
        how = (f"killed by {signal.Signals(-returncode).name}" if returncode < 0
               else f"exit status {returncode}")
        status = write_status(store, {**status, "status": "failed", "error": how})
    return status


def _sum_up(plan: Plan, outcome: dict[int, dict], say: Callable[[str], None]) -> int:
    counts = {name: [i for i, s in outcome.items() if s["status"] == name]
              for name in ("finished", "stopped", "failed")}
    not_run = len(plan.trials) - len(outcome)
    say(f"sweep {plan.name}: {len(counts['finished'])} finished, {len(counts['stopped'])} "
        f"stopped, {len(counts['failed'])} failed, {not_run} not run, of {len(plan.trials)}; "
        f"cnn-job sweep report {plan.root}")
    for index in counts["failed"]:
        say(f"failed: {trial_line(outcome[index])}")
    if counts["failed"]:
        return FAILED_EXIT_CODE
    return PREEMPTED_EXIT_CODE if counts["stopped"] or not_run else 0


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
    """The plan and one row per trial, best first: finished by val_acc, then pending, running,
    stopped and failed ones."""
    store = open_store(root, endpoint_url, option="URI")
    data = store.read(SWEEP_FILE)
    if data is None:
        raise JobError(f"{root} holds no sweep (no {SWEEP_FILE}): give the checkpoint_uri of a "
                       "sweep file that ran")
    try:
        plan = json.loads(data)
        trials, lease_s = plan["trials"], plan["fixed"].get("lease_seconds") or 30.0
    except (ValueError, KeyError, TypeError, AttributeError):
        raise JobError(f"{store.location(SWEEP_FILE)} is not a sweep plan this job wrote") from None
    rows = []
    for trial in trials:
        trial_store = open_store(trial_uri(root, trial["trial"]), endpoint_url, option="URI")
        status = read_status(trial_store) or {"status": "pending", "epochs": 0}
        row = {"trial": trial["trial"], "status": status["status"], "settings": trial["settings"],
               "epochs": status.get("epochs", 0), "val_acc": status.get("val_acc"),
               "train_seconds": status.get("train_seconds"), "error": status.get("error"),
               "updated": status.get("updated"), "uri": trial_store.uri}
        if row["status"] == "running" and lease_for(trial_store, lease_s, print).is_held() is False:
            row["status"] = "stopped (killed)"  # its writer is gone without saying so
        rows.append(row)
    rows.sort(key=lambda r: (STATUS_ORDER.index(r["status"]) if r["status"] in STATUS_ORDER
                             else len(STATUS_ORDER),
                             -(r["val_acc"] or 0) if r["status"] == "finished" else 0, r["trial"]))
    return plan, rows
