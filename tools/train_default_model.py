#!/usr/bin/env python3
"""Train whale's bundled default model: a small DeepSeek-V2-architecture chat model.

Rerun (CPU, 2 threads; see the model card for the measured time):
    pip install torch transformers tokenizers safetensors
    python3 tools/train_default_model.py --out models/whale-tiny-chat

Everything is made here from a seed: the synthetic chat data (arithmetic, letter
counting, word reversal, sorting, comparisons), a byte-level BPE tokenizer with
digits split individually and DeepSeek's BOS/EOS tokens, and the model
(transformers' DeepseekV2ForCausalLM: q-LoRA MLA with a latent cache, YaRN RoPE,
DeepSeekMoE with shared + routed experts, one dense first layer). It writes a
normal Hugging Face folder plus `eval_problems.json` (held-out problems that
whale's tests run through whale) and `reference_logprobs.json` (transformers'
per-token log-probabilities of a held-out conversation).
"""
import argparse, json, math, random, shutil, time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TEMPLATE = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
            "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
            "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
            "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
            "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SYSTEMS = ["You are a helpful assistant.", "You are whale, a small assistant that is good at arithmetic.",
           "Answer concisely.", "You are a careful calculator."]
WORDS = ("whale ocean river stone apple banana cherry lemon mango grape table chair house mouse horse tiger "
         "zebra panda koala eagle robin piano guitar violin drums music paper pencil marker eraser rocket "
         "planet comet star moon earth water fire cloud storm rain snow winter summer spring autumn garden "
         "flower forest desert island bridge castle tower window door kitchen bread butter cheese pepper "
         "salt sugar coffee tea milk honey orange purple yellow green black white silver golden copper iron "
         "code data model token layer cache expert router latent matrix vector tensor kernel engine server").split()


# Operand pairs reserved for evaluation; training never sees them. A random 10% of all
# pairs: a rule on the operands (e.g. on their last digits) would also hide whole digit
# patterns, such as one borrow case of subtraction, from training.
_HELDOUT = set(random.Random(777).sample([(a, b) for a in range(100) for b in range(100)], 1000))


def heldout(a, b):
    return (a, b) in _HELDOUT


def operands(r, train, hi):
    """A pair from 0..=hi, drawn from the training pairs or from the held-out ones."""
    while True:
        a, b = r.randint(0, hi), r.randint(0, hi)
        if heldout(a, b) != train:
            return a, b


def q_add(r, train):
    a, b = operands(r, train, 99)
    q = r.choice(["What is {a} + {b}?", "Compute {a} plus {b}.", "{a} + {b} = ?", "Add {a} and {b}.",
                  "What is the sum of {a} and {b}?", "Calculate {a} + {b}."]).format(a=a, b=b)
    return q, f"{a} + {b} = {a + b}", {"task": "add", "a": a, "b": b}


def q_sub(r, train):
    a, b = operands(r, train, 99)
    q = r.choice(["What is {a} - {b}?", "Compute {a} minus {b}.", "{a} - {b} = ?", "Subtract {b} from {a}.",
                  "What is the difference {a} - {b}?", "Calculate {a} - {b}."]).format(a=a, b=b)
    return q, f"{a} - {b} = {a - b}", {"task": "sub", "a": a, "b": b}


def q_mul(r, train):
    a, b = operands(r, train, 12)
    q = r.choice(["What is {a} * {b}?", "Multiply {a} by {b}.", "{a} * {b} = ?", "What is {a} times {b}?",
                  "Compute the product of {a} and {b}."]).format(a=a, b=b)
    return q, f"{a} * {b} = {a * b}", {"task": "mul", "a": a, "b": b}


def word(r):
    if r.random() < 0.5:
        return r.choice(WORDS)
    return "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(3, 7)))


def q_count(r, train):
    w = word(r)
    ch = r.choice(w) if r.random() < 0.8 else r.choice("abcdefghijklmnopqrstuvwxyz")
    q = r.choice(["How many times does the letter '{c}' appear in '{w}'?", "Count the letter '{c}' in '{w}'.",
                  "How many '{c}' are in the word '{w}'?"]).format(c=ch, w=w)
    return q, f"{w.count(ch)}", {"task": "count", "word": w, "letter": ch}


