"""The meshlm transformer: `Transformer(ModelConfig(...)).apply({"params": p}, tokens)`."""

from model.config import ModelConfig
from model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
