"""Small offline image sources for the model-alignment benchmark (disjoint label groups).

The setting imitates the homogeneous experiments of ZipIt! and MuDSC (see
``specs/mudsc-and-alignment.md`` §2.5): models trained from different random inits on *disjoint
label groups* of one dataset ("CIFAR-50+50"), then merged. Here the images are 28×28 grey-scale
and ship with the system or a Python package, so nothing is downloaded:

* :func:`fashion_mnist`: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``;
* :func:`digits`: scikit-learn's bundled 8×8 handwritten digits, upsampled to 20×20 and padded;
* :func:`glyphs`: letters rendered with PIL from installed TrueType fonts, train and test fonts
  disjoint (notMNIST-style).

Every source returns an :class:`Images`: float32 images (N, 1, 28, 28) in [0, 1] and int64
labels. :func:`task_split` cuts an :class:`Images` into one :class:`Task` per label group, labels
kept as global class ids (the models share one class-embedding head over all classes, like the
CLIP head of ZipIt!/MuDSC). Everything is deterministic given its ``seed``.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from alloykit.bench.sources import DataMissingError
from alloykit.errors import ParameterError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FONT_DIRS = (Path("/usr/share/fonts"),)  # matplotlib's bundled ttf folder is added at run time
# Fonts whose code points for letters hold symbols (cmex10: big delimiters; Standard Symbols PS:
# Greek; D050000L: dingbats). Matched on the family name, case-insensitive.
SYMBOL_FONTS = re.compile(r"sym|dingbat|d050000l|cmex|wingding|webding|emoji|ornament", re.IGNORECASE)
SIZE = 28


@dataclass
class Images:
    """A labelled image dataset: ``x_*`` float32 (N, 1, 28, 28) in [0, 1], ``y_*`` int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    name: str
    info: dict[str, Any] = field(default_factory=dict)  # source details (e.g. the glyph font split)


@dataclass
class Task:
    """One label group of an :class:`Images`: its examples, labels kept as global class ids."""

    name: str
    classes: list[int]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def task_split(images: Images, groups: list[list[int]], names: list[str] | None = None) -> list[Task]:
    """One :class:`Task` per group of class ids: the train and test examples of those classes.

    Groups must be non-empty, disjoint and within ``range(len(images.classes))``. Labels stay
    global class ids, so every model scores all classes with the shared class-embedding head
    (the ZipIt!/MuDSC CLIP-head protocol). Names default to ``"<dataset>.A"``, ``"<dataset>.B"``, …
    """
    n = len(images.classes)
    seen: set[int] = set()
    for g in groups:
        if not g or any(not 0 <= c < n for c in g) or seen & set(g) or len(set(g)) != len(g):
            raise ParameterError(
                f"groups={groups!r}: expected non-empty, disjoint lists of class ids in [0, {n})"
            )
        seen |= set(g)
    if names is None:
        names = [f"{images.name}.{chr(ord('A') + i)}" for i in range(len(groups))]
    if len(names) != len(groups):
        raise ParameterError(f"names={names!r}: expected {len(groups)} names, one per group")
    tasks = []
    for name, g in zip(names, groups, strict=True):
        ids = torch.tensor(sorted(g))
        tr, te = torch.isin(images.y_train, ids), torch.isin(images.y_test, ids)
        tasks.append(
            Task(
                name, sorted(g), images.x_train[tr], images.y_train[tr], images.x_test[te], images.y_test[te]
            )
        )
    return tasks


def subsample(
    images: Images, train_per_class: int | None = None, test_per_class: int | None = None, seed: int = 0
) -> Images:
    """At most ``*_per_class`` examples of each class per split, drawn with ``seed`` (order kept)."""
    g = torch.Generator().manual_seed(seed)

    def pick(y: torch.Tensor, k: int | None) -> torch.Tensor:
        if k is None:
            return torch.arange(len(y))
        keep = []
        for c in range(len(images.classes)):
            idx = torch.nonzero(y == c).flatten()
            keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
        return torch.cat(keep).sort().values

    tr, te = pick(images.y_train, train_per_class), pick(images.y_test, test_per_class)
    return Images(
        images.x_train[tr], images.y_train[tr], images.x_test[te], images.y_test[te],
        list(images.classes), images.name, dict(images.info),
    )  # fmt: skip


