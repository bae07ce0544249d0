"""Input-pipeline throughput: Cityscapes-shaped records through the project's Grain pipeline and mmseg augmentation.

Records are 1024x2048 RGB images with 19-class label maps (sky / building /
road bands with objects over them, so the crop's category-ratio check behaves
as on Cityscapes), held in memory. Each training example goes through what
`configs/cityscapes.py` runs: random resize (scale 2048x1024, ratio 0.5-2.0),
512x1024 crop with the category-ratio check (0.75), flip, photometric
distortion, normalisation, padding (`SegTrainAugment`), in the global-order
Grain loader of `cankd_jax.data.pipeline` with 0 (in-process), 1 and 2 worker
processes, stacked into batches of `--batch`.

`--decode png` stores the records PNG-encoded instead and decodes them with
Pillow inside the pipeline, as TFDS does with the real data set's PNG files;
`--decode none` (the default) measures the augmentation alone. The first
batches (worker start-up) are not timed; images/s = timed images / seconds.

    python benchmarks/pipeline_speed.py
    python benchmarks/pipeline_speed.py --workers 0 2 --decode png --images 64
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's cankd_jax

from cankd_jax.data.image_ops import resize_bilinear, resize_nearest  # noqa: E402
from cankd_jax.data.pipeline import make_train_iterator  # noqa: E402
from cankd_jax.data.scenes import generate_scenes  # noqa: E402
from cankd_jax.data.segmentation import PhotoMetricDistortion, SegTrainAugment  # noqa: E402
from arg_types import count  # this folder's command-line value types  # noqa: E402

H, W, CLASSES = 1024, 2048, 19


def cityscapes_like(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`n` records {'image': (1024, 2048, 3) uint8, 'label': (1024, 2048) uint8}."""
    scenes = generate_scenes(n, 256, seed)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        image = resize_bilinear(scenes["image"][i], (H, W))
        objects = resize_nearest(scenes["mask"][i], (H, W))
        rows = np.arange(H)[:, None]
        bands = np.where(rows < 0.25 * H, 10, np.where(rows < 0.6 * H, 2, 0)).astype(np.uint8)  # sky, building, road
        label = np.where(objects > 0, objects + 10, np.broadcast_to(bands, (H, W))).astype(np.uint8)
        noise = rng.integers(-6, 7, image.shape)  # sensor-like noise: PNG sizes near real photographs'
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        records.append({"image": image, "label": label})
    return records


def encode_png(record: dict[str, np.ndarray]) -> dict[str, bytes]:
    from PIL import Image

    out = {}
    for key in ("image", "label"):
        buf = io.BytesIO()
        Image.fromarray(record[key]).save(buf, format="PNG")
        out[key] = buf.getvalue()
    return out


@dataclasses.dataclass(frozen=True)
class DecodeThenAugment:
    """PNG bytes -> arrays (Pillow, as TFDS decodes), then the training augmentation. Picklable for workers."""

    augment: SegTrainAugment

    def __call__(self, record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        from PIL import Image

        decoded = {k: np.asarray(Image.open(io.BytesIO(record[k]))) for k in ("image", "label")}
        return self.augment(decoded, rng)


def measure(records, augment, workers: int, batch: int, images: int, warmup: int) -> float:
    it = make_train_iterator(records, augment, global_batch_size=batch, seed=0, worker_count=workers)
    for _ in range(max(1, warmup // batch)):
        out = next(it)
    assert out["image"].shape == (batch, 512, 1024, 3) and out["label"].shape == (batch, 512, 1024)
    n = max(1, images // batch)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - t0)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", nargs="+", type=count(0), default=[0, 1, 2])
    ap.add_argument("--decode", nargs="+", default=["none"], choices=["none", "png"])
    ap.add_argument("--records", type=count(1), default=8, help="distinct records held in memory (visited in a loop)")
    ap.add_argument("--batch", type=count(1), default=8, help="images per batch (mmseg's Cityscapes: 8 = 4 GPUs x 2)")
    ap.add_argument("--images", type=count(1), default=48, help="timed images per measurement")
    ap.add_argument("--warmup", type=count(0), default=16, help="untimed images first (worker start-up)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    records = cityscapes_like(args.records)
    augment = SegTrainAugment(scale=(2048, 1024), crop_size=(512, 1024), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                              photometric=PhotoMetricDistortion())
    print(f"{args.records} records of {H}x{W} in memory ({time.perf_counter() - t0:.0f} s to make); "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}\n", file=sys.stderr, flush=True)
    print("| records | workers | images/s | ms / image |\n|---|---|---|---|")
    for decode in args.decode:
        source, fn = records, augment
        if decode == "png":
            source = [encode_png(r) for r in records]
            size = np.mean([len(r["image"]) for r in source]) / 1e6
            fn = DecodeThenAugment(augment)
        label = "decoded arrays" if decode == "none" else f"PNG ({size:.1f} MB / image), decoded by Pillow"
        for workers in args.workers:
            rate = measure(source, fn, workers, args.batch, args.images, args.warmup)
            print(f"| {label} | {workers} | {rate:.2f} | {1e3 / rate:.0f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
