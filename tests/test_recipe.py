from pathlib import Path

import pytest
import yaml

from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import Recipe, apply_overrides, load_recipe, parse_override, save_recipe, valid_keys

EXAMPLE = """
name: clip_to_mobilenet
seed: 0
out: runs/clip_to_mobilenet
teacher:
  model: ViT-B-32
  pretrained: laion2b_s34b_b79k
student:
  vision: mobilenetv3_large_100
  text: teacher
data:
  train: data/train.jsonl
  val: data/val.jsonl
  image_root: null
  batch_size: 64
  workers: 2
cache:
  dir: null
loss:
  terms: [feature, similarity, relation, contrastive, hard_negative, clip]
  balancer: dsmd
train:
  epochs: 10
  lr: 0.001
"""


def recipe_file(tmp_path: Path, text: str = EXAMPLE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_valid_recipe_loads_with_issue_keys(tmp_path):
    r = load_recipe(recipe_file(tmp_path))
    assert r.name == "clip_to_mobilenet"
    assert r.teacher.model == "ViT-B-32" and r.teacher.pretrained == "laion2b_s34b_b79k"
    assert r.data.train == Path("data/train.jsonl") and r.data.batch_size == 64
    assert list(r.loss.terms)[-1] == "clip" and r.train.epochs == 10 and r.train.lr == pytest.approx(1e-3)


def test_out_defaults_to_runs_name(tmp_path):
    r = load_recipe(recipe_file(tmp_path, "name: x\nteacher: {model: RN50}\ndata: {train: t.jsonl}\n"))
    assert r.out == Path("runs/x")
    assert r.data.workers == 2 and r.cache.dir is None and r.device == "auto"


def test_unknown_key_names_full_path_and_nearest(tmp_path):
    with pytest.raises(UserError) as e:
        load_recipe(recipe_file(tmp_path, EXAMPLE.replace("  epochs: 10", "  epoch: 10")))
    msg = str(e.value)
    assert "unknown key 'train.epoch'" in msg and "did you mean 'train.epochs'?" in msg
    assert "\n" not in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'techer'; did you mean 'teacher'\?"):
        load_recipe(recipe_file(tmp_path, EXAMPLE + "techer: {}\n"))


def test_unknown_key_without_near_match_lists_valid_keys(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'data.zzz'; valid keys there: train, val"):
        load_recipe(recipe_file(tmp_path, EXAMPLE.replace("  workers: 2", "  workers: 2\n  zzz: 1")))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(UserError) as e:
        load_recipe(recipe_file(tmp_path, EXAMPLE.replace("batch_size: 64", "batch_size: many")))
    assert "'data.batch_size'" in str(e.value) and "integer" in str(e.value) and "'many'" in str(e.value)


def test_constraint_violation(tmp_path):
    with pytest.raises(UserError, match=r"'data.batch_size': Input should be greater than 0"):
        load_recipe(recipe_file(tmp_path, EXAMPLE.replace("batch_size: 64", "batch_size: 0")))


def test_missing_required_key(tmp_path):
    with pytest.raises(UserError, match=r"missing required key 'teacher'"):
        load_recipe(recipe_file(tmp_path, "name: x\ndata: {train: t.jsonl}\n"))


def test_several_problems_are_counted(tmp_path):
    bad = EXAMPLE.replace("batch_size: 64", "batch_size: -1").replace("epochs: 10", "epochs: x")
    with pytest.raises(UserError, match=r"and 1 more problem\)"):
        load_recipe(recipe_file(tmp_path, bad))


def test_overrides_are_applied_and_typed(tmp_path):
    r = load_recipe(recipe_file(tmp_path), ["train.epochs=3", "data.batch_size=32", "cache.dir=/tmp/c",
                                            "data.val=null", "loss.terms=[feature, clip]"])
    assert r.train.epochs == 3 and r.data.batch_size == 32
    assert r.cache.dir == Path("/tmp/c") and r.data.val is None and list(r.loss.terms) == ["feature", "clip"]
    assert r.loss.terms["clip"].temperature == pytest.approx(0.07)  # each term's defaults filled in


def test_loss_terms_and_balancer_options_are_validated(tmp_path):
    r = load_recipe(recipe_file(tmp_path), ["loss.terms={contrastive: {queue_size: 128}, feature: {weight: 2}}",
                                            "loss.balancer={name: gradnorm, alpha: 2.0}"])
    # the validated options objects themselves, each its component's own class, read as such by the code
    assert r.loss.terms["contrastive"].queue_size == 128 and r.loss.terms["feature"].weight == 2
    assert type(r.loss.terms["contrastive"]).__qualname__ == "ContrastiveLoss.Options"
    assert r.loss.balancer.name == "gradnorm" and r.loss.balancer.alpha == 2.0
    dumped = r.model_dump(mode="json")["loss"]  # and dumped with every option of their own class
    assert dumped["terms"]["contrastive"]["queue_size"] == 128 and dumped["balancer"]["alpha"] == 2.0
    for override, expected in [
        ("loss.terms=[featur]", "unknown loss term 'featur'; did you mean 'feature'?"),
        ("loss.terms={relation: {temprature: 1}}", "did you mean 'temperature'?"),
        ("loss.terms={contrastive: {queue_size: -1}}", "queue_size"),
        ("loss.terms=[]", "at least one loss term"),
        ("loss.balancer=static2", "unknown balancer"),
        ("loss.balancer={name: dwa, period: 0}", "period"),
    ]:
        with pytest.raises(UserError) as e:
            load_recipe(recipe_file(tmp_path), [override])
        assert expected in str(e.value) and "\n" not in str(e.value), (override, str(e.value))


def test_override_of_unknown_key_is_checked_like_the_file(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'train.epochz'; did you mean 'train.epochs'\?"):
        load_recipe(recipe_file(tmp_path), ["train.epochz=3"])


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train..epochs=3", "train.epochs 3"])
def test_malformed_override(bad):
    with pytest.raises(UserError, match="key.sub=value"):
        parse_override(bad)


def test_override_into_a_value_is_an_error():
    with pytest.raises(UserError, match="'seed' is a value, not a section"):
        apply_overrides({"seed": 0}, ["seed.x=1"])


def test_override_creates_missing_sections():
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_invalid_yaml_gives_line(tmp_path):
    with pytest.raises(UserError, match=r"not valid YAML at line 3"):
        load_recipe(recipe_file(tmp_path, "name: x\nseed: 0\nout: a: b\n"))


def test_executable_yaml_tags_are_refused(tmp_path):
    evil = EXAMPLE + "extra: !!python/object/apply:os.system ['echo pwned > /tmp/edgedistill-pwned']\n"
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(recipe_file(tmp_path, evil))
    assert not Path("/tmp/edgedistill-pwned").exists()


def test_missing_and_empty_recipe(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is empty"):
        load_recipe(recipe_file(tmp_path, "# nothing\n"))
    with pytest.raises(UserError, match="YAML mapping"):
        load_recipe(recipe_file(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("field,value,match", [
    ("name", "'a b'", "letters, digits"),
    ("name", "'..'", "starts with a letter or digit"),  # once: "use letters, digits, '.'", which '..' obeys
    ("device", "gpu", "auto, cpu, cuda"),
])
def test_field_validators(tmp_path, field, value, match):
    text = f"name: x\nteacher: {{model: RN50}}\ndata: {{train: t.jsonl}}\n{field}: {value}\n"
    with pytest.raises(UserError, match=match):
        load_recipe(recipe_file(tmp_path, text))


def test_augment_scale_is_checked(tmp_path):
    with pytest.raises(UserError, match=r"'data.augment.scale': needs 0 < min <= max <= 1"):
        load_recipe(recipe_file(tmp_path), ["data.augment.scale=[0.9, 0.5]"])


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(recipe_file(tmp_path), ["train.epochs=7"])
    out = tmp_path / "run" / "recipe.yaml"
    save_recipe(r, out)
    again = load_recipe(out)
    assert again == r and again.train.epochs == 7
    saved = yaml.safe_load(out.read_text())
    assert saved["data"]["augment"]["hflip"] is True  # defaults are written out, not left implicit
    assert [p.name for p in out.parent.iterdir()] == ["recipe.yaml"]  # no temporary files left


def test_valid_keys_walks_sections():
    assert "epochs" in valid_keys("train")
    assert "hflip" in valid_keys("data.augment")
    assert valid_keys("nope") == []
    assert set(valid_keys()) == set(Recipe.model_fields)


# ------------------------------------------------------ how terms of parts combine, FD's weight at any width

MINIMAL = {"name": "x", "teacher": {"model": "ViT-B-32"}, "data": {"train": "a.jsonl"}}


def test_under_coverage_terms_of_parts_weigh_every_row_alike():
    """coverage weighs terms by their samples, so a term of an image part and a caption part must count its rows
    (combine: rows); under the other balancers a term of parts stays the mean of its parts (combine: parts)."""
    from edgedistill.distill.recipe import validate_recipe
    parts_terms = ["feature", "similarity", "relation", "contrastive", "hard_negative"]
    default = validate_recipe(MINIMAL).loss  # the default terms under the default balancer, coverage
    assert default.balancer.name == "coverage"
    assert {n: default.terms[n].combine for n in parts_terms} == {n: "rows" for n in parts_terms}
    assert "combine" not in type(default.terms["clip"]).model_fields  # one part only
    static = validate_recipe({**MINIMAL, "loss": {"balancer": "static"}}).loss
    assert {n: static.terms[n].combine for n in parts_terms} == {n: "parts" for n in parts_terms}
    chosen = validate_recipe({**MINIMAL, "loss": {"terms": {"feature": {"combine": "parts"}, "relation": {}}}}).loss
    assert chosen.terms["feature"].combine == "parts" and chosen.terms["relation"].combine == "rows"
    # the resolved value is written out: a saved recipe keeps its terms' combine whatever balancer it is given
    dumped = default.model_dump(mode="json")
    dumped["balancer"] = {"name": "static"}
    assert validate_recipe({**MINIMAL, "loss": dumped}).loss.terms == default.terms


def test_the_clipkd_recipe_weighs_fd_per_squared_distance_as_clip_kd_did_at_512_dims_at_any_width():
    """CLIP-KD's FD weight 2000 multiplies mse_loss of 512-d unit vectors: 2000 / 512 per unit of squared
    distance. The shipped recipe keeps that at the scenes teacher's 128-d and at any other width."""
    import math

    import torch

    from edgedistill.distill.losses import Embeddings, LossContext, build_losses
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "scenes_clipkd.yaml")
    fd = recipe.loss.terms["feature"]
    angle = 0.3
    for D in (128, 512, 768):
        t = torch.zeros(3, D, dtype=torch.float64)
        s = torch.zeros(3, D, dtype=torch.float64)
        for i in range(3):
            t[i, 2 * i], s[i, 2 * i], s[i, 2 * i + 1] = 1.0, math.cos(angle), math.sin(angle)
        value = build_losses({"feature": fd}, LossContext(embed_dim=D))["feature"](
            Embeddings(student_image=s, teacher_image=t)).item()
        assert fd.weight * value / (2 - 2 * math.cos(angle)) == pytest.approx(2000 / 512, rel=1e-9), D
