"""CI: a tiny distilled and exported student (the tests' tiny open_clip teacher, 32 JPEGs, one epoch) in the
folder given, for the device-install check (.ci/device_check). Runs in the training install."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import TINY_CONFIG, build_tiny_export  # noqa: E402


def main(root: Path) -> None:
    import json

    import open_clip
    import torch

    root.mkdir(parents=True, exist_ok=True)
    config = root / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(1234)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), root / "tiny-clip.pt")
    build_tiny_export(root, (config, root / "tiny-clip.pt"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
