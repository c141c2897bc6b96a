"""The README, docs/ and the shipped recipes stay true to the code; the code cites only docs in the repository."""

import ast
import io
import re
import tokenize
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from edgedistill.distill.recipe import Recipe, _unwrap_model, load_recipe

ROOT = Path(__file__).resolve().parent.parent


def key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = _unwrap_model(field.annotation)
        out += key_paths(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


def test_recipes_md_documents_every_recipe_key():
    recipes = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    missing = [k for k in key_paths(Recipe) if f"`{k}`" not in recipes]
    assert not missing, f"docs/recipes.md lacks recipe keys: {missing}"


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    r = load_recipe(recipe)
    assert r.name == recipe.stem


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = 'pip install -e ".[train,cpu,dev]" && pytest -n auto'
    assert command in readme and command in ci
    # one session runs every test, the slow ones included: no marker is left out by default
    addopts = re.search(r"^addopts = (.*)$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert addopts and " -m " not in f" {addopts.group(1).strip(chr(34))} " and "-m slow" not in ci


def test_the_long_test_files_that_run_first_exist(request):
    """tests/conftest.py starts the long files first (the order CI's workers take them in): a renamed one would
    silently fall back to name order."""
    from tests.conftest import LONG_FILES
    assert LONG_FILES and all((ROOT / "tests" / name).is_file() for name in LONG_FILES)
    ran = [item.path.name for item in request.session.items]
    listed = [n for n in dict.fromkeys(ran) if n in LONG_FILES]
    assert listed == [n for n in LONG_FILES if n in ran]  # in that order, before any other file
    assert all(n in LONG_FILES for n in dict.fromkeys(ran[:ran.index(listed[-1]) + 1])) if listed else True


def test_recipes_md_documents_every_loss_term_and_balancer_with_its_options():
    from edgedistill.distill.balance import BALANCERS
    from edgedistill.distill.losses import LOSSES
    recipes = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line for line in recipes.splitlines() if line.startswith("| `")}
    for registry in (LOSSES, BALANCERS):
        for name, cls in registry.items():
            assert f"`{name}`" in rows, f"docs/recipes.md has no table row for {name}"
            options = [k for k in cls.Options.model_fields if k not in ("name", "weight")]
            for option in options:
                assert f"`{option}`" in rows[f"`{name}`"], f"docs/recipes.md row of {name} lacks option {option}"


def cli_commands() -> dict[str, Any]:
    """{"embed": click command, "data scenes": ..., ...}: every command the CLI registers."""
    import typer.main

    from edgedistill.cli import app
    out = {}

    def walk(command: Any, prefix: list[str]) -> None:
        if hasattr(command, "commands"):  # a group: typer vendors click, so no isinstance check
            for name, sub in command.commands.items():
                walk(sub, prefix + [name])
        else:
            out[" ".join(prefix)] = command

    walk(typer.main.get_command(app), [])
    return out


def test_cli_md_documents_every_command_and_option():
    cli = (DOCS / "cli.md").read_text(encoding="utf-8")
    commands = cli_commands()
    assert {"distill", "export", "bench", "embed", "search", "classify", "data scenes"} <= set(commands)
    table = section(cli, "commands")
    problems = []
    for name, command in commands.items():
        if f"| `edgedistill {name}" not in table:
            problems.append(f"the Commands table has no row for edgedistill {name}")
        options = section(cli, github_anchor(f"`edgedistill {name}`"))
        for param in command.params:
            names = [param.name.upper()] if param.param_type_name == "argument" else param.opts + param.secondary_opts
            problems += [f"edgedistill {name}: {n} is not documented" for n in names if f"`{n}`" not in options]
    assert not problems, "docs/cli.md is behind the CLI:\n" + "\n".join(problems)


README_LIMIT = 15_000  # bytes: the README is the front door; reference material lives in docs/


def test_readme_is_short_and_opens_with_its_contents():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= README_LIMIT, f"README.md is {len(readme.encode())} bytes: move detail to docs/"
    top = [a for level, a, _ in headings(readme) if level == 2]
    before_the_first_section = readme.split("\n## ", 1)[0]
    assert "**Contents**" in before_the_first_section, "the README opens with its table of contents"
    contents = before_the_first_section.split("**Contents**", 1)[1]
    assert re.findall(r"\]\(#([\w-]+)\)", contents) == top, "the contents must list every section, in order"
    assert top[:5] == ["what-it-is", "set-up", "distill-export-bench", "using-the-student", "results"]
    assert "--index-url https://download.pytorch.org/whl/cpu" in section(readme, "set-up")


# ------------------------------------------------------------------------------------ docs/ and what cites it

DOCS = ROOT / "docs"

# A docstring or comment must not send the reader to a file or label outside the repository: the methods and
# design notes the project started from (METHODS.md, DESIGN.md, "DESIGN decision N"), issue numbers, ../shared/.
# They cite docs/methods.md and docs/design.md by section instead.
OUTSIDE_REFERENCE = re.compile(r"METHODS\.md|DESIGN\.md|\bDESIGN decision|\bMETHODS [A-C]\b|(?i:\bissues? #?\d+)"
                               r"|\.\./shared/|(?<![\w/.-])shared/")

# Lines still allowed to cite outside files (file, substring of the line): none. An entry that no longer matches
# fails the test, so the list cannot go stale.
ALLOWED_OUTSIDE_REFERENCES: list[tuple[str, str]] = []


def comment_and_docstring_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every comment and every docstring or bare string statement line of a Python file."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out += [(n, lines[n - 1]) for n in range(node.lineno, node.end_lineno + 1)]
    return out


def outside_references(roots: list[Path]) -> list[tuple[str, int, str]]:
    """(file relative to the repository, line, text) of every comment or docstring line citing an outside file.

    Python: comments and docstrings. YAML (package data such as export targets): comment lines.
    """
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix == ".py":
                lines = comment_and_docstring_lines(path)
            elif path.suffix in (".yaml", ".yml"):
                lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                         if "#" in line]
            else:
                continue
            rel = path.relative_to(ROOT).as_posix()
            found += [(rel, n, text.strip()) for n, text in lines if OUTSIDE_REFERENCE.search(text)]
    return found


