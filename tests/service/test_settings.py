"""Settings from VLD_* variables, validation that names the variable, and the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.__main__ import main
from service.settings import Settings, SettingsError, load_settings, require_serving_paths


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


def test_settings_checked_together_name_both_variables() -> None:
    with pytest.raises(
        SettingsError,
        match=r"VLD_BATCH_MAX_WAIT_MS=5\.0 must be at least VLD_BATCH_WINDOW_MS=10\.0",
    ):
        load_settings(batch_window_ms=10, batch_max_wait_ms=5)


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


def test_cli_exit_code_1_when_start_up_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("VLD_MODEL_DIR", raising=False)
    assert main(["--index-root", str(tmp_path), "--port", "0"]) == 1
    assert any("VLD_MODEL_DIR is not set" in record.getMessage() for record in caplog.records)


def test_importing_the_module_level_app_loads_nothing() -> None:
    import service.app as module

    assert module.app.title.startswith("vldeformer")
    state = getattr(module.app.state, "service", None)
    assert state is None or state.encoder is None
