"""ServerSettings (pydantic-settings): LOGRA_* variables, their validation naming the variable, and
the command line's flags winning over them."""
from __future__ import annotations

import subprocess
import sys

import pytest

from api.settings import ServerSettings, SettingsError, env_name

from .support import REPO, subprocess_env

KEY = "k" * 8 + "-secret-123"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No LOGRA_* server variable from the shell running the tests."""
    for field in ServerSettings.model_fields:
        monkeypatch.delenv(env_name(field), raising=False)
    return monkeypatch


def test_defaults_without_environment():
    s = ServerSettings.from_env()
    assert (s.max_body_bytes, s.request_timeout_s, s.api_key, s.cors_origins) == (8 * 2**20, 60.0, None, [])
    assert (s.max_value_queries, s.heavy_running, s.heavy_queued) == (256, 1, 2)


def test_every_variable_is_read(clean_env):
    for name, value in {"LOGRA_MAX_BODY_BYTES": "1000", "LOGRA_REQUEST_TIMEOUT_S": "2.5", "LOGRA_API_KEY": KEY,
                        "LOGRA_MAX_VALUE_QUERIES": "7", "LOGRA_HEAVY_RUNNING": "3", "LOGRA_HEAVY_QUEUED": "0"}.items():
        clean_env.setenv(name, value)
    s = ServerSettings.from_env()
    assert (s.max_body_bytes, s.request_timeout_s, s.api_key) == (1000, 2.5, KEY)
    assert (s.max_value_queries, s.heavy_running, s.heavy_queued) == (7, 3, 0)
    assert KEY not in repr(s)


@pytest.mark.parametrize("value, origins", [
    ("https://a.example,https://b.example", ["https://a.example", "https://b.example"]),
    (" https://a.example , https://b.example ,", ["https://a.example", "https://b.example"]),
    ("https://a.example", ["https://a.example"]),
    ('["https://a.example", "https://b.example"]', ["https://a.example", "https://b.example"]),
    ("", []),
])
def test_cors_origins_comma_separated_or_json(clean_env, value, origins):
    clean_env.setenv("LOGRA_CORS_ORIGINS", value)
    assert ServerSettings.from_env().cors_origins == origins


def test_an_empty_variable_counts_as_unset(clean_env):
    clean_env.setenv("LOGRA_API_KEY", "")
    clean_env.setenv("LOGRA_MAX_BODY_BYTES", "")
    s = ServerSettings.from_env()
    assert s.api_key is None and s.max_body_bytes == 8 * 2**20


@pytest.mark.parametrize("name, value, reason", [
    ("LOGRA_MAX_BODY_BYTES", "abc", "valid integer"),
    ("LOGRA_MAX_BODY_BYTES", "0", "greater than or equal to 1"),
    ("LOGRA_REQUEST_TIMEOUT_S", "-1", "greater than 0"),
    ("LOGRA_REQUEST_TIMEOUT_S", "nan", "finite number"),
    ("LOGRA_MAX_VALUE_QUERIES", "many", "valid integer"),
    ("LOGRA_HEAVY_RUNNING", "0", "greater than or equal to 1"),
    ("LOGRA_HEAVY_QUEUED", "-1", "greater than or equal to 0"),
    ("LOGRA_CORS_ORIGINS", '["https://a.example"', "not a JSON list"),
    ("LOGRA_API_KEY", "too-short", "at least 16 characters"),
])
def test_a_bad_value_names_its_variable(clean_env, name, value, reason):
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as e:
        ServerSettings.from_env()
    message = str(e.value)
    assert name in message and reason in message and "\n" not in message
    assert isinstance(e.value, ValueError)
    if name == "LOGRA_API_KEY":
        assert value not in message  # a secret, even a bad one, is not echoed
    else:
        assert repr(value) in message


def test_every_bad_variable_is_reported_at_once(clean_env):
    clean_env.setenv("LOGRA_MAX_BODY_BYTES", "abc")
    clean_env.setenv("LOGRA_HEAVY_RUNNING", "0")
    with pytest.raises(SettingsError, match="LOGRA_MAX_BODY_BYTES=.*; LOGRA_HEAVY_RUNNING="):
        ServerSettings.from_env()


def test_overrides_win_over_the_environment_and_a_bad_one_is_named_as_given(clean_env):
    clean_env.setenv("LOGRA_MAX_BODY_BYTES", "abc")  # overridden: never used
    clean_env.setenv("LOGRA_REQUEST_TIMEOUT_S", "5")
    clean_env.setenv("LOGRA_CORS_ORIGINS", "https://env.example")
    s = ServerSettings.from_env(max_body_bytes=100, request_timeout_s=None, cors_origins=["https://flag.example"])
    assert (s.max_body_bytes, s.request_timeout_s, s.cors_origins) == (100, 5.0, ["https://flag.example"])
    with pytest.raises(SettingsError, match=r"^invalid server setting: heavy_queued=-1: "):
        ServerSettings.from_env(max_body_bytes=1, heavy_queued=-1)


def test_settings_are_frozen():
    with pytest.raises(Exception):
        ServerSettings().max_body_bytes = 1


def _serve(monkeypatch, argv):
    """`python -m api ARGV` in process, up to the app: the settings it would serve with."""
    import api.__main__ as cli
    seen = {}

    def fake_app(index, **kw):
        seen.update(kw)
        return object()
    monkeypatch.setattr(cli, "create_app", fake_app)
    monkeypatch.setattr(cli, "serve", lambda *a, **kw: 0)  # the server itself (api.shutdown) is not started
    assert cli.main(argv) == 0
    return seen["settings"]


def test_cli_flags_win_over_the_environment(clean_env):
    clean_env.setenv("LOGRA_MAX_BODY_BYTES", "1000")
    clean_env.setenv("LOGRA_REQUEST_TIMEOUT_S", "9")
    clean_env.setenv("LOGRA_CORS_ORIGINS", "https://a.example,https://b.example")
    s = _serve(clean_env, ["--index", "x"])
    assert (s.max_body_bytes, s.request_timeout_s, s.cors_origins) == (1000, 9.0, ["https://a.example", "https://b.example"])
    s = _serve(clean_env, ["--index", "x", "--max-body-bytes", "2000", "--request-timeout", "1.5",
                           "--cors-origin", "https://c.example", "--cors-origin", "https://d.example"])
    assert (s.max_body_bytes, s.request_timeout_s, s.cors_origins) == (2000, 1.5, ["https://c.example", "https://d.example"])


@pytest.mark.parametrize("argv", [["--max-body-bytes", "0"], ["--request-timeout", "-1"], ["--max-body-bytes", "abc"]])
def test_a_bad_flag_is_named_by_argparse(capsys, argv):
    from api.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["--index", "x", *argv])
    assert e.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_python_m_api_with_a_bad_variable_exits_with_one_line_naming_it(tmp_path):
    env = subprocess_env(LOGRA_MAX_BODY_BYTES="abc")
    done = subprocess.run([sys.executable, "-m", "api", "--index", str(tmp_path / "no-index")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == ("error: invalid server setting: LOGRA_MAX_BODY_BYTES='abc': "
                                   "Input should be a valid integer, unable to parse string as an integer")
    assert "serving" not in done.stdout
