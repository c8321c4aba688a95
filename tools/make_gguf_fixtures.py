#!/usr/bin/env python3
"""GGUF reference fixtures for whale's tests.

Rerun:  pip install gguf numpy
        python3 tools/make_gguf_fixtures.py

Needs llama.cpp itself for the cross-checks: `pip install llama-cpp-python==0.3.36`
(compiles llama.cpp, about 10 minutes on 2 cores), and a release build of whale
(`cargo build --release -p whale`) for the files whale converts.

Writes tests/fixtures/gguf/dequant.json: random blocks of every GGML type whale
reads, with the f32 values (as bit patterns) that llama.cpp's reference
dequantisation gives, as implemented in gguf-py's `gguf.quants` (llama.cpp's own
Python package, which mirrors ggml-quants.c); and tests/fixtures/gguf/small.gguf
(+ small.json): a GGUF written by gguf-py's GGUFWriter with metadata of every
value type and tensors of several types, with what gguf-py's reader reads back; quantize.json: rows quantised by llama.cpp's
own `ggml_quantize_chunk` (the blocks `llama-quantize` writes); deepseek-v2-vocab.gguf.gz:
the real DeepSeek-V2 tokenizer as llama.cpp's converter stores it (vocab only) with
llama.cpp's token ids for the tokenizer test texts; v3-f32.gguf / v3-q8_0.gguf
(llama.cpp's converter) with transformers' logits (*.expected.json) and llama.cpp's
(*.llama_cpp.json); whale-convert.json: llama.cpp's logits on the files
`whale convert` writes from the v3 fixture, with a checksum of each file.
"""
import gzip
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
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
    quantize_fixture(rng)
    vocab_fixture()
    v3 = ROOT / "tests" / "fixtures" / "models" / "v3"
    tokens = json.loads((v3 / "expected.json").read_text())["tokens"]
    for outtype in ["f32", "q8_0"]:
        out = OUT / f"v3-{outtype}.gguf"
        convert(v3, out, outtype)
        reference_logits(v3, out)
        out.with_suffix(".llama_cpp.json").write_text(json.dumps(llama_cpp_logits(out, tokens)))
    whale_convert_fixture(v3, tokens)
    kquant_fixture(tokens)


# ---- llama.cpp itself, through llama-cpp-python --------------------------------------------

def ggml_lib():
    import ctypes
    import llama_cpp
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def quantize_fixture(rng):
    """Rows quantised by llama.cpp's ggml_quantize_chunk (no importance matrix: the
    reference quantisers llama-quantize uses)."""
    lib = ggml_lib()
    n = 512
    rows = [rng.standard_normal(n), rng.uniform(-1, 1, n) * 1e-3, rng.standard_normal(n) ** 3,
            np.concatenate([np.zeros(256), rng.standard_normal(256)]),
            np.where(rng.uniform(size=n) < 0.05, 30.0, 1.0) * rng.standard_normal(n),
            np.abs(rng.standard_normal(n)), np.full(n, 0.25)]
    x = np.stack(rows).astype(np.float32)
    cases = []
    for t in [T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q6_K]:
        bs, ts = gguf.GGML_QUANT_SIZES[t]
        out = np.zeros(x.shape[0] * n // bs * ts, dtype=np.uint8)
        lib.ggml_quantize_init(int(t))
        written = lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, x.shape[0], n, None)
        assert written == out.size, (t, written, out.size)
        cases.append({"type": t.name, "blocks": out.tobytes().hex()})
    (OUT / "quantize.json").write_text(json.dumps({
        "source": "llama.cpp ggml_quantize_chunk via llama-cpp-python " + importlib.metadata.version("llama-cpp-python"),
        "n_per_row": n, "rows_f32_bits": x.view(np.uint32).tolist(), "cases": cases}))
    print(f"quantize.json: {len(cases)} types x {x.shape[0]} rows")


