"""Configuration: one frozen `Config` (settings.py), read once from the one OPTIONS table (options.py),
with the default locations of paths.py. Torch-free."""

from vallexd.config.options import DTYPES, ENV_PREFIX, LOG_LEVELS, OPTIONS, Option, build_parser, load_config
from vallexd.config.paths import DefaultPaths, default_paths
from vallexd.config.settings import Config, ConfigError

__all__ = [
    "DTYPES", "ENV_PREFIX", "LOG_LEVELS", "OPTIONS", "Config", "ConfigError", "DefaultPaths", "Option",
    "build_parser", "default_paths", "load_config",
]
