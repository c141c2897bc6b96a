"""Students: every zoo tower runs forward and backward, saves as an open_clip model and loads back identically."""

import json

import open_clip
import pytest
import torch

from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import StudentConfig, StudentTextConfig, TeacherConfig
from edgedistill.distill.students import STUDENT_ZOO, build_student, load_student, save_student
from edgedistill.distill.teachers import load_teacher


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    config, checkpoint = tiny_teacher
    return load_teacher(TeacherConfig(model=str(config), pretrained=str(checkpoint)), "cpu")


@pytest.mark.parametrize("vision", sorted(STUDENT_ZOO))
def test_every_zoo_student_runs_forward_and_backward(teacher, vision):
    size = 224 if vision.startswith("vit") else 64
    student = build_student(StudentConfig(vision=vision, image_size=size), teacher, f"zoo-{vision}")
    model = student.model.train()
    x = torch.randn(2, 3, size, size)
    out = model.encode_image(x)
    assert out.shape == (2, teacher.embed_dim)  # the timm head projects to the teacher's width
    out.square().sum().backward()
    grads = [p.grad for p in model.visual.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_teacher_text_tower_is_copied_and_frozen(teacher):
    student = build_student(StudentConfig(vision="resnet18", image_size=32), teacher, "text-copy")
    tokens = teacher.tokenizer(["a red circle", "two blue squares on the left"])
    with torch.no_grad():
        got = student.model.encode_text(tokens, normalize=True)
        want = teacher.model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(got, want)
    frozen = [n for n, p in student.model.named_parameters() if not n.startswith("visual.") and not p.requires_grad]
    assert "token_embedding.weight" in frozen
    assert student.model.logit_scale.requires_grad
    assert all(p.requires_grad for p in student.model.visual.parameters())


def test_saved_student_loads_with_open_clip_and_gives_the_same_embeddings(teacher, tmp_path):
    student = build_student(StudentConfig(vision="mobilenetv3_small_100", image_size=32), teacher, "saved")
    with torch.no_grad():  # move the weights away from their initialisation so a fresh model would differ
        for p in student.model.visual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.model.eval()
    folder = tmp_path / "student"
    save_student(student, folder)
    images = torch.randn(3, 3, 32, 32)
    tokens = teacher.tokenizer(["a photo", "a green star"])
    with torch.no_grad():
        want_img = student.model.encode_image(images)
        want_txt = student.model.encode_text(tokens)

    # The way the issue asks: add_model_config + create_model with the safetensors weights.
    open_clip.add_model_config(folder / f"{student.name}.json")
    model = open_clip.create_model(student.name, pretrained=str(folder / "open_clip_model.safetensors")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), want_img)
        torch.testing.assert_close(model.encode_text(tokens), want_txt)

    # And open_clip's local-dir form, with the preprocessing config.
    model2, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    with torch.no_grad():
        torch.testing.assert_close(model2.eval().encode_image(images), want_img)
    assert preprocess.transforms[0].size in (32, [32], (32, 32))
    loaded = load_student(folder)
    assert loaded.text_is_teacher and loaded.name == student.name
    meta = json.loads((folder / "open_clip_config.json").read_text())
    assert meta["model_cfg"]["vision_cfg"]["timm_model_name"] == "mobilenetv3_small_100"


def test_save_replaces_the_folder_whole(teacher, tmp_path):
    student = build_student(StudentConfig(vision="mobilenetv3_small_100", image_size=32), teacher, "replace")
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    save_student(student, folder)
    assert not (folder / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary folders left behind


def test_student_text_transformer_of_another_width(teacher):
    cfg = StudentConfig(vision="mobilenetv3_small_100", image_size=32,
                        text=StudentTextConfig(width=32, layers=1, heads=2), embed_dim=16)
    student = build_student(cfg, teacher, "small-text")
    assert not student.text_is_teacher and student.embed_dim == 16
    tokens = teacher.tokenizer(["a red circle"])
    out = student.model.encode_text(tokens)
    assert out.shape == (1, 16)
    out.sum().backward()
    assert student.model.token_embedding.weight.grad is not None
    assert student.config["text_cfg"]["width"] == 32 and student.config["text_cfg"]["layers"] == 1


def test_unknown_timm_model_names_the_valid_ones(teacher):
    with pytest.raises(UserError) as e:
        build_student(StudentConfig(vision="mobilenetv3_larg_100"), teacher, "bad")
    msg = str(e.value)
    assert "unknown timm model 'mobilenetv3_larg_100'" in msg and "mobilenetv3_large_100" in msg
    assert "resnet18" in msg and "\n" not in msg


def test_vit_student_at_the_wrong_size_is_a_user_error(teacher):
    with pytest.raises(UserError, match="takes 224 px inputs only"):
        build_student(StudentConfig(vision="vit_tiny_patch16_224", image_size=64), teacher, "vit")


def test_two_students_with_one_name_keep_their_own_configs(teacher):
    """open_clip's model-config registry is global; a second student of the same recipe name must not replace the
    first one's entry (building the first again by its name would give the second's tower)."""
    a = build_student(StudentConfig(vision="mobilenetv3_small_100", image_size=32), teacher, "same")
    b = build_student(StudentConfig(vision="resnet18", image_size=32), teacher, "same")
    assert a.name != b.name
    again = open_clip.create_model(a.name)
    assert type(again.visual.trunk).__name__ == type(a.model.visual.trunk).__name__ == "MobileNetV3"
    assert type(open_clip.create_model(b.name).visual.trunk).__name__ == "ResNet"
