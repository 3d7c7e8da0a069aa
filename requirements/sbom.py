"""Completes cyclonedx-py's SBOM of the image's venv, in the Dockerfile's sbom stage (with that
stage's throw-away tool venv, never in the image): every component gets the sha256 of the very
wheel that was installed, which must be one the lock lists for its pin (else the build stops),
and a purl; the job itself, the SBOM's subject, gets its wheel's. The third-party licences are
written beside it as a plain list, one package a line.

    python sbom.py RAW_SBOM LOCK SBOM LICENCES WHEEL_FOLDER...
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
UNDECLARED = "none declared in its metadata"


def locked(text: str) -> dict[str, tuple[Version, set[str]]]:
    """The lock's pins: canonical name → (version, the sha256s its files may have)."""
    pins: dict[str, tuple[Version, set[str]]] = {}
    name = None
    for line in text.splitlines():
        if pin := PIN.match(line):
            name = canonicalize_name(pin[1])
            pins[name] = (Version(pin[2]), set())
        elif name is not None:
            pins[name][1].update(HASH.findall(line))
    return pins


def wheels(folders: list[str]) -> dict[tuple[str, Version], set[str]]:
    """(canonical name, version) → the sha256s of the wheels of it in `folders`."""
    found: dict[tuple[str, Version], set[str]] = {}
    for folder in folders:
        for wheel in Path(folder).glob("*.whl"):
            name, version, _, _ = parse_wheel_filename(wheel.name)
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            found.setdefault((name, version), set()).add(digest)
    return found


def licence_text(component: dict) -> str:
    """The licences a component declares, as a line says them: SPDX ids and expressions, the
    words of a `License` field, the classifiers' names; its licence files' texts are in the SBOM."""
    names = []
    for entry in component.get("licenses", []):
        licence = entry.get("license", {})
        text = licence.get("text", {}).get("content", "").strip()
        if "expression" in entry or licence.get("id"):
            names.append(entry.get("expression") or licence["id"])
        elif licence.get("name", "").startswith("declared license of ") and "\n" not in text:
            names.append(text)  # the words of its `License` field
        elif " license file: " not in licence.get("name", " license file: "):
            names.append(re.sub(r"^License :: (OSI Approved :: )?", "", licence["name"]))
    if not names and component.get("licenses"):
        names = ["see its licence file in the SBOM"]
    return ", ".join(dict.fromkeys(names)) or UNDECLARED


def complete(sbom: dict, pins: dict, installed: dict) -> list[str]:
    """Hashes and purls into `sbom`; returns the licence lines, the job's first."""
    root = sbom["metadata"]["component"]
    lines = [f"{root['name']} {root['version']}: {licence_text(root)} (this image's job)"]
    for component in [root, *sorted(sbom["components"], key=lambda c: c["name"].lower())]:
        name, version = canonicalize_name(component["name"]), Version(component["version"])
        digests = installed.get((name, version), set())
        if component is not root:
            if name not in pins or pins[name][0] != version:
                sys.exit(f"sbom: {name} {version} is installed but the lock pins "
                         f"{pins[name][0] if name in pins else 'no version of it'}")
            digests = digests & pins[name][1]
            lines.append(f"{component['name']} {component['version']}: {licence_text(component)}")
        if len(digests) != 1:
            sys.exit(f"sbom: {name} {version}: {len(digests)} installed wheels match the lock's hashes")
        component["hashes"] = [{"alg": "SHA-256", "content": digests.pop()}]
        component.setdefault("purl", f"pkg:pypi/{name}@{version}")
    return lines


def main(raw: str, lock: str, out: str, licences: str, *wheel_folders: str) -> None:
    sbom = json.loads(Path(raw).read_text())
    lines = complete(sbom, locked(Path(lock).read_text()), wheels(list(wheel_folders)))
    Path(out).write_text(json.dumps(sbom, indent=2) + "\n")
    Path(licences).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
