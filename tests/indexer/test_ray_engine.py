"""The ``ray`` engine on one local Ray cluster: it publishes what the local engine does, survives
a killed driver (``--resume``) and a killed encoder actor (retried, nothing lost or doubled)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.build import BuildConfig, load_build_encoder, run_build
from indexer.cli import main
from indexer.engines import RayOptions
from indexer.store import IndexVersion, read_current, read_manifest, verify_version, version_dir
from tests.indexer.conftest import BuiltIndex
from tests.indexer.test_crash_resume import REPO, _kill_when

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """One local cluster for the module; its address lets a child process join it."""
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},  # actors import tests.*
    )
    try:
        yield str(context.address_info["address"])
    finally:
        ray.shutdown()


# The two CLI errors first: the module's cluster is not started yet.
def test_engine_ray_without_ray_installed_names_the_extra(
    built: BuiltIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    monkeypatch.delitem(sys.modules, "indexer.ray_engine", raising=False)
    code = main(["build", "--model", str(built.model_dir), "--out", str(tmp_path / "root"),
                 "--images", str(built.gallery.folder), "--engine", "ray"])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert "vldeformer[ray]" in error and "Traceback" not in error
    assert not list((tmp_path / "root").glob(".tmp-*"))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--gpus-per-worker", "inf"], "--gpus-per-worker must be a finite number"),
        (["--ray-address", "no-port-here"], "--ray-address must be host:port"),
        (["--runtime", "onnx-int8", "--gpus-per-worker", "1"], "use --runtime torch on GPUs"),
    ],
)
def test_impossible_ray_options_fail_before_any_work(
    built: BuiltIndex, tmp_path: Path, capsys: Any, options: list[str], expected: str
) -> None:
    code = main(["build", "--model", str(built.model_dir), "--out", str(tmp_path / "root"),
                 "--images", str(built.gallery.folder), "--engine", "ray", *options])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert expected in error and "Traceback" not in error
    assert not list((tmp_path / "root").glob(".tmp-*"))


def test_more_gpus_than_the_local_cluster_has_is_a_usage_error_not_a_hang(
    built: BuiltIndex, tmp_path: Path, capsys: Any
) -> None:
    if ray.is_initialized():
        pytest.skip("this process is connected to a cluster already")
    code = main(["build", "--model", str(built.model_dir), "--out", str(tmp_path / "root"),
                 "--images", str(built.gallery.folder), "--engine", "ray",
                 "--gpus-per-worker", "64"])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert "GPUs, the cluster has" in error and "Traceback" not in error
    assert not ray.is_initialized()  # the cluster it started is shut down
    assert not list((tmp_path / "root").glob(".tmp-*"))  # failed before the build dir


def test_a_bad_ray_address_is_a_usage_error(built: BuiltIndex, tmp_path: Path, capsys: Any) -> None:
    if ray.is_initialized():
        pytest.skip("this process is connected to a cluster already")
    code = main(["build", "--model", str(built.model_dir), "--out", str(tmp_path / "root"),
                 "--images", str(built.gallery.folder), "--engine", "ray",
                 "--ray-address", "not-a-host:1"])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert "--ray-address not-a-host:1" in error and "Traceback" not in error


def _ray_args(built: BuiltIndex, root: Path, captions_path: Path | None) -> list[str]:
    """The arguments of the ``built`` fixture's build, on the ray engine."""
    args = ["build", "--model", str(built.model_dir), "--out", str(root),
            "--images", str(built.gallery.folder), "--batch-size", "4", "--shard-size", "8",
            "--engine", "ray"]  # fmt: skip
    return [*args, "--captions", str(captions_path)] if captions_path else args


def _image_vectors(root: Path, version: str) -> tuple[list[str], np.ndarray]:
    with IndexVersion.open(root, version) as opened:
        ids = [r.id for r in opened.image_records(range(opened.image_count))]
        return ids, opened.reconstruct("images", range(opened.image_count))