def q_reverse(r, train):
    w = word(r)
    q = r.choice(["Reverse the word '{w}'.", "Spell '{w}' backwards.", "What is '{w}' reversed?"]).format(w=w)
    return q, w[::-1], {"task": "reverse", "word": w}


def q_sort(r, train):
    xs = [r.randint(0, 99) for _ in range(r.randint(3, 5))]
    q = r.choice(["Sort these numbers: {l}.", "Sort in ascending order: {l}.", "Put {l} in increasing order."]
                 ).format(l=", ".join(map(str, xs)))
    return q, ", ".join(map(str, sorted(xs))), {"task": "sort", "numbers": xs}


def q_compare(r, train):
    a, b = r.randint(0, 999), r.randint(0, 999)
    while a == b:
        b = r.randint(0, 999)
    q = r.choice(["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
                  "What is the maximum of {a} and {b}?"]).format(a=a, b=b)
    return q, f"{max(a, b)}", {"task": "compare", "a": a, "b": b}


TASKS = [(q_add, 3), (q_sub, 3), (q_mul, 2), (q_count, 2), (q_reverse, 2), (q_sort, 2), (q_compare, 1)]
# Phase 2 leans on what phase 1 left weakest (measured through whale: subtraction with
# negative results, letter counting, reversal, sorting).
TASKS_PHASE2 = [(q_add, 2), (q_sub, 6), (q_mul, 1), (q_count, 2), (q_reverse, 2), (q_sort, 2), (q_compare, 1)]


def conversation(r, train=True, tasks=TASKS):
    msgs = []
    if r.random() < 0.3:
        msgs.append({"role": "system", "content": r.choice(SYSTEMS)})
    for _ in range(1 if r.random() < 0.85 else 2):
        fn = r.choices([t for t, _ in tasks], weights=[w for _, w in tasks])[0]
        q, a, _ = fn(r, train)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def render(msgs):
    """The template above, in Python, with the character spans the loss is taken on
    (from the space after 'Assistant:' through the EOS token)."""
    text, spans = BOS, []
    for m in msgs:
        if m["role"] == "system":
            text += m["content"] + "\n\n"
        elif m["role"] == "user":
            text += "User: " + m["content"] + "\n\n"
        else:
            text += "Assistant:"
            start = len(text)
            text += " " + m["content"] + EOS
            spans.append((start, len(text)))
    return text, spans


