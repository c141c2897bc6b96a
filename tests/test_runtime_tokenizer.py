"""edgedistill.runtime.tokenizer: the same token ids as open_clip's tokenizers, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import open_clip
import pytest

from edgedistill.core.errors import UserError
from edgedistill.export.tokenizer import save_tokenizer
from edgedistill.runtime.tokenizer import CONFIG_FILE, TOKENIZER_FILE, load_tokenizer
from tests.conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("a photo of the dog cat car red blue small large tree house person riding bicycle street at night "
         "beach sunset two three people standing next to building with sign reads pizza skateboard").split()
SCRIPTS = ["café naïve façade über straße", "Ελληνικά κείμενο ΣΑΣ", "русский текст Ёж", "עברית", "العربية",
           "हिन्दी भाषा", "ภาษาไทย", "한국어 문장", "日本語のテキスト", "中文句子测试", "Tiếng Việt", "İstanbul ıi"]
EMOJI = ["🐶", "🚗", "👍🏽", "👩‍👩‍👧", "🇫🇷", "❤️", "😀😃😄", "🧑‍🚀", "✨"]
ENTITIES = ["&amp;", "&lt;b&gt;", "&amp;amp;", "&#39;", "&nbsp;", "&#x1F600;", "&copy;", "&quot;hi&quot;", "&bogus;"]
PUNCT = ["!!!", "???", "...", "--", "==>", "$100,000.00", "3.14159", "(a)", "[b]", "{c}", "#tag", "@user", "%",
         "'s", "'T", "DON'T", "it'S", "o'clock", "''", "\"quoted\"", "«»", "—", "…", "•"]
ODD = ["", " ", "   ", "\t\n", "\u00a0\u2003", "\u200b", "\ufeff", "\x1b[31mred\x1b[0m", "\x00\x07", "e\u0301",
       "\u0345", "a\u0345b", "ﬁ ligature", "ＦＵＬＬ ｗｉｄｔｈ", "<start_of_text>", "x <end_of_text> y",
       "a.<end_of_text>b", "<<start_of_text>>", "<END_OF_TEXT>", "\r\n", "2024-01-31T12:00"]


def _mojibake(text: str, codec: str) -> str:
    return text.encode("utf-8").decode(codec, errors="replace")


def _random_code_points(rng: np.random.Generator, n: int) -> str:
    """Assigned, non-surrogate code points from all planes (Python's Unicode database decides 'assigned')."""
    out = []
    while len(out) < n:
        cp = int(rng.integers(0x20, 0x110000 if rng.random() < 0.3 else 0x3000))
        if not 0xD800 <= cp <= 0xDFFF and unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co"):
            out.append(chr(cp))
    return "".join(out)


def corpus(n: int = 2200, seed: int = 0) -> list[str]:
    """``n`` deterministic test texts: captions, scripts, emoji, entities, mojibake, odd and long ones."""
    rng = np.random.default_rng(seed)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    texts = list(ODD)
    while len(texts) < n:
        kind = int(rng.integers(9))
        words = [pick(WORDS) for _ in range(int(rng.integers(1, 14)))]
        if kind == 0:  # a caption, with its case varied
            text = " ".join(words)
            texts.append(text.capitalize() + pick([".", "", "!", " ."]) if rng.random() < 0.5 else text.upper())
        elif kind == 1:
            texts.append(" ".join(words[:3] + [pick(SCRIPTS)] + words[3:]))
        elif kind == 2:
            texts.append(" ".join(w + (pick(EMOJI) if rng.random() < 0.4 else "") for w in words))
        elif kind == 3:
            texts.append(f"{pick(ENTITIES)}".join(words))
        elif kind == 4:  # mojibake ftfy repairs (and some it cannot)
            texts.append(_mojibake(" ".join([pick(SCRIPTS), *words[:3]]), pick(["latin-1", "cp1252", "cp1252"])))
        elif kind == 5:
            texts.append("".join(pick(PUNCT) + (pick(WORDS) if rng.random() < 0.5 else "") for _ in words))
        elif kind == 6:  # longer than any context: 60-200 words
            texts.append(" ".join(pick(WORDS) for _ in range(int(rng.integers(60, 200)))))
        elif kind == 7:
            texts.append(_random_code_points(rng, int(rng.integers(1, 25))))
        else:  # numbers, whitespace runs and odd pieces mixed into a caption
            parts = words + [str(int(rng.integers(0, 10 ** 9))), pick(ODD), pick(PUNCT), "\t  \n"]
            rng.shuffle(parts)
            texts.append(" ".join(parts))
    return texts


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with the tiny CLIP's config (context length 16), as a saved student has."""
    folder = tmp_path_factory.mktemp("student")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}))
    return folder


def assert_same_ids(reference, ours, texts: list[str]) -> int:
    want, got = reference(texts).numpy(), ours(texts)
    assert got.dtype == np.int64 and got.shape == want.shape
    differ = [texts[i] for i in np.flatnonzero((want != got).any(axis=1))]
    assert not differ, f"{len(differ)} of {len(texts)} texts differ, first: {differ[:3]!r}"
    return len(texts)


