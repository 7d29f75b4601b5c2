"""qllava/checkpoint.py on its own: weights read as safetensors stores them, read ahead in a thread, files written
as save_file writes them; and merge's one-pass LoRA merge equal to peft's."""

import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qllava import merge
from qllava.checkpoint import CheckpointError, Files, ahead, file_order, write_file

TENSORS = {
    "model.layers.10.w": torch.randn(3, 5, dtype=torch.float64),
    "model.layers.2.w": torch.randn(7).half(),
    "ids": torch.arange(6).reshape(2, 3),
    "scale": torch.tensor(2.5),
    "mask": torch.tensor([True, False, True]),
    "b": torch.randn(4, 3).bfloat16(),
    "a": torch.randn(2, 2),
    "q": torch.tensor([1, 250], dtype=torch.uint8),
    "n": torch.tensor([-3], dtype=torch.int8),
    "i": torch.tensor([7], dtype=torch.int32),
}


@pytest.fixture
def stored(tmp_path):
    save_file(dict(list(TENSORS.items())[:5]), str(tmp_path / "one.safetensors"), metadata={"format": "pt"})
    save_file(dict(list(TENSORS.items())[5:]), str(tmp_path / "two.safetensors"), metadata={"format": "pt"})
    return tmp_path


def test_a_file_written_weight_by_weight_is_the_file_save_file_writes(tmp_path):
    save_file(TENSORS, str(tmp_path / "saved.safetensors"), metadata={"format": "pt"})
    layout = {name: t.to("meta") for name, t in TENSORS.items()}
    order = file_order(layout)
    assert order[:3] == ["ids", "model.layers.10.w", "a"]  # by dtype (as safetensors ranks them), then by name
    write_file(tmp_path / "written.safetensors", layout, ((name, TENSORS[name]) for name in order))
    assert (tmp_path / "written.safetensors").read_bytes() == (tmp_path / "saved.safetensors").read_bytes()


def test_write_file_refuses_a_weight_out_of_order_or_of_another_shape_naming_the_file(tmp_path):
    layout = {"a": torch.empty(2, 2, device="meta"), "b": torch.empty(3, device="meta")}
    with pytest.raises(
        CheckpointError,
        match=r"x\.safetensors: expected weight b torch.float32 \(3,\) next, got "
        r"b torch.float32 \(4,\)",
    ):
        write_file(tmp_path / "x.safetensors", layout, iter([("a", torch.zeros(2, 2)), ("b", torch.zeros(4))]))
    with pytest.raises(CheckpointError, match="expected weight a .* got nothing"):
        write_file(tmp_path / "x.safetensors", layout, iter([]))


def test_weights_read_ahead_are_the_bytes_safetensors_reads(stored):
    files = Files(stored)
    assert set(files.where) == set(TENSORS)
    keys = sorted(TENSORS)
    read = list(ahead((files.read(key) for key in keys), depth=2))
    for key, tensor in zip(keys, read, strict=True):
        with safe_open(files.where[key], "pt") as f:
            expected = f.get_tensor(key)
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape and torch.equal(tensor, expected)


def test_a_weight_cut_short_is_refused_from_the_reader_thread_naming_its_file(stored):
    files, other = Files(stored), Files(stored)  # listed whole, as an index (a sharded checkpoint's) lists them
    path = stored / "two.safetensors"
    path.write_bytes(path.read_bytes()[:-1])  # the last weight in the file ("q": uint8, 2 bytes) loses its end
    reads = ahead(((key, files.read(key)) for key in ["a", "ids", "q", "b"]), depth=2)
    assert [next(reads)[0], next(reads)[0]] == ["a", "ids"]  # what comes before it arrives
    with pytest.raises(CheckpointError, match=rf"{path}: weight q is cut short \(1 of its 2 bytes"):
        next(reads)
    (stored / "one.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match=r"one\.safetensors: not a safetensors file"):
        list(ahead((other.read(key) for key in ["ids"]), depth=2))


def test_ahead_stops_its_thread_when_the_consumer_stops_early():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    before = threading.active_count()
    reads = ahead(items(), depth=2)
    assert [next(reads), next(reads)] == [0, 1]
    reads.close()
    assert threading.active_count() == before and len(produced) <= 5  # 2 taken, 2 queued, 1 waiting for room
    with pytest.raises(ZeroDivisionError):  # an error producing an item is raised as it is, where it is reached
        list(ahead((1 / (2 - i) for i in range(4)), depth=2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_one_pass_merge_is_peft_s_merge_and_measures_its_rounding(dtype, monkeypatch):
    monkeypatch.setattr(merge, "BLOCK", 1000)  # several blocks, the last one partial
    torch.manual_seed(0)
    base = torch.randn(96, 70).to(dtype)
    lora_a, lora_b = torch.randn(8, 70), torch.randn(96, 8) * 0.01
    weights = merge._Weights.__new__(merge._Weights)
    weights.lora = {
        "w": {"A": lora_a, "B": lora_b, "scaling": 2.0},
        "big": {"A": torch.randn(8, 100), "B": torch.randn(120, 8), "scaling": 1.0},
    }
    weights.merged_count, weights.error, weights.change, weights._delta = 0, 0.0, 0.0, torch.empty(0)
    weights._with_delta("big", torch.randn(120, 100).to(dtype))  # the delta is computed in a larger buffer
    weights.merged_count, weights.error, weights.change = 0, 0.0, 0.0
    merged = weights._with_delta("w", base.clone())
    delta = (lora_b @ lora_a) * 2.0
    peft = base.clone()
    peft += delta  # peft's merge of a float32 adapter: the sum in float32, rounded once
    assert torch.equal(merged, peft) and weights.merged_count == 1
    error = torch.linalg.vector_norm(peft.float() - (base.float() + delta)) / torch.linalg.vector_norm(delta)
    assert weights.rounding_error() == pytest.approx(error.item(), rel=1e-5, abs=1e-12)
    assert (weights.rounding_error() == 0) == (dtype == torch.float32)
