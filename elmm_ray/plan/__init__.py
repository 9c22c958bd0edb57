"""`elmm-ray plan`: the configured ELMM built on the meta device from a checkpoint's
``config.json`` (nothing downloaded), and what its stages need per GPU, how long they take
and what they cost (:mod:`elmm_ray.plan.report`)."""

DEFAULT_MFU = 0.35  # the model-FLOPs utilisation plan times assume unless told (--mfu)
