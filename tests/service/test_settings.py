"""Settings from VLD_* variables, validation that names the variable, and the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.__main__ import ENV_ONLY_SETTINGS, _parser, main
from service.app import _batching_config
from service.settings import (
    Settings,
    SettingsError,
    env_name,
    load_settings,
    require_serving_paths,
)


def test_defaults() -> None:
    settings = Settings()
    assert settings.max_upload_bytes == 10 * 1024 * 1024
    assert settings.max_image_pixels == 40_000_000
    assert settings.max_k == 100 and settings.max_text_chars == 1000
    assert settings.host == "127.0.0.1" and settings.port == 8000
    assert settings.reload_token is None and settings.poll_interval_s == 0
    assert settings.model_dir is None and settings.index_root is None


def test_values_come_from_vld_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLD_MAX_K", "7")
    monkeypatch.setenv("VLD_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("VLD_RELOAD_TOKEN", "s" * 20)
    monkeypatch.setenv("VLD_BATCH_WINDOW_MS", "0")
    settings = load_settings(port=9001)
    assert settings.max_k == 7 and settings.model_dir == tmp_path and settings.port == 9001
    assert (
        settings.reload_token is not None and settings.reload_token.get_secret_value() == "s" * 20
    )
    assert settings.batch_window_ms == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VLD_MAX_K", "0"),
        ("VLD_MAX_K", "many"),
        ("VLD_PORT", "70000"),
        ("VLD_QUEUE_SIZE", "0"),
        ("VLD_BATCH_WINDOW_MS", "-1"),
        ("VLD_MAX_UPLOAD_BYTES", "0"),
        ("VLD_DEVICE", "tpu"),
        ("VLD_LOG_LEVEL", "loud"),
        ("VLD_POLL_INTERVAL_S", "0.01"),
        ("VLD_RELOAD_TOKEN", "short"),
    ],
)
def test_invalid_values_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_a_batch_window_over_the_default_max_wait_is_accepted() -> None:
    """`--batch-window-ms 100` alone must start: the batcher waits at least the window."""
    settings = load_settings(**vars(_parser().parse_args(["--batch-window-ms", "100"])))
    assert settings.batch_window_ms == 100 and settings.batch_max_wait_ms == 50
    config = _batching_config(settings)
    assert config.window_s == pytest.approx(0.1) and config.max_wait_s == pytest.approx(0.1)
    wider = load_settings(batch_window_ms=100, batch_max_wait_ms=300)
    assert _batching_config(wider).max_wait_s == pytest.approx(0.3)


def test_every_operator_setting_has_a_cli_option_naming_its_variable() -> None:
    parser = _parser()
    actions = {action.dest: action for action in parser._actions}
    assert {"reload_token"} == ENV_ONLY_SETTINGS  # a secret
    for field in set(Settings.model_fields) - ENV_ONLY_SETTINGS:
        assert field in actions, f"no option for {field}"
        flag = "--" + field.replace("_", "-")
        assert flag in actions[field].option_strings
        assert env_name(field) in (actions[field].help or "") and "default" in (
            actions[field].help or ""
        )
    assert not set(actions) & ENV_ONLY_SETTINGS
    assert "VLD_RELOAD_TOKEN" in parser.format_help() and "--reload-token" not in (
        parser.format_help()
    )


def test_cli_options_reach_the_settings(tmp_path: Path) -> None:
    values: dict[str, tuple[str, object]] = {
        "model_dir": (str(tmp_path), tmp_path),
        "index_root": (str(tmp_path), tmp_path),
        "teacher_dir": (str(tmp_path), tmp_path),
        "device": ("cpu", "cpu"),
        "torch_threads": ("3", 3),
        "host": ("0.0.0.0", "0.0.0.0"),
        "port": ("9002", 9002),
        "max_upload_bytes": ("1234", 1234),
        "max_image_pixels": ("5678", 5678),
        "max_k": ("7", 7),
        "max_text_chars": ("99", 99),
        "queue_size": ("5", 5),
        "batch_window_ms": ("8", 8.0),
        "batch_max_wait_ms": ("9", 9.0),
        "max_batch_size": ("4", 4),
        "retry_after_s": ("6", 6),
        "poll_interval_s": ("0.5", 0.5),
        "log_level": ("debug", "debug"),
    }
    argv = [
        arg for field, (text, _) in values.items() for arg in (f"--{field.replace('_', '-')}", text)
    ]
    settings = load_settings(**vars(_parser().parse_args([*argv, "--no-verify-on-start"])))
    for field, (_, expected) in values.items():
        assert getattr(settings, field) == expected, field
    assert settings.verify_on_start is False
    assert load_settings(**vars(_parser().parse_args([]))).verify_on_start is True


def test_a_rejected_token_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLD_RELOAD_TOKEN", "secret value")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "secret" not in str(caught.value) and "VLD_RELOAD_TOKEN" in str(caught.value)


def test_serving_paths_are_required_and_checked(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="VLD_MODEL_DIR is not set"):
        require_serving_paths(Settings(index_root=tmp_path))
    with pytest.raises(SettingsError, match="VLD_INDEX_ROOT is not set"):
        require_serving_paths(Settings(model_dir=tmp_path))
    with pytest.raises(SettingsError, match=r"VLD_INDEX_ROOT=.*no such directory"):
        require_serving_paths(Settings(model_dir=tmp_path, index_root=tmp_path / "nope"))
    assert require_serving_paths(Settings(model_dir=tmp_path, index_root=tmp_path)) == (
        tmp_path,
        tmp_path,
    )


def test_cli_exit_code_2_on_invalid_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VLD_QUEUE_SIZE", "-3")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "VLD_QUEUE_SIZE" in err
    monkeypatch.delenv("VLD_QUEUE_SIZE")
    assert main(["--port", "99999"]) == 2
    assert "VLD_PORT" in capsys.readouterr().err


def test_a_missing_or_bad_path_setting_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("VLD_MODEL_DIR", raising=False)
    assert main(["--index-root", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: VLD_MODEL_DIR is not set")
    assert main(["--model-dir", str(tmp_path / "nope"), "--index-root", str(tmp_path)]) == 2
    assert "VLD_MODEL_DIR=" in capsys.readouterr().err


def test_cli_exit_code_1_when_start_up_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty_model_dir = tmp_path / "model"
    empty_model_dir.mkdir()
    args = ["--model-dir", str(empty_model_dir), "--index-root", str(tmp_path), "--port", "0"]
    assert main(args) == 1
    assert any("start-up failed" in record.getMessage() for record in caplog.records)


def test_the_factory_app_fails_start_up_in_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`uvicorn --factory service.app:app_from_env` with a bad setting: uvicorn logs the
    lifespan's message, so it must be one line, not a traceback."""
    import asyncio

    from service.app import app_from_env

    monkeypatch.setenv("VLD_MAX_K", "0")
    app = app_from_env()
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    line = str(sent[0]["message"])
    assert "\n" not in line and "Traceback" not in line and "VLD_MAX_K" in line
    monkeypatch.delenv("VLD_MAX_K")
    monkeypatch.delenv("VLD_MODEL_DIR", raising=False)
    sent.clear()
    asyncio.run(app_from_env()({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert "VLD_MODEL_DIR is not set" in str(sent[0]["message"])


def test_importing_the_app_module_builds_no_app(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import service.app as module

    assert not hasattr(module, "app")  # no import-time app: uvicorn --factory builds it
    monkeypatch.setenv("VLD_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("VLD_INDEX_ROOT", str(tmp_path))
    app = module.app_from_env()
    assert app.title == "vldeformer"
    assert app.state.service.encoder is None  # the model loads in the lifespan, not here
