"""Model export: a Hugging Face BERT-family checkpoint to an ONNX repository entry, fp32 and int8, without torch.

`graph` builds the fp32 graph of an encoder (`cross_encoder` adds a reranker's head), `quantise` derives the
int8 copy, `entries` writes repository entries for either kind, `cli` picks the builder (what `xcstack model
import` runs); `ModelImportError` says why a checkpoint cannot be imported.
"""

from xcstack.inference.export.cli import (
    DEFAULT_INT8_NAME,
    DEFAULT_MODEL_NAME,
    default_source,
    import_default,
    import_model,
)
from xcstack.inference.export.errors import ModelImportError

__all__ = [
    "DEFAULT_INT8_NAME",
    "DEFAULT_MODEL_NAME",
    "ModelImportError",
    "default_source",
    "import_default",
    "import_model",
]
