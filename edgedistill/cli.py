"""The ``edgedistill`` command line (typer).

A user error (bad recipe, missing file, bad manifest, too many unreadable images) ends with one line
``error: ...`` naming the problem and the fix, and exit status 2; ``--debug`` (anywhere on the line) also
prints the traceback. Each command imports its own stack when it runs (torch, onnx, open_clip...), so
``--help`` and the light commands start at once.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from edgedistill import __version__
from edgedistill.core.errors import UserError
from edgedistill.core.terminal import make_console, safe, warn

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
    # deferred: the command's own stack loads when it runs
    from edgedistill.distill.cache import load_split_manifests
    from edgedistill.evaluation.split import read_class_descriptions
    from edgedistill.distill.recipe import load_recipe, recipe_to_yaml
    from edgedistill.distill.students import check_vision_tower
    from edgedistill.distill.teachers import check_teacher
    from edgedistill.distill.train import check_ood_classes

    resolved = load_recipe(recipe, overrides or [])
    check_teacher(resolved.teacher, seed=resolved.seed)  # the model config builds, the checkpoint fits it
    check_vision_tower(resolved.student.vision, resolved.student.image_size)
    manifests = load_split_manifests(resolved)
    check_ood_classes(manifests)
    if resolved.data.class_descriptions is not None:
        read_class_descriptions(resolved.data.class_descriptions)
    typer.echo(recipe_to_yaml(resolved), nl=False)
    err = make_console(stderr=True, soft_wrap=True)
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
    # deferred: the command's own stack loads when it runs
    from edgedistill.distill.cache import caches_for_recipe, load_split_manifests
    from edgedistill.distill.recipe import load_recipe
    from edgedistill.distill.teachers import load_teacher

    console = make_console(stderr=True, soft_wrap=True)
    resolved = load_recipe(recipe, overrides or [])
    manifests = load_split_manifests(resolved)
    with console.status(f"loading teacher {resolved.teacher.model} ({resolved.teacher.pretrained})"):
        teacher = load_teacher(resolved.teacher, resolved.device, seed=resolved.seed)
    console.print(f"teacher {teacher.source.model_name} ({teacher.source.weights[:40]}) on {teacher.device}, "
                  f"embedding width {teacher.embed_dim}", highlight=False)
    results = caches_for_recipe(resolved, teacher, manifests, console=console, rebuild=rebuild)
    out = make_console()
    out.print(_cache_table(results))
    for name, r in results.items():  # paths under the table: a column of them would fold at 80 columns
        out.print(f"{safe(name)}: {safe(r.cache.path)}", highlight=False, soft_wrap=True)


def _cache_table(results: dict) -> Table:
    """`cache`'s table: one row per split, numbers never wrapped (the paths are printed under it)."""
    table = Table(title="teacher feature cache", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for col in ("split", "images", "unreadable", "captions", "status", "seconds"):
        table.add_column(col, justify="left" if col in ("split", "status") else "right", no_wrap=col != "split",
                         overflow="fold")
    for name, r in results.items():
        table.add_row(safe(name), str(r.cache.n_images), str(len(r.cache.bad_images)), str(r.cache.n_texts),
                      "reused" if r.hit else "built", f"{r.seconds:.1f}")
    return table


@app.command()
def distill(
    recipe: Path = RECIPE_ARG,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the recipe's out directory from "
                                                       "checkpoints/last.pt, exactly where it stopped."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train with N processes on this machine (one per GPU; "
                                                        "gloo on CPU) through torchrun; data.batch_size stays the "
                                                        "global batch."),
) -> None:
    """Train a compact student against the frozen teacher.

    Builds (or reuses) the teacher feature cache, trains the student with the recipe's loss terms and balancer,
    evaluates on val, and writes into `out`: recipe.yaml, checkpoints/, student/ (an open_clip model),
    metrics.jsonl, tensorboard/ and summary.json.

    Examples:

    * `edgedistill distill recipes/clip_to_mobilenet.yaml`
    * `edgedistill distill recipes/clip_to_mobilenet.yaml train.epochs=3 student.vision=resnet18`
    * `edgedistill distill recipes/clip_to_mobilenet.yaml --resume`
    * `edgedistill distill recipes/clip_to_mobilenet.yaml --nproc 8` (or `torchrun --nproc_per_node 8 -m
      edgedistill distill recipes/clip_to_mobilenet.yaml`)
    """
    # deferred: the command's own stack loads when it runs
    from edgedistill.distill.recipe import load_recipe
    from edgedistill.distill.train import distill as run_distill

    console = make_console(stderr=True, soft_wrap=True)
    resolved = load_recipe(recipe, overrides or [])
    if nproc > 1:
        from edgedistill.distill.distributed import launch_distill  # deferred: only --nproc needs the launcher
        raise typer.Exit(launch_distill(resolved, nproc, [str(recipe), *(overrides or [])], resume))
    summary = run_distill(resolved, console=console, resume=resume)
    if summary is not None:  # None on the other ranks of a distributed run: rank 0 reports
        _print_summary(summary, Path(resolved.out))


METRIC_LABELS = {"i2t_r1": "image->text R@1", "i2t_r5": "image->text R@5", "i2t_r10": "image->text R@10",
                 "t2i_r1": "text->image R@1", "t2i_r5": "text->image R@5", "t2i_r10": "text->image R@10",
                 "rsum": "RSUM", "zs_mean_class": "zero-shot (mean per class)", "zs_top1": "zero-shot top-1",
                 "agreement_top1": "top-1 agreement with teacher", "cosine_to_teacher": "cosine to teacher"}


def _print_summary(summary: dict, out: Path, trained: bool = True) -> None:
    """One row per metric, a column per model: fits any terminal width (numbers never wrap; a metric's name
    folds first)."""
    models = {k: v for k, v in (("teacher", summary.get("teacher")), ("student", summary.get("student"))) if v}
    console = make_console()
    if models:
        table = Table(title=f"val ({summary.get('val_images', 0)} images; recall in %)", box=box.SIMPLE_HEAD,
                      pad_edge=False)
        table.add_column("metric", overflow="fold")
        for name in models:
            table.add_column(name, justify="right", no_wrap=True)
        for key, label in METRIC_LABELS.items():
            if any(key in m for m in models.values()):
                table.add_row(label, *["-" if key not in m else f"{m[key]:.3f}" if key == "cosine_to_teacher"
                                       else f"{m[key]:.1f}" for m in models.values()])
        console.print(table)
    retention = (summary.get("retention") or {}).get("rsum")
    parts = [f"RSUM retention {retention:.1%}"] if retention is not None else []
    if trained:
        parts.insert(0, f"{summary['steps']} steps, {summary['train_images_per_s']:.1f} training images/s")
    console.print("; ".join(parts + [f"student in {safe(out / 'student')}"]), highlight=False)


@app.command("eval")
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory written by `distill`.", show_default=False),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Re-evaluate a run's saved student on its recipe's val split, next to the teacher; writes eval.json.

    The student is loaded from RUN_DIR/student exactly as a user would load it (open_clip, local-dir) and
    embeds captions with its own text tower.

    Examples:

    * `edgedistill eval runs/clip_to_mobilenet`
    * `edgedistill eval runs/clip_to_mobilenet --device cpu`
    """
    # deferred: the command's own stack loads when it runs
    from edgedistill.distill.evaluate import run_eval

    console = make_console(stderr=True, soft_wrap=True)
    result = run_eval(run_dir, device, console)
    _print_summary(result, run_dir, trained=False)
    console.print(f"written to {run_dir / 'eval.json'}", highlight=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder (a previous demo there is replaced)."),
    quick: bool = typer.Option(False, "--quick", help="A two-minute version (3k scenes, tiny teacher) for the tests."),
) -> None:
    """The whole job offline on built-in data: scenes -> teacher -> distill -> ONNX FP32/INT8 -> table.

    Generates procedural scenes, trains a small open_clip teacher on them (once per machine, then reused from
    the cache), distills a MobileNetV3 student from it, exports ONNX FP32 and calibrated INT8, and prints
    teacher vs student retrieval and CPU latency. About 10 minutes on 2 CPU cores the first time.

    Examples:

    * `edgedistill demo`
    * `edgedistill demo --quick --out /tmp/demo`
    """
    # deferred: the command's own stack loads when it runs
    from edgedistill.demo import print_report, run_demo

    console = make_console(stderr=True, soft_wrap=True)
    report = run_demo(out, quick=quick, console=console)
    print_report(report)
    retention = report.get("retention_rsum")
    console.print(f"{'student RSUM retention ' + format(retention, '.1%') + '; ' if retention else ''}"
                  f"{report['seconds']:.0f} s in all. Report: {out / 'demo.md'}, run: {out}, export: "
                  f"{out / 'export' / 'export.json'}, bench: {report['bench']['md']}, plot: {report['bench']['plot']}, "
                  f"search: {out / 'search.png'}",
                  highlight=False)


data_app = typer.Typer(help="Datasets: generate the procedural scenes data (offline, exact ground truth).",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("scenes")
def data_scenes(
    out: Path = typer.Option(..., "--out", help="Folder to write (reused when it holds the same settings)."),
    n: int = typer.Option(50000, "--n", help="Training images."),
    seed: int = typer.Option(0, "--seed", help="Seed; each scene comes from (seed, split, index)."),
    size: int = typer.Option(64, "--size", help="Image side in pixels (32-512)."),
    n_val: int = typer.Option(1000, "--n-val", help="Held-out iid val images."),
    n_hard: int = typer.Option(500, "--n-hard", help="Twin pairs differing by one edit (hard split)."),
    n_ood: int = typer.Option(500, "--n-ood", help="Twin pairs with colour-shape combinations never trained on."),
    captioned: Optional[int] = typer.Option(None, "--captioned",
                                            help="Keep captions only on the first N training images."),
    workers: int = typer.Option(0, "--workers", help="Rendering processes (same bytes for any count)."),
) -> None:
    """Write a scenes dataset: JPEGs and JSON Lines manifests (train, val, hard, ood) any recipe can use.

    One to three coloured shapes a scene, captions naming every object's size, colour, shape and position;
    `hard` and `ood` hold twins that differ by one edit (colour, shape, size, position, count, bind,
    swap-position), listed in `hard_twins.json` / `ood_twins.json`.

    Examples:

    * `edgedistill data scenes --out data/scenes --n 50000 --seed 0`
    * `edgedistill data scenes --out data/scenes-transfer --n 50000 --captioned 2000`
    """
    # deferred: the command's own stack loads when it runs
    from edgedistill.data.scenes import write_scenes

    console = make_console(stderr=True, soft_wrap=True)
    info = write_scenes(out, n, seed=seed, size=size, n_val=n_val, n_hard=n_hard, n_ood=n_ood, captioned=captioned,
                        workers=workers, progress=console)
    counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
    console.print(f"{'reused' if info['reused'] else 'wrote'} {out}: {counts}", highlight=False)


teacher_app = typer.Typer(help="Teachers: train a small open_clip CLIP on local data (offline).",
                          no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("pretrain")
def teacher_pretrain(
    data: Path = typer.Option(..., "--data", help="Dataset folder with train.jsonl (and val.jsonl for Recall@K)."),
    preset: str = typer.Option("small", "--preset", help="tiny (CI), small (the demo) or base (benchmarks)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default: the preset's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also copy the config JSON and checkpoint here."),
) -> None:
    """Train an open_clip CLIP (ViT + text transformer, ClipLoss) on a dataset and save it in open_clip's format.

    Trained once per settings and data, then reused from the cache. The result is an ordinary local teacher:
    `teacher.model: OUT/<name>.json`, `teacher.pretrained: OUT/<name>.pt`.

    Examples:

    * `edgedistill teacher pretrain --data data/scenes --preset base --out data/scenes-teacher`
    """
    # deferred: the command's own stack loads when it runs
    from edgedistill.distill.pretrain import pretrain_config, pretrain_teacher

    import edgedistill.core.atomic as atomic

    console = make_console(stderr=True, soft_wrap=True)
    if out is not None:
        atomic.writable_dir(out, "--out")
    train = data / "train.jsonl"
    if not train.is_file():
        raise UserError(f"{data} has no train.jsonl; give a dataset folder (e.g. one `edgedistill data scenes` "
                        "wrote)")
    val = data / "val.jsonl"
    cfg = pretrain_config(preset, **({"steps": steps} if steps is not None else {}))
    result = pretrain_teacher(train, val if val.is_file() else None, cfg, console=console)
    config_json, checkpoint = result.config_json, result.checkpoint
    if out is not None:
        for src in (result.config_json, result.checkpoint):
            atomic.write_bytes(out / src.name, src.read_bytes())
        config_json, checkpoint = out / result.config_json.name, out / result.checkpoint.name
    metrics = ", ".join(f"{k} {v:.1f}" for k, v in result.metrics.items() if k in ("i2t_r1", "t2i_r1", "rsum"))
    console.print(f"{'reused' if result.reused else 'trained'} {result.folder}"
                  f"{'; held-out ' + metrics if metrics else ''}", highlight=False)
    typer.echo(f"teacher:\n  model: {config_json}\n  pretrained: {checkpoint}")


@app.command()
def export(
    run_dir: Optional[Path] = typer.Argument(None, help="A run directory (default: the latest run under runs/).",
                                             show_default=False),
    fmt: str = typer.Option("onnx", "--format", help="onnx, trt (TensorRT engine) or torchtrt (Torch-TensorRT)."),
    fp16: bool = typer.Option(False, "--fp16", help="Also a float16 graph (float32 inputs and outputs)."),
    int8: bool = typer.Option(False, "--int8", help="Also a calibrated INT8 QDQ graph of the image encoder."),
    calib_method: Optional[str] = typer.Option(None, "--calib-method",
                                               help="INT8 calibration: entropy (default), minmax or percentile."),
    calib_size: Optional[int] = typer.Option(None, "--calib-size",
                                             help="Training images to calibrate INT8 on (default 512)."),
    target: Optional[str] = typer.Option(None, "--target", help="Deployment preset (jetson-orin-nano, "
                                         "jetson-agx-orin, x86-cuda, cpu) or a target YAML."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default RUN_DIR/export)."),
    text_embeddings: Optional[Path] = typer.Option(None, "--text-embeddings",
                                                   help="Prompts file (one a line): also save their embeddings."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for export and checks."),
) -> None:
    """Export the distilled student: ONNX fp32 (+ fp16, calibrated INT8), TensorRT engines or Torch-TensorRT.

    Both encoders are exported (the text encoder is the teacher's when the student shares it). Every
    artifact is checked against PyTorch on the recipe's val images (cosine >= 0.9999 fp32, 0.999 fp16) before
    it gets its name; `export.json` lists each artifact's sha256, size, parity and val metrics.

    Examples:

    * `edgedistill export runs/clip_to_mobilenet --int8`
    * `edgedistill export --format trt --int8 --target jetson-orin-nano`
    * `edgedistill export --text-embeddings classes.txt`
    """
    # deferred: the command's own stack loads when it runs
    from edgedistill.export.exporter import ExportOptions, run_export

    console = make_console(stderr=True, soft_wrap=True)
    doc = run_export(ExportOptions(run_dir=run_dir, format=fmt, fp16=fp16, int8=int8, calib_method=calib_method,
                                   calib_size=calib_size, target=target, out=out, text_embeddings=text_embeddings,
                                   threads=threads), console)
    make_console().print(_export_table(doc))
    console.print(f"written to {safe(Path(doc['out']) / 'export.json')}", highlight=False)


def _export_table(doc: dict) -> Table:
    """`export`'s table: one row per artifact in about 75 columns (numbers never wrap; a long path folds)."""
    table = Table(title=f"export ({doc['val']['images']} val images; recall in %)", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 1, 0, 0))
    for col in ("artifact", "format", "prec", "MB", "cosine", "i2t R@1", "t2i R@1", "RSUM"):
        table.add_column(col, justify="left" if col in ("artifact", "format", "prec") else "right",
                         no_wrap=col != "artifact", overflow="fold")
    for e in doc["artifacts"]:
        val = e.get("val") or {}
        parity = e.get("parity") or {}
        table.add_row(safe(e["path"]), e["format"], e["precision"], f"{e['size_mb']:.1f}",
                      f"{parity['cosine_mean']:.5f}" if parity else "-",
                      *[f"{val[k]:.1f}" if k in val else "-" for k in ("i2t_r1", "t2i_r1", "rsum")])
    return table


MODEL_OPTION = typer.Option(..., "--model", help="The student: an export folder, one artifact, a run folder or its "
                             "student/ folder (see edgedistill.load).", show_default=False)
DEVICE_OPTION = typer.Option("auto", "--device", help="auto, cpu, cuda or jetson.")
BACKEND_OPTION = typer.Option("auto", "--backend", help="auto (the fastest here) or a backend name, e.g. "
                              "onnxruntime-cpu, tensorrt, pytorch-cpu.")
PRECISION_OPTION = typer.Option(None, "--precision", help="fp32, fp16 or int8 (default: the fastest here).")
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document instead of the table (docs/outputs.md).")
CSV_OPTION = typer.Option(False, "--csv", help="Print CSV instead of the table: a header row, then one row per "
                          "result (docs/outputs.md).")


@app.command()
def embed(
    source: Path = typer.Argument(..., help="A folder of images (recursive), a manifest (.jsonl, .csv) or webdataset "
                                  "shards.", show_default=False),
    model: Path = MODEL_OPTION,
    out: Optional[Path] = typer.Option(None, "--out", help="Index folder (default: SOURCE's name + .index here)."),
    batch: int = typer.Option(64, "--batch", help="Images per inference call."),
    device: str = DEVICE_OPTION,
    backend: str = BACKEND_OPTION,
    precision: Optional[str] = PRECISION_OPTION,
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads of the runtime."),
    max_bad_fraction: float = typer.Option(0.05, "--max-bad-fraction", help="Stop when more than this share of "
                                           "the images cannot be read."),
    spin: bool = typer.Option(False, "--spin/--no-spin", help="Let onnxruntime's pool threads spin between "
                              "batches (off by default: they would compete with image decoding for the cores)."),
    decode: str = typer.Option("reduced", "--decode", help="reduced (faster: large JPEGs decoded at a reduced "
                               "scale) or exact (open_clip's own full-size decode)."),
    exif: bool = typer.Option(True, "--exif/--no-exif", help="Turn photos upright by their EXIF orientation (phone "
                              "photos are often stored sideways)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Embed every image again, also into an index made by "
                                 "another model or with other decode settings."),
) -> None:
    """Embed every image of SOURCE with a student into an index for `edgedistill search`.

    Into an existing index, only new or changed images are embedded and deleted ones dropped; the index is replaced
    as one unit. Resumable (run the same command again after an interruption); unreadable images are skipped,
    counted and named at the end.

    Examples:

    * `edgedistill embed photos/ --model runs/clip_to_mobilenet/export`
    * `edgedistill embed data/val.jsonl --model runs/clip_to_mobilenet/export --out val.index --precision int8`
    """
    # deferred: the command's own stack loads when it runs
    from edgedistill.runtime.loader import load
    from edgedistill.runtime.index import build_index, check_options, read_source, recorded_precision

    console = make_console(stderr=True, soft_wrap=True)
    check_options(batch, max_bad_fraction, decode)
    manifest = read_source(source)  # a bad source is found before the model loads
    out = out or Path(f"{Path(str(source).rstrip('/')).name.split('{')[0] or 'images'}.index")
    # measured (or cached) at embed's own batch: the artifact that is fastest for this job on this machine; an
    # update of an index keeps the precision it was embedded at, where that still loads
    kept = None if precision is not None or rebuild else recorded_precision(out)
    encoder = None
    if kept is not None:
        try:
            encoder = load(model, device=device, backend=backend, precision=kept, threads=threads, spin=spin,
                           batch=batch)
        except UserError:
            encoder = None  # not available here: choose afresh (build_index refuses a mismatch in one line)
    if encoder is None:
        encoder = load(model, device=device, backend=backend, precision=precision, threads=threads, spin=spin,
                       batch=batch)
    console.print(f"model {safe(encoder.info.image['artifact'])} on {encoder.info.image['backend']} "
                  f"({encoder.info.device}; chosen by {encoder.info.chosen_by})", highlight=False)
    doc = build_index(source, encoder, out, batch=batch, max_bad_fraction=max_bad_fraction, console=console,
                      manifest=manifest, decode=decode, exif=exif, rebuild=rebuild)
    done = doc.update
    console.print(f"{done['embedded']} embedded, {done['reused']} reused, {done['dropped']} dropped: {doc.count} "
                  f"images in {safe(out)}", highlight=False)


@app.command()
def search(
    index: Path = typer.Argument(..., help="An index folder made by `edgedistill embed`.", show_default=False),
    query: Optional[str] = typer.Argument(None, help="The text to search for.", show_default=False),
    k: int = typer.Option(10, "-k", "--top", min=1, help="How many hits."),
    image: Optional[Path] = typer.Option(None, "--image", help="Search with an image instead of text."),
    model: Optional[Path] = typer.Option(None, "--model", help="The model (default: the one that made the index)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write the hits as an HTML page."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write the hits as a PNG contact sheet."),
    device: str = DEVICE_OPTION,
    backend: str = BACKEND_OPTION,
    as_json: bool = JSON_OPTION,
    as_csv: bool = CSV_OPTION,
) -> None:
    """The images of an index closest to a text (or to an image): a table, and optionally a contact sheet.

    `--json` / `--csv` print the hits for a program instead of the table (docs/outputs.md).

    Examples:

    * `edgedistill search photos.index "a red car on a street" -k 5 --png hits.png`
    * `edgedistill search photos.index --image query.jpg --html hits.html`
    * `edgedistill search photos.index "a red car" --json | jq -r '.hits[].path'`
    """
    # deferred: the command's own stack loads when it runs
    import edgedistill.core.atomic as atomic
    from edgedistill.runtime.loader import load
    from edgedistill.runtime.index import check_same_model, load_like_index, open_index
    from edgedistill.runtime.sheets import Hit, html_sheet, png_sheet

    output = _output_format(as_json, as_csv)
    if (query is None) == (image is None):
        raise UserError("give a text query or --image (one of them)")
    for path, flag in ((html, "--html"), (png, "--png")):
        if path is not None:
            atomic.writable_file(path, flag)  # before the search, not after it
    idx = open_index(index)
    if model is None and backend == "auto" and image is not None:  # an image query: the artifact the index used
        encoder = load_like_index(idx, device)
    else:
        encoder = load(model or idx.doc.model.source, device=device, backend=backend)
    check_same_model(idx, encoder)
    vector = encoder.encode_text([query])[0] if query is not None else encoder.encode_image([str(image)])[0]
    hits = [Hit(rank + 1, s, idx.items[row]["path"], (idx.items[row].get("captions") or [None])[0])
            for rank, (row, s) in enumerate(idx.search(vector, k))]
    title = f"'{safe(query)}'" if query is not None else f"like {safe(image)}"
    if output == "json":
        _print_json({"query": {"text": query} if query is not None else {"image": str(image)}, "index": str(index),
                     "model": _model_json(encoder), "count": len(hits), "indexed": len(idx.items),
                     "hits": [{"rank": h.rank, "score": round(float(h.score), 6), "path": h.path,
                               "caption": h.caption} for h in hits]})
    elif output == "csv":
        _print_csv(("rank", "score", "path", "caption"),
                   [(h.rank, f"{h.score:.6f}", h.path, h.caption or "") for h in hits])
    else:
        table = Table(title=f"{title}: top {len(hits)} of {len(idx.items)}")
        for col in ("#", "score", "image", "caption"):
            table.add_column(col, overflow="fold")
        for h in hits:
            table.add_row(str(h.rank), f"{h.score:.4f}", safe(h.path), safe(h.caption or ""))
        _wide().print(table)
    err = make_console(stderr=True, soft_wrap=True)
    for path, write in ((html, html_sheet), (png, png_sheet)):
        if path is not None:
            write(hits, f"{title} in {safe(index)}", path)
            err.print(f"written to {safe(path)}", highlight=False)


@app.command()
def classify(
    images: list[Path] = typer.Argument(..., help="Image files or folders of images.", show_default=False),
    model: Path = MODEL_OPTION,
    labels: str = typer.Option(..., "--labels", help="Class names, comma-separated, or a text file with one a line.",
                               show_default=False),
    prompt: str = typer.Option("a photo of a {label}.", "--prompt", help="The class prompt; {label} is the name "
                               "(the one field; {{ and }} for literal braces)."),
    k: int = typer.Option(3, "-k", "--top", min=1, help="How many classes per image (as many as labels: all)."),
    decode: str = typer.Option("reduced", "--decode", help="reduced (faster: large JPEGs decoded at a reduced "
                               "scale) or exact (open_clip's own full-size decode), as for `embed`."),
    exif: bool = typer.Option(True, "--exif/--no-exif", help="Turn photos upright by their EXIF orientation (phone "
                              "photos are often stored sideways)."),
    device: str = DEVICE_OPTION,
    backend: str = BACKEND_OPTION,
    as_json: bool = JSON_OPTION,
    as_csv: bool = CSV_OPTION,
) -> None:
    """Zero-shot classification: the top classes of each image among the labels, with their probabilities.

    Images are decoded like `embed` decodes them; an unreadable image is named on stderr and skipped. `--json` /
    `--csv` print the classes for a program instead of the table (docs/outputs.md).

    Examples:

    * `edgedistill classify photo.jpg --model runs/clip_to_mobilenet/export --labels "cat,dog,car"`
    * `edgedistill classify photos/ --model export/ --labels classes.txt -k 1`
    * `edgedistill classify photos/ --model export/ --labels classes.txt -k 1 --csv > classes.csv`
    """
    # deferred: the command's own stack loads when it runs
    from edgedistill.data.manifest import load_folder
    from edgedistill.runtime.decode import DECODE_MODES, decoded_batches
    from edgedistill.runtime.encoder import check_prompt
    from edgedistill.runtime.loader import load

    output = _output_format(as_json, as_csv)
    if decode not in DECODE_MODES:
        raise UserError(f"--decode {safe(decode)}: give one of {', '.join(DECODE_MODES)}")
    names = _labels(labels)
    check_prompt(prompt)  # before the model loads
    files = [f for p in images for f in ([str(e.image) for e in load_folder(p).entries] if p.is_dir() else [str(p)])]
    for f in files:
        if not Path(f).is_file():
            raise UserError(f"{safe(f)} not found; give image files or folders of images")
    encoder = load(model, device=device, backend=backend)
    err = make_console(stderr=True, soft_wrap=True)
    top: dict[int, list[tuple[str, float]]] = {}  # position in files -> its k best (label, probability)
    skipped: list[tuple[str, str]] = []
    for positions, pixels, bad in decoded_batches(files, encoder.preprocess, CLASSIFY_BATCH, decode=decode,
                                                  exif=exif):
        for position, why in bad:
            warn(err, f"skipped image {files[position]}: {why}")
            skipped.append((files[position], why))
        top.update(zip(positions, encoder.zero_shot_pixels(pixels, names, prompt=prompt).top(k)))
    if not top:
        raise UserError(f"none of the {len(files)} images could be read (first: {safe(skipped[0][0])}: "
                        f"{safe(skipped[0][1])})")
    rows = [(files[i], top[i]) for i in sorted(top)]
    if output == "json":
        _print_json({"model": _model_json(encoder), "prompt": prompt, "labels": names, "k": min(k, len(names)),
                     "decode": decode, "exif": exif,
                     "images": [{"path": f, "top": [{"label": name, "probability": round(p, 6)} for name, p in best]}
                                for f, best in rows],
                     "skipped": [{"path": f, "reason": why} for f, why in skipped]})
    elif output == "csv":
        _print_csv(("path", "rank", "label", "probability"),
                   [(f, rank, name, f"{p:.6f}") for f, best in rows for rank, (name, p) in enumerate(best, 1)])
    else:
        table = Table(title=f"zero-shot over {len(names)} labels ('{safe(prompt)}')")
        table.add_column("image", overflow="fold")
        table.add_column("top classes", overflow="fold")
        for f, best in rows:
            table.add_row(safe(f), ", ".join(f"{safe(name)} {p:.1%}" for name, p in best))
        _wide().print(table)
    if skipped:
        err.print(f"skipped {len(skipped)} of {len(files)} images (unreadable)", highlight=False)


CLASSIFY_BATCH = 64  # images per inference call


def _wide() -> Console:
    """stdout; piped or captured, wide enough for paths (rich assumes 80 columns off a terminal)."""
    console = make_console()
    return console if console.is_terminal else make_console(width=200)


def _labels(text: str) -> list[str]:
    """``--labels``: a file of one label a line, or a comma-separated list."""
    path = Path(text)
    if path.is_file():
        try:
            raw = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--labels {path} cannot be read as UTF-8 text ({type(e).__name__}); give a text file "
                            f"of one name a line") from None
    elif "," not in text and (os.sep in text or path.suffix.lower() in (".txt", ".csv", ".lst", ".labels")):
        raise UserError(f"--labels file {path} not found; give an existing file or names like \"cat,dog\"")
    else:
        raw = text.split(",")
    names = [x.strip() for x in raw if x.strip()]
    if not names:
        raise UserError(f"--labels {text!r} holds no class names; give \"cat,dog\" or a file of one name a line")
    if len(names) < 2:
        raise UserError(f"--labels names one class ({names[0]!r}); zero-shot chooses among two or more")
    if len(set(names)) != len(names):
        raise UserError("--labels names a class twice; give each class once")
    return names


def _output_format(as_json: bool, as_csv: bool) -> str:
    """``--json`` / ``--csv`` / neither (the table)."""
    if as_json and as_csv:
        raise UserError("--json and --csv: give one of them")
    return "json" if as_json else "csv" if as_csv else "table"


def _print_json(doc: dict) -> None:
    """One JSON document on stdout; ASCII only, so no control character or odd byte reaches a terminal raw."""
    sys.stdout.write(json.dumps(doc, ensure_ascii=True, indent=2) + "\n")
    sys.stdout.flush()


def _print_csv(header: tuple[str, ...], rows: list[tuple]) -> None:
    """A header row, then ``rows``, on stdout; text cells through ``safe()`` (as in the table: control characters
    and a file name's undecodable bytes as visible escapes, which stdout can always encode)."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[safe(c) if isinstance(c, str) else c for c in row] for row in rows])
    sys.stdout.flush()


def _model_json(encoder: Any) -> dict:
    """What answered: the model folder, its identity (weights' sha256), the device, each tower's artifact."""
    info = encoder.info
    return {"source": info.source, "identity": info.model, "device": info.device, "image": info.image,
            "text": info.text}


INTERRUPTED = "interrupted; run the same command again to continue where it stopped\n"
INTERRUPTED_DISTILL = "interrupted; add --resume to the same command to continue from checkpoints/last.pt\n"


def _interrupted_hint(args: list[str]) -> str:
    if os.environ.get("RANK", "0") != "0" or os.environ.get("EDGEDISTILL_LAUNCHED"):
        return ""  # a process of a distributed run: rank 0, or the `--nproc` launcher, says it once
    return INTERRUPTED_DISTILL if "distill" in args and "--resume" not in args else INTERRUPTED


# What the `train` extra installs: a command that reaches for it on a device install says so in one line.
TRAINING_STACK = {"torch", "torchvision", "open_clip", "timm", "onnxscript", "onnxslim", "safetensors",
                  "tensorboard"}
# Environment faults a user fixes (a full disk, a read-only or forbidden folder), wherever they surface.
USER_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _is_a(e: BaseException, name: str) -> bool:
    """Whether ``e`` is click's exception ``name``; typer >= 0.20 vendors its own copy of click, older typer uses
    click itself, so the class is matched by name."""
    return any(cls.__name__ == name for cls in type(e).__mro__)


def _usage_error(e: Exception) -> str:
    """A usage error as one line, with where to look: 'No such option: --fp61 Did you mean --fp16?'."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "edgedistill"
    message = " ".join(e.format_message().split())  # type: ignore[attr-defined]
    return f"error: {message} (see {command} --help)\n"


def _run(args: list[str]) -> int:
    """typer without its own error handling (``standalone_mode=False``): every way out comes back here."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="edgedistill", standalone_mode=False)
    except Exception as e:  # noqa: BLE001 - usage errors and click's Abort are told apart by class name
        if _is_a(e, "NoArgsIsHelpError"):  # `edgedistill` / `edgedistill data` alone: the help
            typer.echo(e.ctx.get_help())  # type: ignore[attr-defined]
            return 0
        if _is_a(e, "ClickException"):
            sys.stderr.write(safe(_usage_error(e).rstrip("\n")) + "\n")
            return 2
        if _is_a(e, "Abort"):
            if isinstance(e.__cause__, EOFError):  # click turns any EOFError into "Aborted!": show the real one
                raise e.__cause__ from None
            raise KeyboardInterrupt from e
        raise
    return code if isinstance(code, int) else 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the CLI and turn user errors into one line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]  # accepted anywhere on the line, not only before the command
    try:
        code = _run(args)
        if code == 130:  # typer turns Ctrl-C into exit 130
            sys.stderr.write(_interrupted_hint(args))
        return code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 130:
            sys.stderr.write(_interrupted_hint(args))
        return code
    except UserError as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {safe(e)}\n")  # paths and names in it come from files
        return 2
    except ModuleNotFoundError as e:
        stack = (e.name or "").split(".")[0]
        if stack not in TRAINING_STACK:
            raise
        if debug:
            traceback.print_exc()
        command = next((a for a in args if not a.startswith("-")), "this command")
        sys.stderr.write(f"error: edgedistill {command} needs the training install ({stack} is missing): pip install "
                         f"'edgedistill[train]'\n")
        return 2
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        if debug:
            traceback.print_exc()
        where = f" {safe(e.filename)}" if e.filename else ""
        sys.stderr.write(f"error: cannot write{where} ({e.strerror}); free space, or choose a folder you can "
                         f"write to\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(_interrupted_hint(args))
        return 130



@app.command()
def bench(
    export_dir: Optional[Path] = typer.Argument(None, help="An export folder with export.json (default: the "
                                                "latest run's export/).", show_default=False),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or jetson (Jetson: power and energy too)."),
    host: Optional[str] = typer.Option(None, "--host", help="user@address: run the bench on that machine over "
                                       "ssh (your own keys) and bring the report back."),
    batch: str = typer.Option("1,8,32", "--batch", help="Batch sizes, comma-separated."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed calls before timing each batch size."),
    iters: int = typer.Option(50, "--iters", help="Timed calls per batch size (percentiles over them)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: torch's default)."),
    teacher: bool = typer.Option(False, "--teacher", help="Also time the teacher's image encoder (PyTorch and "
                                 "its fp32 ONNX graph)."),
    e2e: bool = typer.Option(False, "--e2e", help="Time decode + preprocessing + inference, not inference alone."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default EXPORT_DIR/bench)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Val manifest for accuracy (default: the export's)."),
    port: Optional[int] = typer.Option(None, "--port", help="ssh port of --host."),
    remote_cmd: str = typer.Option("edgedistill", "--remote-cmd", help="edgedistill on the target, if not on its "
                                   "login PATH (e.g. '~/venv/bin/edgedistill', quoted so ~ is the target's home)."),
    ssh_option: list[str] = typer.Option([], "--ssh-option", help="Extra ssh -o option (repeatable), e.g. "
                                         "ConnectTimeout=20."),
    timeout: float = typer.Option(3600, "--timeout", help="Seconds the remote bench may take."),
    load: int = typer.Option(0, "--load", help="Busy processes beside the timed runs: latency under contention, "
                             "as on a device that runs its application too."),
    spin: Optional[bool] = typer.Option(None, "--spin/--no-spin", help="onnxruntime's spinning intra-op threads "
                                        "(default: onnxruntime's, on); --no-spin is faster on a busy machine."),
    openvino_hint: Optional[str] = typer.Option(None, "--openvino-hint", help="OpenVINO's performance hint: "
                                                "latency (default) or throughput."),
    as_json: bool = typer.Option(False, "--json", help="Print the report (bench.json) as one JSON document on "
                                 "stdout; progress and the table go to stderr."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the report's rows as CSV on stdout."),
) -> None:
    """Latency and accuracy of every exported artifact on every backend of a device, next to the teacher.

    Writes bench.json (one row per artifact x backend x batch, every row naming its conditions), bench.md (the
    table) and pareto.png (accuracy vs latency), and prints the table. What cannot run on the device is
    listed with the reason. A faulty artifact (missing, sha256 mismatch, engine for another GPU) is reported
    and the others are still measured; the command then exits 2.

    Examples:

    * `edgedistill bench runs/clip_to_mobilenet/export --teacher`
    * `edgedistill bench --device cuda --batch 1,16,64`
    * `edgedistill bench --device jetson --host nvidia@orin.local --remote-cmd '~/venv/bin/edgedistill'`
    * `edgedistill bench runs/clip_to_mobilenet/export --teacher --json > bench.json`
    """
    # deferred: the command's own stack loads when it runs
    from edgedistill.bench.report import ROW_FIELDS, csv_rows
    from edgedistill.bench.runner import BenchOptions, parse_batches, run_bench
    from edgedistill.core.locations import latest_run

    output = _output_format(as_json, as_csv)
    console = make_console(stderr=True, soft_wrap=True)

    def emit(report: dict) -> None:  # stdout holds the document and nothing else (the table is on stderr)
        if output == "json":
            _print_json(json.loads(json.dumps(report, default=str)))  # paths and dates as bench.json has them
        elif output == "csv":
            _print_csv(ROW_FIELDS, csv_rows(report))
    if export_dir is None:
        export_dir = latest_run(Path("runs")) / "export"
    options = []
    for opt in ssh_option:
        options += ["-o", opt]
    run_bench(BenchOptions(export_dir=export_dir, device=device, batches=parse_batches(batch), warmup=warmup,
                           iters=iters, threads=threads, teacher=teacher, e2e=e2e, out=out, val=val, host=host,
                           port=port, remote_cmd=remote_cmd, ssh_options=options, timeout_s=timeout, load=load,
                           spin=spin, openvino_hint=openvino_hint), console, emit)


if __name__ == "__main__":
    sys.exit(main())
