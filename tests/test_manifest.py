import json
from pathlib import Path

import pytest

from edgedistill.data.manifest import load_manifest
from edgedistill.core.errors import UserError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_jsonl_keeps_every_caption_and_label(tmp_path):
    m = load_manifest(write(tmp_path / "m.jsonl",
                            '{"image": "a.jpg", "captions": ["one", "two", "three"], "label": "dog"}\n'
                            '\n'
                            '{"image": "/abs/b.jpg", "captions": ["four"]}\n'))
    assert len(m) == 2 and m.n_captions == 4
    assert m.entries[0].image == tmp_path / "a.jpg" and m.entries[0].label == "dog"
    assert m.entries[1].image == Path("/abs/b.jpg") and m.entries[1].label is None
    assert m.all_captions() == ["one", "two", "three", "four"]
    assert m.caption_offsets.tolist() == [0, 3, 4]


def test_images_without_captions_are_kept(tmp_path):
    m = load_manifest(write(tmp_path / "m.jsonl", '{"image": "a.jpg"}\n{"image": "b.jpg", "captions": []}\n'
                                                  '{"image": "c.jpg", "captions": ["x"]}\n'))
    assert [len(e.captions) for e in m.entries] == [0, 0, 1]
    assert m.caption_offsets.tolist() == [0, 0, 0, 1]


def test_image_root_resolves_relative_paths(tmp_path):
    m = load_manifest(write(tmp_path / "m.jsonl", '{"image": "sub/a.jpg"}\n'), image_root=tmp_path / "imgs")
    assert m.entries[0].image == tmp_path / "imgs" / "sub" / "a.jpg"


def test_extra_keys_are_allowed_but_typos_are_not(tmp_path):
    ok = load_manifest(write(tmp_path / "m.jsonl", '{"image": "a.jpg", "width": 10, "url": "http://x"}\n'))
    assert len(ok) == 1
    with pytest.raises(UserError, match=r"line 2: unknown key 'captoins'; did you mean 'captions'\?"):
        load_manifest(write(tmp_path / "m.jsonl", '{"image": "a.jpg"}\n{"image": "b.jpg", "captoins": ["x"]}\n'))


@pytest.mark.parametrize("line,match", [
    ('{"image": "a.jpg", ', "line 2: not valid JSON"),
    ('["a.jpg"]', "line 2: each line must be a JSON object"),
    ('{"captions": ["x"]}', 'line 2: missing "image"'),
    ('{"image": "b.jpg", "captions": "a dog"}', 'line 2: "captions" must be a list of strings'),
    ('{"image": "b.jpg", "captions": ["ok", ""]}', "line 2: caption 2 is empty"),
    ('{"image": "b.jpg", "captions": [3]}', "line 2: caption 1 is int"),
    ('{"image": "b.jpg", "label": [1]}', 'line 2: "label" must be a class name'),
    ('{"image": "a.jpg"}', "line 2: image 'a.jpg' is already on line 1"),
])
def test_bad_line_names_its_number(tmp_path, line, match):
    with pytest.raises(UserError, match=match) as e:
        load_manifest(write(tmp_path / "m.jsonl", '{"image": "a.jpg"}\n' + line + "\n"))
    assert "\n" not in str(e.value)


