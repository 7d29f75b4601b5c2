"""Checkpoints weight by weight: where each weight of the LLaVA a recipe describes is stored in its base
checkpoints, and how to write a LLaVA checkpoint one weight at a time.

`qllava merge` streams with this: it never holds the whole model, only the few weights in flight, so a 7B merge
fits a Colab runtime (benchmarks/merge_7b.py). Three threads overlap: one reads the next weights, one computes,
one writes (`ahead`). The names are transformers' own: a checkpoint key is renamed as `from_pretrained` renames it
on loading, and a weight is written under the name `save_pretrained` gives it, in the shards it gives it, and
each file holds the bytes `safetensors.torch.save_file` writes: the checkpoint written here is the one
`save_pretrained` would write.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

WEIGHTS_INDEX = "model.safetensors.index.json"
# safetensors' dtype names, in the order of its dtype enum: a file stores the higher ones first, then by name
DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
RANK = {name: i for i, name in enumerate(DTYPES)}
# weights read ahead of the one being merged, and merged ahead of the one being written: a few hundred MB at 7B
READ_AHEAD, WRITE_BEHIND = 2, 3


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
                try:
                    with safe_open(path, "pt") as f:
                        self.where.update(dict.fromkeys(f.keys(), path))
                except SafetensorError as e:
                    raise CheckpointError(f"{path}: not a complete safetensors file ({e})") from None
        if not self.where:
            raise CheckpointError(f"{self.folder}: no safetensors weights (qllava merge reads .safetensors only)")
        self._headers: dict[Path, tuple[int, dict]] = {}

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key`, read into memory of its own with pread (not a memory map: nothing stays resident after
        it is freed), without holding Python's lock: reading the next weight in a thread overlaps work on this one."""
        path = self.where[key]
        try:
            start, entries = self._header(path)
            if key not in entries:
                raise CheckpointError(f"{path}: no weight {key}, which {WEIGHTS_INDEX} places there")
            dtype, shape, (begin, end) = entries[key]
            if dtype not in DTYPES:  # a dtype torch has no plain name for: safetensors converts it
                with safe_open(path, "pt", backend="pread") as f:
                    return f.get_tensor(key)
            data = torch.empty(end - begin, dtype=torch.uint8)
            with open(path, "rb", buffering=0) as f:
                got = _read_into(f.fileno(), memoryview(data.numpy()), start + begin)
        except OSError as e:
            raise CheckpointError(f"{path}: weight {key} cannot be read: {e}") from None
        if got != end - begin:
            raise CheckpointError(
                f"{path}: weight {key} is cut short ({got} of its {end - begin} bytes are in the "
                "file): the checkpoint is incomplete, download it again"
            )
        return data.view(DTYPES[dtype]).reshape(shape)

    def _header(self, path: Path) -> tuple[int, dict]:
        """Where the data of `path` starts, and each key's dtype, shape and byte range in it (read once a file)."""
        if path not in self._headers:
            with open(path, "rb") as f:
                start = f.read(8)
                size = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
                try:
                    header = json.loads(f.read(size)) if 0 < size < 2**27 else None
                except ValueError:
                    header = None
            if not isinstance(header, dict):
                raise CheckpointError(f"{path}: not a safetensors file (its header does not read)")
            self._headers[path] = (
                8 + size,
                {k: (v["dtype"], v["shape"], v["data_offsets"]) for k, v in header.items() if k != "__metadata__"},
            )
        return self._headers[path]


def _read_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill `buffer` from `offset` of the file `fd`; the bytes read (fewer at the file's end). One read returns at
    most 2 GiB on Linux, less than one weight of a large vocabulary in float32."""
    got = 0
    while got < len(buffer):
        n = os.preadv(fd, [buffer[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


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
            raise CheckpointError(
                f"{files.folder}: weight {key} is converted on loading ({converted}), which "
                "qllava merge cannot stream; merge with a checkpoint that stores weights as loaded"
            )
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
    with `tensors(keys)` (an iterator of (key, tensor), model keys, called once with every key in the order the
    files store them) in a thread a few weights ahead of the one being written; returns the bytes written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    names = saved_names(model)
    state = model.state_dict()
    by_name = {name: state[key] for key, name in names.items()}
    split = split_torch_state_dict_into_shards(
        by_name, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    model_key = {name: key for key, name in names.items()}
    files = {
        filename: file_order({n: by_name[n] for n in shard_names})
        for filename, shard_names in split.filename_to_tensors.items()
    }
    computed = ahead(tensors([model_key[n] for order in files.values() for n in order]), WRITE_BEHIND)
    try:
        for filename, order in files.items():
            write_file(folder / filename, {n: by_name[n] for n in order}, ((names[k], t) for k, t in computed))
    finally:
        computed.close()
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": model.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sum(t.numel() * t.element_size() for t in by_name.values())


def file_order(layout: dict[str, torch.Tensor]) -> list[str]:
    """The names of a safetensors file's tensors in the order safetensors stores them: by dtype, then by name."""
    return sorted(layout, key=lambda name: (-RANK[DTYPE_NAMES[layout[name].dtype]], name))


def write_file(
    path: Path,
    layout: dict[str, torch.Tensor],
    tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: dict | None = None,
) -> None:
    """Write a safetensors file holding the tensors `layout` describes (dtype and shape, as meta tensors), taking
    each from `tensors` (name, tensor) as it comes, in file_order: the bytes `save_file` writes, without holding
    the file in memory."""
    order = file_order(layout)
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name in order:
        size = layout[name].numel() * layout[name].element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[layout[name].dtype],
            "shape": list(layout[name].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for expected in order:
            name, tensor = next(tensors, (None, None))
            if name != expected or tensor.dtype != layout[name].dtype or tensor.shape != layout[name].shape:
                got = "nothing" if name is None else f"{name} {tensor.dtype} {tuple(tensor.shape)}"
                raise CheckpointError(
                    f"{path}: expected weight {expected} {layout[expected].dtype} "
                    f"{tuple(layout[expected].shape)} next, got {got}"
                )
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def ahead(items: Iterable, depth: int) -> Iterator:
    """`items`, produced by a thread up to `depth` items ahead of the consumer, so that producing the next ones
    (reading a weight, merging one) overlaps the work on this one. What producing an item raises is raised here
    when that item is reached; closing this generator stops the thread."""
    handoff, stop = queue.Queue(maxsize=depth), threading.Event()

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not _put(handoff, (item, None), stop):
                    return
            _put(handoff, (None, StopIteration()), stop)
        except BaseException as e:  # handed to the consumer, raised there
            _put(handoff, (None, e), stop)
        finally:
            if hasattr(iterator, "close"):
                iterator.close()

    thread = threading.Thread(target=produce, name="qllava-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = handoff.get()
            if isinstance(error, StopIteration):
                return
            if error is not None:
                raise error
            yield item
    finally:
        stop.set()
        thread.join()


def _put(handoff: queue.Queue, entry, stop: threading.Event) -> bool:
    """Hand `entry` over, waiting for room unless the consumer has stopped; whether it was handed over."""
    while not stop.is_set():
        try:
            handoff.put(entry, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
