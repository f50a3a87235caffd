"""knitwatch.config: the settings schema, file + environment loading, the example config."""

from knitwatch.config.settings import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ConfigProblem,
    Settings,
    load_settings,
)

__all__ = ["DEFAULT_CONFIG_PATH", "ConfigError", "ConfigProblem", "Settings", "load_settings"]
