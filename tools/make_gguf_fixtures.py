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
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, quants

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "gguf"
LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("WHALE_CACHE", ROOT / "target" / "llama-cpp"))


def llama_cpp_source():
    """llama.cpp as vendored by llama-cpp-python's source distribution (PyPI), unpacked once."""
    src = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not src.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        tgz = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not tgz.exists():
            # `pip download` would build the package's metadata (and cmake) first; fetch the file itself.
            index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
            url = next(u for u in index.split('"') if u.startswith("https://") and f"{LLAMA_CPP_PYTHON}.tar.gz" in u)
            urllib.request.urlretrieve(url.split("#")[0], tgz)
        with tarfile.open(tgz) as t:
            t.extractall(CACHE, filter="data")
    return src


# The converter names tokenizers by a hash of their output; our tiny fixture tokenizer has
# no entry, so it is declared a deepseek-llm tokenizer (what DeepSeek-V2's real one is).
CONVERT = """
import sys
sys.path.insert(0, {src!r}); sys.path.insert(0, {src!r} + '/gguf-py')
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'deepseek-llm'
import convert_hf_to_gguf
sys.argv = ['convert_hf_to_gguf.py'] + {args!r}
convert_hf_to_gguf.main()
"""


def convert(model_dir, out, outtype):
    src = llama_cpp_source()
    args = [str(model_dir), "--outfile", str(out), "--outtype", outtype]
    subprocess.run([sys.executable, "-c", CONVERT.format(src=str(src), args=args)], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"{out.name}: {out.stat().st_size} bytes ({outtype}, llama.cpp's convert_hf_to_gguf.py)")

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
    for name in ["v3"]:
        for outtype in ["f32", "q8_0"]:
            out = OUT / f"{name}-{outtype}.gguf"
            convert(ROOT / "tests" / "fixtures" / "models" / name, out, outtype)
            reference_logits(ROOT / "tests" / "fixtures" / "models" / name, out)


HF_OF = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
BLK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
       "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
       "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
       "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
       "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj"}


def reference_logits(model_dir, gguf_path):
    """transformers' logits on the GGUF's own weights (dequantised by gguf-py): the exact
    answer for whale's quantized path, independent of how llama.cpp rounds activations."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    r = gguf.GGUFReader(str(gguf_path))
    sd = {}
    for t in r.tensors:
        w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype(np.float32).copy())
        shape = [int(n) for n in reversed(t.shape.tolist())]
        w = w.reshape(shape)
        if t.name in HF_OF:
            sd[HF_OF[t.name]] = w
            continue
        _, layer, kind, suffix = t.name.split(".")
        pre = f"model.layers.{layer}"
        if kind == "attn_k_b":
            sd.setdefault(f"{pre}._k_b", w)  # [H, C, P]
        elif kind == "attn_v_b":
            sd.setdefault(f"{pre}._v_b", w)  # [H, V, C]
        elif kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            sd[f"{pre}._{kind}"] = w
        elif kind == "exp_probs_b":
            sd[f"{pre}.mlp.gate.e_score_correction_bias"] = w
        else:
            sd[f"{pre}.{BLK[kind]}.weight"] = w
    for k in [k for k in sd if k.endswith("._k_b")]:
        pre = k[: -len("._k_b")]
        kb, vb = sd.pop(k), sd.pop(f"{pre}._v_b")
        # kv_b_proj per head: [W_UK (P rows of C) ; W_UV (V rows of C)]
        sd[f"{pre}.self_attn.kv_b_proj.weight"] = torch.cat([kb.transpose(1, 2), vb], dim=1).reshape(-1, kb.shape[1])
    for k in [k for k in sd if k.endswith("._ffn_gate_exps")]:
        pre = k[: -len("._ffn_gate_exps")]
        g, u, d = sd.pop(k), sd.pop(f"{pre}._ffn_up_exps"), sd.pop(f"{pre}._ffn_down_exps")
        sd[f"{pre}.mlp.experts.gate_up_proj"] = torch.cat([g, u], dim=1)
        sd[f"{pre}.mlp.experts.down_proj"] = d
    cfg = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("e_score_correction_bias") or m in sd]
    assert not missing and not unexpected, (missing, unexpected)
    tokens = json.loads((Path(model_dir) / "expected.json").read_text())["tokens"]
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    (gguf_path.with_suffix(".expected.json")).write_text(json.dumps(
        {"reference": "transformers eager fp32 on the GGUF's dequantised weights", "tokens": tokens,
         "logits": logits.tolist()}))


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