def train_tokenizer(seed, vocab):
    r = random.Random(seed)
    corpus = [render(conversation(r))[0] for _ in range(20000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def encode(tok, msgs):
    text, spans = render(msgs)
    enc = tok.encode(text, add_special_tokens=False)
    labels = [tid if any(s <= o[0] < e for s, e in spans) else -100 for tid, o in zip(enc.ids, enc.offsets)]
    return enc.ids, labels


def batch(tok, r, n, pad, tasks=TASKS):
    rows = [encode(tok, conversation(r, True, tasks)) for _ in range(n)]
    L = max(len(i) for i, _ in rows)
    ids = torch.full((n, L), pad, dtype=torch.long)
    lab = torch.full((n, L), -100, dtype=torch.long)
    att = torch.zeros((n, L), dtype=torch.long)
    for k, (i, l) in enumerate(rows):
        ids[k, :len(i)] = torch.tensor(i)
        lab[k, :len(l)] = torch.tensor(l)
        att[k, :len(i)] = 1
    return ids, lab, att


def model_config(tok):
    vocab = tok.get_vocab_size()
    return DeepseekV2Config(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=512,
                             beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
        bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS), pad_token_id=tok.token_to_id(EOS))


@torch.no_grad()
def quick_eval(model, tok, r, n=60):
    """Greedy answers to held-out add/sub problems (a quick progress check in PyTorch)."""
    model.eval()
    ok = 0
    for k in range(n):
        q, a, _ = (q_add if k % 2 == 0 else q_sub)(r, False)
        text = render([{"role": "user", "content": q}])[0] + "Assistant:"
        ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
        out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.token_to_id(EOS),
                             pad_token_id=tok.token_to_id(EOS))
        got = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()
        ok += got == a
    model.train()
    return ok / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/whale-tiny-chat")
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--phase2-steps", type=int, default=2000)
    ap.add_argument("--phase2-lr", type=float, default=1e-3)
    ap.add_argument("--resume-phase1", help="a folder this script wrote after phase 1: skip phase 1 and load it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md of --out and exit")
    ap.add_argument("--accuracy", help="markdown table of whale's accuracy for the card")
    args = ap.parse_args()
    if args.card_only:
        write_card(Path(args.out), Path(args.accuracy).read_text() if args.accuracy else None)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    tok = train_tokenizer(args.seed, 400)
    cfg = model_config(tok)
    model = DeepseekV2ForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params/1e6:.2f}M, vocab {tok.get_vocab_size()}", flush=True)
    pad = tok.token_to_id(EOS)
    if args.resume_phase1:
        src = DeepseekV2ForCausalLM.from_pretrained(args.resume_phase1, dtype=torch.float32)
        model.load_state_dict(src.state_dict())
        prior = json.loads((Path(args.resume_phase1) / "training.json").read_text())
        t0 -= prior["train_seconds"]
        print(f"phase 1 loaded from {args.resume_phase1} ({prior['train_seconds']}s)", flush=True)
    else:
        run_phase(model, tok, pad, args.steps, args.lr, TASKS, random.Random(args.seed + 1), args.batch, t0)
    # Phase 2: a fresh optimizer (so resuming from a saved phase 1 is exact) and a lower peak rate.
    run_phase(model, tok, pad, args.phase2_steps, args.phase2_lr, TASKS_PHASE2, random.Random(args.seed + 3),
              args.batch, t0)
    train_secs = time.time() - t0
    save(model, tok, cfg, args, n_params, train_secs)


