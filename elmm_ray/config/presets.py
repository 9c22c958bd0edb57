"""Model presets: one name for a whole set of ``model.*`` values.

``model.preset: NAME`` fills these keys before the YAML file and the ``key=value``
overrides are applied, so a key given explicitly always beats the preset:
schema defaults <- preset <- YAML <- overrides. Nothing is downloaded here; a checkpoint
id only says where the model is loaded from later.
"""

from __future__ import annotations

from typing import Any

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The demo's tiny random-init LLaVA (configs/demo.yaml): 4 px patches give 16 x 16 = 256
    # patch tokens per 64 px image; a random-init tower needs fine patches to expose shape
    # (bench/bench_vision_probe.py: linear probe 0.21 at 16 px, 0.49 at 4 px).
    "tiny": {
        "backbone": "tiny", "image_size": 64, "patch_size": 4,
        "vision_hidden": 64, "vision_layers": 2, "vision_heads": 4,
        "llm_hidden": 128, "llm_layers": 4, "llm_heads": 4, "llm_kv_heads": 2,
        "llm_intermediate": 256, "vocab_size": 2000,
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