def test_the_outside_reference_pattern_catches_what_it_should():
    for text in ["see METHODS.md A", "(DESIGN decision 3)", "DESIGN.md", "(issue 6: classification)",
                 "Issue 14 asks", "copied from ../shared/fixtures/", "shared/fixtures/jetson"]:
        assert OUTSIDE_REFERENCE.search(text), text
    for text in ["docs/methods.md#feature", "docs/design.md#registries", "the last shared layer", "a design choice",
                 "/shared/edgedistill-cache", "the issue target"]:
        assert not OUTSIDE_REFERENCE.search(text), text


def test_code_cites_no_document_outside_the_repository():
    found = outside_references([ROOT / "edgedistill", ROOT / "benchmarks"])
    allowed = [f for f in found if any(f[0] == file and sub in f[2] for file, sub in ALLOWED_OUTSIDE_REFERENCES)]
    offending = [f"{file}:{n}: {text}" for file, n, text in found if (file, n, text) not in allowed]
    assert not offending, ("cite docs/methods.md or docs/design.md sections instead of files outside the "
                           "repository:\n" + "\n".join(offending))
    stale = [(file, sub) for file, sub in ALLOWED_OUTSIDE_REFERENCES
             if not any(f[0] == file and sub in f[2] for f in found)]
    assert not stale, f"remove these entries from ALLOWED_OUTSIDE_REFERENCES (fixed): {stale}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading's text: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(markdown: str) -> list[tuple[int, str, int]]:
    """(level, anchor, line index) of every heading outside code fences; repeated anchors get -1, -2, ..."""
    out, seen, fenced = [], {}, False
    for i, line in enumerate(markdown.splitlines()):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            base = github_anchor(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.append((len(m.group(1)), base if n == 0 else f"{base}-{n}", i))
    return out


def anchors(path: Path) -> set[str]:
    return {anchor for _, anchor, _ in headings(path.read_text(encoding="utf-8"))}


def test_github_anchor_rules():
    assert github_anchor("hard_negative") == "hard_negative"
    assert github_anchor("Precision in the ONNX graph") == "precision-in-the-onnx-graph"
    assert github_anchor("`vl_align`") == "vl_align"
    assert github_anchor("Tip-Adapter") == "tip-adapter"
    assert github_anchor("Recall@K (the standard protocol)") == "recallk-the-standard-protocol"
    assert [a for _, a, _ in headings("# A\n```\n# not a heading\n```\n## A\n### b")] == ["a", "a-1", "b"]


CITATION = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
MARKDOWN_LINK = re.compile(r"\]\((?!https?://)([\w./-]*\.md)?(?:#([\w-]+))?\)")


def cited_doc_anchors() -> list[tuple[str, Path, str | None]]:
    """(where, doc path, anchor or None) of every docs/ citation in the code, benchmarks and README, and of every
    Markdown link in docs/ and the README (its own sections included)."""
    cites = []
    sources = [p for root in (ROOT / "edgedistill", ROOT / "benchmarks") for p in sorted(root.rglob("*"))
               if p.suffix in (".py", ".yaml", ".yml", ".md", ".txt", ".sh")] + [ROOT / "README.md"]
    for path in sources:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in CITATION.finditer(line):
                cites.append((f"{path.relative_to(ROOT)}:{n}", DOCS / m.group(1), m.group(2)))
    for path in sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in MARKDOWN_LINK.finditer(line):
                if m.group(1) is None and m.group(2) is None:
                    continue
                target = (path.parent / m.group(1)).resolve() if m.group(1) else path
                cites.append((f"{path.relative_to(ROOT)}:{n}", target, m.group(2)))
    return cites


def missing_citations(cites: list[tuple[str, Path, str | None]]) -> list[str]:
    bad = []
    for where, doc, anchor in cites:
        if not doc.is_file():
            bad.append(f"{where}: {doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc} does not exist")
        elif anchor is not None and doc.suffix == ".md" and anchor not in anchors(doc):
            bad.append(f"{where}: {doc.name} has no heading with the anchor #{anchor}")
    return bad


def test_every_cited_doc_and_anchor_exists():
    cites = cited_doc_anchors()
    assert any(anchor for _, _, anchor in cites), "no docs/<file>.md#anchor citation found: the scan is broken"
    bad = missing_citations(cites)
    assert not bad, "\n".join(bad)


def test_a_citation_of_a_missing_anchor_or_doc_is_caught():
    assert missing_citations([("x", DOCS / "methods.md", "feature")]) == []
    assert missing_citations([("x", DOCS / "methods.md", "no-such-section")])
    assert missing_citations([("x", DOCS / "no_such_doc.md", None)])


def section(markdown: str, anchor: str) -> str:
    """The text under the heading with ``anchor`` up to the next heading of the same or a higher level."""
    lines = markdown.splitlines()
    hs = headings(markdown)
    for k, (level, a, i) in enumerate(hs):
        if a == anchor:
            end = next((j for lv, _, j in hs[k + 1:] if lv <= level), len(lines))
            return "\n".join(lines[i + 1:end])
    raise AssertionError(f"no section #{anchor}")


OPTION_ROW = re.compile(r"^\|\s*`([\w.]+)`\s*\|\s*`([^`]*)`\s*\|", re.MULTILINE)


def documented_defaults(text: str) -> dict[str, Any]:
    """``| `option` | `default` | ...`` rows -> {option: default read as YAML (a number written 1e-8 too)}."""
    out = {}
    for name, raw in OPTION_ROW.findall(text):
        value = yaml.safe_load(raw)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out[name] = value
    return out


def model_defaults(model: type[BaseModel], skip: tuple[str, ...] = (), prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        default = field.get_default(call_default_factory=True)
        out[prefix + name] = default.as_posix() if isinstance(default, Path) else default
    return out


def test_methods_md_documents_every_component_with_its_options_and_defaults():
    from edgedistill.distill.balance import BALANCERS
    from edgedistill.distill.losses import LOSSES
    from edgedistill.distill.recipe import DataConfig, EvalConfig, LayerwiseConfig
    from edgedistill.distill.select import SELECTORS
    methods = (DOCS / "methods.md").read_text(encoding="utf-8")
    problems = []

    def compare(anchor: str, expected: dict[str, Any]) -> None:
        documented = documented_defaults(section(methods, anchor))
        if documented != expected:
            problems.append(f"#{anchor}: documented {documented}, the code has {expected}")

    for registry in (LOSSES, BALANCERS, SELECTORS):
        for name, cls in registry.items():
            compare(name, model_defaults(cls.Options, skip=("name",)))
    compare("layerwise-distillation", model_defaults(LayerwiseConfig))
    ood = {**model_defaults(DataConfig, prefix="data."), **model_defaults(EvalConfig, prefix="eval.")}
    compare("out-of-distribution-tools", {k: v for k, v in ood.items() if k in (
        "data.class_descriptions", "data.description_prompt", "data.ood_val", "eval.prompt", "eval.few_shot",
        "eval.few_shot_repeats", "eval.tip_alpha", "eval.tip_beta")})
    assert not problems, "\n".join(problems)


def test_documented_defaults_are_read_as_the_code_writes_them():
    text = "| `a` | `0.07` | x |\n| `b` | `[image, text]` | y |\n| `c` | `null` | z |\n| `d` | `1e-8` | w |"
    assert documented_defaults(text) == {"a": 0.07, "b": ["image", "text"], "c": None, "d": 1e-8}


def test_the_recipe_defaults_of_terms_and_balancer_are_the_documented_ones():
    """docs/recipes.md's recipe table and docs/methods.md name the code's default terms and balancer (a switch of
    the defaults in edgedistill/distill/recipe.py fails here until the docs follow)."""
    from edgedistill.distill.recipe import DEFAULT_BALANCER, DEFAULT_TERMS
    terms, balancer = f"`[{', '.join(DEFAULT_TERMS)}]`", f"`{DEFAULT_BALANCER}`"
    recipes = (DOCS / "recipes.md").read_text(encoding="utf-8")
    assert f"| `loss.terms` | {terms} |" in recipes
    assert f"| `loss.balancer` | {balancer} |" in recipes
    methods = (DOCS / "methods.md").read_text(encoding="utf-8")
    assert f"The default is {terms}" in section(methods, "loss-terms")
    assert f"The default is {balancer}" in section(methods, "balancers")
    shipped = load_recipe(ROOT / "recipes" / "clip_to_mobilenet.yaml")  # the flagship recipe follows the defaults
    assert list(shipped.loss.terms) == DEFAULT_TERMS and shipped.loss.balancer.name == DEFAULT_BALANCER
