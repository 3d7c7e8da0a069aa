"""The hash-locked install: a wheel whose bytes are not the ones the lock hashed is refused.

The dev venv (`make install`) and the image install the lock with `pip install --require-hashes`;
here the same pip installs a small wheel made on the spot, from a local folder (no network):
with the lock line's sha256 it installs, with any other bytes it stops before installing
anything. And the image's cut of the lock (the Dockerfile's awk, leaving OMITTED out) keeps
every other pin whole, hashes included.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from requirements.sbom import locked
from tests.conftest import REPO

LOCK = REPO / "requirements" / "constraints.txt"
NAME, VERSION = "lockcheck", "1.0"
WHEEL = f"{NAME}-{VERSION}-py3-none-any.whl"


def make_wheel(folder: Path, answer: int) -> Path:
    """A real wheel of one module, `lockcheck.ANSWER = answer`: what pip installs from an index."""
    folder.mkdir(exist_ok=True)
    dist_info = f"{NAME}-{VERSION}.dist-info"
    files = {
        f"{NAME}.py": f"ANSWER = {answer}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test_lock\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n",
    }
    record = [f"{path},sha256={record_digest(text.encode())},{len(text.encode())}"
              for path, text in files.items()]
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    path = folder / WHEEL
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), text)
    return path


def record_digest(data: bytes) -> str:
    """A wheel RECORD's form of a file's sha256: urlsafe base64, unpadded."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_install(requirements: Path, wheels: Path, target: Path) -> subprocess.CompletedProcess:
    """`pip install --require-hashes` from the folder alone, as make install and the image do."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--require-hashes", "--no-deps", "--no-index",
         "--no-cache-dir", "--find-links", str(wheels), "--target", str(target), "-r",
         str(requirements)],
        capture_output=True, text=True, timeout=120,
        env={**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def test_a_wheel_whose_bytes_do_not_match_the_lock_is_refused(tmp_path):
    wheels = tmp_path / "wheels"
    locked_digest = sha256(make_wheel(wheels, 42))
    requirements = tmp_path / "lock.txt"
    requirements.write_text(f"{NAME}=={VERSION} \\\n    --hash=sha256:{locked_digest}\n")

    # The index now serves other bytes under the same name and version.
    tampered_digest = sha256(make_wheel(wheels, 666))
    assert tampered_digest != locked_digest
    refused = pip_install(requirements, wheels, tmp_path / "refused")
    assert refused.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE" in refused.stderr
    assert re.search(rf"Expected sha256 {locked_digest}\s+Got\s+{tampered_digest}", refused.stderr)
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())

    # A line without a hash is refused too: the lock cannot let one package through unchecked.
    unhashed = tmp_path / "unhashed.txt"
    unhashed.write_text(f"{NAME}=={VERSION}\n")
    result = pip_install(unhashed, wheels, tmp_path / "unhashed")
    assert result.returncode != 0 and "Hashes are required in --require-hashes mode" in result.stderr

    # The locked bytes install, and are what runs.
    make_wheel(wheels, 42)
    installed = pip_install(requirements, wheels, tmp_path / "installed")
    assert installed.returncode == 0, installed.stderr
    answer = subprocess.run([sys.executable, "-c", f"import {NAME}; print({NAME}.ANSWER)"],
                            capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path / "installed")})
    assert answer.stdout.strip() == "42", answer.stderr


def test_every_pin_of_the_lock_carries_its_sha256s():
    pins = locked(LOCK.read_text())
    assert len(pins) > 50 and "torch" in pins
    without = [name for name, (_, digests) in pins.items() if not digests]
    assert without == []
    # Every line is a pin, a hash of the pin above it, or a comment: nothing pip would read alone.
    for line in LOCK.read_text().splitlines():
        assert re.match(r"^(\S+==\S+ \\|    --hash=sha256:[0-9a-f]{64}( \\)?|\s*#.*|)$", line), line


def test_the_images_cut_of_the_lock_keeps_every_other_pin_whole():
    dockerfile = (REPO / "Dockerfile").read_text()
    (omitted,) = re.findall(r'^ARG OMITTED="([^"]*)"$', dockerfile, re.M)
    (program,) = re.findall(r"awk -v omitted=\" \$OMITTED \" \\\n\s+'([^']+)'", dockerfile)
    cut = subprocess.run(["awk", "-v", f"omitted= {omitted} ", program, str(LOCK)],
                         capture_output=True, text=True, check=True).stdout
    pins, kept = locked(LOCK.read_text()), locked(cut)
    assert set(pins) - set(kept) == set(omitted.split()) and "triton" in pins
    assert all(kept[name] == pins[name] for name in kept)
    # No hash line left without its pin above it.
    for previous, line in zip(cut.splitlines(), cut.splitlines()[1:]):
        if line.startswith("    --hash="):
            assert previous.endswith(" \\"), (previous, line)
