"""Corrupt or inconsistent checkpoints are refused quickly, with CheckpointError / ConfigError naming the file
and the field, never another exception, a long wait or a large allocation: GGUF counts and lengths past the
bytes left, metadata that disagrees with the tensors present, retyped tensors, NaN weights, and broken or
escaping Hugging Face directories. Then hypothesis mutates a small GGUF file at random: it loads, or a
package error is raised."""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen3moe_jax as qj
from qwen3moe_jax.io.chat_template import CHATML_TEMPLATE
from qwen3moe_jax.io.gguf_write import write_gguf
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.model.params import named_leaves

CONFIG = qj.ModelConfig(
    vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=0, norm_topk_prob=True,
    max_position_embeddings=64, bos_token_id=0, eos_token_ids=(2,),
)
# Python-level allocations (numpy's included) while a corrupt file is refused: the model itself is ~0.4 MB.
MEMORY_BOUND = 64 << 20


@pytest.fixture(scope="module")
def model(bpe_tokenizer):
    model = qj.random_model(CONFIG, seed=0, std=0.05)
    model.tokenizer = Tokenizer(bpe_tokenizer.backend, CHATML_TEMPLATE)
    return model


@pytest.fixture(scope="module")
def good_gguf(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    qj.save_gguf(model, path, "Q8_0")
    return path


def load_within_bounds(path: Path) -> qj.Model:
    """qj.load, failing the test if it allocates more than MEMORY_BOUND on the way."""
    tracemalloc.start()
    try:
        return qj.load(path, progress=False)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_BOUND, f"loading {path.name} allocated {peak / 2**20:.0f} MB"


def patched(src: Path, dst: Path, edit: Callable[[GGUFReader], None]) -> Path:
    """A copy of a GGUF file with values overwritten in place through the gguf reader's writable map."""
    shutil.copy(src, dst)
    reader = GGUFReader(dst, "r+")
    edit(reader)
    reader.data.flush()
    del reader
    return dst


def set_value(key: str, value: int) -> Callable[[GGUFReader], None]:
    def edit(reader: GGUFReader) -> None:
        reader.fields[key].parts[-1][0] = value
    return edit


def set_array_count(key: str, count: int) -> Callable[[GGUFReader], None]:
    def edit(reader: GGUFReader) -> None:
        reader.fields[key].parts[4][0] = count  # key length, key, type, element type, count, elements...
    return edit


@pytest.mark.parametrize("count", [2**38, 2**40, 10**6])
@pytest.mark.parametrize("key", ["tokenizer.ggml.token_type", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_array_counts_past_the_bytes_left_are_refused_before_allocating(good_gguf, tmp_path, key, count):
    path = patched(good_gguf, tmp_path / "bad.gguf", set_array_count(key, count))
    with pytest.raises(qj.CheckpointError, match=key.replace(".", r"\.")) as err:
        load_within_bounds(path)
    assert str(path) in str(err.value)


def test_metadata_arrays_past_the_loaders_limit_are_refused(tmp_path):
    """A consistent file whose arrays together hold more elements than the loader reads (each becomes a Python
    object): 5 arrays of 2^20 bytes, assembled by hand."""
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 5)
    arrays = b"".join(struct.pack("<Q", 5) + f"big.{i}".encode() + struct.pack("<IIQ", GGUFValueType.ARRAY,
                      GGUFValueType.UINT8, 2**20) + bytes(2**20) for i in range(5))
    (tmp_path / "big.gguf").write_bytes(header + arrays)
    with pytest.raises(qj.CheckpointError, match=r"big\.4 claims 1048576 elements.*past the 4194304"):
        load_within_bounds(tmp_path / "big.gguf")


def test_string_length_past_the_bytes_left_is_refused(good_gguf, tmp_path):
    def edit(reader: GGUFReader) -> None:
        reader.fields["tokenizer.chat_template"].parts[3][0] = 2**50  # the string's length
    path = patched(good_gguf, tmp_path / "bad.gguf", edit)
    with pytest.raises(qj.CheckpointError, match=r"tokenizer\.chat_template"):
        load_within_bounds(path)


def test_text_that_is_not_utf8_is_named(good_gguf, tmp_path):
    def edit(reader: GGUFReader) -> None:
        field = reader.fields["tokenizer.ggml.tokens"]
        field.parts[field.data[300]][0] = 0xFF  # the first byte of token 300
    path = patched(good_gguf, tmp_path / "bad.gguf", edit)
    with pytest.raises(qj.CheckpointError, match=r"tokenizer\.ggml\.tokens\[300\] is not UTF-8"):
        load_within_bounds(path)


@pytest.mark.parametrize("value, message", [
    (2**31, "layer 2"), (5_000_000, "layer 2"), (3, "layer 2"), (1, "layer 1"),
])
def test_block_count_must_match_the_layers_present(good_gguf, tmp_path, value, message):
    """Absurd counts, a count naming a layer the file lacks, and one dropping a layer it has."""
    path = patched(good_gguf, tmp_path / "bad.gguf", set_value("qwen3moe.block_count", value))
    with pytest.raises(qj.CheckpointError, match=rf"{message}.*qwen3moe\.block_count") as err:
        load_within_bounds(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("key, value, field", [
    ("qwen3moe.attention.head_count", 0, "num_heads"),
    ("qwen3moe.attention.head_count_kv", 0, "num_kv_heads"),
    ("qwen3moe.attention.head_count_kv", 3, "num_kv_heads"),  # 4 heads do not split over 3
    ("qwen3moe.expert_used_count", 5, "num_experts_per_tok"),  # more than the 4 experts
    ("qwen3moe.expert_used_count", 0, "num_experts_per_tok"),
    ("qwen3moe.expert_count", 2**31, None),  # passes the ranges, then the tensors disagree
    ("qwen3moe.attention.value_length", 16, None),  # key_length is 8
    ("qwen3moe.embedding_length", 0, "hidden_size"),
    ("qwen3moe.context_length", 0, "max_position_embeddings"),
    ("qwen3moe.expert_feed_forward_length", 0, "moe_intermediate_size"),
])
def test_inconsistent_heads_and_experts_are_config_errors_naming_the_key(good_gguf, tmp_path, key, value, field):
    path = patched(good_gguf, tmp_path / "bad.gguf", set_value(key, value))
    with pytest.raises(qj.Qwen3MoeError) as err:
        load_within_bounds(path)
    assert str(path) in str(err.value)
    if key == "qwen3moe.expert_count":  # a valid config whose tensors have 4 experts
        assert isinstance(err.value, qj.CheckpointError) and "ffn_gate_inp" in str(err.value)
    else:
        assert isinstance(err.value, qj.ConfigError) and key in str(err.value), err.value
        assert err.value.field == field


def test_expert_count_zero_is_refused(good_gguf, tmp_path):
    path = patched(good_gguf, tmp_path / "bad.gguf", set_value("qwen3moe.expert_count", 0))
    with pytest.raises(qj.ConfigError, match=r"qwen3moe\.expert_count"):
        load_within_bounds(path)


@pytest.mark.parametrize("which", [0, -1], ids=["first", "last"])
def test_a_tensor_relabelled_to_another_type_is_refused_by_name(good_gguf, tmp_path, which):
    """Q8_0 blocks read as Q4_0 would load as garbage (NaN logits): the bytes a tensor occupies must be the
    bytes its type and shape need."""
    reader = GGUFReader(good_gguf)
    name = [t.name for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q8_0][which]
    del reader

    def edit(reader: GGUFReader) -> None:
        tensor = next(t for t in reader.tensors if t.name == name)
        tensor.field.parts[4][0] = GGMLQuantizationType.Q4_0  # name length, name, n_dims, dims, type, offset

    path = patched(good_gguf, tmp_path / "bad.gguf", edit)
    with pytest.raises(qj.CheckpointError, match=rf"{name.replace('.', '[.]')}.*Q4_0"):
        load_within_bounds(path)


def test_metadata_of_the_wrong_kind_is_named(good_gguf, tmp_path):
    def edit(reader: GGUFReader) -> None:  # block_count's type tag says float32: same width, another kind
        reader.fields["qwen3moe.block_count"].parts[2][0] = GGUFValueType.FLOAT32
    path = patched(good_gguf, tmp_path / "bad.gguf", edit)
    with pytest.raises(qj.CheckpointError, match=r"qwen3moe\.block_count must be an integer"):
        load_within_bounds(path)


def test_extra_and_missing_tensors_are_named(model, tmp_path):
    arrays = {name: np.asarray(a) for name, a in named_leaves(model.params).items()}
    write_gguf(tmp_path / "extra.gguf", CONFIG.replace(num_layers=1), arrays)  # layer 1's tensors, 1 layer
    with pytest.raises(qj.CheckpointError, match=r"layer 1.*says 1 layers"):
        load_within_bounds(tmp_path / "extra.gguf")
    del arrays["layers.0.mlp.up"]
    write_gguf(tmp_path / "missing.gguf", CONFIG, arrays)
    with pytest.raises(qj.CheckpointError, match=r"blk\.0\.ffn_up_exps"):
        load_within_bounds(tmp_path / "missing.gguf")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_weights_are_named(model, tmp_path, bad):
    arrays = {name: np.array(a) for name, a in named_leaves(model.params).items()}
    arrays["layers.1.attn.k"][0, 1, 2] = bad
    write_gguf(tmp_path / "nan.gguf", CONFIG, arrays)
    with pytest.raises(qj.CheckpointError, match=r"nan\.gguf.*layers\.1\.attn\.k hold NaN or infinite"):
        load_within_bounds(tmp_path / "nan.gguf")
    qj.save_hf(qj.Model(CONFIG, model.params, None), tmp_path / "hf")
    from safetensors.numpy import load_file, save_file
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors["model.layers.0.mlp.experts.3.down_proj.weight"][1, 1] = bad
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(qj.CheckpointError, match=r"layers\.0\.mlp\.down hold NaN or infinite"):
        load_within_bounds(tmp_path / "hf")


@pytest.fixture
def hf_dir(model, tmp_path):
    qj.save_hf(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def write_index(directory: Path, content: str | dict) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (directory / "model.safetensors.index.json").write_text(text)


def weight_map(directory: Path, file: str) -> dict:
    from safetensors import safe_open
    with safe_open(directory / "model.safetensors", framework="numpy") as f:
        return {"weight_map": {name: file for name in f.keys()}}


@pytest.mark.parametrize("content, error, message", [
    ("[1, 2, 3]", qj.ConfigError, "config.json.*JSON object"),
    ("{not json", qj.ConfigError, "config.json is not a readable JSON"),
    ('{"model_type": "qwen3_moe", "vocab_size": "512"}', qj.ConfigError, "config.json.*lacks"),
])
def test_broken_config_json(hf_dir, content, error, message):
    (hf_dir / "config.json").write_text(content)
    with pytest.raises(error, match=message):
        load_within_bounds(hf_dir)


@pytest.mark.parametrize("field, value", [
    ("num_attention_heads", 0), ("num_hidden_layers", "2"), ("num_experts_per_tok", 9), ("rms_norm_eps", -1.0),
    ("rope_parameters", [1]), ("eos_token_id", 10**9), ("num_key_value_heads", 3), ("num_key_value_heads", 0),
    ("hidden_size", 2.5), ("mlp_only_layers", 1), ("norm_topk_prob", "yes"),
])
def test_config_json_values_of_the_wrong_type_or_range(hf_dir, field, value):
    config = json.loads((hf_dir / "config.json").read_text())
    config[field] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(qj.ConfigError, match="config.json") as err:
        load_within_bounds(hf_dir)
    assert err.value.field is not None


@pytest.mark.parametrize("layers, message", [(1, "layer 1"), (3, "layer 2"), (5_000_000, "layer 2")])
def test_config_json_layer_count_must_match_the_tensors(hf_dir, layers, message):
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(qj.CheckpointError, match=rf"{message}.*num_hidden_layers"):
        load_within_bounds(hf_dir)


@pytest.mark.parametrize("field, value, tensor", [
    ("moe_intermediate_size", 48, r"layers\.0\.mlp\.experts\.0\.gate_proj"),
    ("head_dim", 16, r"layers\.0\.self_attn\.q_proj"),
    ("vocab_size", 1024, r"embed_tokens"),
])
def test_config_json_shapes_must_match_the_tensor_headers(hf_dir, field, value, tensor):
    """Checked from the safetensors headers before any weight is read."""
    config = json.loads((hf_dir / "config.json").read_text())
    config[field] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(qj.CheckpointError, match=rf"{tensor}.*config\.json implies"):
        load_within_bounds(hf_dir)


def test_config_json_expert_count_must_match_the_tensors(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_experts"] = 10**9
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(qj.CheckpointError, match="experts numbered up to 3"):
        load_within_bounds(hf_dir)


@pytest.mark.parametrize("content", ["{not json", "[]", "{}", '{"weight_map": [1]}', '{"weight_map": {"a": 1}}'])
def test_broken_index(hf_dir, content):
    write_index(hf_dir, content)
    with pytest.raises(qj.CheckpointError, match="model.safetensors.index.json"):
        load_within_bounds(hf_dir)


@pytest.mark.parametrize("file", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_index_entries_outside_the_directory_are_refused(hf_dir, file):
    write_index(hf_dir, weight_map(hf_dir, file))
    with pytest.raises(qj.CheckpointError, match="outside the checkpoint"):
        load_within_bounds(hf_dir)


def test_symlinks_out_of_the_directory_are_refused_but_a_hub_snapshot_loads(hf_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(hf_dir / "model.safetensors", outside)
    (hf_dir / "model.safetensors").symlink_to(outside)
    with pytest.raises(qj.CheckpointError, match="outside the checkpoint directory"):
        load_within_bounds(hf_dir)
    # The Hugging Face cache: snapshots/<revision>/ whose files link to the model's blobs/.
    snapshot = tmp_path / "models--x" / "snapshots" / "abc123"
    blobs = tmp_path / "models--x" / "blobs"
    blobs.mkdir(parents=True)
    shutil.copytree(hf_dir, snapshot, symlinks=True)
    (snapshot / "model.safetensors").unlink()
    shutil.move(outside, blobs / "0123abcd")
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs/0123abcd"))
    assert load_within_bounds(snapshot).config == CONFIG


@pytest.mark.parametrize("file, content", [
    ("tokenizer.json", "not a tokenizer"), ("tokenizer.json", '{"model": 5}'),
    ("tokenizer_config.json", "{oops"), ("tokenizer_config.json", '{"chat_template": 5}'),
    ("tokenizer_config.json", '{"eos_token": ["x"]}'), ("chat_template.jinja", b"\xff\xfe\x00bad"),
])
def test_broken_tokenizer_files(hf_dir, file, content):
    path = hf_dir / file
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(qj.CheckpointError, match=file.split(".")[0]):
        load_within_bounds(hf_dir)


# Property-based: random damage to a small GGUF file either leaves it loadable or raises a package error.
# Integers a corrupt field most often holds: small ones, zero, and the edges of the integer widths.
EDGE_INTEGERS = st.one_of(st.integers(0, 9), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**38, 2**63, 2**64 - 1]),
                          st.integers(0, 2**64 - 1))


def _mutations(size: int, spans: list[tuple[int, int]], config_spans: list[tuple[int, int]]):
    cut = st.builds(lambda n: ("cut", n, 0), st.integers(0, size - 1))
    flip = st.builds(lambda at, bit: ("flip", at, bit), st.integers(0, size - 1), st.integers(0, 7))
    # Flips aimed at the header, metadata and tensor table, where a flip changes structure, not a weight.
    header = st.builds(lambda at, bit: ("flip", at, bit), st.integers(0, spans[-1][1] - 1), st.integers(0, 7))
    # A length, count, type tag, shape, offset or value replaced whole; the model's shape keys most often.
    value = st.builds(lambda f, v: ("value", f, v), st.sampled_from(spans), EDGE_INTEGERS)
    config = st.builds(lambda f, v: ("value", f, v), st.sampled_from(config_spans), EDGE_INTEGERS)
    return st.lists(st.one_of(cut, flip, header, value, config, config), min_size=1, max_size=3)


def _apply(data: bytearray, mutation) -> bytearray:
    kind, at, arg = mutation
    if kind == "cut":
        return data[:at]
    if kind == "flip":
        if at < len(data):
            data[at] ^= 1 << arg
        return data
    (start, end), width = at, min(8, at[1] - at[0])
    if end <= len(data):
        data[start:start + width] = (arg % 2 ** (8 * width)).to_bytes(width, "little")
    return data


@pytest.fixture(scope="module")
def value_spans(good_gguf):
    """(start, end) byte spans of every metadata length, count, type tag and value and of every tensor table
    entry; and those of the qwen3moe.* values (the model's shape)."""
    reader = GGUFReader(good_gguf)
    base = reader.data.ctypes.data

    def spans(fields) -> list[tuple[int, int]]:
        starts = [(p.ctypes.data - base, p.nbytes) for f in fields for p in f.parts if 0 < p.nbytes <= 8]
        return sorted((start, start + n) for start, n in starts)

    every = spans(list(reader.fields.values()) + [t.field for t in reader.tensors])
    shape = spans(f for name, f in reader.fields.items() if name.startswith("qwen3moe."))
    del reader
    return every, shape


def test_random_damage_loads_or_raises_a_package_error(good_gguf, value_spans, tmp_path_factory):
    original = good_gguf.read_bytes()
    directory = tmp_path_factory.mktemp("fuzz")
    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=150, deadline=5000, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_mutations(len(original), *value_spans))
    def check(mutations):
        data = bytearray(original)
        for mutation in mutations:
            data = _apply(data, mutation)
        path = directory / "damaged.gguf"
        path.write_bytes(bytes(data))
        try:
            load_within_bounds(path)
            outcomes["loaded"] += 1
        except qj.Qwen3MoeError:
            outcomes["refused"] += 1

    check()
    print(outcomes)
    assert outcomes["refused"] > 0 and sum(outcomes.values()) >= 100
