"""RetinaNet anchors and FCOS points against hand-computed numbers; valid flags; level flattening."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cankd_jax.detection import FCOS_REGRESS_RANGES, AnchorGenerator, fcos_priors, flatten_level_maps, grid_points

# Stride 8, scales 4 * 2^(i/3) = 4, 5.0397, 6.3496; ratio = h/w, w = 8 * s / sqrt(r), h = 8 * s * sqrt(r),
# ratio-major then scale, centred at the origin. Worked out by hand (rounded to 4 decimals).
BASE_STRIDE8 = np.array([
    [-22.6274, -11.3137, 22.6274, 11.3137],  # ratio 0.5, scale 4: w = 32 * sqrt(2), h = 32 / sqrt(2)
    [-28.5088, -14.2544, 28.5088, 14.2544],  # ratio 0.5, scale 5.0397
    [-35.9188, -17.9594, 35.9188, 17.9594],  # ratio 0.5, scale 6.3496
    [-16.0000, -16.0000, 16.0000, 16.0000],  # ratio 1, scale 4: 32 x 32
    [-20.1587, -20.1587, 20.1587, 20.1587],
    [-25.3984, -25.3984, 25.3984, 25.3984],
    [-11.3137, -22.6274, 11.3137, 22.6274],  # ratio 2: tall
    [-14.2544, -28.5088, 14.2544, 28.5088],
    [-17.9594, -35.9188, 17.9594, 35.9188],
])


def test_base_anchors_by_hand():
    gen = AnchorGenerator()
    np.testing.assert_allclose(gen.base_anchors(0), BASE_STRIDE8, atol=1e-4)
    # Every level is the stride-8 set scaled by stride / 8.
    for level, stride in enumerate((8, 16, 32, 64, 128)):
        np.testing.assert_allclose(gen.base_anchors(level), BASE_STRIDE8 * stride / 8, rtol=1e-5, atol=1e-4)
    assert gen.base_anchors(0).dtype == np.float32 and gen.num_base_anchors == 9


def test_grid_anchors_order_by_hand():
    gen = AnchorGenerator(strides=(8, 16))
    a0, a1 = gen.grid_anchors([(2, 3), (1, 2)])
    assert a0.shape == (2 * 3 * 9, 4) and a1.shape == (2 * 9, 4)
    # Row (y * W + x) * 9 + base: location (y=1, x=2) shifted by (16, 8); base 4 = ratio 1, scale 5.0397.
    np.testing.assert_allclose(a0[(1 * 3 + 2) * 9 + 4], [16 - 20.1587, 8 - 20.1587, 16 + 20.1587, 8 + 20.1587],
                               atol=1e-4)
    # location (y=0, x=1): shift (8, 0); base 0 = ratio 0.5, scale 4.
    np.testing.assert_allclose(a0[1 * 9 + 0], [8 - 22.6274, -11.3137, 8 + 22.6274, 11.3137], atol=1e-4)
    # level 1 (stride 16) location (0, 1): shift (16, 0); base 3 = ratio 1, scale 4: 64 x 64.
    np.testing.assert_allclose(a1[1 * 9 + 3], [16 - 32, -32, 16 + 32, 32], atol=1e-4)
    # Every location's 9 anchors share the centre (x * stride, y * stride).
    centres = ((a0[:, :2] + a0[:, 2:]) / 2).reshape(6, 9, 2)
    np.testing.assert_allclose(centres[:, 0], [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8]], atol=1e-4)
    assert np.ptp(centres, axis=1).max() < 1e-4
    with pytest.raises(ValueError, match="2 strides"):
        gen.grid_anchors([(2, 3)])


def test_valid_flags():
    gen = AnchorGenerator(strides=(8, 16))
    # pad_shape (20, 30): ceil(20/8) = 3 rows, ceil(30/8) = 4 columns valid at stride 8; 2 x 2 at stride 16.
    flags = jax.jit(jax.vmap(lambda s: gen.valid_flags([(4, 5), (2, 3)], s)))
    batch = flags(jnp.array([[20.0, 30.0], [32.0, 40.0], [8.0, 8.0]]))
    f0, f1 = batch[0][0], batch[1][0]
    loc0 = np.asarray(f0).reshape(4, 5, 9)
    assert (loc0 == loc0[..., :1]).all()  # one flag per location
    want0 = np.zeros((4, 5), bool)
    want0[:3, :4] = True
    np.testing.assert_array_equal(loc0[..., 0], want0)
    want1 = np.array([[True, True, False], [True, True, False]])
    np.testing.assert_array_equal(np.asarray(f1).reshape(2, 3, 9)[..., 0], want1)
    # The other images of the batch: (32, 40) covers every location; (8, 8) only the first of each level.
    assert bool(jnp.all(batch[0][1])) and bool(jnp.all(batch[1][1]))
    assert int(jnp.sum(batch[0][2])) == 9 and int(jnp.sum(batch[1][2])) == 9


def test_fcos_points_by_hand():
    p0, p1 = grid_points([(2, 3), (1, 2)], strides=(8, 16))
    # mmdet 3.x MlvlPointGenerator offset 0.5: ((x + 0.5) * stride, (y + 0.5) * stride), row-major.
    np.testing.assert_array_equal(p0, [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]])
    np.testing.assert_array_equal(p1, [[8, 8], [24, 8]])
    pri = fcos_priors([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])
    assert pri.level_sizes == (6, 2, 1, 1, 1)
    np.testing.assert_array_equal(pri.strides, [8] * 6 + [16] * 2 + [32, 64, 128])
    np.testing.assert_array_equal(pri.regress_ranges[5], [-1, 64])
    np.testing.assert_array_equal(pri.regress_ranges[6], [64, 128])
    np.testing.assert_array_equal(pri.regress_ranges[-1], FCOS_REGRESS_RANGES[-1])
    np.testing.assert_array_equal(pri.points[-1], [64, 64])


def test_flatten_level_maps_is_mmdets_reshape(rng):
    maps_nchw = [rng.standard_normal((2, 9 * 3, h, w)).astype(np.float32) for h, w in ((3, 4), (2, 2))]
    ours = flatten_level_maps([jnp.asarray(m.transpose(0, 2, 3, 1)) for m in maps_nchw], 3)
    theirs = torch.cat([torch.from_numpy(m).permute(0, 2, 3, 1).reshape(2, -1, 3) for m in maps_nchw], 1)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
