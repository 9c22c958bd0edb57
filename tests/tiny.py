"""The tiny run the tests share: a 60-entity synthetic KG with up to 2 images each, the
`tiny-test` model preset with 4 + 4 MVTC tokens, local training. Tests add only what
they are about (epochs, steps, Ray settings).

The tiny run pins the learning settings it was recorded with (entity table, no feature
pooling, no warm-up), so that tuning configs/demo.yaml for learning (issue 10) never moves
its recorded curve (tests/test_golden.py) or its feature store."""

TINY_DATA = [
    "dataset.synth.num_entities=60", "dataset.synth.max_images=2",
    "dataset.synth.image_size=32", "images.max_images_per_entity=2",
]
TINY_MODEL = [
    "model.preset=tiny-test", "mvtc.n_visual=4", "mvtc.n_text=4", "mvtc.heads=2",
    "model.entity_repr=table", "model.feature_pool=1",
]
TINY_LOCAL_TRAIN = [
    "train.backend=local", "train.batch_size=16", "train.learning_rate=0.003",
    "train.num_negatives=8", "eval.batch_size=64", "train.warmup_steps=0",
]
TINY = [*TINY_DATA, *TINY_MODEL, *TINY_LOCAL_TRAIN]