# --------------------------------------------------------------------------------- Fashion-MNIST


def _idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: magic, dims as big-endian uint32, then uint8 data)."""
    with gzip.open(path) as f:
        data = f.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


def fashion_mnist(root: Path | str = FASHION_MNIST) -> Images:
    """Fashion-MNIST (60,000 train, 10,000 test, 10 classes) from the Debian files under ``root``."""
    root = Path(root)
    files = {
        "x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz",
    }  # fmt: skip
    for f in files.values():
        if not (root / f).exists():
            raise DataMissingError(
                f"Fashion-MNIST not found at {root / f}: `apt-get install dataset-fashion-mnist`"
            )
    a = {k: torch.from_numpy(_idx(root / f).copy()) for k, f in files.items()}
    return Images(
        (a["x_train"].float() / 255).unsqueeze(1), a["y_train"].long(),
        (a["x_test"].float() / 255).unsqueeze(1), a["y_test"].long(),
        list(FASHION_CLASSES), "fashion_mnist",
    )  # fmt: skip


# ------------------------------------------------------------------------------------ sklearn digits


def digits(seed: int = 0, test_fraction: float = 0.3) -> Images:
    """scikit-learn's 1,797 handwritten digits (8×8, values 0..16) as 28×28 images.

    Each image is scaled to [0, 1], upsampled to 20×20 (bilinear) and zero-padded to 28×28, the
    MNIST layout. The train/test split is stratified by class and seeded.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataMissingError("scikit-learn not found: `pip install scikit-learn`") from e
    if not 0 < test_fraction < 1:
        raise ParameterError(f"test_fraction={test_fraction}: expected a fraction in (0, 1)")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16).unsqueeze(1)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = F.pad(x, (4, 4, 4, 4))
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=d.target
    )
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return Images(x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)], "digits")


# -------------------------------------------------------------------------------------------- glyphs


