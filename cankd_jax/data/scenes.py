"""Synthetic scene-parsing images, generated in vectorised numpy (thousands per second).

Each image is a textured background (smooth colour noise, stripes or a
gradient) with 2-6 objects of six classes and 0-2 distractors, painted in a
random order so later shapes occlude earlier ones. The label of a pixel is
the class of the topmost shape there; distractors (thin bars and elongated
ellipses) and the background are class 0. No pixel carries the ignore label
255: every pixel is labelled, ignore only ever comes from padding.

What makes it not trivial:
- colour is only loosely tied to the class: each class has a base hue, the
  object's hue is drawn around it with a 35 degree spread (classes are 60
  degrees apart), and a quarter of the objects get any hue; backgrounds and
  distractors use the same colours, so a per-pixel colour rule fails;
- shape and texture carry the class: objects with radii of 8-25 % of the image size,
  rotated, partly occluded, with a class-preferred (not fixed) texture;
- disc vs ring vs star and square vs cross differ only in the outline, and
  distractors (label 0) look like objects except for their shape.

Randomness: the images of chunk c of stream s (train 0, test 1) come from
`np.random.default_rng([seed, s, c])`, chunks of `CHUNK` images, so the data
depend only on (seed, stream, index) and a larger split extends a smaller one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cankd_jax.data.image_ops import hsv_to_rgb, resize_bilinear

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring", "star", "cross")
NUM_CLASSES = len(CLASS_NAMES)
MIN_OBJECTS, MAX_OBJECTS = 2, 6  # per image, plus up to MAX_DISTRACTORS
MAX_DISTRACTORS = 2
SLOTS = MAX_OBJECTS + MAX_DISTRACTORS
CHUNK = 256

_BAR, _ELLIPSE = NUM_CLASSES, NUM_CLASSES + 1  # shape kinds past the classes: distractors (label 0)
_HUE_SPREAD = 35.0  # degrees (classes are 360 / 6 = 60 apart)
_RANDOM_HUE_PROB = 0.25
_PIXEL_NOISE = 6.0  # std of the per-pixel noise on the 0-255 scale


def _triangle(u, v, p):
    # Equilateral, circumradius 1: inside all three half-planes whose normals are 120 degrees apart.
    inside = np.ones(u.shape, bool)
    for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
    return inside


def _star(u, v, p):
    # Five points: the radius limit oscillates between 0.4 and 1 with the polar angle.
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    return rho <= 0.4 + 0.6 * np.abs(np.cos(2.5 * phi)) ** 3


# kind -> inside(u, v, params) on rotated coordinates scaled by the radius; params are (m, 1, 1) arrays.
_SHAPES: dict[int, Callable] = {
    1: lambda u, v, p: u**2 + (v / p["aspect"]) ** 2 <= 1.0,  # disc (mildly elliptic)
    2: lambda u, v, p: (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8 * p["aspect"]),  # square / rectangle
    3: _triangle,
    4: lambda u, v, p: (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= p["inner"] ** 2),  # ring
    5: _star,
    6: lambda u, v, p: ((np.abs(u) <= 0.28) | (np.abs(v) <= 0.28)) & (np.abs(u) <= 1) & (np.abs(v) <= 1),  # cross
    _BAR: lambda u, v, p: (np.abs(u) <= 1.3) & (np.abs(v) <= 0.12),
    _ELLIPSE: lambda u, v, p: u**2 + (v / 0.35) ** 2 <= 1.0,
}


def generate_scenes(num: int, size: int, seed: int, stream: int = 0) -> dict[str, np.ndarray]:
    """`num` scenes of `size` x `size` pixels.

    Returns a dict of
      image:   (num, size, size, 3) uint8 RGB
      mask:    (num, size, size) uint8 class ids in [0, NUM_CLASSES)
      boxes:   (num, SLOTS, 4) float32 visible-extent boxes, normalised (ymin, xmin, ymax, xmax)
      labels:  (num, SLOTS) int64 class id of each slot (0 for distractors and empty slots)
      present: (num, SLOTS) bool, True for an object (not a distractor) with at least one visible pixel
    Slots are in painting order (later slots occlude earlier ones).
    """
    if num < 0 or size < 8:
        raise ValueError(f"need num >= 0 and size >= 8, got num={num}, size={size}")
    # Whole chunks only (then trimmed): the draws of a chunk depend on its length.
    parts = [_chunk(np.random.default_rng([seed, stream, c]), CHUNK, size) for c in range(max(-(-num // CHUNK), 1))]
    return {k: np.concatenate([p[k] for p in parts])[:num] for k in parts[0]}


def _random_rgb(rng: np.random.Generator, shape: tuple, hue: np.ndarray | None = None) -> np.ndarray:
    """float32 (*shape, 3) RGB colours; hue in degrees (any hue if None), saturation/value drawn broadly."""
    hue = rng.uniform(0, 360, shape) if hue is None else hue
    hsv = np.stack([(hue % 360) / 2, rng.uniform(90, 255, shape), rng.uniform(90, 255, shape)], -1)
    return hsv_to_rgb(hsv)


def _background(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, size, size, 3) float32: per image one of smooth colour noise, stripes, gradient."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    kind = rng.integers(0, 3, n)
    c1, c2 = _random_rgb(rng, (n,)).astype(np.float32), _random_rgb(rng, (n,)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, n)[:, None, None].astype(np.float32)
    proj = np.cos(angle) * xx + np.sin(angle) * yy  # (n, size, size), in [-0.71, 0.71]
    freq = (rng.uniform(3, 10, n)[:, None, None] * 2 * np.pi).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None].astype(np.float32)
    weight = np.where((kind == 1)[:, None, None], 0.5 + 0.5 * np.sin(freq * proj + phase),
                      np.clip(proj / 1.42 + 0.5, 0, 1))[..., None]
    blend = c1[:, None, None] * (1 - weight) + c2[:, None, None] * weight
    # Smooth noise: a random 4x4 colour grid per image, upsampled (all images in one call via channels).
    low = _random_rgb(rng, (n, 4, 4)).transpose(1, 2, 0, 3).reshape(4, 4, n * 3)
    noise = resize_bilinear(low, (size, size)).reshape(size, size, n, 3).transpose(2, 0, 1, 3)
    return np.where((kind == 0)[:, None, None, None], noise, blend).astype(np.float32)


def _slot_kinds(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, SLOTS) shape kind per painting slot: 1-6 classes, _BAR/_ELLIPSE distractors, 0 empty."""
    n_obj = rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1, n)[:, None]
    n_dis = rng.integers(0, MAX_DISTRACTORS + 1, n)[:, None]
    j = np.arange(SLOTS)[None, :]
    kinds = np.where(j < n_obj, rng.integers(1, NUM_CLASSES, (n, SLOTS)),
                     np.where(j < n_obj + n_dis, rng.integers(_BAR, _ELLIPSE + 1, (n, SLOTS)), 0))
    order = np.argsort(rng.random((n, SLOTS)), axis=1)  # random painting order
    return np.take_along_axis(kinds, order, axis=1)


