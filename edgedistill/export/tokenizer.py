"""The export side of the device tokenizer: ``save_tokenizer(model, folder)`` converts open_clip's tokenizer to
``tokenizer.json`` + ``tokenizer_edgedistill.json`` for ``runtime.tokenizer.load_tokenizer`` and checks the result
against open_clip's own tokenizer before anything is written. It imports open_clip (lazily), so it lives outside
the torch-free runtime; docs/runtime.md ("Text") says what is supported.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

import edgedistill.core.atomic as atomic
from edgedistill.core.errors import UserError
from edgedistill.runtime.tokenizer import (CLIP_SPLIT, CLEAN_STEPS, CLEANS, CONFIG_FILE, FORMAT, SPECIAL_TOKEN, TOKENIZER_FILE,
                                           TextTokenizer, _is_int)

_OPEN_CLIP_PATTERN = r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # after the specials
PROBES = [  # texts open_clip and the saved tokenizer must agree on before anything is written
    "a photo of a dog", "A Photo Of A CAT!!!", "", "   ", "café naïve über", "東京の夜景", "🐶🚗 emoji",
    "&amp;lt;b&amp;gt; tags", "cafÃ© mojibake", "don't won't it's", "2024-01-31 3.14", "x" * 200,
    " ".join(["many words"] * 60), "tab\tnew\nline", "<start_of_text> special <end_of_text>", "a.<end_of_text>b",
]


def save_tokenizer(model: Any, folder: str | os.PathLike, context_length: int | None = None) -> dict[str, Any]:
    """Write the tokenizer of an open_clip model to ``folder`` for ``load_tokenizer``; returns the description.

    ``model``: an open_clip model name (``ViT-B-32``, ``hf-hub:org/name``), ``local-dir:FOLDER`` or a folder
    with ``open_clip_config.json`` (a saved student), a model config JSON file, or a tokenizer open_clip made.
    ``context_length`` overrides the model's (not with a tokenizer object, which has its own). A tokenizer that
    cannot be reproduced without torch is a UserError, and nothing is written.
    """
    if context_length is not None and not isinstance(model, (str, os.PathLike)):
        raise UserError("context_length cannot change a tokenizer object; make it with open_clip.get_tokenizer("
                        "name, context_length=...) or pass the model name")
    tokenizer, source = _open_clip_tokenizer(model, context_length)
    backend, config = _convert(tokenizer)
    config.update(format=FORMAT, source=source, clean_steps=CLEAN_STEPS[config["clean"]], versions=_versions())
    _check_against(tokenizer, TextTokenizer(backend, config), source)
    folder = atomic.writable_dir(folder, "tokenizer folder")
    atomic.write_text(folder / TOKENIZER_FILE, backend.to_str())
    atomic.write_json(folder / CONFIG_FILE, config)
    return config


def _open_clip_tokenizer(model: Any, context_length: int | None) -> tuple[Any, str]:
    """open_clip's tokenizer for ``model`` and a name for it."""
    if not isinstance(model, (str, os.PathLike)):
        return model, type(model).__name__
    import open_clip  # deferred: the export side only; the device has no open_clip (nor torch)

    name = str(model)
    path = Path(name)
    if not name.startswith(("local-dir:", "hf-hub:")) and path.is_dir():
        name = f"local-dir:{path}"
    elif name.endswith(".json") and path.is_file():  # a model config, as recipes accept for teacher.model
        open_clip.add_model_config(path)
        name = path.stem
    elif not name.startswith(("local-dir:", "hf-hub:")) and open_clip.get_model_config(name) is None:
        raise UserError(f"unknown open_clip model {name!r}; give a name from open_clip.list_models(), "
                        "local-dir:FOLDER or a model config JSON")
    try:
        return open_clip.get_tokenizer(name, context_length=context_length), name
    except Exception as e:  # downloads (offline), missing tokenizer files, bad configs: all say what failed
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load the tokenizer of {name} ({type(e).__name__}: {reason:.200}); it must load "
                        "offline here (HF cache or the model's folder) before it can be exported") from None


