"""DINO (mmdetection 3.x `DINO`, `dino-4scale_r50_8xb2-12e_coco`): a ResNet, a `ChannelMapper` neck, a deformable
encoder, two-stage query selection, a decoder with iterative box refinement and contrastive denoising queries.

One module, `DINO`, runs mmdet's `forward_transformer` and the head's `forward` in one pass:
`__call__(images (B, H, W, 3), *, train, img_shapes=None, denoising=None) -> dict` with

- the backbone's features and the neck's levels as `fpn.p3`..`fpn.p6` (what CanKD distils, as for the other
  detectors; `fpn.p{k}` has stride `2**k`);
- `cls_scores (num_layers, B, D + Q, K)` logits and `bbox_preds (num_layers, B, D + Q, 4)` normalised
  (cx, cy, w, h), one row per decoder layer, the `D` denoising queries first (D = 0 without `denoising`);
- `enc_cls_scores (B, Q, K)`, `enc_bbox_preds (B, Q, 4)`: the encoder's selected proposals (the two-stage part).

`img_shapes (B, 2)` are the images' (h, w) inside the padded batch: the padding is masked out of the encoder,
the decoder's sampling and the positional encodings as mmdet does for a batch of unequal images; None
means every image fills the batch (mmdet's mask-free path, which gives the same numbers as all-valid masks).

`denoising` is a `Denoising` of the step's noised ground truth (`cankd_jax.detection.dino.cdn_queries` makes
it from `jax.random`), so the model itself draws nothing. Parameters carry mmdet's names (`encoder.layers.0.
self_attn.sampling_offsets`, `decoder.ref_point_head.layers.1`, `bbox_head.reg_branches.6.4`, `level_embed`,
`query_embedding`, `dn_query_generator.label_embedding`, ...), so `import_state_dict` reads an mmdet DINO
checkpoint strictly.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.detection.topk import top_k
from cankd_jax.layers import Dtype, torch_bias_init, torch_kernel_init
from cankd_jax.models.conv import xavier_uniform
from cankd_jax.models.dense_heads import prior_bias
from cankd_jax.models.detr_layers import (
    MLP,
    DeformableDecoderLayer,
    DeformableEncoderLayer,
    coordinate_to_encoding,
    inverse_sigmoid,
    layer_norm,
    sine_position_embedding,
)
from cankd_jax.models.ops import check_nhwc, resize_nearest
from cankd_jax.models.resnet import STAGES
from cankd_jax.models.trunk import _Pyramid

Array = jax.Array


class Denoising(NamedTuple):
    """A step's contrastive denoising queries (mmdet's `CdnQueryGenerator` output, static shapes).

    labels `(B, D)` int32: each query's noised class, -1 for an unused slot (a zero query, as mmdet's collate
    leaves it); boxes `(B, D, 4)`: inverse-sigmoid of each query's noised (cx, cy, w, h) (0 for unused);
    attn_mask `(B, D + Q, D + Q)` bool, True where a query may not attend (other groups, and the matching
    queries never see the denoising ones)."""

    labels: Array
    boxes: Array
    attn_mask: Array


class DINOHead(nn.Module):
    """mmdet's `DINOHead` layers: per prediction layer (the decoder's, then the encoder's proposals last) a
    classifier `cls_branches.{i}` and a box MLP `reg_branches.{i}.{0,2,4}` (two ReLU'd fcs, then 4).
    `__call__(x (..., C), *, layer, branch)` runs one of them: 'cls' -> `(..., K)` logits, 'reg' -> `(..., 4)`
    offsets in inverse-sigmoid space. Init as mmdet's: classifier bias at the 0.01 prior, last reg layer 0."""

    num_classes: int
    embed_dims: int = 256
    num_reg_fcs: int = 2
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, layer: int, branch: str) -> Array:
        d = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.embed_dims
        if branch == "cls":
            return nn.Dense(self.num_classes, kernel_init=torch_kernel_init,
                            bias_init=nn.initializers.constant(prior_bias(0.01)), name=f"cls_branches.{layer}", **d)(x)
        if branch != "reg":
            raise ValueError(f"DINOHead: branch must be 'cls' or 'reg', got {branch!r}")
        for j in range(self.num_reg_fcs):
            x = nn.relu(nn.Dense(c, kernel_init=torch_kernel_init, bias_init=torch_bias_init(c),
                                 name=f"reg_branches.{layer}.{2 * j}", **d)(x))
        return nn.Dense(4, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                        name=f"reg_branches.{layer}.{2 * self.num_reg_fcs}", **d)(x)