def test_missing_empty_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_manifest(tmp_path / "none.jsonl")
    with pytest.raises(UserError, match="has no images"):
        load_manifest(write(tmp_path / "e.jsonl", "\n\n"))
    with pytest.raises(UserError, match="unknown format '.txt'"):
        load_manifest(write(tmp_path / "m.txt", "a.jpg\n"))
    with pytest.raises(UserError, match="not UTF-8"):
        (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
        load_manifest(tmp_path / "bin.jsonl")


def test_csv_groups_rows_by_image(tmp_path):
    m = load_manifest(write(tmp_path / "m.csv", "image,caption,label\n"
                                                "a.jpg,a red circle,red\n"
                                                "b.jpg,\"a blue square, small\",blue\n"
                                                "a.jpg,a circle in red,red\n"
                                                "c.jpg,,\n"))
    assert [e.image.name for e in m.entries] == ["a.jpg", "b.jpg", "c.jpg"]
    assert m.entries[0].captions == ("a red circle", "a circle in red")
    assert m.entries[1].captions == ("a blue square, small",)
    assert m.entries[2].captions == () and m.entries[0].label == "red"


def test_csv_errors(tmp_path):
    with pytest.raises(UserError, match="needs a header with 'image' and 'caption'"):
        load_manifest(write(tmp_path / "m.csv", "path,text\na.jpg,x\n"))
    with pytest.raises(UserError, match="line 3: empty 'image' column"):
        load_manifest(write(tmp_path / "m.csv", "image,caption\na.jpg,x\n,y\n"))
    with pytest.raises(UserError, match="line 3: image 'a.jpg' has label 'cat' here but 'dog' on line 2"):
        load_manifest(write(tmp_path / "m.csv", "image,caption,label\na.jpg,x,dog\na.jpg,y,cat\n"))
    with pytest.raises(UserError, match="line 3: 1 fields where the header names 2"):  # not silently uncaptioned
        load_manifest(write(tmp_path / "m.csv", "image,caption\na.jpg,x\nb.jpg\n"))
    with pytest.raises(UserError, match="line 2: 3 fields where the header names 2"):
        load_manifest(write(tmp_path / "m.csv", "image,caption\na.jpg,x,y\n"))
    assert load_manifest(write(tmp_path / "m.csv", "image,caption\na.jpg,\n")).entries[0].captions == ()


@pytest.mark.parametrize("suffix, head", [(".jsonl", b'{"image": "a.jpg"}\n{"image": "b.jpg"}\n'),
                                          (".csv", b"image,caption\na.jpg,x\nb.jpg,y\n")])
def test_bytes_that_are_not_utf8_name_their_line(tmp_path, suffix, head):
    path = tmp_path / f"m{suffix}"
    path.write_bytes(head + b'{"image": "c\xff.jpg"}\n' if suffix == ".jsonl" else head + b"c\xff.jpg,z\n")
    bad_line = head.count(b"\n") + 1
    with pytest.raises(UserError, match=f"line {bad_line}: not UTF-8 text"):
        load_manifest(path)


def test_content_hash_follows_paths_and_captions_not_labels(tmp_path):
    base = [{"image": "a.jpg", "captions": ["x"], "label": "dog"}]
    h = lambda rows, name="m.jsonl": load_manifest(  # noqa: E731
        write(tmp_path / name, "".join(json.dumps(r) + "\n" for r in rows))).content_hash()
    first = h(base)
    assert h(base, "other.jsonl") == first  # same content, another file name
    assert h([{**base[0], "label": "cat"}]) == first
    assert h([{**base[0], "captions": ["y"]}]) != first
    assert h([{**base[0], "image": "b.jpg"}]) != first


def test_content_hash_does_not_depend_on_how_the_path_is_spelt(tmp_path, monkeypatch):
    """A relative and an absolute path to one manifest key the same cache and the same pretrained teacher."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.jsonl").write_text('{"image": "a.jpg", "captions": ["x"]}\n')
    monkeypatch.chdir(tmp_path)
    relative = load_manifest("d/m.jsonl")
    absolute = load_manifest(tmp_path / "d" / "m.jsonl")
    assert relative.entries[0].image.is_absolute()
    assert relative.content_hash() == absolute.content_hash()


def test_a_folder_of_images_is_a_manifest_without_captions(tmp_path):
    from tests.conftest import write_images

    write_images(tmp_path / "imgs" / "cat", 2)
    write_images(tmp_path / "imgs" / "dog" / "deep", 3, start=10)
    write_images(tmp_path / "imgs", 1, start=20)
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    write_images(tmp_path / "imgs" / ".thumbs", 1, start=30)  # hidden: skipped
    m = load_manifest(tmp_path / "imgs", folder_labels=True)
    assert len(m) == 6 and m.n_captions == 0
    labels = {e.image.name: e.label for e in m.entries}
    assert labels["img_00000.jpg"] == "cat" and labels["img_00010.jpg"] == "dog" and labels["img_00020.jpg"] is None
    assert [e.label for e in load_manifest(tmp_path / "imgs").entries] == [None] * 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_manifest(tmp_path / "empty")
