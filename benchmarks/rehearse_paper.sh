#!/usr/bin/env bash
# The pod rehearsal of every paper config (results/rehearsal/): the paper's 2 images per device on 8 / 64 / 256
# devices, replicated and FSDP; then, on 8 devices, 4 and 8 images per device (which fit a 16 GB device).
#     bash benchmarks/rehearse_paper.sh            # about 30 min on a 2-core CPU
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/rehearsal
mkdir -p "$out"
rehearse() { python -m cankd_jax.rehearse "$@"; }
for arg in "" head=pspnet student=mobilenet_v2 teacher=pspnet; do
  name=cityscapes${arg:+_${arg/=/_}}
  rehearse --config "configs/cityscapes.py${arg:+:$arg}" --devices 8 64 256 --layouts replicated fsdp \
    --per-device-batch 2 --markdown "$out/$name.md" --json "$out/$name.json"
  rehearse --config "configs/cityscapes.py${arg:+:$arg}" --devices 8 --per-device-batch 4 8 \
    --markdown "$out/${name}_fit.md" --json "$out/${name}_fit.json"
done
for det in retinanet fcos faster_rcnn; do
  rehearse --config "configs/coco.py:detector=$det" --devices 8 64 256 --layouts replicated fsdp \
    --per-device-batch 2 --markdown "$out/coco_$det.md" --json "$out/coco_$det.json"
  rehearse --config "configs/coco.py:detector=$det" --devices 8 --per-device-batch 4 8 --shapes first \
    --markdown "$out/coco_${det}_fit.md" --json "$out/coco_${det}_fit.json"
done
