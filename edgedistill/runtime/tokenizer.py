"""open_clip's tokenizers without torch: a HF ``tokenizers`` Tokenizer plus the text cleaning open_clip does first.

Export side (``export.tokenizer.save_tokenizer(model, folder)``, outside this torch-free layer) writes ``tokenizer.json`` (HF tokenizers: vocabulary, merges,
pre-tokenisation, special tokens, truncation and padding to the context length) and ``tokenizer_edgedistill.json``
(context length, special ids, the cleaning steps that tokenizer.json cannot hold). It imports open_clip (lazily)
and checks its result against open_clip's own tokenizer before it writes anything.

Device side: ``load_tokenizer(folder)`` needs numpy, ``tokenizers`` and ``ftfy`` (pure Python; open_clip's
cleaning starts with ``ftfy.fix_text``), never torch or open_clip.

Supported (see docs/runtime.md for the measured agreement):
- open_clip's ``SimpleTokenizer`` (every CLIP-text model): cleaning (ftfy, HTML unescape twice, whitespace,
  lower case, or the ``whitespace`` / ``canonicalize`` variants a config may ask for) in Python; CLIP's regex
  pre-tokenisation, byte-level BPE with the ``</w>`` word end, start/end tokens, truncation that keeps the end
  token last and zero padding in tokenizer.json.
- open_clip's ``HFTokenizer`` and ``SigLipTokenizer`` when the underlying transformers tokenizer is a "fast" one
  that can be loaded here (offline: from the local HF cache or the model's own folder): its own tokenizer.json,
  with open_clip's cleaning, truncation and padding, and ``strip_sep_token``.
- Not supported (a one-line UserError at save time): ``reduction_mask`` (random token dropping),
  ``tokenizer_mode: clips``, slow (Python-only) transformers tokenizers, special tokens that are not plain text.
"""

from __future__ import annotations

import html
import json
import os
import re
import string
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, pre_tokenizers

from edgedistill.core.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_edgedistill.json"
FORMAT = 1
CLEANS = ("lower", "whitespace", "canonicalize")
CLEAN_STEPS = {  # what each cleaning does, in order; written to CONFIG_FILE for people reading it
    "lower": ["ftfy.fix_text", "html.unescape twice", "strip", "collapse whitespace", "lower case"],
    "whitespace": ["ftfy.fix_text", "html.unescape twice", "strip", "collapse whitespace"],
    "canonicalize": ["ftfy.fix_text", "html.unescape twice", "strip", "'_' to space", "drop ASCII punctuation",
                     "lower case", "collapse whitespace"],
}
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
# CLIP's pattern holds special tokens unescaped and matches them ignoring case: plain lower-case text only
SPECIAL_TOKEN = re.compile(r"[a-z0-9_<>/-]+")


# -- cleaning (open_clip's basic_clean + whitespace_clean / lower / canonicalize_text) ----------------------------
def clean_text(text: str, clean: str, fix_text: Callable[[str], str]) -> str:
    """open_clip's text cleaning ``clean`` ('lower', 'whitespace' or 'canonicalize'); ``fix_text`` is ftfy's."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    if clean == "canonicalize":
        text = text.replace("_", " ").translate(_NO_PUNCTUATION).lower()
    text = " ".join(text.split())
    return text.lower() if clean == "lower" else text


def _ftfy() -> Callable[[str], str]:
    try:
        import ftfy  # deferred: only the "canonicalize"-free CLIP cleaning needs it; a clear line if it is missing
    except ImportError:
        raise UserError("the tokenizer needs ftfy (open_clip cleans text with it): pip install ftfy") from None
    return ftfy.fix_text


# -- device side --------------------------------------------------------------------------------------------------
# CLIP's pre-tokenisation (open_clip's SimpleTokenizer.pat without the special tokens, which tokenizer.json matches
# as added tokens). Two changes keep Oniguruma (HF tokenizers) in step with the `regex` module open_clip uses,
# checked over every assigned code point: only the contractions ignore case (under IGNORECASE `regex` lets no
# class match U+0345, Oniguruma lets the letter class fold it to iota), and U+0345 is left out, as `regex` does.
CLIP_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+"""


