"""Encoder runtimes: the same VLDeformer vectors from torch, ONNX Runtime fp32 or ONNX Runtime int8.

:func:`load_encoder` is the one entry point. ``"torch"`` wraps :class:`model.VLDeformer`;
``"onnx"`` and ``"onnx-int8"`` export the two encoders (:mod:`model.onnx_export`), cache the
export next to the checkpoint keyed by the model's fingerprint, run the export-time check
against torch fp32 (:mod:`model.runtime_check`) and return an encoder backed by ONNX Runtime on
the CPU. Tokenisation and image preprocessing are the torch path's in every runtime.

Cache layout (each runtime directory written atomically; a stale or corrupt one is rebuilt)::

    <cache_dir, default <model_dir>/.onnx>/<fingerprint[:16]>/<runtime>/
        text.onnx  image.onnx  export.json (fingerprint, versions, sha256 of each file)
        check.json (the RuntimeCheck, pass or fail)

A runtime whose check failed stays refused (the failed check is cached with its export);
delete its directory to export and check again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from model.atomic import replace_file, write_atomically
from model.files import file_sha256
from model.modeling import VLDeformer
from model.runtime_check import RuntimeCheck, run_check
from model.runtime_encoders import OnnxEncoder, TorchEncoder

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "RUNTIMES",
    "OnnxEncoder",
    "RuntimeCheck",
    "RuntimeEncoder",
    "RuntimeUnavailable",
    "TorchEncoder",
    "compatible",
    "load_encoder",
    "pick_default_runtime",
]

logger = logging.getLogger(__name__)

RUNTIMES: tuple[str, ...] = ("torch", "onnx", "onnx-int8")
DEFAULT_PREFERENCE: tuple[str, ...] = ("onnx-int8", "onnx", "torch")  # pick_default_runtime
CACHE_DIRNAME = ".onnx"
EXPORT_FILE = "export.json"
CHECK_FILE = "check.json"
EXPORT_FORMAT_VERSION = 1
_MODEL_FILES = ("text.onnx", "image.onnx")
INSTALL_HINT = "install the `onnx` extra: pip install 'vldeformer[onnx]'"


class RuntimeUnavailable(ValueError):
    """A runtime cannot be used: onnxruntime missing, export failed, or its check refused it."""


@runtime_checkable
class RuntimeEncoder(Protocol):
    """What the indexer and the service use of an encoder, whatever runs it."""

    @property
    def embedding_dim(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def max_text_len(self) -> int: ...

    def encode_text(self, texts: list[str], batch_size: int = ...) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image], batch_size: int = ...) -> np.ndarray: ...

    @property
    def runtime(self) -> str: ...

    @property
    def check(self) -> RuntimeCheck | None: ...


# ---------------------------------------------------------------------------- loading
def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"the ONNX runtimes need onnxruntime ({exc}); {INSTALL_HINT}"
        ) from exc
    return onnxruntime


def _export_manifest(runtime: str, fingerprint: str, directory: Path) -> dict[str, Any]:
    import onnxruntime

    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "runtime": runtime,
        "model_fingerprint": fingerprint,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "files": {name: file_sha256(directory / name) for name in _MODEL_FILES},
    }


def _valid_export(directory: Path, runtime: str, fingerprint: str) -> bool:
    """True when ``directory`` holds a complete export of this model for this runtime."""
    try:
        manifest = json.loads((directory / EXPORT_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
        return (
            manifest["format_version"] == EXPORT_FORMAT_VERSION
            and manifest["runtime"] == runtime
            and manifest["model_fingerprint"] == fingerprint
            and all(file_sha256(directory / name) == files[name] for name in _MODEL_FILES)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_export(network: VLDeformer, runtime: str, directory: Path) -> None:
    from model.onnx_export import export_image_encoder, export_text_encoder, quantize_int8

    def write(temporary: Path) -> None:
        if runtime == "onnx":
            export_text_encoder(network, temporary / "text.onnx")
            export_image_encoder(network, temporary / "image.onnx")
        else:  # int8 from the fp32 export
            fp32 = temporary / "fp32"
            fp32.mkdir()
            for name, export in (
                ("text.onnx", export_text_encoder),
                ("image.onnx", export_image_encoder),
            ):
                quantize_int8(export(network, fp32 / name), temporary / name)
            for leftover in fp32.iterdir():
                leftover.unlink()
            fp32.rmdir()
        manifest = _export_manifest(runtime, network.fingerprint, temporary)
        (temporary / EXPORT_FILE).write_text(
            json.dumps(manifest, indent=2) + "\n", encoding="utf-8"
        )

    logger.info("exporting %s encoders of %s to %s", runtime, network.fingerprint[:16], directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(directory, write)
    except OSError as exc:
        raise RuntimeUnavailable(
            f"cannot write the {runtime} export under {directory}: {exc}; pass a writable cache_dir"
        ) from exc
    except Exception as exc:  # exporter / quantizer failures: the runtime is unavailable
        raise RuntimeUnavailable(
            f"the {runtime} export of {network.fingerprint[:16]} failed: {exc!r}"
        ) from exc


def _session(path: Path, threads: int | None) -> onnxruntime.InferenceSession:
    onnxruntime = _import_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 0 if threads is None else int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _read_check(directory: Path, runtime: str, fingerprint: str) -> RuntimeCheck | None:
    try:
        data = json.loads((directory / CHECK_FILE).read_text(encoding="utf-8"))
        check = RuntimeCheck(**data)
    except (OSError, ValueError, TypeError):
        return None
    if check.runtime != runtime or check.model_fingerprint != fingerprint:
        return None
    return check


def _write_check(directory: Path, check: RuntimeCheck) -> None:
    with replace_file(directory / CHECK_FILE, fsync=False) as stream:
        stream.write(json.dumps(dataclasses.asdict(check), indent=2) + "\n")


def export_dir(
    model_dir: str | Path, fingerprint: str, runtime: str, cache_dir: str | Path | None = None
) -> Path:
    """Where ``runtime``'s export of the model with ``fingerprint`` is cached."""
    root = Path(model_dir) / CACHE_DIRNAME if cache_dir is None else Path(cache_dir)
    return root / fingerprint[:16] / runtime


