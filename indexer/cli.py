"""``vldeformer-index`` / ``python -m indexer``: build, inspect, verify and prune index versions.

Exit codes: 0 success, 1 the build failed or verification found problems, 2 usage error
(bad arguments or inputs, found before any encoding). User errors print ``error: ...`` on
stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from indexer.engines import ENGINES, RAY_EXTRA_HINT, RayOptions
from indexer.errors import BuildError, UsageError
from indexer.faiss_index import INDEX_OPTIONS, IndexPolicy
from indexer.manifest import BuildInfo, Manifest
from indexer.store import (
    MetadataField,
    StoreError,
    VersionNotFoundError,
    list_versions,
    read_current,
    read_manifest,
    read_metadata_fields,
    verify_version,
    version_dir,
)

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_EPILOG = """exit codes: 0 success, 1 build failed / problems found, 2 usage error.
Layout and format: see indexer/store.py."""


def _number(parse: type[int] | type[float], ok: Callable[[float], bool], expected: str) -> Any:
    """An argparse ``type`` that parses with ``parse`` and accepts values where ``ok``."""

    def convert(text: str) -> int | float:
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_unit_fraction = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="vldeformer-index",
        description="Build and manage versioned FAISS indexes of image and caption embeddings.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = IndexPolicy()

    build = commands.add_parser(
        "build",
        help="encode a gallery and/or captions and publish a new index version",
        description="Encode a gallery and/or a caption corpus with a VLDeformer model, build "
        "FAISS indexes and publish them as a new version of INDEX_ROOT (CURRENT moves only "
        "when the version is complete).",
        epilog=_EPILOG,
    )
    build.add_argument(
        "--model",
        required=True,
        type=Path,
        metavar="DIR",
        help="VLDeformer checkpoint directory (or a plain ViLT one)",
    )
    build.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="INDEX_ROOT",
        help="index root; created if missing",
    )
    build.add_argument(
        "--images",
        type=Path,
        metavar="PATH",
        help="gallery: a folder (recursive; jpg jpeg png webp bmp tiff gif) or a "
        "JSONL/CSV manifest with path, optional id and captions; a manifest's other keys / "
        "columns become filterable metadata (strings, numbers, booleans, lists of strings; "
        "one type per field; CSV cells are strings unless the whole column parses as numbers)",
    )
    build.add_argument(
        "--captions",
        type=Path,
        metavar="PATH",
        help="captions: JSONL {caption, id?, image?}, text (one per line), "
        "Karpathy JSON or COCO captions JSON",
    )
    build.add_argument(
        "--split",
        metavar="NAME",
        help="with a Karpathy --captions file: keep only this split (e.g. test)",
    )
    build.add_argument(
        "--device",
        default="auto",
        help="auto (GPU when available), cpu, cuda or cuda:N (default: auto)",
    )
    build.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model weights dtype; auto = bfloat16 on a GPU, float32 on the CPU",
    )
    build.add_argument(
        "--runtime",
        default="torch",
        choices=["torch", "onnx", "onnx-int8", "auto"],
        help="encoder runtime: torch; onnx / onnx-int8 = ONNX Runtime fp32 / int8 on the CPU, "
        "exported once next to the checkpoint and refused when its vectors differ from torch "
        "fp32 (cosine < 0.99); auto = torch on a GPU, else the first of onnx-int8, onnx, torch "
        "that passes that check (the first run exports and checks each, then the cache is "
        "used). The default stays torch: the exports are new, and auto loads the model once "
        "more to choose. The manifest records the runtime (default: torch)",
    )
    build.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="items per forward pass (default: 256 on a GPU; 32 images / 64 captions on the CPU)",
    )
    build.add_argument(
        "--workers",
        type=_non_negative_int,
        metavar="N",
        help="local engine: image decoding processes; 0 decodes in the main process "
        "(default: CPU cores - 1). The ray engine decodes in Ray tasks on the cluster's free "
        "CPUs and ignores it (see --ray-workers)",
    )
    build.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="threads for encoding on the CPU: torch's intra-op threads, or ONNX Runtime's "
        "(default: the runtime's own; with torch, fewer when --workers processes share the "
        "cores)",
    )
    build.add_argument(
        "--index",
        default="auto",
        choices=INDEX_OPTIONS,
        help="index type; auto = flat up to --flat-max-vectors, IVF above, "
        "IVF-PQ above the memory budget (default: auto)",
    )
    build.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest interrupted build of the same inputs and model "
        "from its finished embedding shards",
    )
    build.add_argument(
        "--shard-size",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="items per embedding shard, the unit of --resume (default: 4096)",
    )
    build.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=40_000_000,
        metavar="N",
        help="skip images with more pixels than this (default: 40000000)",
    )
    build.add_argument(
        "--flat-max-vectors",
        type=_non_negative_int,
        default=defaults.flat_max_vectors,
        metavar="N",
        help=f"auto: exact search up to N vectors (default: {defaults.flat_max_vectors})",
    )
    build.add_argument(
        "--memory-budget-gb",
        type=_positive_float,
        default=defaults.memory_budget_bytes / 1024**3,
        metavar="GB",
        help="auto: IVF-PQ when float32 vectors would exceed this "
        f"(default: {defaults.memory_budget_bytes / 1024**3:g})",
    )
    build.add_argument(
        "--target-recall",
        type=_unit_fraction,
        default=defaults.target_recall,
        metavar="R",
        help="recall@10 the search parameter is tuned to reach "
        f"(default: {defaults.target_recall})",
    )
    build.add_argument(
        "--progress-interval",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds between progress log lines when stderr is not a terminal",
    )
    engine = build.add_argument_group(
        "engine",
        "Where the pending shards are encoded. local: decoding processes and the forward pass "
        "on this machine. ray: Ray Data on a Ray cluster (needs the ray extra: "
        f"{RAY_EXTRA_HINT}): images decoded in CPU tasks on any node, encoded by --ray-workers "
        "actors that each load the model once; this process writes the shards and the index, "
        "so INDEX_ROOT must be on its disk, and every node must read the gallery files at "
        "the same paths. Both engines give the same vectors, and --resume works across them.",
    )
    engine.add_argument(
        "--engine", default="local", choices=ENGINES, help="local or ray (default: local)"
    )
    engine.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="ray: the cluster to join (host:port of a `ray start --head`, or auto); "
        "default: start a local cluster with this machine's CPUs",
    )
    engine.add_argument(
        "--ray-workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="ray: encoder actors, each with --gpus-per-worker GPUs (default: 1)",
    )
    engine.add_argument(
        "--gpus-per-worker",
        type=_non_negative_float,
        metavar="G",
        help="ray: GPUs per encoder actor, may be fractional (default: 1 when CUDA is "
        "visible here, else 0: the actors encode on the CPU; 0 with --device cpu or an ONNX "
        "runtime). More than a local cluster has is refused",
    )

    info = commands.add_parser(
        "info",
        help="show a version's manifest and metadata fields in readable form",
        description="Show the published (or a given) version's manifest and the metadata "
        "fields its searches can filter on.",
    )
    info.add_argument("root", type=Path, metavar="INDEX_ROOT")
    info.add_argument("--version", metavar="V", help="a version name (default: CURRENT)")
    info.add_argument("--json", action="store_true", help="print the raw manifest JSON")

    verify = commands.add_parser(
        "verify",
        help="check checksums, counts, self-query and optionally the model fingerprint",
        description="Verify a version: file checksums, counts, dimensions, that stored vectors "
        "find themselves first, and (with --model or --fingerprint) the model fingerprint.",
        epilog=_EPILOG,
    )
    verify.add_argument("root", type=Path, metavar="INDEX_ROOT")
    verify.add_argument("--version", metavar="V", help="a version name (default: CURRENT)")
    which = verify.add_mutually_exclusive_group()
    which.add_argument(
        "--model", type=Path, metavar="DIR", help="check that the version was built with this model"
    )
    which.add_argument("--fingerprint", metavar="HEX", help="check against this model fingerprint")
    verify.add_argument("--no-self-query", action="store_true", help="skip the self-query check")

    versions = commands.add_parser(
        "versions",
        help="list the versions, oldest first",
        description="List the versions, oldest first; * = CURRENT.",
    )
    versions.add_argument("root", type=Path, metavar="INDEX_ROOT")

    gc = commands.add_parser(
        "gc",
        help="delete old versions",
        description="Delete all but the newest N versions (never the one "
        "CURRENT names) and stale build directories.",
    )
    gc.add_argument("root", type=Path, metavar="INDEX_ROOT")
    gc.add_argument(
        "--keep",
        type=_positive_int,
        required=True,
        metavar="N",
        help="number of newest versions to keep",
    )
    return parser


def _configure_logging(quiet: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    logging.getLogger("indexer").setLevel(logging.WARNING if quiet else logging.INFO)


def _cmd_build(args: argparse.Namespace) -> int:
    from indexer.build import BuildConfig, run_build, skipped_lines

    policy = IndexPolicy(
        flat_max_vectors=args.flat_max_vectors,
        memory_budget_bytes=int(args.memory_budget_gb * 1024**3),
        target_recall=args.target_recall,
    )
    config = BuildConfig(
        model_dir=args.model,
        out_root=args.out,
        images=args.images,
        captions=args.captions,
        caption_split=args.split,
        device=args.device,
        dtype=args.dtype,
        runtime=args.runtime,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        index=args.index,
        resume=args.resume,
        shard_size=args.shard_size,
        max_pixels=args.max_pixels,
        policy=policy,
        progress_interval_s=args.progress_interval,
        engine=args.engine,
        ray=RayOptions(
            address=args.ray_address,
            workers=args.ray_workers,
            gpus_per_worker=args.gpus_per_worker,
        ),
    )
    result = run_build(config)
    print(result.summary())
    for line in skipped_lines(result.manifest):
        print(line)
    return EXIT_OK


def _human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def format_manifest(
    manifest: Manifest,
    current: str | None,
    fields: Mapping[str, MetadataField] | None = None,
) -> str:
    """The readable form of a manifest (and the version's metadata ``fields``) that ``info``
    prints."""
    marker = " (CURRENT)" if manifest.version == current else ""
    model, counts = manifest.model, manifest.counts
    build = manifest.build or BuildInfo()
    lines = [
        f"version      {manifest.version}{marker}",
        f"created_at   {manifest.created_at}",
        f"model        {model.path} (fingerprint {model.fingerprint[:16]}…, dim {manifest.dim})",
        f"runtime      {_describe_runtime(manifest)}",
        f"metric       {manifest.metric} over L2-normalised vectors",
    ]
    for name in ("images", "captions"):
        index = manifest.indexes.get(name)
        source = manifest.inputs.of(name) if manifest.inputs is not None else None
        if index is None:
            lines.append(f"{name:<12} none")
            continue
        params = ", ".join(f"{k}={v}" for k, v in index.params.items())
        lines.append(
            f"{name:<12} {counts.of(name)} in a {index.kind} index"
            f"{f' ({params})' if params else ''}, "
            f"recall@10 {index.recall_at_10} on {index.recall_queries} queries"
            + (f"; from {source.path} ({source.format})" if source else "")
        )
    described = ", ".join(f"{name} ({field.type})" for name, field in (fields or {}).items())
    lines.append(f"metadata     {described or 'no fields'}")
    lines.append(
        f"linked       {counts.captions_linked_to_images or 0} captions link to a gallery image"
    )
    reasons = ", ".join(f"{r} {n}" for r, n in sorted((manifest.skipped_by_reason or {}).items()))
    lines.append(f"skipped      {counts.skipped or 0}{f' ({reasons})' if reasons else ''}")
    lines.append(
        f"build        {build.seconds} s on {build.device} ({build.dtype}), "
        f"{build.engine.name if build.engine else 'local'} engine; "
        f"{build.images_per_s} images/s, {build.captions_per_s} captions/s; "
        f"{build.resumed_items or 0} items resumed"
    )
    libraries = ", ".join(f"{k} {v}" for k, v in (manifest.library_versions or {}).items())
    lines.append(f"libraries    {libraries}")
    for name, entry in manifest.files.items():
        lines.append(
            f"file         {name:<16} {_human_bytes(entry.bytes):>9}  sha256 {entry.sha256[:16]}…"
        )
    return "\n".join(lines)


def _describe_runtime(manifest: Manifest) -> str:
    """``onnx-int8 (checked against torch fp32: min cosine 0.99871, ...)``, or ``torch``."""
    runtime, check = manifest.runtime, manifest.model.runtime_check
    if check is None:
        recorded = manifest.model.runtime is not None
        return runtime if recorded else f"{runtime} (not recorded: an older build)"
    recall = check.recall_drop
    return (
        f"{runtime} (checked against torch fp32: min cosine {check.min_cosine:.5f}, "
        f"mean {check.mean_cosine:.5f}"
        + (f", recall drop {recall:.2f} points)" if recall is not None else ")")
    )


def _cmd_info(args: argparse.Namespace) -> int:
    current = read_current(args.root)
    version = args.version or current
    if version is None:
        raise UsageError(f"no version is published under {args.root}")
    try:
        directory = version_dir(args.root, version)
    except VersionNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    if not directory.is_dir():
        raise UsageError(f"version {version} does not exist under {args.root}")
    manifest = read_manifest(directory)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        print(format_manifest(manifest, current, read_metadata_fields(directory)))
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    fingerprint = args.fingerprint
    if args.model is not None:
        from model import CheckpointError, VLDeformer

        try:
            fingerprint = VLDeformer.from_pretrained(args.model, device="cpu").fingerprint
        except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
            raise UsageError(f"--model {args.model} does not load: {exc}") from exc
    version = args.version or read_current(args.root)
    problems = verify_version(
        args.root, args.version, fingerprint=fingerprint, self_query=not args.no_self_query
    )
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in version {version} of {args.root}")
        return EXIT_FAILED
    print(f"OK: version {version} of {args.root}")
    return EXIT_OK


def _cmd_versions(args: argparse.Namespace) -> int:
    current = read_current(args.root)
    names = list_versions(args.root)
    if not names:
        print(f"no versions under {args.root}")
    for name in names:
        try:
            manifest = read_manifest(version_dir(args.root, name))
            counts = manifest.counts
            detail = (
                f"{counts.images:>9} images {counts.captions:>9} captions  {manifest.created_at}"
            )
        except StoreError as exc:
            detail = f"unreadable: {exc}"
        print(f"{'*' if name == current else ' '} {name}  {detail}")
    return EXIT_OK


def _cmd_gc(args: argparse.Namespace) -> int:
    from indexer.publish import collect_garbage

    removed = collect_garbage(args.root, args.keep)
    print(f"removed {len(removed)} version(s){': ' + ', '.join(removed) if removed else ''}")
    return EXIT_OK


_COMMANDS = {
    "build": _cmd_build,
    "info": _cmd_info,
    "verify": _cmd_verify,
    "versions": _cmd_versions,
    "gc": _cmd_gc,
}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (0 ok, 1 failed, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.quiet)
    try:
        if args.command != "build" and not args.root.is_dir():  # only build creates a root
            raise UsageError(f"INDEX_ROOT {args.root}: no such directory")
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BuildError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        return EXIT_OK
    except KeyboardInterrupt:
        print("error: interrupted; rerun the build with --resume to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # a crash (e.g. mid-encode): keep the traceback for the log, exit 1
        logger.exception("%s failed", args.command)
        unchanged = "; CURRENT is unchanged" if args.command == "build" else ""
        print(
            f"error: {args.command} failed: {type(exc).__name__}: {exc}{unchanged}", file=sys.stderr
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
