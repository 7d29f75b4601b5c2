"""A stage's data: reading LLaVA JSON and Hugging Face datasets, turning conversations into samples (input_ids and
labels), and preparing them at scale, cached. Three modules, one concept each:

- formats: the formats users have (LLaVA JSON streamed, Hugging Face datasets), read into Conversations; what makes
  a sample unusable, skipped and counted by reason in a DataReport; the ImageStore that opens a sample's image.
  A new data format is added there.
- samples: a conversation rendered and tokenized as official LLaVA does (encode), one placeholder per image, and
  the one place that widens placeholders to an image's tokens (expand_images).
- prepare: a stage's data prepared once in worker processes, written into one memory-mapped Arrow file, cached under
  a key of what they depend on and checked against their images each time they are read.

Every public name is importable from qllava.data, as before the package was split.
"""

from ..errors import DataError
from .formats import (
    JOB_SAMPLES,
    LARGE,
    ORIENTED,
    ROLES,
    SEVERAL_IMAGES,
    Conversation,
    DataReport,
    ImageChanged,
    ImageStore,
    image_source,
    image_stamp,
    is_llava_json,
    read_conversations,
)
from .prepare import (
    CACHE_VERSION,
    IMAGES_FILE,
    SAMPLES_FILE,
    SAVED_DATASET_FILES,
    available_cores,
    build_stage_dataset,
    default_num_proc,
    stage_dataset,
)
from .samples import (
    FEATURES,
    Tokenization,
    encode,
    expand_images,
    expand_sample,
    tokenize_conversation,
    tokenize_dataset,
)

__all__ = [
    "CACHE_VERSION",
    "FEATURES",
    "IMAGES_FILE",
    "JOB_SAMPLES",
    "LARGE",
    "ORIENTED",
    "ROLES",
    "SAMPLES_FILE",
    "SAVED_DATASET_FILES",
    "SEVERAL_IMAGES",
    "Conversation",
    "DataError",
    "DataReport",
    "ImageChanged",
    "ImageStore",
    "Tokenization",
    "available_cores",
    "build_stage_dataset",
    "default_num_proc",
    "encode",
    "expand_images",
    "expand_sample",
    "image_source",
    "image_stamp",
    "is_llava_json",
    "read_conversations",
    "stage_dataset",
    "tokenize_conversation",
    "tokenize_dataset",
]
