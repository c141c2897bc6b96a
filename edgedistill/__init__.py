"""edgedistill: distill large open_clip image-text models into edge-ready students."""

__version__ = "0.1.0"
