"""Data: manifests (JSON Lines, CSV), image loading with bad-image accounting, transforms."""

from edgedistill.data.images import BadImages, ImageDataset, collate_images, open_image
from edgedistill.data.manifest import Entry, Manifest, load_manifest
from edgedistill.data.transforms import student_train_transform

__all__ = ["BadImages", "Entry", "ImageDataset", "Manifest", "collate_images", "load_manifest", "open_image",
           "student_train_transform"]
