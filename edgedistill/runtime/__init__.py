"""The device layer: everything that reads, verifies, chooses or runs an exported student (docs/design.md#layers).

The table of formats, backends and devices (``formats``), export.json and its probe set (``manifest``, ``probe``),
the runners (``backends``, ``tensorrt`` through cuda-python), choosing by measuring on the device (``choose``),
``load`` and ``Encoder`` (``loader``, ``encoder``), preprocessing, the tokenizer and the index. Nothing here
imports torch, torchvision, open_clip or timm, at import or at call time: an import-linter contract with no
exceptions keeps it so, and the tests import every module with torch blocked. Runners that need torch live in
``bench.torch_runners`` and the table names them as strings.
"""
