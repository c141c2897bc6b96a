"""The training side (needs the `train` extra: torch, open_clip, timm): recipes, the teacher and its feature
cache, students, loss terms and balancers, module selection, layerwise distillation, the trainer, the scenes
teacher's pretraining and distributed training. Nothing in the device runtime imports it."""
