"""Configuration: one YAML file describes a whole orchestrator (``SagaManager.from_config``).

`load_config` reads and validates it into the frozen `SagaConfig`; `build_manager` turns it into a wired,
not yet started `SagaManager`. The reference of every key is in the README and in the docstrings of
`saga.config.model`.
"""

from saga.config.build import (
    apply_default_timeout,
    build_broker_pool,
    build_manager,
    build_recovery_worker,
    build_storage,
    import_sagas,
    manager_options,
)
from saga.config.embedded import EMBEDDED_CONFIG, default_config_path
from saga.config.loader import interpolate, load_config, read_config_file
from saga.config.model import (
    MEMORY_STORAGE_URL,
    BrokerConfig,
    ConsumerConfig,
    LoggingConfig,
    MemoryBrokerConfig,
    MetricsConfig,
    OutboxConfig,
    RecoveryConfig,
    SagaConfig,
    ServiceConfig,
    StorageConfig,
    TimeoutsConfig,
    TopicsConfig,
    TracingConfig,
    UiConfig,
)

__all__ = [
    "EMBEDDED_CONFIG",
    "MEMORY_STORAGE_URL",
    "BrokerConfig",
    "ConsumerConfig",
    "LoggingConfig",
    "MemoryBrokerConfig",
    "MetricsConfig",
    "OutboxConfig",
    "RecoveryConfig",
    "SagaConfig",
    "ServiceConfig",
    "StorageConfig",
    "TimeoutsConfig",
    "TopicsConfig",
    "TracingConfig",
    "UiConfig",
    "apply_default_timeout",
    "build_broker_pool",
    "build_manager",
    "build_recovery_worker",
    "build_storage",
    "default_config_path",
    "import_sagas",
    "interpolate",
    "load_config",
    "manager_options",
    "read_config_file",
]