def load_encoder(
    model_dir: str | Path,
    runtime: str = "torch",
    *,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    check_data: str | Path | None = None,
) -> TorchEncoder | OnnxEncoder:
    """Load the checkpoint ``model_dir`` under ``runtime`` (one of :data:`RUNTIMES`).

    ``"torch"``: the VLDeformer on ``device`` (``threads`` is not applied: torch's thread
    count is process-wide, the caller's to set). ``"onnx"`` / ``"onnx-int8"``: CPU only;
    exported once and cached (see the module docstring), checked against torch fp32 on a fixed
    sample (and on ``check_data``'s test split when given: a synthetic ``dataset.json``), run
    by ONNX Runtime's CPU provider with ``threads`` intra-op threads (``None``: its default).

    Raises :class:`RuntimeUnavailable` when onnxruntime is missing, the export fails or the
    check refuses the runtime (its message gives the measured cosine and recall), and
    :class:`model.backbone.CheckpointError` for a bad checkpoint.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "torch":
        return TorchEncoder(VLDeformer.from_pretrained(model_dir, device=device))
    if torch.device(device).type != "cpu":
        raise RuntimeUnavailable(
            f"the {runtime} runtime runs on the CPU only, got device {device!r}"
        )
    _import_onnxruntime()
    reference = TorchEncoder(VLDeformer.from_pretrained(model_dir, device="cpu"))
    fingerprint = reference.fingerprint
    directory = export_dir(model_dir, fingerprint, runtime, cache_dir)
    if not _valid_export(directory, runtime, fingerprint):
        if directory.exists():
            logger.warning("rebuilding the stale or corrupt export %s", directory)
        _write_export(reference.network, runtime, directory)
    try:
        text_session = _session(directory / "text.onnx", threads)
        image_session = _session(directory / "image.onnx", threads)
    except Exception as exc:  # onnxruntime cannot load what was written: rebuild once
        logger.warning("onnxruntime cannot load %s (%s); exporting again", directory, exc)
        _write_export(reference.network, runtime, directory)
        text_session = _session(directory / "text.onnx", threads)
        image_session = _session(directory / "image.onnx", threads)
    check = _read_check(directory, runtime, fingerprint)
    encoder = OnnxEncoder(text_session, image_session, reference.network, runtime, check)
    if check is None or (check_data is not None and check.recall_drop is None):
        check = run_check(reference, encoder, runtime, check_data)
        _write_check(directory, check)
        encoder.check = check
    if not check.passed:
        raise RuntimeUnavailable(
            f"the {runtime} runtime of model {fingerprint[:16]} was refused by its check against "
            f"torch fp32: {check.describe()} (cached in {directory / CHECK_FILE}; delete "
            f"{directory} to export and check again)"
        )
    logger.info("%s runtime ready: %s", runtime, check.describe())
    return encoder


def pick_default_runtime(model_dir: str | Path, *, cache_dir: str | Path | None = None) -> str:
    """The CPU default: the first of ``onnx-int8``, ``onnx``, ``torch`` that passes its check.

    A fixed preference, not a measurement: int8 is the fastest on CPU for ViLT-sized encoders
    (``bench/runtime_bench.py``), fp32 ONNX next. Exports and checks on first use (cached).
    """
    for runtime in DEFAULT_PREFERENCE[:-1]:
        try:
            load_encoder(model_dir, runtime, cache_dir=cache_dir)
            return runtime
        except RuntimeUnavailable as exc:
            logger.info("default runtime: %s unavailable (%s)", runtime, exc)
    return "torch"


def compatible(index_runtime: str, serve_runtime: str, check: RuntimeCheck | None) -> bool:
    """Whether vectors of an index built with ``index_runtime`` can be searched with queries
    encoded by ``serve_runtime`` (same model fingerprint: the caller compares those).

    ``check`` is the serving runtime's check (``None`` for torch). Every runtime that passed
    its check against torch fp32 is compatible with torch and with every other such runtime.
    An index's runtime counts as passed: :func:`load_encoder` never returns an encoder whose
    check failed, so nothing else can have built it.
    """
    if index_runtime not in RUNTIMES or serve_runtime not in RUNTIMES:
        return False
    if index_runtime == serve_runtime or serve_runtime == "torch":
        return True
    return check is not None and check.runtime == serve_runtime and check.passed
