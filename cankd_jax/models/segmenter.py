"""mmsegmentation's `EncoderDecoder`: backbone, decode head, optional auxiliary head."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cankd_jax.models.freeze import frozen_prefixes
from cankd_jax.models.ops import resize_bilinear

Array = jax.Array


def _pick(feats: dict[str, Array], name: str, who: str) -> Array:
    if name not in feats:
        raise ValueError(f"Segmenter: the {who} reads backbone feature {name!r}, but the backbone gives "
                         f"{', '.join(sorted(feats))}")
    return feats[name]


class Segmenter(nn.Module):
    """Semantic segmentation network: `backbone` features -> `decode_head` (+ `auxiliary_head`).

    `__call__(images (B, H, W, 3), *, train) -> dict`: every backbone feature
    under its own name (`stem`, `layer1`..`layer4`, see `ResNet`), and

    - `head.feature`, `head.logits`: the decode head's pre-classifier feature
      `(B, h, w, channels)` and logits `(B, h, w, K)` at the backbone's
      resolution (stride 8 for `-d8` backbones);
    - `logits`: `head.logits` resized to `(B, H, W, K)` (bilinear,
      `align_corners=False`, as mmseg's loss and whole-image inference), float32;
    - with an auxiliary head: `aux.feature`, `aux.logits` and `aux_logits`
      (`(B, H, W, K)`, float32) likewise.

    `decode_in` / `aux_in` name the backbone features the heads read (mmseg's
    `in_index` 3 and 2). Parameters live under `backbone`, `decode_head` and
    `auxiliary_head`, so their dotted paths are mmseg's state-dict keys.
    """

    backbone: nn.Module
    decode_head: nn.Module
    auxiliary_head: Optional[nn.Module] = None
    decode_in: str = "layer4"
    aux_in: str = "layer3"

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the frozen backbone stages."""
        return tuple("backbone." + p for p in frozen_prefixes(self.backbone))

    @nn.compact
    def __call__(self, images: Array, *, train: bool) -> dict[str, Array]:
        feats = dict(self.backbone(images, train=train))
        size = images.shape[1:3]
        heads = [("head", self.decode_head, self.decode_in, "logits")]
        if self.auxiliary_head is not None:
            heads.append(("aux", self.auxiliary_head, self.aux_in, "aux_logits"))
        out = dict(feats)
        for prefix, head, source, full_name in heads:
            res = head(_pick(feats, source, f"{prefix} head"), train)  # positional: a rematerialised head needs it
            out[f"{prefix}.feature"], out[f"{prefix}.logits"] = res["feature"], res["logits"]
            out[full_name] = resize_bilinear(res["logits"].astype(jnp.float32), size)
        return out
