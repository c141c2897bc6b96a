"""The torch-free runtime: what a device needs to run an exported student (numpy, pillow, HF ``tokenizers``).

Nothing in this package imports torch, torchvision or open_clip, at import or at call time (``save_tokenizer``
is the one exception: it runs on the export side and imports open_clip lazily). The tests prove it by
importing these modules with torch blocked.
"""
