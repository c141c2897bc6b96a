"""edgedistill: distill large open_clip image-text models into edge-ready students, and run them.

    import edgedistill
    encoder = edgedistill.load("runs/clip_to_mobilenet/export")   # any exported form; see edgedistill.runtime.loader
    encoder.encode_image(["a.jpg"]), encoder.encode_text(["a dog"]), encoder.zero_shot(["a.jpg"], ["cat", "dog"])
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Encoder", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # Deferred: `import edgedistill` stays instant (the CLI, python -m edgedistill); the loader's stack loads when
    # it is asked for.
    if name in ("load", "Encoder"):
        import edgedistill.runtime.loader as loader

        return getattr(loader, name)
    raise AttributeError(f"module 'edgedistill' has no attribute {name!r}")
