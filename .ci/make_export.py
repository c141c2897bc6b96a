"""CI: a tiny distilled and exported student (the tests' tiny open_clip teacher, 32 JPEGs, one epoch) in the
folder given, for the device-install check (.ci/device_check). Runs in the training install."""

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import TINY_CONFIG, write_images, write_manifest, write_recipe  # noqa: E402


def main(root: Path) -> None:
    import json

    import open_clip
    import torch

    from edgedistill.cli import main as cli

    root.mkdir(parents=True, exist_ok=True)
    config = root / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(1234)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), root / "tiny-clip.pt")
    train = write_manifest(root / "data" / "train.jsonl", write_images(root / "data" / "images", 32))
    val = write_manifest(root / "data" / "val.jsonl", write_images(root / "data" / "val_images", 10, seed=1))
    recipe = write_recipe(root / "tiny.yaml", (config, root / "tiny-clip.pt"), train, val, cache_dir=root / "cache",
                          student={"image_size": 32}, train={"epochs": 1, "warmup_steps": 1, "tensorboard": False})
    raw = yaml.safe_load(recipe.read_text())
    raw["out"] = str(root / "run")
    recipe.write_text(yaml.safe_dump(raw))
    assert cli(["distill", str(recipe)]) == 0
    assert cli(["export", str(root / "run"), "--int8", "--calib-size", "16"]) == 0


if __name__ == "__main__":
    main(Path(sys.argv[1]))
