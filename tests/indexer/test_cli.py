"""The command line: help, usage errors before any encoding (exit 2), info and versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from indexer.cli import main
from indexer.errors import UsageError
from indexer.publish import BuildLock, collect_garbage
from indexer.store import list_versions, read_current
from tests.indexer.conftest import BuiltIndex


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("build", ["--model", "--out", "--images", "--captions", "--split", "--device", "--dtype",
                   "--batch-size", "--workers", "--threads", "--index", "--resume", "--shard-size",
                   "--max-pixels", "--flat-max-vectors", "--memory-budget-gb", "--target-recall",
                   "--progress-interval"]),
        ("info", ["INDEX_ROOT", "--version", "--json"]),
        ("verify", ["INDEX_ROOT", "--version", "--model", "--fingerprint", "--no-self-query"]),
        ("versions", ["INDEX_ROOT"]),
        ("gc", ["INDEX_ROOT", "--keep"]),
    ],
)  # fmt: skip
def test_help_documents_every_option(
    command: str, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text
    if command == "build":
        assert "exit codes" in text and "pause-after-shards" not in text


def test_a_missing_subcommand_or_option_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([]) == 2
    assert main(["build", "--out", "x"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["gc", "root"]) == 2
    assert "--keep" in capsys.readouterr().err


@pytest.fixture()
def images_dir(built: BuiltIndex, tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(built.gallery.folder / built.gallery.good[0], folder / "one.png")
    return folder


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str], root: Path) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") or "error:" in err
    assert "Traceback" not in err
    # Nothing was started: no build directory, no version, no CURRENT.
    assert not list(root.glob(".tmp-*"))
    assert list_versions(root) == [] and read_current(root) is None
    return err


def test_usage_errors_are_found_before_encoding(
    tiny_vilt_dir: Path, images_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    model = str(tiny_vilt_dir)
    base = ["build", "--model", model, "--out", str(root)]

    assert "--images" in _usage_error(base, capsys, root)
    missing = tmp_path / "missing"
    assert str(missing) in _usage_error([*base, "--images", str(missing)], capsys, root)

    manifest = tmp_path / "gallery.jsonl"
    manifest.write_text(
        json.dumps({"id": "a", "path": str(images_dir / "one.png")}) + "\n"
        + json.dumps({"id": "a", "path": str(images_dir / "one.png")}) + "\n"
    )  # fmt: skip
    err = _usage_error([*base, "--images", str(manifest)], capsys, root)
    assert f"{manifest}:2: duplicate image id 'a'" in err

    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"caption": "a dog"}\n{"caption": \n')
    err = _usage_error(
        [*base, "--images", str(images_dir), "--captions", str(captions)], capsys, root
    )
    assert f"{captions}:2: invalid JSON" in err

    empty_model = tmp_path / "empty-model"
    empty_model.mkdir()
    err = _usage_error(["build", "--model", str(empty_model), "--out", str(root), "--images",
                        str(images_dir)], capsys, root)  # fmt: skip
    assert f"--model {empty_model} does not load" in err and "config.json" in err
    broken_model = tmp_path / "broken-model"
    shutil.copytree(tiny_vilt_dir, broken_model)
    (broken_model / "model.safetensors").write_bytes(b"not weights")
    err = _usage_error(["build", "--model", str(broken_model), "--out", str(root), "--images",
                        str(images_dir)], capsys, root)  # fmt: skip
    assert "does not load" in err

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    err = _usage_error(["build", "--model", model, "--out", str(a_file / "root"), "--images",
                        str(images_dir)], capsys, root)  # fmt: skip
    assert "not writable" in err and str(a_file / "root") in err

    assert main([*base, "--images", str(images_dir), "--batch-size", "0"]) == 2
    assert "--batch-size: expected a positive integer, got '0'" in capsys.readouterr().err
    assert main([*base, "--images", str(images_dir), "--index", "lsh"]) == 2
    capsys.readouterr()

    if not torch.cuda.is_available():
        err = _usage_error([*base, "--images", str(images_dir), "--device", "cuda"], capsys, root)
        assert "CUDA is not available" in err

    with BuildLock(root):
        err = _usage_error([*base, "--images", str(images_dir)], capsys, root)
        assert "another build" in err


def test_a_folder_without_images_fails_the_build(
    tiny_vilt_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    root = tmp_path / "root"
    assert (
        main(["build", "--model", str(tiny_vilt_dir), "--out", str(root), "--images", str(folder)])
        == 1
    )
    assert "no image file" in capsys.readouterr().err
    assert read_current(root) is None


def test_info_and_versions_show_the_published_version(
    built: BuiltIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(built.root)]) == 0
    text = capsys.readouterr().out
    assert f"version      {built.version} (CURRENT)" in text
    assert f"images       {len(built.gallery.good)} in a flat index" in text
    assert "skipped      9 (" in text and "too_many_pixels 1" in text
    assert "sha256" in text and "recall@10 1.0" in text
    assert main(["info", str(built.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == built.version
    assert main(["versions", str(built.root)]) == 0
    assert capsys.readouterr().out.startswith(f"* {built.version}")
    assert main(["info", str(tmp_path)]) == 2
    assert "no version is published" in capsys.readouterr().err
    assert main(["info", str(built.root), "--version", "20200101T000000Z-000000"]) == 2
    assert main(["verify", str(tmp_path)]) == 1
    assert "no version is published" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["gc", "--keep", "1"], ["info"], ["verify"], ["versions"]],
    ids=["gc", "info", "verify", "versions"],
)
def test_commands_on_a_missing_root_are_usage_errors_and_create_nothing(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo"
    assert main([argv[0], str(typo), *argv[1:]]) == 2
    assert capsys.readouterr().err == f"error: INDEX_ROOT {typo}: no such directory\n"
    assert not typo.exists()


def test_collect_garbage_does_not_create_a_missing_root(tmp_path: Path) -> None:
    typo = tmp_path / "typo"
    with pytest.raises(UsageError, match=f"INDEX_ROOT {typo}: no such directory"):
        collect_garbage(typo, keep=1)
    assert not typo.exists()
