"""Configuration: flag > LORAFORGE_* environment variable > default."""

from __future__ import annotations

import dataclasses

import pytest

from loraforge.services.common.config import ServerConfig, load_config, setting
from loraforge.services.common.errors import InvalidArgument
from loraforge.services.common.pages import decode_token, encode_token
from loraforge.services.common.resources import parse_name, validate_id


def test_flags_beat_environment_which_beats_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFORGE_PORT", "7000")
    monkeypatch.setenv("LORAFORGE_LOG_LEVEL", "DEBUG")
    config = load_config(ServerConfig, ["--port", "7001"])
    assert config.port == 7001
    assert config.log_level == "DEBUG"
    assert config.host == "127.0.0.1"


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFORGE_PORT", "eighty")
    with pytest.raises(InvalidArgument, match="LORAFORGE_PORT"):
        load_config(ServerConfig, [])


def test_choices_match_ignoring_case_and_anything_else_is_refused_naming_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAFORGE_LOG_LEVEL", "debug")
    assert load_config(ServerConfig, ["--log-format", "JSON"]).log_level == "DEBUG"
    assert load_config(ServerConfig, ["--log-format", "JSON"]).log_format == "json"
    with pytest.raises(InvalidArgument) as info:
        load_config(ServerConfig, ["--log-format", "xml"])
    assert info.value.message == (
        "--log-format (LORAFORGE_LOG_FORMAT) must be one of text, json (got 'xml')"
    )


@dataclasses.dataclass
class _NeedsPeer(ServerConfig):
    peer_address: str = setting("", "host:port of the peer.", required=True)


def test_a_required_setting_that_is_empty_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgument) as info:
        load_config(_NeedsPeer, [])
    assert info.value.message == (
        "--peer-address (LORAFORGE_PEER_ADDRESS) is required: host:port of the peer."
    )
    monkeypatch.setenv("LORAFORGE_PEER_ADDRESS", "  ")
    with pytest.raises(InvalidArgument):
        load_config(_NeedsPeer, [])
    assert load_config(_NeedsPeer, ["--peer-address", "p:1"]).peer_address == "p:1"


def test_embedded_defaults_live_under_home(tmp_path: object) -> None:
    config = load_config(ServerConfig, ["--home", str(tmp_path)])
    assert config.database_url_for("dataset") == f"sqlite:///{tmp_path}/dataset.db"
    assert config.object_store_url_or_default() == f"{tmp_path}/objects"


def test_resource_names_and_ids_are_validated() -> None:
    assert parse_name("apps/a/datasets/d-1", "apps/{app}/datasets/{dataset}") == {
        "app": "a",
        "dataset": "d-1",
    }
    for bad in ["apps/a", "apps/A/datasets/d", "apps/a/models/d", "apps/a/datasets/../x", ""]:
        with pytest.raises(InvalidArgument):
            parse_name(bad, "apps/{app}/datasets/{dataset}")
    with pytest.raises(InvalidArgument, match="1 to 63"):
        validate_id("x" * 64, "app_id")
    token = encode_token("ListApps", "", {"after": 5})
    assert decode_token(token, "ListApps", "", ("after",)) == {"after": 5}
    with pytest.raises(InvalidArgument, match="page_token"):
        decode_token("not-a-token!", "ListApps", "", ("after",))
