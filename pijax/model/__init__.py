from pijax.model.llama import LlamaModel
from pijax.model.metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "LlamaModel"]