def font_paths() -> list[Path]:
    """Every .ttf/.otf under /usr/share/fonts and matplotlib's bundled ttf folder, sorted."""
    dirs = list(FONT_DIRS)
    try:
        import matplotlib

        dirs.append(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf")
    except ImportError:
        pass
    found = set()
    for d in dirs:
        for dirpath, _, files in os.walk(d):
            found |= {Path(dirpath) / f for f in files if f.lower().endswith((".ttf", ".otf"))}
    return sorted(found)


def _glyph(font: Any, ch: str) -> np.ndarray:
    """The glyph of ``ch`` cropped to its ink, uint8 (h, w); (0, 0) when it has no ink."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(ch)
    im = Image.new("L", (max(right - left, 1) + 4, max(bottom - top, 1) + 4))
    ImageDraw.Draw(im).text((2 - left, 2 - top), ch, font=font, fill=255)
    a = np.asarray(im)
    rows, cols = np.flatnonzero(a.max(1)), np.flatnonzero(a.max(0))
    if len(rows) == 0:
        return np.zeros((0, 0), np.uint8)
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def usable_fonts(chars: str, render_size: int = 64) -> list[tuple[Path, str, dict[str, np.ndarray]]]:
    """(path, family, glyph per char) of each font that draws every char of ``chars`` as a letter.

    Dropped: fonts PIL cannot open; fonts where a char has no ink, equals the font's "notdef"
    glyph (what it draws for a missing char), or two chars draw the same (LastResort draws one
    box for everything); symbol fonts by family name (:data:`SYMBOL_FONTS`); a (family, style)
    seen before (matplotlib bundles copies of DejaVu).
    """
    from PIL import ImageFont

    out, seen = [], set()
    for path in font_paths():
        try:
            font = ImageFont.truetype(str(path), render_size)
        except OSError:
            continue
        family, style = font.getname()
        if (family, style) in seen or SYMBOL_FONTS.search(family or ""):
            continue
        notdef = _glyph(font, "\U0010ffff")
        glyphs = {c: _glyph(font, c) for c in chars}
        keys = {g.shape + (g.tobytes(),) for g in glyphs.values()}
        if (
            any(g.size == 0 for g in glyphs.values())
            or notdef.shape + (notdef.tobytes(),) in keys
            or len(keys) < len(set(chars))
        ):
            continue
        seen.add((family, style))
        out.append((path, family or path.stem, glyphs))
    return out


def _place(glyph: np.ndarray, scale: float, dx: int, dy: int, box: int = 20) -> np.ndarray:
    """``glyph`` resized so its longer side is ``scale · box`` pixels, centred in 28×28, shifted."""
    from PIL import Image

    h, w = glyph.shape
    f = scale * box / max(h, w)
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    small = np.asarray(Image.fromarray(glyph).resize((nw, nh), Image.Resampling.LANCZOS), np.float32) / 255
    canvas = np.zeros((SIZE, SIZE), np.float32)
    top = min(max((SIZE - nh) // 2 + dy, 0), SIZE - nh)
    left = min(max((SIZE - nw) // 2 + dx, 0), SIZE - nw)
    canvas[top : top + nh, left : left + nw] = small
    return canvas


def glyphs(
    chars: str = "ABCDEFGHIJ",
    seed: int = 0,
    test_fraction: float = 0.25,
    variants: int = 8,
    hold_out: str = "family",
) -> Images:
    """Letters rendered from the installed fonts; test fonts never seen in training.

    Each usable font (:func:`usable_fonts`) draws each char; the glyph is cropped to its ink,
    scaled so its longer side is 20 px and centred in 28×28 (the MNIST layout). ``variants``
    images per (font, char): the first as is, the others with a seeded scale in [0.7, 1] and shift
    of up to ±2 px per axis. Label = index of the char in ``chars``. The fonts are split, not the
    images: ``hold_out="family"`` holds out whole typefaces (every style of "Liberation Serif"
    goes to one side), ``"font"`` single font files; ``test_fraction`` of them (at least one) go
    to test, drawn with ``seed``. ``info`` lists ``train_fonts`` and ``test_fonts``.
    """
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise DataMissingError("PIL not found: `pip install pillow`") from e
    if not chars or len(set(chars)) != len(chars):
        raise ParameterError(f"chars={chars!r}: expected distinct characters")
    if not 0 < test_fraction < 1:
        raise ParameterError(f"test_fraction={test_fraction}: expected a fraction in (0, 1)")
    if variants < 1:
        raise ParameterError(f"variants={variants}: expected at least 1")
    if hold_out not in ("family", "font"):
        raise ParameterError(f"hold_out={hold_out!r}: expected 'family' or 'font'")
    fonts = usable_fonts(chars)
    keys = sorted({fam if hold_out == "family" else str(p) for p, fam, _ in fonts})
    if len(keys) < 2:
        raise DataMissingError(
            f"only {len(fonts)} usable fonts for {chars!r}: "
            "`apt-get install fonts-dejavu-core fonts-liberation fonts-freefont-ttf`"
        )
    rng = np.random.default_rng(seed)
    n_test = min(max(1, round(test_fraction * len(keys))), len(keys) - 1)
    test_keys = {keys[i] for i in rng.permutation(len(keys))[:n_test]}
    xs: dict[bool, list[np.ndarray]] = {False: [], True: []}
    ys: dict[bool, list[int]] = {False: [], True: []}
    split: dict[bool, list[str]] = {False: [], True: []}
    for path, family, glyph in fonts:
        is_test = (family if hold_out == "family" else str(path)) in test_keys
        split[is_test].append(str(path))
        for label, ch in enumerate(chars):
            for v in range(variants):
                scale = 1.0 if v == 0 else rng.uniform(0.7, 1.0)
                dx, dy = (0, 0) if v == 0 else rng.integers(-2, 3, size=2)
                xs[is_test].append(_place(glyph[ch], scale, int(dx), int(dy)))
                ys[is_test].append(label)

    def stack(t: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.stack(xs[t])).unsqueeze(1), torch.tensor(ys[t], dtype=torch.int64)

    (x_train, y_train), (x_test, y_test) = stack(False), stack(True)
    info = {"train_fonts": split[False], "test_fonts": split[True], "hold_out": hold_out}
    return Images(x_train, y_train, x_test, y_test, list(chars), "glyphs", info)