def test_corpus_covers_what_it_claims(texts):
    assert len(set(texts)) >= 2000
    assert "" in texts and "   " in texts
    assert sum(len(t.split()) > 80 for t in texts) >= 100  # longer than 77 tokens
    assert any("cafÃ©" in t for t in texts) and any("&amp;" in t for t in texts)
    assert any(any(0x4E00 <= ord(c) <= 0x9FFF for c in t) for t in texts)
    assert any(any(ord(c) >= 0x1F300 for c in t) for t in texts)


@pytest.mark.slow
def test_clip_tokenizer_matches_open_clip_at_77(tmp_path, texts):
    save_tokenizer("ViT-B-32", tmp_path)
    ours = load_tokenizer(tmp_path)
    assert ours.context_length == 77
    reference = open_clip.get_tokenizer("ViT-B-32")
    assert assert_same_ids(reference, ours, texts) >= 2000
    long = ours(texts)[[len(t.split()) > 80 for t in texts]]
    assert (long[:, -1] == 49407).all() and (long[:, 0] == 49406).all()  # truncated: the end token stays last


@pytest.mark.slow
@pytest.mark.parametrize("form", ["local-dir", "folder", "config-json", "tokenizer"])
def test_clip_tokenizer_matches_open_clip_at_16(tmp_path, tiny_dir, texts, form):
    config_json = tmp_path / "tiny-clip-16.json"
    config_json.write_text(json.dumps(TINY_CONFIG))
    reference = open_clip.get_tokenizer(f"local-dir:{tiny_dir}")
    source = {"local-dir": f"local-dir:{tiny_dir}", "folder": tiny_dir, "config-json": config_json,
              "tokenizer": reference}[form]
    save_tokenizer(source, tmp_path / "tok")
    ours = load_tokenizer(tmp_path / "tok")
    assert ours.context_length == reference.context_length == 16
    assert assert_same_ids(reference, ours, texts) >= 2000


def test_context_length_argument_and_single_string(tmp_path):
    save_tokenizer("ViT-B-32", tmp_path, context_length=8)
    ours = load_tokenizer(tmp_path)
    ids = ours("a photo of a dog on a sunny beach with friends")
    assert ids.shape == (1, 8) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert np.array_equal(ids, open_clip.get_tokenizer("ViT-B-32", context_length=8)(["a photo of a dog on a sunny "
                                                                                        "beach with friends"]).numpy())
    assert ours([]).shape == (0, 8)


@pytest.mark.slow
def test_cleaning_variants_from_tokenizer_kwargs(tmp_path, texts):
    for clean in ("whitespace", "canonicalize"):
        cfg = {**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "tokenizer_kwargs": {"clean": clean}}}
        folder = tmp_path / clean
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        save_tokenizer(f"local-dir:{folder}", folder / "tok")
        assert json.loads((folder / "tok" / CONFIG_FILE).read_text())["clean"] == clean
        assert_same_ids(open_clip.get_tokenizer(f"local-dir:{folder}"), load_tokenizer(folder / "tok"), texts)


def test_saved_files_describe_the_tokenizer(tmp_path):
    description = save_tokenizer("ViT-B-32", tmp_path)
    on_disk = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert on_disk == description
    assert on_disk["kind"] == "open_clip_bpe" and on_disk["sot_id"] == 49406 and on_disk["eot_id"] == 49407
    assert on_disk["clean_steps"][0] == "ftfy.fix_text" and "ftfy" in on_disk["versions"]
    tok = json.loads((tmp_path / TOKENIZER_FILE).read_text())
    assert tok["model"]["type"] == "BPE" and tok["model"]["end_of_word_suffix"] == "</w>"
    assert len(tok["model"]["vocab"]) == 49408 and tok["padding"]["strategy"] == {"Fixed": 77}


@pytest.mark.slow
def test_clip_split_equals_open_clips_regex_on_every_assigned_code_point():
    """tokenizer.json's pre-tokenisation (Oniguruma) splits as open_clip's pattern (the `regex` module) does, for
    every code point Python's Unicode database lists as assigned, each in six contexts."""
    from tokenizers import Regex, pre_tokenizers

    from edgedistill.runtime.tokenizer import CLIP_SPLIT

    pattern = open_clip.get_tokenizer("ViT-B-32").pat
    split = pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True)
    points = [cp for cp in range(0x20, 0x110000)
              if not 0xD800 <= cp <= 0xDFFF and unicodedata.category(chr(cp)) != "Cn"]
    assert len(points) > 250_000
    differ = []
    for i in range(0, len(points), 2000):  # spaces end every piece, so chunks split as their parts do
        text = " ".join(f"a{c}b .{c}. 1{c}2 '{c}s {c}{c} {c}'T" for c in map(chr, points[i:i + 2000]))
        if pattern.findall(text) != [piece for piece, _ in split.pre_tokenize_str(text)]:
            differ.append(hex(points[i]))
    assert not differ, f"chunks starting at {differ[:5]} split differently"