def _convert(tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """(tokenizers.Tokenizer, description) for an open_clip tokenizer, or a UserError saying why not."""
    from open_clip import tokenizer as oc  # deferred: the export side only

    if not isinstance(tokenizer, (oc.SimpleTokenizer, oc.HFTokenizer, oc.SigLipTokenizer)):
        raise UserError(f"cannot export a {type(tokenizer).__name__} tokenizer; supported: open_clip's "
                        "SimpleTokenizer, HFTokenizer and SigLipTokenizer")
    length = tokenizer.context_length
    if not _is_int(length) or length < 2:
        raise UserError(f"context length {length!r} cannot be exported; it must be an integer of at least 2")
    if isinstance(tokenizer, oc.SimpleTokenizer):
        if tokenizer.reduction_fn is not None:
            raise UserError("open_clip's reduction_mask (random token dropping) cannot be exported; "
                            "use a model config without tokenizer_kwargs.reduction_mask")
        return _clip_bpe(tokenizer), {"kind": "open_clip_bpe", "context_length": length, "pad_id": 0,
                                      "clean": _clean_name(tokenizer.clean_fn), "strip_sep_id": None,
                                      "sot_id": tokenizer.sot_token_id, "eot_id": tokenizer.eot_token_id,
                                      "specials": {tokenizer.decoder[i]: i for i in tokenizer.all_special_ids}}
    if isinstance(tokenizer, oc.HFTokenizer):
        if tokenizer.tokenizer_mode:
            raise UserError(f"open_clip tokenizer_mode {tokenizer.tokenizer_mode!r} cannot be exported; only the "
                            "standard HF tokenizer mode is supported")
        backend, pad_id, sep_id = _hf_backend(tokenizer.tokenizer, length)
        return backend, {"kind": "hf", "context_length": length, "pad_id": pad_id,
                         "clean": _clean_name(tokenizer.clean_fn),
                         "strip_sep_id": sep_id if tokenizer.strip_sep_token else None}
    backend, pad_id, _ = _hf_backend(tokenizer.tokenizer, length)  # SigLipTokenizer: canonicalize, its pad id
    return backend, {"kind": "hf", "context_length": length, "pad_id": pad_id, "clean": "canonicalize",
                     "strip_sep_id": None}


def _clean_name(fn: Callable[[str], str]) -> str:
    from open_clip import tokenizer as oc  # deferred: the export side only

    for name in CLEANS:
        if fn is oc.get_clean_fn(name):
            return name
    raise UserError(f"open_clip text cleaning {getattr(fn, '__name__', fn)!r} is not one of {list(CLEANS)}; "
                    "it cannot be exported")


def _clip_bpe(tokenizer: Any) -> Any:
    """A tokenizers.Tokenizer that does what open_clip's SimpleTokenizer does after cleaning."""
    import regex  # deferred: open_clip's own dependency, needed only to read its pattern at export

    specials = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
    expected = "|".join(specials) + _OPEN_CLIP_PATTERN
    if tokenizer.pat.pattern != expected or not tokenizer.pat.flags & regex.IGNORECASE:
        raise UserError("this open_clip's SimpleTokenizer splits text with another pattern than CLIP's; "
                        "the tokenizer cannot be exported (use the open_clip version edgedistill pins)")
    if not all(SPECIAL_TOKEN.fullmatch(t) for t in specials):
        raise UserError(f"special tokens {specials} must be lower-case letters, digits and _<>/- to be exported")
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    backend = Tokenizer(models.BPE(vocab=dict(tokenizer.encoder), merges=merges, end_of_word_suffix="</w>",
                                   fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),  # keep the matches only
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # CLIP's bytes_to_unicode is GPT-2's
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.BPEDecoder(suffix="</w>")])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    sot, eot = tokenizer.decoder[tokenizer.sot_token_id], tokenizer.decoder[tokenizer.eot_token_id]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, tokenizer.sot_token_id), (eot, tokenizer.eot_token_id)])
    # truncation keeps room for the two special tokens, so the end token stays last, as open_clip's does
    backend.enable_truncation(tokenizer.context_length)
    backend.enable_padding(length=tokenizer.context_length, pad_id=0, pad_token=tokenizer.decoder[0])
    return backend


def _hf_backend(hf: Any, length: int) -> tuple[Any, int, int | None]:
    """(backend with open_clip's truncation and padding, pad id, sep id) of a transformers fast tokenizer."""
    if getattr(hf, "backend_tokenizer", None) is None:
        raise UserError(f"{type(hf).__name__} is a slow (Python) transformers tokenizer without tokenizer.json; "
                        "only fast tokenizers can be exported")
    if hf.pad_token_id is None:
        raise UserError(f"{type(hf).__name__} has no padding token, so open_clip cannot pad to {length}; "
                        "set one in the tokenizer's config")
    backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    backend.enable_truncation(length, direction=hf.truncation_side)
    backend.enable_padding(length=length, direction=hf.padding_side, pad_id=hf.pad_token_id,
                           pad_type_id=hf.pad_token_type_id, pad_token=str(hf.pad_token))
    return backend, int(hf.pad_token_id), hf.sep_token_id


def _check_against(reference: Any, ours: TextTokenizer, source: str) -> None:
    """Refuse to export a tokenizer that disagrees with open_clip's on any probe text."""
    want = np.asarray(reference(PROBES))
    got = ours(PROBES)
    if want.shape != got.shape or not np.array_equal(want, got):
        row = 0 if want.shape != got.shape else int(np.flatnonzero((want != got).any(axis=1))[0])
        raise UserError(f"the tokenizer of {source} cannot be reproduced without torch: its ids differ from "
                        f"open_clip's on {PROBES[row]!r:.60}; report this with the model name")


def _versions() -> dict[str, str]:
    found = {}
    for package in ("open_clip_torch", "tokenizers", "ftfy", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
