"""Distillation of a student against a frozen teacher (``edgedistill distill``).

- ``distill``: the whole command (teacher, caches, trainer, summary), in one process or under torchrun.
- ``build``: a run's parts from its recipe; ``trainer``: the loop; ``step``: one step's forward and
  optimisation; ``batches``: what a step is fed; ``rundir``: the run directory (checkpoints, log, resume checks).

One step: augmented student views of a batch of images -> student embeddings; the teacher's embeddings of the
clean views come from the feature cache (or an online teacher); one caption per captioned image is drawn; every
loss term sees the batch, the balancer combines them, AdamW steps. Resuming is exact: every random choice is a
function of (seed, epoch, index) or (seed, step), and a checkpoint holds the model, optimizer, scheduler, AMP
scaler, balancer, loss state (queues), layerwise projections, selector and RNG states.
"""

from edgedistill.distill.train.batches import EpochBatches, TrainImages
from edgedistill.distill.train.distill import build_trainer, check_ood_classes, distill
from edgedistill.distill.train.step import cosine_schedule
from edgedistill.distill.train.trainer import FAULT_ENV, FAULT_RANK_ENV, MAX_BAD_STEPS, Trainer

__all__ = ["FAULT_ENV", "FAULT_RANK_ENV", "MAX_BAD_STEPS", "EpochBatches", "TrainImages", "Trainer", "build_trainer",
           "check_ood_classes", "cosine_schedule", "distill"]
