"""Concept data in Broden's layout (Bau et al. 2017): a generator of synthetic scenes and a loader (chapter 2).

A Broden folder holds ``index.csv`` (columns image, split, ih, iw, sh, sw, color, object, part, material,
scene, texture; a category column lists segmentation PNGs under ``images/`` or whole-image label numbers,
separated by ';'), ``label.csv`` (number, name, category, frequency, coverage, syns), ``category.csv``
(name, first, last, count, frequency) and one ``c_<category>.csv`` per category (code, number, name,
frequency, coverage). A segmentation PNG stores the label number of each pixel as R + 256 * G.
:func:`generate` writes such a folder of synthetic scenes; :func:`load` reads it, or a real
broden1_224 / broden1_227 folder, by path.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import data as data_mod
from .params import ParameterError

INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material", "scene",
                 "texture")
CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
LABEL_COLUMNS = ("number", "name", "category", "frequency", "coverage", "syns")
CATEGORY_COLUMNS = ("name", "first", "last", "count", "frequency")
C_COLUMNS = ("code", "number", "name", "frequency", "coverage")

# The synthetic vocabulary. Colours are RGB; "sky" and "ground" are the two background regions.
COLORS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (150, 60, 190), "orange": (240, 135, 30), "white": (235, 235, 235), "black": (30, 30, 30)}
TEXTURES = ("stripes", "checker", "dots", "brick", "grass", "gravel")
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ("sky", "ground")
SCENES = ("circles", "squares", "triangles", "crosses")  # a scene of circles (SHAPES[0]), ...
BACKGROUND_CONTRAST = 0.3  # backgrounds are muted (desaturated, low-contrast texture); objects are not


class BrodenUnavailable(FileNotFoundError):
    """A Broden folder was asked for that is not there."""


class BrodenFormatError(ValueError):
    """A folder is there but is not in Broden's format (a file or a column is missing or malformed)."""


# ----------------------------------------------------------------------------------------------- generator

@lru_cache(maxsize=None)
def _photo_texture(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)().astype(np.float32) / 255.0