def padding_masks(img_shapes: Array, batch_hw: tuple[int, int], level_hws: list[tuple[int, int]]) -> list[Array]:
    """Per level `(B, h_l, w_l)` bool, True on padding: the batch's input mask (True outside each image's
    `(h, w)`) resized to the level as `F.interpolate(mode='nearest')`, as mmdet's `pre_transformer`."""
    hin, win = batch_hw
    inside = ((jnp.arange(hin)[None, :, None] < img_shapes[:, 0, None, None])
              & (jnp.arange(win)[None, None, :] < img_shapes[:, 1, None, None]))
    pad = (~inside).astype(jnp.float32)[..., None]
    return [resize_nearest(pad, hw)[..., 0] > 0.5 for hw in level_hws]


def valid_size(mask: Array) -> Array:
    """`(B, 2)` float32: a level's unpadded (w, h), counted along its first row and column as mmdet does."""
    return jnp.stack([jnp.sum(~mask[:, 0, :], axis=1), jnp.sum(~mask[:, :, 0], axis=1)], axis=-1).astype(jnp.float32)


def valid_ratios(masks: list[Array]) -> Array:
    """`(B, L, 2)`: each level's unpadded share (w, h)."""
    return jnp.stack([valid_size(m) / jnp.asarray([m.shape[2], m.shape[1]], jnp.float32) for m in masks], axis=1)


def encoder_reference_points(shapes: list[tuple[int, int]], ratios: Array) -> Array:
    """mmdet's `get_encoder_reference_points`: `(B, S, L, 2)` pixel centres of every level, normalised by the
    level's unpadded size, then scaled to each level by its valid ratio."""
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ry, rx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5, jnp.arange(w, dtype=jnp.float32) + 0.5,
                              indexing="ij")
        ry = ry.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
        rx = rx.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        refs.append(jnp.stack([rx, ry], axis=-1))
    return jnp.concatenate(refs, axis=1)[:, :, None] * ratios[:, None]


def encoder_proposals(memory: Array, masks: list[Array]) -> tuple[Array, Array]:
    """mmdet's `gen_encoder_output_proposals` before its fc and norm: (memory `(B, S, C)` zeroed on padding
    and invalid proposals, proposals `(B, S, 4)` in inverse-sigmoid (cx, cy, w, h), +inf where invalid).

    Each position proposes a box centred on it, 0.05 x 2**level of the image wide and high; a proposal is
    invalid on padding or when any coordinate leaves (0.01, 0.99)."""
    props = []
    for lvl, m in enumerate(masks):
        b, h, w = m.shape
        gy, gx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
        grid = jnp.stack([gx, gy], axis=-1)[None]
        grid = (grid + 0.5) / valid_size(m)[:, None, None, :]
        wh = jnp.full_like(grid, jnp.float32(0.05) * 2.0 ** lvl)
        props.append(jnp.concatenate([grid, wh], axis=-1).reshape(b, h * w, 4))
    props = jnp.concatenate(props, axis=1)
    pad = jnp.concatenate([m.reshape(m.shape[0], -1) for m in masks], axis=1)[..., None]
    valid = jnp.all((props > 0.01) & (props < 0.99), axis=-1, keepdims=True)
    props = jnp.log(props / (1 - props))
    props = jnp.where(pad | ~valid, jnp.inf, props)
    memory = jnp.where(pad | ~valid, 0.0, memory)
    return memory, props


