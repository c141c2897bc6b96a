"""The README and the shipped recipes stay true to the code."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from edgedistill.recipe import Recipe, _unwrap_model, load_recipe

ROOT = Path(__file__).resolve().parent.parent


def key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = _unwrap_model(field.annotation)
        out += key_paths(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


def test_readme_documents_every_recipe_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in key_paths(Recipe) if f"`{k}`" not in readme]
    assert not missing, f"README.md lacks recipe keys: {missing}"


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    r = load_recipe(recipe)
    assert r.name == recipe.stem


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = 'pip install -e ".[cpu,dev]" && pytest'
    assert command in readme and command in ci


def test_readme_documents_every_loss_term_and_balancer_with_its_options():
    from edgedistill.balance import BALANCERS
    from edgedistill.losses import LOSSES, _load_builtin_terms
    _load_builtin_terms()
    readme = (ROOT / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in readme.splitlines() if line.startswith("| `")}
    for registry in (LOSSES, BALANCERS):
        for name, cls in registry.items():
            assert f"`{name}`" in rows, f"README.md has no table row for {name}"
            options = [k for k in cls.Options.model_fields if k not in ("name", "weight")]
            for option in options:
                assert f"`{option}`" in rows[f"`{name}`"], f"README.md row of {name} lacks option {option}"