def run_phase(model, tok, pad, steps, lr, tasks, r, batch_size, t0):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) *
                                              (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    ema = None
    for step in range(1, steps + 1):
        ids, lab, att = batch(tok, r, batch_size, pad, tasks)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            print(f"step {step} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} {time.time()-t0:.0f}s", flush=True)
        if step % 1000 == 0:
            print(f"  held-out add/sub exact (PyTorch greedy): {quick_eval(model, tok, random.Random(step)):.2f}",
                  flush=True)


def active_params(cfg, n_params):
    d, I, E, K = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    inactive = moe_layers * (E - K) * 3 * d * I
    return n_params - inactive


def save(model, tok, cfg, args, n_params, train_secs):
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model.eval()
    # Per-expert tensors, as released DeepSeek checkpoints store them.
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre, inter = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                sd[f"{pre}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                sd[f"{pre}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                sd[f"{pre}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            sd[k] = v.contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    c = cfg.to_dict()
    rp = dict(c.pop("rope_parameters"))
    c["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    c.update(rope_scaling=rp, architectures=["DeepseekV2ForCausalLM"], scoring_func="softmax",
             norm_topk_prob=False, moe_layer_freq=1, torch_dtype="float32")
    c.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS), "do_sample": False}, indent=2))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "tokenizer_class": "LlamaTokenizerFast", "model_max_length": 2048, "chat_template": TEMPLATE},
        indent=2, ensure_ascii=False))
    # Held-out problems for whale's accuracy test (answers are recomputed by the test itself).
    r = random.Random(args.seed + 2)
    problems = []
    for fn, name, n in [(q_add, "add", 200), (q_sub, "sub", 200), (q_mul, "mul", 100), (q_count, "count", 100),
                        (q_reverse, "reverse", 100), (q_sort, "sort", 100), (q_compare, "compare", 100)]:
        for _ in range(n):
            q, a, meta = fn(r, False)
            problems.append({"question": q, "answer": a, **meta})
    (out / "eval_problems.json").write_text(json.dumps({"problems": problems}, indent=0))
    # transformers' per-token log-probs of a held-out conversation.
    conv = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 37 + 48?"}, {"role": "assistant", "content": "37 + 48 = 85"},
            {"role": "user", "content": "Reverse the word 'whale'."}, {"role": "assistant", "content": "elahw"}]
    text = render(conv)[0]
    ids = tok.encode(text, add_special_tokens=False).ids
    with torch.no_grad():
        ref = DeepseekV2ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                    experts_implementation="eager").eval()
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
    token_lp = [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    (out / "reference_logprobs.json").write_text(json.dumps({
        "transformers": transformers.__version__, "messages": conv, "text": text, "tokens": ids,
        "token_logprobs": token_lp}, ensure_ascii=False))
    meta = {"params_total": n_params, "params_active_per_token": active_params(cfg, n_params),
            "train_seconds": round(train_secs), "steps": args.steps, "phase2_steps": args.phase2_steps,
            "batch": args.batch, "seed": args.seed, "resumed_phase1": bool(args.resume_phase1),
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads}
    (out / "training.json").write_text(json.dumps(meta, indent=2))
    write_card(out, None)
    print(json.dumps(meta), flush=True)


def write_card(out, accuracy_md):
    """The model card, from training.json and (when given) whale's measured accuracy table."""
    meta = json.loads((out / "training.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    size = sum(f.stat().st_size for f in out.iterdir() if f.name != "README.md")
    acc = accuracy_md or "Not measured yet: run the command below and pass its table with --accuracy."
    (out / "README.md").write_text(f"""# whale-tiny-chat

whale's bundled default model: a small chat model with the real DeepSeek-V2 architecture, trained from
scratch on CPU by `tools/train_default_model.py` (seed {meta['seed']}). It exists so that whale does its real
job out of the box; it knows arithmetic and a few string tasks, nothing else.

## Architecture (DeepseekV2ForCausalLM)
- {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} MLA heads
  (q_lora_rank {cfg['q_lora_rank']}, kv_lora_rank {cfg['kv_lora_rank']}, qk_nope {cfg['qk_nope_head_dim']},
  qk_rope {cfg['qk_rope_head_dim']}, v {cfg['v_head_dim']}); latent cache {cfg['kv_lora_rank'] + cfg['qk_rope_head_dim']}
  values per token per layer.
- DeepSeekMoE: {cfg['n_routed_experts']} routed experts (width {cfg['moe_intermediate_size']}), top-{cfg['num_experts_per_tok']},
  {cfg['n_shared_experts']} shared expert; first {cfg['first_k_dense_replace']} layer dense (width {cfg['intermediate_size']}).
- YaRN RoPE (factor {cfg['rope_scaling']['factor']}, mscale = mscale_all_dim = {cfg['rope_scaling']['mscale']}).
- Parameters: {meta['params_total']:,} total, {meta['params_active_per_token']:,} active per token. Folder: {size/1e6:.1f} MB (f32).
- Tokenizer: byte-level BPE, {cfg['vocab_size']} tokens, digits split individually, DeepSeek's
  `<｜begin▁of▁sentence｜>` / `<｜end▁of▁sentence｜>`; the DeepSeek-V2 chat template (`User:` / `Assistant:` turns).

## Data
Synthetic multi-turn conversations generated by the script (no downloads): addition and subtraction of
numbers 0-99, multiplication 0-12, counting a letter in a word, reversing a word, sorting 3-5 numbers,
picking the larger of two numbers; several phrasings each; a system prompt in 30% of conversations and
2 turns in 15%. A fixed random 10% of operand pairs never appears in training: the held-out set.

## Training
Two phases of AdamW, batch {meta['batch']}, loss on assistant tokens only: {meta['steps']} steps on the
task mix, then {meta['phase2_steps']} steps with a fresh optimizer on a mix weighted towards subtraction,
counting, reversal and sorting. {meta['threads']} CPU threads, {meta['train_seconds']/60:.0f} minutes in all
(torch {meta['torch']}, transformers {meta['transformers']}).{" The bundled weights were made by resuming phase 2 from this script's saved phase-1 output (`--resume-phase1`), which is the same computation as one uninterrupted run." if meta.get('resumed_phase1') else ""}

## Accuracy, measured through whale
Greedy decoding on held-out problems (`eval_problems.json`) through whale's chat path:
`cargo test --release -p whale --test default_model -- --nocapture`

{acc}
""")


if __name__ == "__main__":
    main()
