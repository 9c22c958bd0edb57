"""Model presets: one name for a whole set of ``model.*`` values.

``model.preset: NAME`` fills these keys before the YAML file and the ``key=value``
overrides are applied, so a key given explicitly always beats the preset:
schema defaults <- preset <- YAML <- overrides. Nothing is downloaded here; a checkpoint
id only says where the model is loaded from later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _committed_tower() -> str:
    """``towers/elmm-tiny-clip`` of the source tree this package runs from (a checkout, an
    editable install, a Ray job's uploaded ``working_dir``); else ``./towers/elmm-tiny-clip``,
    relative to the working directory (the cluster image's, which holds ``towers/``): a local
    path, never a hub id, so that a missing tower is an error that names the folder."""
    tower = Path(__file__).resolve().parents[2] / "towers" / "elmm-tiny-clip"
    return str(tower) if (tower / "config.json").is_file() else "./towers/elmm-tiny-clip"


_TINY_LLM = {"llm_hidden": 128, "llm_layers": 4, "llm_heads": 4, "llm_kv_heads": 2,
             "llm_intermediate": 256, "vocab_size": 2000}

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # A tiny random-init LLaVA (CLIP + Llama; the demo's until the pre-trained tower below):
    # 4 px patches give 16 x 16 = 256 patch tokens per 64 px image; a random-init tower needs
    # fine patches to expose shape (bench/bench_vision_probe.py: linear probe 0.21 at 16 px,
    # 0.49 at 4 px).
    "tiny": {
        "backbone": "tiny", "image_size": 64, "patch_size": 4,
        "vision_hidden": 64, "vision_layers": 2, "vision_heads": 4, **_TINY_LLM,
    },
    # The demo's model (configs/demo.yaml): the tiny Llama above under the self-supervised
    # tiny CLIP tower committed in towers/elmm-tiny-clip (its README: how it was made, its
    # probes; 8 px patches, 64 tokens per image), read at its last layer, the one it was
    # pre-trained on. Test Hits@1 on the demo KG, one process (bench/bench_learning.py):
    # 0.379 with this preset; over 3 training seeds of "tiny" + this tower 0.368 on average,
    # against 0.373 with the random tower of "tiny", in ~0.8x its training time
    # (bench/results/learning_search.md). The tiny LLM is taken from a seeded tiny LLaVA
    # whose random tower (the schema's vision_* sizes here) is drawn first, so its draw
    # differs from "tiny" + model.vision_tower.
    "tiny-pretrained": {
        "backbone": "tiny", "vision_tower": _committed_tower(), "vision_feature_layer": -1,
        **_TINY_LLM,
    },
    # The smallest sizes the tests train (tests/test_train_local.py): seconds per epoch on CPU.
    "tiny-test": {
        "backbone": "tiny", "image_size": 32, "patch_size": 4,
        "vision_hidden": 32, "vision_layers": 2, "vision_heads": 2,
        "llm_hidden": 64, "llm_layers": 2, "llm_heads": 4, "llm_kv_heads": 2,
        "llm_intermediate": 128, "vocab_size": 300,
    },
    # The paper-scale checkpoint (sizes come from the checkpoint; the tiny sizes are ignored).
    "llava-1.5-7b": {"backbone": "llava-hf/llava-1.5-7b-hf", "dtype": "bfloat16"},
}
