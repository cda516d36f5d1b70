"""Data: record files of any common chat shape -> (context, reply) token pairs, exactly as inference splits them.

records.py reads files and brings each record's shape to a chat; examples.py splits chats into
the context the full model prefills and the reply the decoder learns, batches them, and holds
the train/validation split; calibration.py serves pruning; prompts.py reads the prompt side alone.
"""

from overfill.data.examples import (
    Batch,
    ChatTemplateError,
    DataConfig,
    DataSplits,
    Example,
    LoadedData,
    RecordFields,
    chat_ids,
    collate,
    load_data,
    load_examples,
    split_messages,
    split_train_val,
    truncate,
)

__all__ = [
    "Batch", "ChatTemplateError", "DataConfig", "DataSplits", "Example", "LoadedData", "RecordFields", "chat_ids",
    "collate", "load_data", "load_examples", "split_messages", "split_train_val", "truncate",
]
