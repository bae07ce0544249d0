"""The README's pod-rehearsal table, from the JSON that `bash benchmarks/rehearse_paper.sh` writes to results/rehearsal/.

    python benchmarks/rehearsal_summary.py            # prints the markdown table

Per paper config: the peak per device (XLA:CPU's buffer assignment) at 2 images per device on 8 devices,
replicated and FSDP, the largest per-device batch of 2 / 4 / 8 that fits a 16 GB device, and the bytes each
device sends per step on 8, 64 and 256 devices, replicated and FSDP.
"""

from __future__ import annotations

import json
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "rehearsal")
CONFIGS = (("cityscapes", "Cityscapes DeepLabV3 R101-d8 -> R18-d8"),
           ("cityscapes_head_pspnet", "Cityscapes PSPNet R101-d8 -> R18-d8"),
           ("cityscapes_teacher_pspnet", "Cityscapes PSPNet R101-d8 -> DeepLabV3 R18-d8"),
           ("cityscapes_student_mobilenet_v2", "Cityscapes DeepLabV3 R101-d8 -> MobileNetV2-d8"),
           ("coco_retinanet", "COCO RetinaNet R101 -> R50"),
           ("coco_fcos", "COCO FCOS R101 -> R50"),
           ("coco_faster_rcnn", "COCO Faster R-CNN R101 -> R50"))
GB, MB = 1e9, 1e6


def _rows(name: str) -> list[dict]:
    with open(os.path.join(ROOT, f"{name}.json")) as f:
        return json.load(f)


def _sent(row: dict) -> float:
    return sum(v["sent"] for v in row["traffic"].values() if isinstance(v, dict))


def main() -> None:
    print("| config | peak GB, 2 / device (replicated / FSDP) | fits 16 GB up to | MB sent per device, 8 / 64 / 256 "
          "devices, replicated | the same, FSDP |")
    print("|---|---|---|---|---|")
    for name, title in CONFIGS:
        rows = _rows(name)
        first = {}
        for r in rows:  # detection compiles both buckets; they agree, the first one stands for both
            first.setdefault((r["devices"], r["layout"]), r)
        # the tables' "fits 16 GB": 16e9 bytes
        fit = [r for r in _rows(f"{name}_fit") + [first[(8, "replicated")]] if r["peak"] <= 16 * GB]
        best = max(r["per_device_batch"] for r in fit)
        peak = f"{first[(8, 'replicated')]['peak'] / GB:.2f} / {first[(8, 'fsdp')]['peak'] / GB:.2f}"
        sent = {lay: " / ".join(f"{_sent(first[(n, lay)]) / MB:.0f}" for n in (8, 64, 256))
                for lay in ("replicated", "fsdp")}
        print(f"| {title} | {peak} | {best} images | {sent['replicated']} | {sent['fsdp']} |")


if __name__ == "__main__":
    main()
