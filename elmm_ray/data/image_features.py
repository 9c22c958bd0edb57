"""Per-entity image features for training and evaluation, without Ray.

:class:`FeatureBank` is the interface training reads (``features_for(entity_ids)``): the
padded patch features of each entity's first ``max_images`` images and their mask.
:func:`features_from_shards` fills one in memory by running the frozen vision tower
(:func:`elmm_ray.models.backbone.encode_images`) over the packed image shards; the
distributed feature store serves the same interface at scale.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from elmm_ray.data.pixels import PixelSpec
from elmm_ray.data.shards import MANIFEST as SHARDS_MANIFEST
from elmm_ray.data.shards import read_manifest, verify_shards
from elmm_ray.models.backbone import encode_images, preprocess_images

log = logging.getLogger(__name__)


class FeatureBank:
    """Dense in-memory features ``(E, max_images, tokens, width)`` fp16 and mask ``(E, max_images)``."""  # noqa: E501

    def __init__(self, features: torch.Tensor, mask: torch.Tensor) -> None:
        if features.ndim != 4 or mask.shape != features.shape[:2]:
            raise ValueError(f"features {tuple(features.shape)} / mask {tuple(mask.shape)} "
                             "must be (E, max_images, tokens, width) / (E, max_images)")
        self.features = features
        self.mask = mask.bool()

    @property
    def num_entities(self) -> int:
        return self.features.shape[0]

    @property
    def feature_shape(self) -> tuple[int, int]:
        return tuple(self.features.shape[2:])  # type: ignore[return-value]

    def features_for(self, entity_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded features (float32) and image mask of a batch of entities."""
        ids = torch.as_tensor(entity_ids, dtype=torch.long)
        return self.features[ids].float(), self.mask[ids]

    @classmethod
    def empty(cls, num_entities: int, max_images: int, tokens: int, width: int) -> FeatureBank:
        """A zeroed bank with no image marked, to be filled in place."""
        return cls(torch.zeros(num_entities, max(max_images, 1), tokens, width,
                               dtype=torch.float16),
                   torch.zeros(num_entities, max(max_images, 1), dtype=torch.bool))

    @classmethod
    def none(cls, num_entities: int, max_images: int, tokens: int, width: int) -> FeatureBank:
        """No images for anyone (the no-image ablation, or ``max_images = 0``): one zero
        slot viewed for every entity (read-only), so memory does not grow with entities
        (a dense zero bank of WN18's 40,943 entities took 1.3 GB with the tiny preset)."""
        slots = max(max_images, 1)
        zero = torch.zeros(1, 1, tokens, width, dtype=torch.float16)
        return cls(zero.expand(num_entities, slots, tokens, width),
                   torch.zeros(num_entities, slots, dtype=torch.bool))


def read_shard_rows(shard_dir: str | Path, max_images: int) -> list[tuple[int, int, bytes]]:
    """(entity, image_index, bytes) of the first ``max_images`` packed images per entity.
    The shards of a pack manifest are checked against its digests first (a missing or
    corrupt shard is an error naming it, never fewer images)."""
    manifest = Path(shard_dir) / SHARDS_MANIFEST
    if manifest.is_file():
        pack = read_manifest(shard_dir)
        verify_shards(shard_dir, pack)
        files = [Path(shard_dir) / shard["file"] for shard in pack["shards"]]
    else:
        files = sorted(Path(shard_dir).glob("shard-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no image shards (shard-*.parquet) in {shard_dir}; "
                                "run `elmm-ray pack` first")
    rows: list[tuple[int, int, bytes]] = []
    for f in files:
        t = pq.read_table(f, columns=["entity", "image_index", "image"])
        rows.extend(zip(t["entity"].to_pylist(), t["image_index"].to_pylist(),
                        t["image"].to_pylist()))
    rows.sort(key=lambda r: (r[0], r[1]))
    kept, count, last = [], 0, -1
    for entity, index, data in rows:
        count = count + 1 if entity == last else 0
        last = entity
        if count < max_images:
            kept.append((entity, index, data))
    return kept


@torch.no_grad()
def features_from_shards(
    vision_tower: torch.nn.Module,
    shard_dir: str | Path,
    *,
    num_entities: int,
    max_images: int,
    image_size: int,
    layer: int = -2,
    pool: int = 1,
    batch_size: int = 64,
    pixels: PixelSpec | None = None,
) -> FeatureBank:
    """Run the frozen vision tower over the packed images into a :class:`FeatureBank`;
    ``pixels``: the tower's preprocessing (None: CLIP's at ``image_size``)."""
    rows = read_shard_rows(shard_dir, max_images) if max_images > 0 else []
    spec = pixels or PixelSpec.clip(image_size)
    probe = preprocess_images([Image.new("RGB", (spec.width, spec.height))], spec)
    tokens, width = encode_images(vision_tower, probe, layer=layer, pool=pool).shape[1:]
    bank = FeatureBank.empty(num_entities, max_images, tokens, width)
    slot = np.zeros(num_entities, dtype=np.int64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = [Image.open(io.BytesIO(data)) for _, _, data in chunk]
        feats = encode_images(vision_tower, preprocess_images(images, spec),
                              layer=layer, pool=pool).cpu()
        for (entity, _, _), f in zip(chunk, feats):
            if entity >= num_entities:
                raise ValueError(f"shard row for entity {entity} but the KG has {num_entities} "
                                 "entities: the shards belong to another dataset")
            bank.features[entity, slot[entity]] = f
            bank.mask[entity, slot[entity]] = True
            slot[entity] += 1
    log.info("features: %d images of %d entities", len(rows), int((slot > 0).sum()))
    return bank
