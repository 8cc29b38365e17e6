"""The run's config: every default in the dataclasses of sections.py; load.py reads a YAML file and
`key.path=value` overrides into them, and validates."""

from qlora_loop.config.checks import objective_metrics
from qlora_loop.config.load import flat_config, key_paths, load_config, source_configs, to_dict, validate
from qlora_loop.config.sections import (ASSETS, CHOICES, PREFERENCE_METRICS, AdapterConfig, Config, DataConfig,
                                        EvalConfig, ModelConfig, SourceConfig, TrainConfig, resolved_beta)
from qlora_loop.errors import ConfigError

__all__ = ["ASSETS", "CHOICES", "PREFERENCE_METRICS", "AdapterConfig", "Config", "ConfigError", "DataConfig",
           "EvalConfig", "ModelConfig", "SourceConfig", "TrainConfig", "flat_config", "key_paths", "load_config",
           "objective_metrics", "resolved_beta", "source_configs", "to_dict", "validate"]