def _chunk(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
    image = _background(rng, n, size)
    mask = np.zeros((n, size, size), np.uint8)
    owner = np.full((n, size, size), -1, np.int8)  # slot of the visible object, -1 elsewhere
    kinds = _slot_kinds(rng, n)
    shape = (n, SLOTS)
    # Per-slot parameters, drawn for every slot so the stream does not depend on which are used.
    hue_class = np.where(kinds < NUM_CLASSES, kinds, rng.integers(1, NUM_CLASSES, shape))  # distractors mimic a class
    hue = (hue_class - 1) * 60.0 + rng.normal(0, _HUE_SPREAD, shape)
    hue = np.where(rng.random(shape) < _RANDOM_HUE_PROB, rng.uniform(0, 360, shape), hue)
    slot = {
        "cy": rng.uniform(0.08, 0.92, shape) * size, "cx": rng.uniform(0.08, 0.92, shape) * size,
        "radius": np.exp(rng.uniform(np.log(0.08), np.log(0.25), shape)) * size,
        "angle": rng.uniform(0, 2 * np.pi, shape),
        "aspect": rng.uniform(0.6, 1.0, shape), "inner": rng.uniform(0.45, 0.65, shape),
        "texture": np.where(rng.random(shape) < 0.5, hue_class % 3, rng.integers(0, 3, shape)),
        "tex_freq": rng.uniform(1.5, 4.0, shape) * np.pi, "tex_angle": rng.uniform(0, np.pi, shape),
    }
    colour = _random_rgb(rng, shape, hue)
    speckle = 0.2 * rng.standard_normal((n, size, size), dtype=np.float32)

    for j in range(SLOTS):
        for kind in _SHAPES:
            idx = np.nonzero(kinds[:, j] == kind)[0]
            if idx.size == 0:
                continue
            params = {k: v[idx, j][:, None, None].astype(np.float32) for k, v in slot.items()}
            inside, shade = _shape_and_shading(kind, params, size, speckle[idx])
            painted = colour[idx, j][:, None, None, :] * shade[..., None]
            image[idx] = np.where(inside[..., None], painted, image[idx])
            is_object = kind < NUM_CLASSES
            mask[idx] = np.where(inside, kind if is_object else 0, mask[idx])
            owner[idx] = np.where(inside, j if is_object else -1, owner[idx])

    image += _PIXEL_NOISE * rng.standard_normal(image.shape, dtype=np.float32)
    boxes, present = _visible_boxes(owner)
    labels = np.where(present, kinds, 0).astype(np.int64)
    return {"image": np.clip(np.rint(image), 0, 255).astype(np.uint8), "mask": mask,
            "boxes": boxes, "labels": labels, "present": present}


def _shape_and_shading(kind: int, p: dict[str, np.ndarray], size: int,
                       speckle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m, size, size) inside-mask of shape `kind` and its brightness factor, for m images
    whose parameters `p` are (m, 1, 1) arrays."""
    pix = np.arange(size, dtype=np.float32) + 0.5
    dy, dx = pix[None, :, None] - p["cy"], pix[None, None, :] - p["cx"]
    cos, sin = np.cos(p["angle"]), np.sin(p["angle"])
    u, v = (dx * cos + dy * sin) / p["radius"], (dy * cos - dx * sin) / p["radius"]
    inside = _SHAPES[kind](u, v, p)
    # Texture modulates brightness: 0 shaded, 1 stripes, 2 speckle.
    stripes = 1.0 + 0.3 * np.sin(p["tex_freq"] * (u * np.cos(p["tex_angle"]) + v * np.sin(p["tex_angle"])))
    shade = np.select([p["texture"] == 0, p["texture"] == 1], [1.0 + 0.2 * u, stripes], 1.0 + speckle)
    return inside, shade


def _visible_boxes(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (ymin, xmin, ymax, xmax) of each slot's visible pixels, and whether any are visible."""
    n, size, _ = owner.shape
    boxes = np.zeros((n, SLOTS, 4), np.float32)
    present = np.zeros((n, SLOTS), bool)
    for j in range(SLOTS):
        hit = owner == j
        rows, cols = hit.any(2), hit.any(1)  # (n, size) each
        present[:, j] = rows.any(1)
        first_row, first_col = np.argmax(rows, 1), np.argmax(cols, 1)
        end_row, end_col = size - np.argmax(rows[:, ::-1], 1), size - np.argmax(cols[:, ::-1], 1)  # exclusive
        boxes[:, j] = np.stack([first_row, first_col, end_row, end_col], 1) / size
    boxes[~present] = 0.0
    return boxes, present