# -- HF tokenizers (open_clip's HFTokenizer, SigLipTokenizer): built here, since hubs are out of reach -------------
def _local_hf_tokenizer(folder: Path, texts: list[str]) -> Path:
    """A BERT-style fast tokenizer trained on ``texts``, saved as transformers saves one (offline)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=800, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("strip_sep", [False, True])
def test_hf_tokenizer_from_a_model_folder(tmp_path, texts, strip_sep):
    folder = _local_hf_tokenizer(tmp_path / "model", texts[:500])
    text_cfg = {**TINY_CONFIG["text_cfg"], "hf_tokenizer_name": "local", "context_length": 24,
                "tokenizer_kwargs": {"strip_sep_token": strip_sep}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**TINY_CONFIG, "text_cfg": text_cfg}}))
    reference = open_clip.get_tokenizer(f"local-dir:{folder}")
    assert type(reference).__name__ == "HFTokenizer"
    config = save_tokenizer(f"local-dir:{folder}", tmp_path / "tok")
    assert config["kind"] == "hf" and config["clean"] == "whitespace"
    assert (config["strip_sep_id"] is not None) == strip_sep
    assert assert_same_ids(reference, load_tokenizer(tmp_path / "tok"), texts) >= 2000


def test_siglip_style_tokenizer(tmp_path, texts):
    """open_clip's SigLipTokenizer (canonicalize, its own pad id) around a local tokenizer: the real ones need a
    download, so the wrapper is built around one made here; its __call__ is open_clip's own."""
    from open_clip.tokenizer import SigLipTokenizer
    from transformers import AutoTokenizer

    reference = object.__new__(SigLipTokenizer)
    reference.tokenizer = AutoTokenizer.from_pretrained(_local_hf_tokenizer(tmp_path / "model", texts[:500]))
    reference.tokenizer.pad_token_id = 1  # what SigLipTokenizer sets for the T5 vocabularies
    reference.context_length = 12
    config = save_tokenizer(reference, tmp_path / "tok")
    assert config["clean"] == "canonicalize" and config["pad_id"] == 1
    assert assert_same_ids(reference, load_tokenizer(tmp_path / "tok"), texts) >= 2000


# -- what cannot be exported, and damaged files ------------------------------------------------------------------
def test_unsupported_tokenizers_are_one_line_errors(tmp_path):
    cfg = {**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "tokenizer_kwargs": {"reduction_mask": "random"}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    cases = [(f"local-dir:{tmp_path}", "reduction_mask"), ("no-such-model-xyz", "unknown open_clip model"),
             (object(), "cannot export a object tokenizer"),
             (f"local-dir:{tmp_path / 'missing'}", "cannot load the tokenizer")]
    for source, message in cases:
        with pytest.raises(UserError, match=message) as info:
            save_tokenizer(source, tmp_path / "out")
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="context_length cannot change a tokenizer object"):
        save_tokenizer(open_clip.get_tokenizer("ViT-B-32"), tmp_path / "out", context_length=16)
    assert not (tmp_path / "out" / TOKENIZER_FILE).exists()


def test_hub_tokenizer_offline_is_a_user_error(tmp_path, monkeypatch):
    """SigLIP's tokenizer lives on the HF hub: without it in the local cache, export says so in one line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # fail at once, as without internet
    with pytest.raises(UserError, match="cannot load the tokenizer of ViT-B-16-SigLIP") as info:
        save_tokenizer("ViT-B-16-SigLIP", tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out" / CONFIG_FILE).exists()


def test_damaged_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no exported tokenizer"):
        load_tokenizer(tmp_path)
    save_tokenizer("ViT-B-32", tmp_path, context_length=16)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "context_length": 20}))
    with pytest.raises(UserError, match="context length 20"):
        load_tokenizer(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "clean": "shout"}))
    with pytest.raises(UserError, match="bad kind"):
        load_tokenizer(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(UserError, match="cannot be loaded"):
        load_tokenizer(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("[1, 2")
    with pytest.raises(UserError, match="not readable JSON"):
        load_tokenizer(tmp_path)


def test_non_string_texts_are_user_errors(tmp_path):
    save_tokenizer("ViT-B-32", tmp_path)
    with pytest.raises(UserError, match="texts must be strings"):
        load_tokenizer(tmp_path)(["fine", None])


# -- no torch on the device ----------------------------------------------------------------------------------------
BLOCKED = """
import sys
for name in ("torch", "torchvision", "open_clip", "transformers", "timm"):
    sys.modules[name] = None  # any import of these now raises ImportError
from edgedistill.runtime.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
ids = tok(["a photo of a dog", "", "x" * 500, "a.<end_of_text>b"])
assert ids.shape == (4, 77) and ids.dtype.name == "int64", ids.shape
print(ids[:, :6].tolist())
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "transformers") and sys.modules[m]))
"""


def test_tokenizer_runs_with_torch_blocked(tmp_path):
    save_tokenizer("ViT-B-32", tmp_path)
    run = subprocess.run([sys.executable, "-c", BLOCKED, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    rows, loaded = (json.loads(line.replace("'", '"')) for line in run.stdout.splitlines()[-2:])
    want = open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog", "", "x" * 500, "a.<end_of_text>b"])
    assert rows == want[:, :6].tolist() and loaded == []
