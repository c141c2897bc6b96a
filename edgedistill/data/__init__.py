"""Data: what a dataset is (``records``), reading manifests (JSON Lines, CSV: ``manifest``) and webdataset shards
(``shards``), image loading with bad-image accounting (``images``), training transforms (``transforms``) and the
procedural scenes dataset (``scenes``).

Nothing is imported here: ``manifest`` and ``records`` need no torch (the device runtime reads manifests), while
``images`` and ``transforms`` do.
"""
