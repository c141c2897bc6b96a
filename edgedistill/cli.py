"""The ``edgedistill`` command line (typer).

A user error (bad recipe, missing file, bad manifest, too many unreadable images) ends with one line
``error: ...`` naming the problem and the fix, and exit status 2; ``--debug`` (anywhere on the line) also
prints the traceback.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgedistill import __version__
from edgedistill.errors import UserError

app = typer.Typer(
    name="edgedistill",
    help="Distill a large open_clip model into an edge-ready student, export it, benchmark it on the target.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

RECIPE_ARG = typer.Argument(..., help="Recipe YAML (see recipes/).", show_default=False)
OVERRIDES_ARG = typer.Argument(None, help="Recipe overrides, key.sub=value (e.g. data.batch_size=32).",
                               show_default=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgedistill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="On an error, also show the full traceback."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """Distill a large open_clip model into an edge-ready student, export it, benchmark it on the target."""


@app.command()
def check(recipe: Path = RECIPE_ARG, overrides: Optional[list[str]] = OVERRIDES_ARG) -> None:
    """Validate a recipe and its manifests, and print the resolved recipe (every default filled in).

    Examples:

    * `edgedistill check recipes/clip_to_mobilenet.yaml`
    * `edgedistill check recipes/clip_to_mobilenet.yaml train.epochs=3 data.batch_size=32`
    """
    from edgedistill.cache import load_split_manifests
    from edgedistill.recipe import load_recipe, recipe_to_yaml

    resolved = load_recipe(recipe, overrides or [])
    manifests = load_split_manifests(resolved)
    typer.echo(recipe_to_yaml(resolved), nl=False)
    err = Console(stderr=True)
    for name, m in manifests.items():
        err.print(f"{name}: {len(m)} images, {m.n_captions} captions ({m.path})", highlight=False)


@app.command()
def cache(
    recipe: Path = RECIPE_ARG,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
    rebuild: bool = typer.Option(False, "--rebuild", help="Recompute even when a valid cache exists."),
) -> None:
    """Compute the teacher's image and text embeddings for train and val once, and keep them.

    The cache is keyed by teacher identity, preprocessing and manifest content; an interrupted build
    continues where it stopped; a second run computes nothing. `distill` starts with the same step.

    Examples:

    * `edgedistill cache recipes/clip_to_mobilenet.yaml`
    * `edgedistill cache recipes/clip_to_mobilenet.yaml cache.dir=/data/cache data.workers=8`
    """
    from edgedistill.cache import caches_for_recipe, load_split_manifests
    from edgedistill.recipe import load_recipe
    from edgedistill.teachers import load_teacher

    console = Console(stderr=True)
    resolved = load_recipe(recipe, overrides or [])
    manifests = load_split_manifests(resolved)
    with console.status(f"loading teacher {resolved.teacher.model} ({resolved.teacher.pretrained})"):
        teacher = load_teacher(resolved.teacher, resolved.device, seed=resolved.seed)
    console.print(f"teacher {teacher.source.model_name} ({teacher.source.weights[:40]}) on {teacher.device}, "
                  f"embedding width {teacher.embed_dim}", highlight=False)
    results = caches_for_recipe(resolved, teacher, manifests, console=console, rebuild=rebuild)
    table = Table(title="teacher feature cache")
    for col in ("split", "images", "unreadable", "captions", "status", "seconds"):
        table.add_column(col)
    table.add_column("path", overflow="fold")
    for name, r in results.items():
        table.add_row(name, str(r.cache.n_images), str(len(r.cache.bad_images)), str(r.cache.n_texts),
                      "reused" if r.hit else "built", f"{r.seconds:.1f}", str(r.cache.path))
    Console().print(table)


INTERRUPTED = "interrupted; run the same command again to continue where it stopped\n"


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the CLI and turn user errors into one line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]  # accepted anywhere on the line, not only before the command
    try:
        app(args=args, prog_name="edgedistill")  # typer handles --help and usage errors (exit 2) itself
        return 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 130:  # typer turns Ctrl-C into exit 130
            sys.stderr.write(INTERRUPTED)
        return code
    except UserError as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(INTERRUPTED)
        return 130


if __name__ == "__main__":
    sys.exit(main())
