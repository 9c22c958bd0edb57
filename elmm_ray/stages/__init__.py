"""The pipeline's stages as units (:class:`~elmm_ray.stages.base.Stage`): synth, pack,
extract, entity_init, train, eval, prune, export. Importing this package registers them
all in :data:`STAGES`; :func:`run_stage` runs one after whatever it needs."""

from elmm_ray.stages import data, export, features, prune, train
from elmm_ray.stages.base import (
           STAGES,
           Stage,
           StageContext,
           StageResult,
           plan,
           run_stage,
           run_stages,
)

__all__ = ["STAGES", "Stage", "StageContext", "StageResult", "data", "export",
           "features", "plan", "prune", "run_stage", "run_stages", "train"]
