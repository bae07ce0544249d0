"""Run as a script (tests/test_deform_attn.py starts it with XLA:CPU's default flags, as users compile): DINO's
encoder attention over a padded batch, its reference points computed in the same program from the image sizes,
on 1 device, on 4, image by image, and op by op without jit. Prints the largest difference of each from the
op-by-op result as one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cankd_jax.models.deform_attn import MultiScaleDeformableAttention
from cankd_jax.models.dino import encoder_reference_points, padding_masks, valid_ratios

SHAPES = [(16, 16), (8, 8), (4, 4), (2, 2)]
# (h, w) of each image in a 128 x 128 bucket: the valid ratios put many points exactly on pixel boundaries
IMAGES = [[97.0, 97.0], [92.0, 92.0], [82.0, 82.0], [113.0, 117.0]]


def main(points_inside: bool) -> dict[str, float]:
    img = jnp.asarray(IMAGES)

    def points_and_mask(img):
        masks = padding_masks(img, (128, 128), SHAPES)
        return (encoder_reference_points(SHAPES, valid_ratios(masks)),
                jnp.concatenate([m.reshape(img.shape[0], -1) for m in masks], 1))

    rng = np.random.default_rng(0)
    query, pos = (jnp.asarray(rng.normal(size=(4, 340, 16)), jnp.float32) for _ in range(2))
    module = MultiScaleDeformableAttention(embed_dims=16, num_heads=4, num_levels=4, num_points=4)
    refs, pad = points_and_mask(img)
    variables = module.init(jax.random.key(0), query, reference_points=refs, spatial_shapes=SHAPES, query_pos=pos,
                            key_padding_mask=pad)

    def attend(variables, query, pos, img, refs, pad):
        if points_inside:
            refs, pad = points_and_mask(img)
        return module.apply(variables, query, reference_points=refs, spatial_shapes=SHAPES, query_pos=pos,
                            key_padding_mask=pad)

    args = (query, pos, img, refs, pad)
    with jax.disable_jit():
        want = np.asarray(attend(variables, *args))
    got = {}
    for n in (1, 4):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        with jax.set_mesh(mesh):
            placed = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args]
            got[f"{n}_devices"] = np.asarray(jax.jit(attend)(variables, *placed))
    got["image_by_image"] = np.concatenate([np.asarray(jax.jit(attend)(variables, *(a[i:i + 1] for a in args)))
                                            for i in range(len(IMAGES))])
    return {k: float(np.max(np.abs(v - want))) for k, v in got.items()}


if __name__ == "__main__":
    # "inside": reference points computed in the program (the form that parted); "given": passed in
    print(json.dumps(main(sys.argv[1] == "inside")))