def llama_cpp_logits(path, tokens):
    """llama.cpp's logits for every position. The KV cache is kept in F32 and flash
    attention off, so the only rounding llama.cpp adds is its 8-bit activation blocks
    in quantised matmuls (its default F16 cache flips this random model's expert choice)."""
    from llama_cpp import Llama
    m = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False,
              flash_attn=False, type_k=0, type_v=0)
    m.eval(tokens)
    logits = np.array(m.scores[: len(tokens)], dtype=np.float32)
    return {"reference": "llama.cpp (llama-cpp-python " + importlib.metadata.version("llama-cpp-python")
            + "), F32 KV cache, flash attention off", "tokens": tokens,
            "logits": [[float(f"{v:.7g}") for v in row] for row in logits]}


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def router_margins(model_dir, tokens):
    """Per position, the smallest gap (over MoE layers) between the last chosen and the
    first rejected score of the V3 router, for groups and for experts within the chosen
    groups. Where it is ~1e-4, any rounding (llama.cpp's F16 cache or F16 activations)
    can swap an expert, and the logits of that position legitimately differ."""
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = m.config
    margins = np.full(len(tokens), np.inf)

    def hook(mod, inp, out):
        x = inp[0].reshape(-1, inp[0].shape[-1])
        sc = torch.nn.functional.linear(x, mod.weight).sigmoid() + mod.e_score_correction_bias
        g = sc.view(x.shape[0], cfg.n_group, -1).topk(2, dim=-1)[0].sum(-1)
        gs = g.sort(dim=-1, descending=True)[0]
        gm = gs[:, cfg.topk_group - 1] - gs[:, cfg.topk_group]
        keep = torch.zeros_like(g).scatter(1, g.topk(cfg.topk_group, dim=-1)[1], 1)
        keep = keep.repeat_interleave(sc.shape[1] // cfg.n_group, dim=1)
        es = sc.masked_fill(keep == 0, -1e9).sort(dim=-1, descending=True)[0]
        em = es[:, cfg.num_experts_per_tok - 1] - es[:, cfg.num_experts_per_tok]
        np.minimum(margins, torch.minimum(gm, em).numpy(), out=margins)

    for layer in m.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(hook)
    with torch.no_grad():
        m(torch.tensor([tokens]))
    return [float(f"{v:.4g}") for v in margins]


def whale_convert_fixture(model_dir, tokens):
    """llama.cpp runs the files `whale convert` writes; their logits and checksums let the
    Rust tests check that whale reads the very same files the same way."""
    whale = ROOT / "target" / "release" / "whale"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in ["f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k"]:
            path = Path(tmp) / f"v3-{t}.gguf"
            subprocess.run([str(whale), "convert", "--from", str(model_dir), "--to", str(path), "--type", t,
                            "--tokenizer-pre", "deepseek-llm"], check=True, stderr=subprocess.DEVNULL)
            data = path.read_bytes()
            out[t] = {"fnv1a64": fnv1a64(data), "bytes": len(data), **llama_cpp_logits(path, tokens)}
            print(f"whale convert --type {t}: {len(data)} bytes, loaded and run by llama.cpp")
    out["router_margin"] = router_margins(model_dir, tokens)
    (OUT / "whale-convert.json").write_text(json.dumps(out))


# A model whose rows are whole 256-blocks, so `whale convert --type q4_k|q6_k` writes real
# Q4_K/Q6_K tensors (the v3 fixture is too narrow: every k-quant tensor falls back). Its
# weights come from a counter-based generator that the Rust test reimplements, so only the
# spec (kquant-model.json) is committed, never the weights.
KQ_CONFIG = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 320,
             "hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 256, "num_hidden_layers": 1,
             "num_attention_heads": 2, "q_lora_rank": 256, "kv_lora_rank": 256, "qk_nope_head_dim": 32,
             "qk_rope_head_dim": 16, "v_head_dim": 128, "n_routed_experts": 4, "n_shared_experts": 1,
             "num_experts_per_tok": 2, "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1,
             "topk_group": 1, "norm_topk_prob": False, "first_k_dense_replace": 0, "moe_layer_freq": 1,
             "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512,
             "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu"}


def kq_tensors():
    """(name, shape, scale exponent, offset) in generation order; value = offset + u · 2^-scale."""
    c = KQ_CONFIG
    d, h, q, kv = c["hidden_size"], c["num_attention_heads"], c["q_lora_rank"], c["kv_lora_rank"]
    p, r, v, i = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["moe_intermediate_size"]
    L = "model.layers.0."
    t = [("model.embed_tokens.weight", [c["vocab_size"], d], 1, 0.0),
         (L + "input_layernorm.weight", [d], 3, 1.0),
         (L + "self_attn.q_a_proj.weight", [q, d], 4, 0.0),
         (L + "self_attn.q_a_layernorm.weight", [q], 3, 1.0),
         (L + "self_attn.q_b_proj.weight", [h * (p + r), q], 4, 0.0),
         (L + "self_attn.kv_a_proj_with_mqa.weight", [kv + r, d], 4, 0.0),
         (L + "self_attn.kv_a_layernorm.weight", [kv], 3, 1.0),
         (L + "self_attn.kv_b_proj.weight", [h * (p + v), kv], 4, 0.0),
         (L + "self_attn.o_proj.weight", [d, h * v], 4, 0.0),
         (L + "post_attention_layernorm.weight", [d], 3, 1.0),
         (L + "mlp.gate.weight", [c["n_routed_experts"], d], 2, 0.0)]
    for e in range(c["n_routed_experts"]):
        t += [(L + f"mlp.experts.{e}.{w}_proj.weight", [i, d] if w != "down" else [d, i], 4, 0.0)
              for w in ["gate", "up", "down"]]
    t += [(L + f"mlp.shared_experts.{w}_proj.weight", [i, d] if w != "down" else [d, i], 4, 0.0)
          for w in ["gate", "up", "down"]]
    t += [("model.norm.weight", [d], 3, 1.0), ("lm_head.weight", [c["vocab_size"], d], 4, 0.0)]
    return t


