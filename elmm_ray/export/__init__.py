"""Export a trained run as a self-contained model directory (:mod:`.model`), with its LoRA
adapter in PEFT format (:mod:`.adapter`) and a model card (:mod:`.card`); load it and
predict."""

from elmm_ray.export.card import CARD_FILE, read_front_matter
from elmm_ray.export.model import (
    EXPORT_FORMAT,
    MARKER,
    ExportedModel,
    export_model,
    is_export,
    load_base_backbone,
    load_export,
)

__all__ = ["CARD_FILE", "EXPORT_FORMAT", "MARKER", "ExportedModel", "export_model",
           "is_export", "load_base_backbone", "load_export", "read_front_matter"]
