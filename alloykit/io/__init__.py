"""Reading and writing checkpoints. Knows nothing of merge methods."""

from alloykit.io.readers import CheckpointReader, TensorMeta, open_checkpoint
from alloykit.io.writer import StreamingWriter, parse_size, plan_shards

__all__ = [
    "CheckpointReader",
    "StreamingWriter",
    "TensorMeta",
    "open_checkpoint",
    "parse_size",
    "plan_shards",
]
