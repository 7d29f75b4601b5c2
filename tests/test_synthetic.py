"""The demo's [synthetic] step: written once, kept while what it would write is the same, and always written under a
private name then renamed into place, so that a reader never finds half a checkpoint."""

import json
import shutil

import pytest

from qllava import synthetic, tiny
from qllava.recipe import SyntheticConfig


def config(root, **changes):
    return SyntheticConfig(
        **{"data_dir": str(root / "shapes"), "train_samples": 400, "eval_samples": 72, "seed": 0, **changes}
    )


def stamps(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("decoder", ["mistral", "llama"])
def test_a_second_prepare_writes_nothing(tiny_inputs, decoder):
    """The decoder's key holds the image sizes, a tuple, which reads back from its marker as a list: compared as
    written, they never matched and the decoder was rewritten on every run."""
    before = {name: stamps(tiny_inputs / name) for name in ("shapes", "clip", decoder)}
    said = []
    synthetic.prepare(
        config(tiny_inputs, decoder_family=decoder),
        str(tiny_inputs / "clip"),
        str(tiny_inputs / decoder),
        say=said.append,
    )
    assert said == []
    assert {name: stamps(tiny_inputs / name) for name in before} == before


def test_a_folder_is_written_privately_and_renamed_into_place(tiny_inputs, tmp_path, monkeypatch):
    decoder = tmp_path / "decoder"
    shutil.copytree(tiny_inputs / "mistral", decoder)
    marker = decoder / synthetic.MARKER
    marker.write_text(json.dumps({"kind": "an older one"}))  # what is there is stale: it is rewritten
    old = {p.relative_to(decoder): p.read_bytes() for p in decoder.rglob("*") if p.is_file()}
    cfg = config(tiny_inputs)
    written_to = []

    def fails_halfway(path, *args, **kwargs):
        written_to.append(path)
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half")
        # meanwhile, the folder a reader opens is the old one, whole
        assert {p.relative_to(decoder): p.read_bytes() for p in decoder.rglob("*") if p.is_file()} == old
        raise OSError("disk full")

    monkeypatch.setattr(tiny, "write_decoder", fails_halfway)
    with pytest.raises(OSError, match="disk full"):
        synthetic.prepare(cfg, str(tiny_inputs / "clip"), str(decoder), say=lambda _: None)
    assert written_to[0] != decoder and written_to[0].parent == decoder.parent
    assert {p.relative_to(decoder): p.read_bytes() for p in decoder.rglob("*") if p.is_file()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder"]  # no private folder left behind

    monkeypatch.undo()
    said = []
    synthetic.prepare(cfg, str(tiny_inputs / "clip"), str(decoder), say=said.append)
    assert said == [f"writing the mistral decoder and tokenizer to {decoder}"]
    assert (decoder / "model.safetensors").read_bytes() == (tiny_inputs / "mistral" / "model.safetensors").read_bytes()
    assert json.loads(marker.read_text()) == json.loads((tiny_inputs / "mistral" / synthetic.MARKER).read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder"]


def test_a_folder_not_written_by_the_synthetic_step_is_never_replaced(tiny_inputs, tmp_path):
    mine = tmp_path / "my_decoder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="was not written by qllava's \\[synthetic\\] step"):
        synthetic.prepare(config(tiny_inputs), str(tiny_inputs / "clip"), str(mine), say=lambda _: None)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
