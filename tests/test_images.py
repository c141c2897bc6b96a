import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from rich.console import Console

from edgedistill.data.batching import ImageDataset, collate_images
from edgedistill.data.images import BadImages, open_image
from edgedistill.data.transforms import student_train_transform
from edgedistill.core.errors import UserError
from tests.conftest import write_images


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"))


def test_dataset_reports_missing_and_corrupt_images(tmp_path):
    good = write_images(tmp_path, 2)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good[0].read_bytes()[:200])  # a truncated JPEG
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    to_tensor = T.Compose([T.Resize((8, 8)), T.ToTensor()])
    ds = ImageDataset([good[0], tmp_path / "missing.jpg", corrupt, text, good[1]], to_tensor)
    indices, images, bad = collate_images([ds[i] for i in range(len(ds))])
    assert indices.tolist() == [0, 4] and images.shape == (2, 3, 8, 8)
    reasons = dict(bad)
    assert reasons[1] == "file not found"
    assert reasons[2].startswith("unreadable")
    assert reasons[3] == "not an image file"


def test_open_image_converts_to_rgb(tmp_path):
    Image.new("L", (5, 4), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (5, 4)).save(tmp_path / "a.png")
    assert open_image(tmp_path / "g.png").mode == "RGB" and open_image(tmp_path / "a.png").mode == "RGB"


def test_bad_images_stop_past_the_threshold():
    bad = BadImages(total=100, max_fraction=0.05, what="train", console=quiet())
    for i in range(5):
        bad.add(i, f"x{i}.jpg", "file not found")  # 5% exactly is still allowed
    assert "skipped 5 of 100 images (5.0%)" in bad.summary()
    with pytest.raises(UserError, match=r"train: 6 of 100 images could not be read, more than 5% \(first: x0.jpg"):
        bad.add(5, "x5.jpg", "file not found")


def test_bad_images_summary_when_all_read():
    assert BadImages(total=3, max_fraction=0.05, what="val", console=quiet()).summary() == "val: all 3 images read"


def test_student_transform_augments(tmp_path):
    img = open_image(write_images(tmp_path, 1, size=(64, 48))[0])
    t = student_train_transform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), scale=(0.3, 1.0))
    torch.manual_seed(0)
    a, b = t(img), t(img)
    assert a.shape == (3, 32, 32) and not torch.allclose(a, b)
    assert -1.0 - 1e-6 <= a.min() and a.max() <= 1.0 + 1e-6  # normalised with the given mean/std
    no_flip = student_train_transform(32, (0.5,) * 3, (0.5,) * 3, scale=(1.0, 1.0), hflip=False)
    assert not any(isinstance(s, type(t.transforms[1])) for s in no_flip.transforms)