class DINO(_Pyramid, nn.Module):
    """DINO-4scale (or -5scale with a 4-input neck): see the module docstring for inputs and outputs.

    Fields follow mmdet's config: `num_queries` (900), `num_classes`, `embed_dims` (256), `num_heads` (8),
    `num_points` (4), `encoder_layers` / `decoder_layers` (6), `feedforward_channels` (2048),
    `pos_temperature` (20) and `pos_offset` (0.0) of the positional encoding. The decoder's query position
    encodes each reference box with `embed_dims / 2` sine features per coordinate (mmdet's 128 at 256).
    """

    backbone: nn.Module
    neck: nn.Module
    num_classes: int = 80
    in_features: tuple[str, ...] = STAGES[1:]
    num_queries: int = 900
    embed_dims: int = 256
    num_heads: int = 8
    num_points: int = 4
    encoder_layers: int = 6
    decoder_layers: int = 6
    feedforward_channels: int = 2048
    pos_temperature: float = 20.0
    pos_offset: float = 0.0
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def checkpoint_prefixes(self) -> dict[str, str]:
        return {"": ""}

    @nn.compact
    def __call__(self, images: Array, *, train: bool, img_shapes: Optional[Array] = None,
                 denoising: Optional[Denoising] = None) -> dict[str, Array]:
        check_nhwc(images, who="DINO")
        for name in ("num_queries", "num_points", "num_heads", "decoder_layers"):  # 0: deep errors, or none
            if getattr(self, name) < 1:
                raise ValueError(f"DINO: {name} must be at least 1, got {getattr(self, name)}")
        d = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c, q = self.embed_dims, self.num_queries
        out, levels = self._features(images, train)
        b = images.shape[0]
        for i, x in enumerate(levels):
            if x.shape[-1] != c:
                raise ValueError(f"DINO: neck level {i} has {x.shape[-1]} channels, the transformer {c}")
        shapes = [tuple(x.shape[1:3]) for x in levels]
        if img_shapes is None:
            img_shapes = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.float32), (b, 2))
        masks = padding_masks(jnp.asarray(img_shapes), images.shape[1:3], shapes)
        ratios = valid_ratios(masks)
        level_embed = self.param("level_embed", nn.initializers.normal(1.0), (len(levels), c), self.param_dtype)

        # pre_transformer: flatten the levels, their padding and positions (+ the level's embedding)
        feat = jnp.concatenate([x.reshape(b, -1, c) for x in levels], axis=1)
        pos = jnp.concatenate([
            sine_position_embedding(m, c // 2, self.pos_temperature, True, offset=self.pos_offset).reshape(b, -1, c)
            + level_embed[lvl].astype(feat.dtype) for lvl, m in enumerate(masks)], axis=1)
        pad = jnp.concatenate([m.reshape(b, -1) for m in masks], axis=1)

        layer_fields = dict(embed_dims=c, num_heads=self.num_heads, num_levels=len(levels),
                            num_points=self.num_points, feedforward_channels=self.feedforward_channels, **d)
        memory = feat
        enc_refs = encoder_reference_points(shapes, ratios)
        for i in range(self.encoder_layers):
            memory = DeformableEncoderLayer(**layer_fields, name=f"encoder.layers.{i}")(
                memory, query_pos=pos, reference_points=enc_refs, spatial_shapes=shapes, key_padding_mask=pad)

        # pre_decoder: the encoder's best positions become the matching queries' reference boxes
        head = DINOHead(self.num_classes, c, name="bbox_head", **d)
        n = self.decoder_layers
        out_memory, proposals = encoder_proposals(memory, masks)
        out_memory = nn.Dense(c, kernel_init=xavier_uniform, bias_init=torch_bias_init(c), name="memory_trans_fc",
                              **d)(out_memory)
        out_memory = layer_norm("memory_trans_norm", **d)(out_memory)
        enc_cls = head(out_memory, layer=n, branch="cls")
        enc_coord_unact = head(out_memory, layer=n, branch="reg") + proposals
        if q > enc_cls.shape[1]:
            raise ValueError(f"DINO: {q} queries but the encoder has only {enc_cls.shape[1]} positions")
        # indices only (the scores are gathered below, with their gradient); rows stay on their devices
        top = top_k(jax.lax.stop_gradient(jnp.max(enc_cls, axis=-1)), q)[1]
        topk_score = jnp.take_along_axis(enc_cls, top[..., None], axis=1)
        topk_coords_unact = jnp.take_along_axis(enc_coord_unact, top[..., None], axis=1)
        topk_coords = jax.nn.sigmoid(topk_coords_unact)
        topk_coords_unact = jax.lax.stop_gradient(topk_coords_unact)
        query = nn.Embed(q, c, embedding_init=xavier_uniform, param_dtype=self.param_dtype,
                         name="query_embedding")(jnp.arange(q))
        query = jnp.broadcast_to(query.astype(memory.dtype)[None], (b, q, c))
        label_embedding = nn.Embed(self.num_classes, c, embedding_init=nn.initializers.normal(1.0),
                                   param_dtype=self.param_dtype, name="dn_query_generator.label_embedding")
        attn_mask, reference = None, topk_coords_unact
        if denoising is None:
            label_embedding(jnp.zeros((), jnp.int32))  # created in every mode, so a checkpoint always has it
        else:
            self._check_denoising(denoising, b)
            used = denoising.labels >= 0
            dn_query = jnp.where(used[..., None], label_embedding(jnp.maximum(denoising.labels, 0)), 0.0)
            query = jnp.concatenate([dn_query.astype(query.dtype), query], axis=1)
            reference = jnp.concatenate([denoising.boxes.astype(topk_coords_unact.dtype), topk_coords_unact], axis=1)
            attn_mask = denoising.attn_mask
        reference = jax.nn.sigmoid(reference)

        # decoder: each layer refines the boxes; the next layer starts from them without their gradient
        ref_point_head = MLP(c, c, 2, name="decoder.ref_point_head", **d)
        decoder_norm = layer_norm("decoder.norm", **d)
        ratios4 = jnp.concatenate([ratios, ratios], axis=-1)[:, None]
        hidden, references = [], [reference]
        for i in range(n):
            ref_in = reference[:, :, None] * ratios4
            query_pos = ref_point_head(coordinate_to_encoding(ref_in[:, :, 0, :], num_feats=c // 2))
            query = DeformableDecoderLayer(**layer_fields, name=f"decoder.layers.{i}")(
                query, query_pos=query_pos, value=memory, reference_points=ref_in, spatial_shapes=shapes,
                key_padding_mask=pad, self_attn_mask=attn_mask)
            new_reference = jax.nn.sigmoid(head(query, layer=i, branch="reg") + inverse_sigmoid(reference, 1e-3))
            reference = jax.lax.stop_gradient(new_reference)
            hidden.append(decoder_norm(query))
            references.append(new_reference)

        # the head: layer i's boxes refine the reference layer i started from (with its gradient: look forward twice)
        cls_scores = jnp.stack([head(h, layer=i, branch="cls") for i, h in enumerate(hidden)])
        bbox_preds = jnp.stack([jax.nn.sigmoid(head(h, layer=i, branch="reg") + inverse_sigmoid(references[i]))
                                for i, h in enumerate(hidden)])
        heads = {"cls_scores": cls_scores, "bbox_preds": bbox_preds, "enc_cls_scores": topk_score,
                 "enc_bbox_preds": topk_coords}
        return {**out, **heads}

    def _check_denoising(self, dn: Denoising, b: int) -> None:
        nd = dn.labels.shape[-1]
        want = {"labels": (b, nd), "boxes": (b, nd, 4), "attn_mask": (b, nd + self.num_queries, nd + self.num_queries)}
        for field, shape in want.items():
            if tuple(getattr(dn, field).shape) != shape:
                raise ValueError(f"DINO: denoising.{field} must be {shape} for {b} images, {nd} denoising and "
                                 f"{self.num_queries} matching queries; got {tuple(getattr(dn, field).shape)}")
