"""What every slimserve server of a comparison is started with."""

from pathlib import Path

from slimserve.loadtest.compare import CompareConfig, server_env


def test_the_servers_get_only_the_settings_the_comparison_names() -> None:
    assert server_env(CompareConfig(bundle=Path("models/demo"))) == {}  # the server's defaults
    config = CompareConfig(bundle=Path("models/demo"), safety_margin_ms=2.5, frontends=3)
    assert server_env(config) == {"SLIMSERVE_SAFETY_MARGIN_MS": "2.5", "SLIMSERVE_FRONTENDS": "3"}
