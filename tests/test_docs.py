"""The README and docs/: a README a newcomer reads in one sitting, its options table generated
from TrainConfig, links that resolve, and a tree that speaks of the project only.

After changing a setting in job/config.py, regenerate the README's options table:

    .venv/bin/python tests/test_docs.py
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the checkout's job/, not an installed one
    sys.path.insert(0, str(REPO))

from job.config import SETTING_KINDS, TrainConfig  # noqa: E402

README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 300
OPTIONS_START = "<!-- options: generated from TrainConfig by tests/test_docs.py -->"
OPTIONS_END = "<!-- end of options -->"
SWEEPS = DOCS / "sweeps.md"
KINDS_START = "<!-- setting kinds: generated from job/config.py's SETTING_KINDS by tests/test_docs.py -->"
KINDS_END = "<!-- end of setting kinds -->"


# ----------------------------------------------------------------------------------------------
# the options table


def _cell(text: str) -> str:
    """`text` safe inside a Markdown table cell: pipes escaped, <placeholders> as code (a bare
    <dataset> would be taken for an HTML tag and vanish)."""
    text = text.replace("|", "\\|")
    return re.sub(r"[^\s`]*<[^<>\s]+>[^\s`.,;)]*", lambda match: f"`{match[0]}`", text)


def _default(field: dataclasses.Field) -> str:
    """The default --help shows: the field's default_text, else its default (flags as on/off)."""
    if field.metadata.get("default_text") is not None:
        return field.metadata["default_text"]
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


# Defaults computed from the environment (the cache folder under HOME or XDG_CACHE_HOME) are
# shown as they read for a user with neither changed: the table is built in a child process.
README_ENV = {"HOME": "/home/user", "XDG_CACHE_HOME": ""}


def options_table() -> str:
    """The table as the README shows it, whatever this machine's HOME and XDG_CACHE_HOME."""
    result = subprocess.run([sys.executable, __file__, "--print"], capture_output=True, text=True,
                            env={**os.environ, **README_ENV}, timeout=60, check=True)
    return result.stdout


def build_options_table() -> str:
    """`cnn-job train`'s arguments as a Markdown table (option, env var, default, help), one row
    per TrainConfig field, in its order; `dataset` is the positional DATASET."""
    types = typing.get_type_hints(TrainConfig)
    rows = ["| option | env var | default | what it does |", "|---|---|---|---|"]
    for field in dataclasses.fields(TrainConfig):
        dashed = field.name.replace("_", "-")
        if field.name == "dataset":
            option = "DATASET"
        elif bool in (types[field.name], *typing.get_args(types[field.name])):
            option = f"--{dashed}/--no-{dashed}"
        else:
            option = f"--{dashed}"
        env = "CNN_JOB_" + field.name.upper()
        rows.append(f"| `{option}` | `{env}` | {_cell(_default(field))} | "
                    f"{_cell(field.metadata['help'])} |")
    return "\n".join(rows) + "\n"


def marked_block(text: str, start_marker: str = OPTIONS_START,
                         end_marker: str = OPTIONS_END) -> str:
    """What the README (or another page) holds between the two markers."""
    start, end = text.index(start_marker), text.index(end_marker)
    return text[start + len(start_marker):end].strip("\n") + "\n"


def write_block(page: Path, start_marker: str, end_marker: str, block: str) -> None:
    """Rewrite `page`'s block between the markers in place."""
    text = page.read_text()
    start, end = text.index(start_marker), text.index(end_marker)
    page.write_text(f"{text[:start]}{start_marker}\n{block}{text[end:]}")


# What a sweep's trial does with a CNN_JOB_* variable of each kind (docs/sweeps.md).
KIND_RULES = {
    "where": "**Where and how a trial runs**: taken from the environment by every trial whose file "
             "does not set the option (the file's value wins)",
    "result": "**What a trial ends with**: refused in one line unless the file gives every trial "
              "the same value (put it in `fixed`, or unset it)",
    "run": "**The sweep's own**: refused unless it is what the sweep gives every trial (the "
           "file's `dataset`, `<root>/trial-NNN`, `<name>-trial-NNN`, `resume` auto, no "
           "`overwrite`)",
}


