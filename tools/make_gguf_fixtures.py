#!/usr/bin/env python3
"""GGUF reference fixtures for whale's tests.

Rerun:  pip install gguf numpy
        python3 tools/make_gguf_fixtures.py

Writes tests/fixtures/gguf/dequant.json: random blocks of every GGML type whale
reads, with the f32 values (as bit patterns) that llama.cpp's reference
dequantisation gives, as implemented in gguf-py's `gguf.quants` (llama.cpp's own
Python package, which mirrors ggml-quants.c); and tests/fixtures/gguf/small.gguf
(+ small.json): a GGUF written by gguf-py's GGUFWriter with metadata of every
value type and tensors of several types, with what gguf-py's reader reads back.
"""
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, quants

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf"

# Byte offsets of the f16 scale fields inside each block (kept finite and modest).
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
              T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def blocks(t, n, rng):
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(n, ts), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        vals = (rng.standard_normal(n) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(n, 2)
    return raw


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    cases = []
    for t in [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]:
        raw = blocks(t, 3, rng)
        vals = quants.dequantize(raw.reshape(-1), t).astype(np.float32).reshape(-1)
        cases.append({"type": t.name, "ggml_type": int(t), "block_bytes": raw.reshape(-1).tobytes().hex(),
                      "values_f32_bits": vals.view(np.uint32).tolist()})
    for t, np_t in [(T.F16, np.float16), (T.BF16, None)]:
        x = (rng.standard_normal(64)).astype(np.float32)
        if np_t is not None:
            raw = x.astype(np_t).view(np.uint8)
        else:
            raw = (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        vals = quants.dequantize(raw, t).astype(np.float32).reshape(-1)
        cases.append({"type": t.name, "ggml_type": int(t), "block_bytes": raw.tobytes().hex(),
                      "values_f32_bits": vals.view(np.uint32).tolist()})
    (OUT / "dequant.json").write_text(json.dumps({"gguf_py": importlib.metadata.version("gguf"),
                                                  "cases": cases}))
    print(f"dequant.json: {len(cases)} types")
    small_gguf(rng)


def small_gguf(rng):
    path = OUT / "small.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_uint32("test.u32", 7)
    w.add_int32("test.i32", -3)
    w.add_float32("test.f32", 0.0707)
    w.add_uint64("test.u64", 1 << 40)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "whale 🐋")
    w.add_array("test.arr_str", ["a", "bc", ""])
    w.add_array("test.arr_i32", [1, -2, 3])
    w.add_uint8("test.u8", 200)
    w.add_float64("test.f64", 2.5)
    tensors = {}
    x = rng.standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("t.f32", x)
    tensors["t.f32"] = x
    h = rng.standard_normal((3, 32)).astype(np.float16)
    w.add_tensor("t.f16", h)
    tensors["t.f16"] = h.astype(np.float32)
    for t, shape in [(T.Q8_0, (2, 64)), (T.Q4_0, (2, 64)), (T.Q4_K, (2, 256)), (T.Q6_K, (1, 256))]:
        v = rng.standard_normal(shape).astype(np.float32)
        try:
            q = quants.quantize(v, t)
        except NotImplementedError:
            bs, ts = gguf.GGML_QUANT_SIZES[t]
            q = blocks(t, shape[0] * shape[1] // bs, rng).reshape(shape[0], -1)
        w.add_tensor(f"t.{t.name.lower()}", q, raw_dtype=t)
        tensors[f"t.{t.name.lower()}"] = quants.dequantize(q, t).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(str(path))
    read = {t.name: {"type": t.tensor_type.name, "ne": [int(n) for n in t.shape],
                     "values": quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1).tolist()}
            for t in r.tensors}
    for name, v in tensors.items():
        assert np.array_equal(np.array(read[name]["values"], dtype=np.float32), v.reshape(-1)), name
    (OUT / "small.json").write_text(json.dumps({"tensors": read}))
    print(f"small.gguf: {path.stat().st_size} bytes, {len(read)} tensors")


if __name__ == "__main__":
    main()