def _comparable(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest without what differs between two builds of the same inputs."""
    kept = {k: v for k, v in manifest.items() if k not in ("version", "created_at", "build")}
    kept["files"] = sorted(manifest["files"])  # the faiss files hold float-rounding noise
    kept["indexes"] = {
        name: {k: v for k, v in index.items() if k != "build_seconds"}
        for name, index in manifest["indexes"].items()
    }
    return kept


def test_ray_build_verifies_and_equals_the_local_build(
    ray_cluster: str, built: BuiltIndex, captions_path: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    assert main(["-q", *_ray_args(built, root, captions_path)]) == 0
    version = read_current(root)
    assert version is not None
    assert verify_version(root) == []
    assert main(["verify", str(root), "--model", str(built.model_dir)]) == 0

    local = read_manifest(version_dir(built.root, built.version)).to_dict()
    distributed = read_manifest(version_dir(root, version)).to_dict()
    assert distributed["build"]["engine"]["name"] == "ray"
    assert local["build"]["engine"]["name"] == "local"
    assert _comparable(distributed) == _comparable(local)  # ids, metadata, skipped, counts
    assert {s["id"]: s["reason"] for s in distributed["skipped"]} == built.gallery.bad

    local_ids, local_vectors = _image_vectors(built.root, built.version)
    ray_ids, ray_vectors = _image_vectors(root, version)
    assert ray_ids == local_ids
    np.testing.assert_allclose(ray_vectors, local_vectors, atol=1e-5)
    with IndexVersion.open(built.root, built.version) as a, IndexVersion.open(root, version) as b:
        np.testing.assert_allclose(
            b.reconstruct("captions", range(b.caption_count)),
            a.reconstruct("captions", range(a.caption_count)),
            atol=1e-5,
        )


def test_sigkill_of_the_driver_keeps_current_and_resume_completes(
    ray_cluster: str, built: BuiltIndex, built_copy: Path
) -> None:
    root = built_copy
    published = read_current(root)
    args = [*_ray_args(built, root, None), "--ray-address", ray_cluster]
    paused = [sys.executable, "-m", "tests.indexer.paused_build", "--after-shards", "1", "--"]
    _kill_when(
        [*paused, "-q", *args],
        lambda: len(list(root.glob(".tmp-*/shards/images/*.json"))) >= 1,
        "its first shard",
    )
    assert read_current(root) == published
    assert verify_version(root) == []

    assert main(["-q", *args, "--resume"]) == 0
    resumed = read_current(root)
    assert resumed not in (None, published)
    assert verify_version(root) == []
    manifest = read_manifest(version_dir(root, resumed or "")).to_dict()
    assert manifest["build"]["images"]["resumed"] == 8  # the shard the killed driver wrote
    assert not list(root.glob(".tmp-*"))
    full_ids, full_vectors = _image_vectors(built.root, built.version)
    ids, vectors = _image_vectors(root, resumed or "")
    assert ids == full_ids
    np.testing.assert_allclose(vectors, full_vectors, atol=1e-5)


class _CrashAlwaysEncoder:
    """Every forward pass kills its process: a poison batch, or the OOM killer each time."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def encode_pixels(self, *args: Any, **kwargs: Any) -> Any:
        os._exit(1)


def _crash_always_loader(config: BuildConfig) -> Any:
    return _CrashAlwaysEncoder(load_build_encoder(config))


class _CrashOnceEncoder:
    """Delegates to the real encoder, but the first forward pass anywhere kills its process."""

    def __init__(self, encoder: Any, marker: Path) -> None:
        self._encoder = encoder
        self._marker = marker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def encode_pixels(self, *args: Any, **kwargs: Any) -> Any:
        if not self._marker.exists():
            self._marker.write_text(f"{os.getpid()}\n")
            os._exit(1)  # a crashed actor: no exception, no cleanup
        return self._encoder.encode_pixels(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _CrashOnceLoader:
    """An encoder loader for the actors (picklable) that injects one crash."""

    marker: Path

    def __call__(self, config: BuildConfig) -> Any:
        return _CrashOnceEncoder(load_build_encoder(config), self.marker)


def test_a_killed_encoder_actor_is_retried_without_loss_or_duplicates(
    ray_cluster: str, built: BuiltIndex, tmp_path: Path
) -> None:
    from indexer.ray_engine import RayEngine

    marker = tmp_path / "crashed"
    config = BuildConfig(
        model_dir=built.model_dir,
        out_root=tmp_path / "root",
        images=built.gallery.folder,
        batch_size=4,
        shard_size=8,
        engine="ray",
        ray=RayOptions(workers=1),
    )
    engine = RayEngine(config, load_encoder=_CrashOnceLoader(marker))
    result = run_build(config, engine=engine)
    assert marker.is_file()  # an actor did die mid-shard
    assert result.manifest.to_dict()["counts"]["images"] == len(built.gallery.good)
    assert result.manifest.to_dict()["build"]["images"]["encoded"] == len(built.gallery.good)
    ids, vectors = _image_vectors(config.out_root, result.version)
    assert sorted(ids) == sorted(built.gallery.good) and len(set(ids)) == len(ids)
    full_ids, full_vectors = _image_vectors(built.root, built.version)
    assert ids == full_ids
    np.testing.assert_allclose(vectors, full_vectors, atol=1e-5)
    assert verify_version(config.out_root) == []


def test_an_actor_that_always_dies_fails_the_build_instead_of_looping(
    ray_cluster: str, built: BuiltIndex, tmp_path: Path
) -> None:
    from indexer.ray_engine import RayEngine

    config = BuildConfig(
        model_dir=built.model_dir,
        out_root=tmp_path / "root",
        images=built.gallery.folder,
        batch_size=4,
        shard_size=8,
        engine="ray",
        ray=RayOptions(workers=1),
    )
    with pytest.raises(Exception, match=r"(?i)actor|died|exit"):
        run_build(config, engine=RayEngine(config, load_encoder=_crash_always_loader))
    assert read_current(config.out_root) is None  # nothing published; the build resumable
