"""TrainConfig's settings: each of one kind, so that a sweep's trials know which CNN_JOB_*
variables they may take (job/sweep.py) and docs/sweeps.md can list them."""

from __future__ import annotations

import dataclasses
from collections import Counter

from job.config import SETTING_KINDS, TrainConfig, setting_kind


def test_every_setting_is_of_exactly_one_kind():
    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    classified = Counter(name for names in SETTING_KINDS.values() for name in names)
    assert sorted(classified) == sorted(fields), "a TrainConfig field without a kind, or a kind " \
        "naming no field: add it to SETTING_KINDS in job/config.py"
    assert [name for name, count in classified.items() if count > 1] == []
    assert {setting_kind(name) for name in ("lr", "device", "precision")} == {"result"}
    assert {setting_kind(name) for name in ("data_uri", "compile", "eval_batch_size")} == {"where"}
    assert setting_kind("checkpoint_uri") == "run"
