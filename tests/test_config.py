"""Config: built-in defaults, and every bad file refused with its key and exit code 2."""

from __future__ import annotations

import pytest

from watchdog.config import Config, ConfigError, load, parse


def test_defaults_need_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr("watchdog.config.SYSTEM_CONFIG", tmp_path / "absent.toml")
    cfg = load(None)
    assert cfg == Config()
    assert cfg.pipeline.fallback == "fail"
    assert cfg.daemon.http_host == "127.0.0.1"


def test_full_file_round_trip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[pipeline]\ndevices = [0, 1]\nfallback = "warn"\nface_box = [10, 20, 64, 64]\n'
        '[pipeline.models]\ngenerator = "/m/gen.onnx"\n'
        '[daemon]\ninterval_s = 1\nmode = "external"\ncommand = ["python", "app.py"]\n'
        '[[daemon.log_patterns]]\nregex = "队列满"\nalert = "queue_full"\n'
    )
    cfg = load(path)
    assert cfg.pipeline.devices == [0, 1]
    assert cfg.pipeline.face_box == (10, 20, 64, 64)
    assert str(cfg.pipeline.models.generator) == "/m/gen.onnx"
    assert cfg.daemon.interval_s == 1.0
    assert cfg.daemon.log_patterns[0].alert == "queue_full"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[daemon]\nbogus = 1\n", "[daemon] bogus: unknown key"),
        ("[nonsense]\n", "nonsense: unknown key"),
        ('[daemon]\ninterval_s = "2"\n', "[daemon] interval_s: Input should be a valid number"),
        ("[daemon]\ninterval_s = -1\n", "[daemon] interval_s: Input should be greater than 0 (got -1)"),
        ("[rules]\nzombies_max = 1.5\n", "[rules] zombies_max"),
        ('[pipeline]\ndevices = "gpu"\n', "[pipeline] devices"),
        ("[pipeline]\ndevices = [0, 0]\n", "[pipeline] devices: GPU indices must be distinct"),
        ("[pipeline]\ndevices = [-1]\n", "[pipeline] devices: GPU indices are >= 0"),
        ('[pipeline]\nfallback = "ignore"\n', "[pipeline] fallback"),
        ("[daemon]\nhttp_port = 70000\n", "[daemon] http_port"),
        ("[daemon\n", "not valid TOML"),
    ],
)
def test_bad_files_name_file_and_key(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="absent.toml: no such config file"):
        load(tmp_path / "absent.toml")


def test_parse_reports_every_problem():
    with pytest.raises(ConfigError) as err:
        parse({"daemon": {"interval_s": 0, "x": 1}}, "f.toml")
    assert "interval_s" in str(err.value) and "[daemon] x: unknown key" in str(err.value)


def test_state_dir_prefers_systemd(tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "sd"))
    path = Config().state_dir()
    assert path == tmp_path / "sd" and path.is_dir()
    assert (path.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("text", ["[daemon]\nbogus = 1\n", "[daemon\n"])
def test_cli_config_error_exits_2(tmp_path, cli, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = cli("--config", str(path), "doctor")
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr


def test_cli_missing_config_exits_2(tmp_path, cli):
    result = cli("--config", str(tmp_path / "nope.toml"), "doctor")
    assert result.returncode == 2
    assert "nope.toml: no such config file" in result.stderr


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.20", False), ("myhost", False), ("::ffff:10.0.0.1", False),
])
def test_what_counts_as_loopback(host, loopback):
    from watchdog.config import is_loopback

    assert is_loopback(host) is loopback
