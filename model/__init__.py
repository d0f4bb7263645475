"""The meshlm transformer: `Transformer(ModelConfig(...)).apply({"params": p}, tokens)`."""

from model.config import ConfigError, ModelConfig
from model.transformer import Transformer

__all__ = ["ConfigError", "ModelConfig", "Transformer"]
