"""One validation split and one scoring function (torch-free), so a number means the same wherever it is printed:
``split`` (ValSplit, score) and ``metrics`` (Recall@K, zero-shot accuracy). Scoring a PyTorch student through them
is ``distill.evaluate``."""
