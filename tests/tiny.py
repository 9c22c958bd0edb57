"""The tiny run the tests share: a 60-entity synthetic KG with up to 2 images each, the
`tiny-test` model preset with 4 + 4 MVTC tokens, local training. Tests add only what
they are about (epochs, steps, Ray settings).

The tiny run pins the entity representation it was recorded with (the entity table), so
that the demo's learning settings (configs/demo.yaml: the entity encoder, issue 10) do not
move its recorded curve (tests/test_golden.py)."""

TINY_DATA = [
    "dataset.synth.num_entities=60", "dataset.synth.max_images=2",
    "dataset.synth.image_size=32", "images.max_images_per_entity=2",
]
TINY_MODEL = [
    "model.preset=tiny-test", "mvtc.n_visual=4", "mvtc.n_text=4", "mvtc.heads=2",
    "model.entity_repr=table",
]
TINY_LOCAL_TRAIN = [
    "train.backend=local", "train.global_batch_size=16", "train.learning_rate=0.003",
    "train.num_negatives=8", "eval.batch_size=64",
]
TINY = [*TINY_DATA, *TINY_MODEL, *TINY_LOCAL_TRAIN]
