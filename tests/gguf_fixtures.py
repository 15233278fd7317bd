"""Tiny llama-architecture GGUF files written by gguf-py itself (its writer and its quantizers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 256, 4, 2, 512, 300, 2

# Per-tensor GGML types: layer 0 takes the types gguf-py quantizes, layer 1 the dequantize-only K-quants.
LAYER_TYPES = [
    {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0", "attn_output": "Q5_1",
     "ffn_gate": "Q8_0", "ffn_up": "TQ2_0", "ffn_down": "BF16"},
    {"attn_q": "Q4_K", "attn_k": "Q6_K", "attn_v": "Q2_K", "attn_output": "Q3_K",
     "ffn_gate": "Q5_K", "ffn_up": "F16", "ffn_down": "TQ1_0"},
]
# Byte offsets of the fp16 scale fields inside one K-quant block (gguf-py's quants.py block layouts).
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def encode(values: np.ndarray, type_name: str, rng: np.random.Generator) -> np.ndarray:
    """GGML blocks of ``values`` (rows x cols): gguf-py's quantizer, or random K-quant blocks with sane scales."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return values.astype(np.float32)
    if type_name == "F16":
        return values.astype(np.float16)
    if type_name in K_SCALE_OFFSETS:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(values.size // block, size), dtype=np.uint8)
        for offset in K_SCALE_OFFSETS[type_name]:
            blocks[:, offset:offset + 2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
        return blocks.reshape(values.shape[0], -1)
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def write_tiny_llama(path: Path, seed: int = 0, head_count: int = HEADS, invalid_utf8: bool = False,
                     layer_types: list[dict] | None = None) -> Path:
    """A 2-layer llama GGUF (hidden 256) mixing GGML types, untied output, with typed key-values.

    ``invalid_utf8`` adds strings that are not UTF-8 (transformers' GGUF parser cannot read those)."""
    import gguf

    rng = np.random.default_rng(seed)
    T = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_file_type(7)
    V = gguf.GGUFValueType  # typed values the store must carry byte for byte
    if invalid_utf8:
        writer.add_key_value("test.raw_bytes", b"\xff\xfe not utf-8", V.STRING)
        writer.add_key_value("test.strings", [b"ok", b"\xc3\x28", "unicod\u00e9".encode()], V.ARRAY, sub_type=V.STRING)
    writer.add_key_value("test.floats", [0.1, -2.5, 3e-8], V.ARRAY, sub_type=V.FLOAT32)
    writer.add_key_value("test.flags", [True, False], V.ARRAY, sub_type=V.BOOL)
    writer.add_key_value("test.int8", -3, V.INT8)
    writer.add_key_value("test.f64", 1.0 / 3.0, V.FLOAT64)
    writer.add_key_value("test.unicode", "h\u00e9llo \u4e16\u754c", V.STRING)

    def add(name: str, rows: int, cols: int, type_name: str, scale: float = 0.05) -> None:
        values = rng.standard_normal((rows, cols)).astype(np.float32) * scale
        data = encode(values, type_name, rng)
        writer.add_tensor(name, data, raw_dtype=T[type_name] if data.dtype == np.uint8 else None)

    def add_norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    head_dim = HIDDEN // HEADS
    add("token_embd.weight", VOCAB, HIDDEN, "Q8_0", 0.5)
    for i, types in enumerate(layer_types or LAYER_TYPES):
        add_norm(f"blk.{i}.attn_norm.weight")
        add(f"blk.{i}.attn_q.weight", HEADS * head_dim, HIDDEN, types["attn_q"])
        add(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN, types["attn_k"])
        add(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN, types["attn_v"])
        add(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * head_dim, types["attn_output"])
        add_norm(f"blk.{i}.ffn_norm.weight")
        add(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN, types["ffn_gate"])
        add(f"blk.{i}.ffn_up.weight", FFN, HIDDEN, types["ffn_up"])
        add(f"blk.{i}.ffn_down.weight", HIDDEN, FFN, types["ffn_down"])
    add_norm("output_norm.weight")
    add("output.weight", VOCAB, HIDDEN, "Q6_K")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