def kq_values(k, n, scale, offset):
    """splitmix64 of (k · golden + index), top 24 bits as u in [-1, 1): exact in f32."""
    with np.errstate(over="ignore"):
        z = np.uint64(k) * np.uint64(0x9E3779B97F4A7C15) + np.arange(n, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -23) - np.float32(1.0)
    return (np.float32(offset) + u * np.float32(2.0 ** -scale)).astype(np.float32)


def kquant_fixture(tokens):
    from safetensors.numpy import save_file
    spec = {"config": KQ_CONFIG, "tensors": [{"name": n, "shape": s, "scale": e, "offset": o}
                                             for n, s, e, o in kq_tensors()]}
    whale = ROOT / "target" / "release" / "whale"
    out = {"spec": spec, "tokens": tokens}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "kq"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(KQ_CONFIG))
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            (d / f).write_bytes((ROOT / "tests" / "fixtures" / "models" / "v3" / f).read_bytes())
        save_file({n: kq_values(k, int(np.prod(s)), e, o).reshape(s) for k, (n, s, e, o) in enumerate(kq_tensors())},
                  str(d / "model.safetensors"))
        for t in ["q4_k", "q6_k", "q4_0"]:
            path = Path(tmp) / f"kq-{t}.gguf"
            subprocess.run([str(whale), "convert", "--from", str(d), "--to", str(path), "--type", t,
                            "--tokenizer-pre", "deepseek-llm"], check=True, stderr=subprocess.DEVNULL)
            data = path.read_bytes()
            r = gguf.GGUFReader(str(path))
            types = sorted({t.tensor_type.name for t in r.tensors})
            out[t] = {"fnv1a64": fnv1a64(data), "bytes": len(data), "tensor_types": types,
                      **llama_cpp_logits(path, tokens)}
            print(f"kq whale convert --type {t}: {len(data)} bytes, tensor types {types}, run by llama.cpp")
    (OUT / "kquant.json").write_text(json.dumps(out))


def vocab_fixture():
    """The real DeepSeek-V2 tokenizer through llama.cpp's converter (vocab only), and the ids
    llama.cpp's own tokenizer gives on the tokenizer test texts."""
    from llama_cpp import Llama
    cases = json.loads((ROOT / "tests" / "fixtures" / "tokenizer_ids.json").read_text())["cases"]
    chat = json.loads((ROOT / "tests" / "fixtures" / "chat_templates.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "deepseek-v2"
        d.mkdir()
        (d / "tokenizer.json").write_bytes(gzip.decompress((ROOT / "tests" / "fixtures" / "deepseek_v2_tokenizer.json.gz").read_bytes()))
        cfg = json.loads((ROOT / "tests" / "fixtures" / "models" / "v2-lite" / "config.json").read_text())
        cfg["vocab_size"] = 102400
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "tokenizer_config.json").write_text(json.dumps({
            "add_bos_token": True, "add_eos_token": False, "bos_token": chat["bos_token"],
            "eos_token": chat["eos_token"], "chat_template": chat["templates"]["deepseek-v2"]}, ensure_ascii=False))
        out = Path(tmp) / "vocab.gguf"
        src = llama_cpp_source()
        subprocess.run([sys.executable, "-c", CONVERT.format(src=str(src), args=[str(d), "--outfile", str(out), "--vocab-only"])],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (OUT / "deepseek-v2-vocab.gguf.gz").write_bytes(gzip.compress(out.read_bytes(), 9, mtime=0))
        m = Llama(model_path=str(out), vocab_only=True, verbose=False)
        ids = [{"text": c["text"], "ids": m.tokenize(c["text"].encode(), add_bos=False, special=True),
                "ids_bos": m.tokenize(c["text"].encode(), add_bos=True, special=True)} for c in cases]
    (OUT / "deepseek-v2-vocab.llama_cpp.json").write_text(json.dumps({
        "source": "llama.cpp tokenizer via llama-cpp-python " + importlib.metadata.version("llama-cpp-python"),
        "cases": ids}, ensure_ascii=False))
    print(f"deepseek-v2-vocab.gguf.gz: {len(ids)} texts tokenized by llama.cpp")


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