def texture_pattern(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) pattern in [0, 1]: procedural (stripes, checker, dots) or a crop of scikit-image's
    bundled brick, grass or gravel photographs, scaled so that a few periods fit in the image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(4.0, size / 6)
    if name == "stripes":
        angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * np.pi
        return ((((xx * np.cos(angle) + yy * np.sin(angle)) / period) % 1.0) < 0.5).astype(np.float32)
    if name == "checker":
        cell = max(2, int(period / 2))
        return (((xx // cell + yy // cell) % 2) == 0).astype(np.float32)
    if name == "dots":
        cx, cy = (xx % period) - period / 2, (yy % period) - period / 2
        return ((cx ** 2 + cy ** 2) < (period / 3.2) ** 2).astype(np.float32)
    if name not in TEXTURES:
        raise ParameterError(f"texture={name!r} is not allowed; choose one of {', '.join(map(repr, TEXTURES))}")
    photo = _photo_texture(name)
    crop = int(min(photo.shape[0], 4 * size))
    y0, x0 = rng.integers(0, photo.shape[0] - crop + 1), rng.integers(0, photo.shape[1] - crop + 1)
    patch = torch.from_numpy(np.ascontiguousarray(photo[y0:y0 + crop, x0:x0 + crop]))[None, None]
    patch = F.interpolate(patch, size=(size, size), mode="area")[0, 0].numpy()
    lo, hi = np.percentile(patch, [5, 95])
    return np.clip((patch - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """A boolean (size, size) mask of ``shape`` centred at (cx, cy) with half-extent ``r`` pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if shape == "triangle":  # apex up, base at cy + r
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = 0.35 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))
    raise ParameterError(f"shape={shape!r} is not allowed; choose one of {', '.join(map(repr, SHAPES))}")


def _paint(rgb: np.ndarray, mask: np.ndarray, color: str, texture: str, rng: np.random.Generator,
           contrast: float = 1.0) -> None:
    pattern = texture_pattern(texture, rgb.shape[0], rng)[..., None]
    c = np.asarray(COLORS[color], dtype=np.float32)
    c = contrast * c + (1 - contrast) * c.mean()  # contrast < 1 desaturates the colour ...
    dark, light = 0.45 * c, 0.7 * c + 0.3 * 255.0
    mid = (dark + light) / 2
    region = mid + contrast * (dark - mid) + contrast * (light - dark) * pattern  # ... and flattens the texture
    rgb[mask] = region[mask]


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """One synthetic scene: an RGB uint8 image, per-pixel names of its object, colour and texture
    (object arrays of str), and its scene name: one or two shapes of one kind (a scene of circles, ...)
    over a muted sky and ground."""
    for _attempt in range(50):
        k = int(rng.integers(len(SCENES)))
        rgb = np.zeros((size, size, 3), np.float32)
        names = {key: np.empty((size, size), dtype=object) for key in ("object", "color", "texture")}
        horizon = int(rng.integers(size // 3, 2 * size // 3 + 1))
        sky = np.zeros((size, size), bool)
        sky[:horizon] = True
        for region, mask in (("sky", sky), ("ground", ~sky)):
            _assign(rgb, names, mask, region, rng, BACKGROUND_CONTRAST, surface_labels=False)
        area = 0
        for _copy in range(int(rng.integers(1, 3))):
            r = float(rng.uniform(0.16, 0.26) * size)
            cx, cy = rng.uniform(r, size - r, size=2)
            mask = shape_mask(SHAPES[k], size, cx, cy, r)
            _assign(rgb, names, mask, SHAPES[k], rng)
            area += int(mask.sum())
        if (names["object"] == SHAPES[k]).sum() >= 0.4 * area:
            return np.clip(rgb, 0, 255).astype(np.uint8), names, SCENES[k]
    raise RuntimeError("could not place visible shapes in 50 attempts; raise the resolution")


def _assign(rgb, names, mask, obj, rng, contrast=1.0, surface_labels=True):
    color = list(COLORS)[rng.integers(len(COLORS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    _paint(rgb, mask, color, texture, rng, contrast)
    names["object"][mask] = obj
    # a muted region's faded colour and texture are not labelled (label 0), as Broden leaves pixels unlabelled
    names["color"][mask], names["texture"][mask] = (color, texture) if surface_labels else ("", "")


def vocabulary() -> dict[str, tuple[str, ...]]:
    """The synthetic concepts of each category, in label-number order."""
    return {"color": tuple(COLORS), "object": BACKGROUNDS + SHAPES, "texture": TEXTURES, "scene": SCENES}


def encode_labels(numbers: np.ndarray) -> np.ndarray:
    """Broden's segmentation encoding: label number n becomes the RGB pixel (n % 256, n // 256, 0)."""
    numbers = np.asarray(numbers, dtype=np.int64)
    if numbers.min() < 0 or numbers.max() >= 65536:
        raise ValueError("label numbers must lie in [0, 65535]")
    return np.stack([numbers % 256, numbers // 256, np.zeros_like(numbers)], -1).astype(np.uint8)


def decode_labels(png: np.ndarray) -> np.ndarray:
    """Label numbers R + 256 * G of a Broden segmentation image (H, W, 3)."""
    png = np.asarray(png)
    if png.ndim != 3 or png.shape[-1] < 2:
        raise BrodenFormatError(f"a segmentation PNG must be RGB; got an array of shape {png.shape}")
    return png[..., 0].astype(np.int64) + 256 * png[..., 1].astype(np.int64)


def generate(directory: str | Path, n_train: int, n_val: int, size: int = 32, seed: int = 0) -> Path:
    """Write ``n_train`` + ``n_val`` synthetic scenes of ``size`` pixels in Broden's layout to ``directory``.

    Every pixel is labelled with its object (sky, ground or a shape), the shapes' pixels also with their
    colour and texture (one PNG per category; the muted background's are unlabelled); each image has a
    whole-image scene label. The same arguments give the same bytes.
    """
    if size < 16:
        raise ParameterError(f"size={size!r} is not allowed; expected an int >= 16")
    if n_train < 0 or n_val < 0 or n_train + n_val < 1:
        raise ParameterError(f"n_train={n_train!r}, n_val={n_val!r}: expected counts >= 0 with a positive sum")
    directory = Path(directory)
    vocab = vocabulary()
    number, rows, counter = {}, [], 1
    for cat, names in vocab.items():
        for name in names:
            number[(cat, name)] = counter
            counter += 1
    freq = np.zeros(counter, np.int64)
    cover = np.zeros(counter, np.float64)
    (directory / "images" / "synthetic").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_train + n_val):
        rgb, names, scene = render_scene(rng, size)
        stem = f"synthetic/{i + 1:06d}"
        Image.fromarray(rgb).save(directory / "images" / f"{stem}.png")
        row = {"image": f"{stem}.png", "split": "train" if i < n_train else "val", "ih": size, "iw": size,
               "sh": size, "sw": size, "part": "", "material": ""}
        for cat in ("color", "object", "texture"):
            lookup = {"": 0, **{name: number[(cat, name)] for name in vocab[cat]}}
            numbers = np.vectorize(lookup.__getitem__, otypes=[np.int64])(names[cat])
            Image.fromarray(encode_labels(numbers)).save(directory / "images" / f"{stem}_{cat}.png")
            row[cat] = f"{stem}_{cat}.png"
            present, counts = np.unique(numbers[numbers > 0], return_counts=True)
            freq[present] += 1
            cover[present] += counts / numbers.size
        row["scene"] = str(number[("scene", scene)])
        freq[number[("scene", scene)]] += 1
        cover[number[("scene", scene)]] += 1.0
        rows.append(row)
    _write_csv(directory / "index.csv", INDEX_COLUMNS, rows)
    _write_tables(directory, vocab, number, freq, cover, n_train + n_val)
    return directory


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _write_tables(directory, vocab, number, freq, cover, n_images):
    labels, categories = [], []
    for cat, names in vocab.items():
        c_rows = []
        for code, name in enumerate(names, start=1):
            n = number[(cat, name)]
            labels.append({"number": n, "name": name, "category": f"{cat}({freq[n]})", "frequency": freq[n],
                           "coverage": f"{cover[n]:.4f}", "syns": ""})
            c_rows.append({"code": code, "number": n, "name": name, "frequency": freq[n],
                           "coverage": f"{cover[n]:.4f}"})
        _write_csv(directory / f"c_{cat}.csv", C_COLUMNS, c_rows)
        categories.append({"name": cat, "first": 1, "last": len(names), "count": len(names),
                           "frequency": n_images})
    _write_csv(directory / "label.csv", LABEL_COLUMNS, labels)
    _write_csv(directory / "category.csv", CATEGORY_COLUMNS, categories)


def synthetic(n_train: int, n_val: int, size: int = 32, seed: int = 0, root: str | Path | None = None) -> Path:
    """The folder of :func:`generate`'s scenes for these arguments, generated once into a cache under
    ``root`` (default: the book's data folder) and reused; written to a temporary folder, then renamed."""
    root = Path(root) if root is not None else data_mod.data_root() / "synthetic_broden"
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]
    key = hashlib.sha256(json.dumps([n_train, n_val, size, seed, code]).encode()).hexdigest()[:12]
    target = root / f"scenes-{size}px-{n_train}+{n_val}-seed{seed}-{key}"
    if not (target / "index.csv").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=target.name, suffix=".tmp"))
        try:
            generate(tmp, n_train, n_val, size, seed)
            os.replace(tmp, target)
        except OSError:  # another process finished the same folder first
            if not (target / "index.csv").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------- loader

@dataclass(frozen=True)
class BrodenData:
    """A Broden folder read into memory: index rows, label names (``names[number]``; 0 is '-'), the
    category index of every label number (-1 for 0), and the categories."""

    directory: Path
    index: tuple[dict, ...]
    names: tuple[str, ...]
    label_category: np.ndarray
    categories: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.index)

    def concepts(self, category: str) -> list[int]:
        """Label numbers of ``category``."""
        c = self.categories.index(category)
        return [int(n) for n in np.flatnonzero(self.label_category == c)]


def _read_csv(path: Path, required) -> list[dict]:
    if not path.exists():
        raise BrodenFormatError(f"{path.name} is missing from {path.parent}; a Broden folder has index.csv, "
                                "label.csv, category.csv and c_<category>.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise BrodenFormatError(f"{path} lacks the column(s) {', '.join(missing)}; expected "
                                    f"{', '.join(required)}")
        return list(reader)


def _int(value: str, what: str) -> int:
    if not re.fullmatch(r"-?\d+", value.strip()):
        raise BrodenFormatError(f"{what}={value!r} is not an integer")
    return int(value)


def _decode_index_row(row: dict, categories) -> dict:
    out = {"image": row["image"], "split": row["split"]}
    for key in ("ih", "iw", "sh", "sw"):
        out[key] = _int(row[key], f"index.csv {row['image']} {key}")
    for cat in categories:
        items = [s for s in (row.get(cat) or "").split(";") if s]
        out[cat] = [int(s) if re.fullmatch(r"\d+", s) else s for s in items]
    return out


def load(directory: str | Path, categories: tuple[str, ...] | list[str] | None = None) -> BrodenData:
    """Read a Broden folder (ours, or a real broden1_224 / broden1_227) given by path.

    ``categories`` restricts to those of category.csv named (default: all of them); images with no
    labels in any of them are dropped, as NetDissect does.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise BrodenUnavailable(
            f"broden_dir={str(directory)!r} is not a folder. Download Broden with NetDissect's "
            "script/dlbroden.sh (broden1_224 is about 1 GB) and pass its path, or use the synthetic scenes "
            "of pruning_utils.broden.synthetic().")
    cat_rows = _read_csv(directory / "category.csv", CATEGORY_COLUMNS)
    known = tuple(r["name"] for r in cat_rows)
    if categories is None:
        categories = known
    for c in categories:
        if c not in known:
            raise ParameterError(f"category={c!r} is not allowed; {directory} has {', '.join(map(repr, known))}")
    categories = tuple(categories)
    label_rows = _read_csv(directory / "label.csv", LABEL_COLUMNS)
    numbers = [_int(r["number"], "label.csv number") for r in label_rows]
    if not numbers:
        raise BrodenFormatError(f"{directory / 'label.csv'} has no labels")
    names = ["-"] * (max(numbers) + 1)
    label_category = np.full(max(numbers) + 1, -1, dtype=np.int64)
    for n, r in zip(numbers, label_rows):
        names[n] = r["name"]
    for ci, cat in enumerate(categories):
        for r in _read_csv(directory / f"c_{cat}.csv", C_COLUMNS):
            n = _int(r["number"], f"c_{cat}.csv number")
            if n >= len(names) or n <= 0:
                raise BrodenFormatError(f"c_{cat}.csv names label {n}, which label.csv does not have")
            label_category[n] = ci
    index_rows = _read_csv(directory / "index.csv", INDEX_COLUMNS)
    index = [_decode_index_row(r, categories) for r in index_rows]
    index = tuple(r for r in index if any(r[c] for c in categories))
    if not index:
        raise BrodenFormatError(f"{directory / 'index.csv'} lists no image with labels in {categories}")
    return BrodenData(directory, index, tuple(names), label_category, categories)


def read_image(data: BrodenData, i: int) -> np.ndarray:
    """The i-th image as uint8 (H, W, 3)."""
    path = data.directory / "images" / data.index[i]["image"]
    if not path.exists():
        raise BrodenFormatError(f"index.csv lists {data.index[i]['image']} but {path} is missing")
    return np.asarray(Image.open(path).convert("RGB"))


def read_segmentation(data: BrodenData, i: int) -> np.ndarray:
    """The i-th image's label layers (D, sh, sw) of label numbers (0: none), one per PNG or whole-image
    label of each category, in category order (D >= 1)."""
    row = data.index[i]
    layers = []
    for cat in data.categories:
        for item in row[cat]:
            if isinstance(item, int):
                layers.append(np.full((row["sh"], row["sw"]), item, dtype=np.int64))
                continue
            path = data.directory / "images" / item
            if not path.exists():
                raise BrodenFormatError(f"index.csv lists {item} but {path} is missing")
            seg = decode_labels(np.asarray(Image.open(path).convert("RGB")))
            if seg.shape != (row["sh"], row["sw"]):
                raise BrodenFormatError(f"{item} is {seg.shape[1]}x{seg.shape[0]}; index.csv says "
                                        f"sw={row['sw']}, sh={row['sh']}")
            layers.append(seg)
    return np.stack(layers) if layers else np.zeros((1, row["sh"], row["sw"]), np.int64)


@dataclass(frozen=True)
class ConceptSet:
    """Images (N, 3, H, W) in [0, 1], label layers ``masks`` (N, D, S, S) of label numbers (0: none), and
    ``has_category`` (N, G): whether image n carries labels of category g (the images counted for g)."""

    images: torch.Tensor
    masks: torch.Tensor
    has_category: torch.Tensor
    names: tuple[str, ...]
    label_category: np.ndarray
    categories: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)


def concept_set(data: BrodenData, split: str | None = None, limit: int | None = None,
                image_size: int | None = None) -> ConceptSet:
    """The images (resized to ``image_size`` if given) and label layers of ``split`` ('train', 'val',
    None: all), at most ``limit`` of them, as tensors for :mod:`pruning_utils.dissect`."""
    rows = [i for i, r in enumerate(data.index) if split is None or r["split"] == split]
    if not rows:
        raise ParameterError(f"split={split!r} has no images in {data.directory}")
    rows = rows[:limit] if limit is not None else rows
    images, masks, has = [], [], []
    for i in rows:
        img = torch.from_numpy(read_image(data, i).copy()).permute(2, 0, 1).float().div_(255.0)
        if image_size is not None and img.shape[-1] != image_size:
            img = F.interpolate(img[None], size=(image_size, image_size), mode="bilinear",
                                align_corners=False)[0]
        images.append(img)
        masks.append(read_segmentation(data, i))
        has.append([bool(data.index[i][c]) for c in data.categories])
    depth = max(m.shape[0] for m in masks)
    size = masks[0].shape[1:]
    if any(m.shape[1:] != size for m in masks):
        raise BrodenFormatError("segmentations of different sizes; pass a folder with one sh x sw")
    stacked = np.zeros((len(masks), depth, *size), np.int64)
    for n, m in enumerate(masks):
        stacked[n, :m.shape[0]] = m
    return ConceptSet(torch.stack(images), torch.from_numpy(stacked), torch.tensor(has), data.names,
                      data.label_category, data.categories)


def scene_split(data: BrodenData, split: str) -> data_mod.Split:
    """Images of ``split`` with their scene (first scene label) as the class: the classification task
    that chapter 2's ResNet learns. Images without a scene label are left out."""
    if "scene" not in data.categories:
        raise ParameterError(f"{data.directory} has no 'scene' category to classify")
    scenes = data.concepts("scene")
    classes = tuple(data.names[n] for n in scenes)
    rows = [i for i, r in enumerate(data.index) if r["split"] == split and r["scene"]]
    if not rows:
        raise ParameterError(f"split={split!r} has no images with a scene label in {data.directory}")
    x = torch.stack([torch.from_numpy(read_image(data, i).copy()).permute(2, 0, 1) for i in rows])
    y = torch.tensor([scenes.index(data.index[i]["scene"][0]) for i in rows])
    return data_mod.Split(x.float().div_(255.0).contiguous(), y, classes, f"{data.directory.name}/{split}")
