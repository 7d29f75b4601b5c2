"""Checkpoints weight by weight: where each weight of the LLaVA a recipe describes is stored in its base
checkpoints, and how to write a LLaVA checkpoint one shard at a time.

`qllava merge` streams with this: it never holds the whole model, only one output shard and the tensor in
flight, so a 7B merge fits a Colab runtime (benchmarks/merge_7b.py). The names are transformers' own: a
checkpoint key is renamed as `from_pretrained` renames it on loading, and a weight is written under the name
`save_pretrained` gives it, so the checkpoint written here is the one `save_pretrained` would write.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    pass


class Files:
    """The safetensors files of one checkpoint folder: which file holds each key; tensors read one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / WEIGHTS_INDEX
        if index.exists():
            self.where = {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.where = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(path, "pt") as f:
                    self.where.update(dict.fromkeys(f.keys(), path))
        if not self.where:
            raise CheckpointError(f"{self.folder}: no safetensors weights (qllava merge reads .safetensors only)")

    def read(self, key: str) -> torch.Tensor:
        # pread, not a memory map: the tensor is copied out and nothing stays resident after it is freed
        with safe_open(self.where[key], "pt", backend="pread") as f:
            return f.get_tensor(key)


@dataclass(frozen=True)
class Source:
    files: Files
    key: str

    def read(self) -> torch.Tensor:
        return self.files.read(self.key)


def module_sources(module, files: Files, place) -> dict[str, Source]:
    """Each weight of `module` (a model built on the meta device) -> where `files` store it, under the name
    `place(module_key)` gives it in the whole model. Keys are renamed as from_pretrained renames them; a
    checkpoint that needs more than renaming (weights split or fused on loading) is refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key
    state = module.state_dict()
    transforms = get_model_conversion_mapping(module)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    sources = {}
    for key in files.where:
        name, converted = rename_source_key(key, renamings, converters, module.base_model_prefix, state)
        if converted is not None:
            raise CheckpointError(f"{files.folder}: weight {key} is converted on loading ({converted}), which "
                                  "qllava merge cannot stream; merge with a checkpoint that stores weights as loaded")
        if name in state:
            sources[place(name)] = Source(files, key)
    return sources


def saved_names(model) -> dict[str, str]:
    """The weights save_pretrained writes (a tied weight once), in the order it shards them: name in `model` ->
    the name it is written under (transformers reverts its renamings on saving: a LLaVA is saved with
    `language_model.model.*` keys)."""
    from transformers.core_model_loading import dot_natural_key, revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    keys = sorted(remove_tied_weights_from_state_dict(model.state_dict(), model), key=dot_natural_key)
    names = {}
    for key in keys:
        (saved,) = revert_weight_conversion(model, {key: torch.empty(0, device="meta")})
        names[key] = saved
    return names


def write_sharded(folder: Path, model, tensors, max_shard_size: str) -> int:
    """Write the weights of `model` (built on the meta device) as save_pretrained shards them, computing each
    with `tensors(keys)` (an iterator of (key, tensor), model keys) one shard at a time; returns the bytes
    written. Only one shard is ever held."""
    from huggingface_hub import split_torch_state_dict_into_shards
    names = saved_names(model)
    state = model.state_dict()
    by_name = {name: state[key] for key, name in names.items()}
    split = split_torch_state_dict_into_shards(by_name, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    model_key = {name: key for key, name in names.items()}
    for filename, shard_names in split.filename_to_tensors.items():
        shard = {names[k]: t.contiguous() for k, t in tensors([model_key[n] for n in shard_names])}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sum(t.numel() * t.element_size() for t in by_name.values())
