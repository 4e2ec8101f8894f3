"""Configuration: bridge.yaml with ${ENV} substitution, strict keys and precise errors."""

from bridge.config.model import (
    Config,
    DeliveryConfig,
    DestinationConfig,
    GuardConfig,
    RetryConfig,
    ServerConfig,
    SourceConfig,
    StoreConfig,
    StreamsAuth,
    build_config,
    load_config,
    parse_rate,
)
from bridge.destinations.base import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DestinationConfig",
    "GuardConfig",
    "RetryConfig",
    "ServerConfig",
    "SourceConfig",
    "StoreConfig",
    "StreamsAuth",
    "build_config",
    "load_config",
    "parse_rate",
]