def build_setting_kinds() -> str:
    """docs/sweeps.md's lists: each kind of setting, what a trial does with its variables, and
    the variables, in TrainConfig's order."""
    order = [field.name for field in dataclasses.fields(TrainConfig)]
    lines = []
    for kind, rule in KIND_RULES.items():
        names = sorted(SETTING_KINDS[kind], key=order.index)
        variables = ", ".join(f"`CNN_JOB_{name.upper()}`" for name in names)
        lines.append(f"- {rule}: {variables}.")
    return "\n".join(lines) + "\n"


def test_readme_options_table_is_trainconfigs():
    text = README.read_text()
    assert OPTIONS_START in text and OPTIONS_END in text, "the README lost its options markers"
    assert marked_block(text) == options_table(), (
        "the README's options table differs from TrainConfig: run `.venv/bin/python tests/test_docs.py`")


def test_the_sweep_docs_lists_are_the_setting_kinds():
    assert set(KIND_RULES) == set(SETTING_KINDS)
    assert marked_block(SWEEPS.read_text(), KINDS_START, KINDS_END) == \
        build_setting_kinds(), ("docs/sweeps.md's lists of setting kinds differ from "
                                "job/config.py's: run `.venv/bin/python tests/test_docs.py`")


def test_options_table_names_every_setting_as_the_cli_does():
    table = options_table()
    assert table.count("\n") == 2 + len(dataclasses.fields(TrainConfig))
    assert "| `DATASET` | `CNN_JOB_DATASET` | required |" in table
    assert "| `--augment/--no-augment` | `CNN_JOB_AUGMENT` |" in table
    assert "| `--batch-size` | `CNN_JOB_BATCH_SIZE` |" in table


# ----------------------------------------------------------------------------------------------
# the README's length, and links


def test_readme_fits_a_first_hour():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move depth into docs/"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    """The targets of `page`'s Markdown links that point into the checkout (no anchors alone)."""
    targets = []
    for target in LINK.findall(page.read_text()):
        target = target.partition("#")[0]
        if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target):
            targets.append(target)
    return targets


def test_every_docs_page_is_linked_from_the_readme():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no pages"
    linked = {(REPO / target).resolve() for target in relative_links(README)}
    missing = [page.name for page in pages if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_every_relative_link_points_at_a_file_that_exists():
    broken = [f"{page.relative_to(REPO)} → {target}"
              for page in [README, *sorted(DOCS.glob("*.md"))]
              for target in relative_links(page)
              if not (page.parent / target).exists()]
    assert not broken, broken


# ----------------------------------------------------------------------------------------------
# the project speaks of itself only

# How the project was once developed, not how it is used. Built from pieces, so that this file
# does not match itself.
LOGISTICS = [re.escape(words) for words in (
    "device" + " tool", "can_start" + "_another", "give" + "_back", "GPU " + "box",
    "working " + "session", "this " + "session", "`" + "carry" + "`", "carry" + " paths",
    "as " + "carry", "MiB per " + "call", "minutes per " + "visit",
)] + [r"\bthe " + "box" + r"\b", r"\b" + "session" + r"s\b", r"\b" + "issue" + r" \d+"]
LOGISTICS_PATTERN = re.compile("|".join(LOGISTICS), re.I)


def test_no_tracked_file_speaks_of_how_the_project_was_developed():
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True,
                               text=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    hits = []
    for name in filter(None, files):
        path = REPO / name
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary, or deleted in the work tree
        for number, line in enumerate(text.splitlines(), 1):
            if match := LOGISTICS_PATTERN.search(line):
                hits.append(f"{name}:{number}: {match[0]!r}")
    assert not hits, "\n".join(hits)


if __name__ == "__main__":
    if sys.argv[1:] == ["--print"]:
        print(build_options_table(), end="")
        sys.exit(0)
    write_block(README, OPTIONS_START, OPTIONS_END, options_table())
    print(f"{README.relative_to(REPO)}: options table rewritten from TrainConfig")
    write_block(SWEEPS, KINDS_START, KINDS_END, build_setting_kinds())
    print(f"{SWEEPS.relative_to(REPO)}: setting kinds rewritten from job/config.py")