class TextTokenizer:
    """open_clip's tokenizer for one model: ``tokenizer(texts)`` -> int64 (N, context_length).

    One string gives (1, context_length), as open_clip's does; an empty list gives (0, context_length).
    """

    def __init__(self, backend: Any, config: dict[str, Any]) -> None:
        self.backend = backend
        self.config = config
        self.context_length: int = config["context_length"]
        self.clean: str = config["clean"]
        self.strip_sep_id: int | None = config.get("strip_sep_id")
        self._fix_text = _ftfy()
        specials = config.get("specials") if config.get("kind") == "open_clip_bpe" else None
        self._literal = _LiteralSpecials(backend, specials, config) if specials else None

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise UserError(f"texts must be strings, not {type(bad[0]).__name__} ({bad[0]!r:.40}); pass str values")
        if not texts:
            return np.zeros((0, self.context_length), dtype=np.int64)
        cleaned = [clean_text(t, self.clean, self._fix_text) for t in texts]
        ids = np.array([e.ids for e in self.backend.encode_batch(cleaned)], dtype=np.int64)
        if self._literal is not None:
            for row, text in enumerate(cleaned):
                if self._literal.found_in(text):
                    ids[row] = self._literal.encode(text)
        if self.strip_sep_id is not None:  # open_clip's strip_sep_token: the separator becomes padding (0)
            ids[ids == self.strip_sep_id] = 0
        return ids


class _LiteralSpecials:
    """CLIP texts that spell out a special token (``"<end_of_text>"``), tokenised exactly as open_clip does.

    tokenizer.json matches special tokens anywhere (HF added tokens); open_clip's regex only where a match can
    start (``"a <end_of_text>"`` is the token, ``"a.<end_of_text>"`` is text: ``.<``, ``end``, ...). For such
    texts, CLIP's own split (special tokens first, case-insensitive, as its pattern) and BPE word by word.
    """

    def __init__(self, backend: Any, specials: dict[str, int], config: dict[str, Any]) -> None:
        self.model, self.specials, self.length = backend.model, specials, config["context_length"]
        self.sot, self.eot, self.pad = config["sot_id"], config["eot_id"], config["pad_id"]
        alternation = "|".join(specials)
        self.split = pre_tokenizers.Split(Regex(f"(?i:{alternation})|{CLIP_SPLIT}"), "removed", invert=True)
        self.bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def found_in(self, text: str) -> bool:
        lowered = text.lower()
        return any(s in lowered for s in self.specials)

    def encode(self, text: str) -> list[int]:
        """(context_length,) ids: start, the words' BPE (a special token's text is its id), end; padded."""
        ids = [self.sot]
        for piece, _ in self.split.pre_tokenize_str(text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            else:  # one word: open_clip's bpe() of its UTF-8 bytes, never split again
                ids.extend(t.id for t in self.model.tokenize(self.bytes.pre_tokenize_str(piece)[0][0]))
        ids.append(self.eot)
        if len(ids) > self.length:
            ids = ids[:self.length]
            ids[-1] = self.eot
        return ids + [self.pad] * (self.length - len(ids))


def load_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
    """Load what ``save_tokenizer`` wrote in ``folder``; a missing or damaged file is a UserError."""
    folder = Path(folder)
    config = _read_config(folder / CONFIG_FILE)
    try:
        backend = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as e:  # the library raises plain Exception subclasses for missing and malformed files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{folder / TOKENIZER_FILE} cannot be loaded ({reason}); export the tokenizer again") from None
    length = config["context_length"]
    truncation, padding = backend.truncation or {}, backend.padding or {}
    if truncation.get("max_length") != length or padding.get("length") != length:
        raise UserError(f"{folder / TOKENIZER_FILE} does not truncate and pad to the context length {length} of "
                        f"{CONFIG_FILE}; export the tokenizer again")
    return TextTokenizer(backend, config)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: this folder holds no exported tokenizer; export it with "
                        "save_tokenizer (edgedistill export)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); export the tokenizer again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path} is not a format-{FORMAT} tokenizer description; export the tokenizer again "
                        "with this edgedistill version")
    kind, length, clean = config.get("kind"), config.get("context_length"), config.get("clean")
    ids = [config.get("pad_id"), *([config.get("sot_id"), config.get("eot_id")] if kind == "open_clip_bpe" else [])]
    specials = config.get("specials", {}) if kind == "open_clip_bpe" else {}
    sep = config.get("strip_sep_id")
    good = (kind in ("open_clip_bpe", "hf") and _is_int(length) and length >= 2 and clean in CLEANS
            and all(_is_int(i) for i in ids) and (sep is None or _is_int(sep)) and isinstance(specials, dict)
            and all(isinstance(k, str) and SPECIAL_TOKEN.fullmatch(k) and _is_int(v) for k, v in specials.items()))
    if not good:
        raise UserError(f"{path} has a bad kind, context_length, clean or token id; export the tokenizer again")
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
