"""The loading bar counts the bytes read from the checkpoint's files, as stored (a Q8_0 file's bytes, not the
float32 they dequantize to), and ends at its total."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.api import BUNDLED_MODEL
from qwen3moe_jax.io import materialize


class RecordingBar:
    """Stands in for tqdm: keeps its total and where it ended."""

    bars: list[RecordingBar] = []

    def __init__(self, total: int, **kwargs: object) -> None:
        self.total, self.n = total, 0
        RecordingBar.bars.append(self)

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        self.n += n


@pytest.fixture
def bar(monkeypatch):
    RecordingBar.bars = []
    monkeypatch.setattr(materialize, "tqdm", RecordingBar)
    yield RecordingBar.bars


def test_gguf_bar_counts_the_files_tensor_bytes(bar):
    model = qj.load(dtype="float32")
    reader = gguf.GGUFReader(BUNDLED_MODEL)  # the gguf package's own account of the file's tensor data
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    assert [(b.total, b.n) for b in bar] == [(stored, stored)]
    dequantized = sum(leaf.nbytes for leaf in jax.tree.leaves(model.params))
    assert stored < Path(BUNDLED_MODEL).stat().st_size < dequantized  # file bytes, not float32 bytes


def test_hf_bar_counts_the_safetensors_data(hf_tiny, bar):
    path, _ = hf_tiny
    qj.load(path, dtype="bfloat16")
    data = 0
    for file in Path(path).glob("*.safetensors"):
        raw = file.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        data += sum(end - start for name, t in header.items() if name != "__metadata__"
                    for start, end in [t["data_offsets"]])
    assert [(b.total, b.n) for b in bar] == [(data, data)]
