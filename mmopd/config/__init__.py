"""Typed run configuration: YAML supplies values, dotted CLI overrides adjust them, and every
field is checked up front so a bad value fails before any model is loaded. One module per
section; every name is importable from `mmopd.config`."""

from .base import ConfigError, apply_overrides, dump_yaml, load_config, parse_override, to_dict
from .model import LoraSettings, ModelConfig, TinyModelConfig
from .objective import ObjectiveConfig
from .rollout import EnvConfig, RolloutConfig, VLLMConfig
from .run import SFTConfig, SFTDataConfig, TrainConfig
from .teacher import ServedTeacherConfig, TeacherConfig
from .trainer import EvalConfig, OptimConfig, TrainerConfig, WarmupConfig

__all__ = [
    "ConfigError", "EnvConfig", "EvalConfig", "LoraSettings", "ModelConfig", "ObjectiveConfig",
    "OptimConfig", "RolloutConfig", "SFTConfig", "SFTDataConfig", "ServedTeacherConfig",
    "TeacherConfig", "TinyModelConfig", "TrainConfig", "TrainerConfig", "VLLMConfig",
    "WarmupConfig", "apply_overrides", "dump_yaml", "load_config", "parse_override", "to_dict",
]
