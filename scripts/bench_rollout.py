#!/usr/bin/env python3
"""Rollout benchmark: `distill generate` against transformers' `generate` and llama.cpp.

Driven by scripts/bench-rollout.sh, which prepares the venv, the models and the binary; see
its header for how to run it. This file does the measuring.

What it measures, per workload (issue 19's table):
  a  small.toml's teacher, greedy, 256 prompts, batch 128, 96 new tokens
  b  the same, sampling T 0.7 / top-p 0.95, 4 samples per prompt (batch = 128 rows)
  c  SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to f32 in both), greedy, 32 prompts,
     batch 8, 64 new tokens
  d  the same at batch 1
  e  llama.cpp (llama-cpp-python) on the same GGUF, native Q4_1, batch 1, 2 threads

How:
  - Every engine runs in its own child process, started by this script, so that each one's
    peak memory is the peak RSS of its own process (ru_maxrss from wait4), and its CPU and
    system time come from the same rusage. 2 threads everywhere: RAYON_NUM_THREADS=2 for
    distill, torch.set_num_threads(2) (and OMP_NUM_THREADS=2) for transformers, n_threads=2
    for llama.cpp. The python peers run with GLIBC_TUNABLES (malloc never returns memory to
    the OS: PyTorch's fastest setting on CPU).
  - The engines alternate inside each round (the order rotates from round to round), and
    each figure is the median over the rounds (default 3).
  - Same input on every side: the prompts are tokenized here exactly as distill does
    (BOS, then the prompt without special tokens, with the checkpoint's tokenizer.json or
    the tokenizer distill rebuilds from the GGUF metadata, using the same `tokenizers`
    library), and these ids are what transformers and llama.cpp receive. distill receives
    the prompt text and tokenizes it itself.
  - Tokens are counted the same way on every side: the new tokens of each sample up to and
    including the EOS that ended it (a sample cut by max_new_tokens counts max_new_tokens).
    distill's trace record gives `tokens` (without the EOS) and the verdict (`unfinished`
    when no EOS came). Where the model's context (max_position_embeddings) leaves a prompt
    less room than max_new_tokens, every side stops that prompt where distill does.
  - distill is timed as a whole process (load included), as a user sees it. Its CLI does
    not print the generation time alone, so the script also runs it on one prompt for one
    new token ("startup") and gives (whole - startup) as an estimate of generation alone.
    transformers is timed on its `generate` calls only; llama.cpp on its decoding calls only;
    each after an untimed warm-up call (one prompt, two tokens).
  - Greedy parity: per prompt, distill's completion text, token count and finished flag
    against transformers' ids decoded with the same tokenizer. llama.cpp computes in Q4_1
    (and quantises activations), so its agreement with distill's f32 path is only reported.
  - The script also reports whether transformers' own tokenizer (AutoTokenizer, from the
    checkpoint or the GGUF) encodes the prompts to the ids distill uses.

The results of each run, raw and as medians, are also written as JSON (--json).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 2
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


# --------------------------------------------------------------------------------------
# Tokenization as distill does it (crates/distill/src/prepare/tokenizer.rs and
# crates/distill/src/model/gguf.rs), with the same `tokenizers` library.
# --------------------------------------------------------------------------------------

EOS_ALIASES = ["<|eos|>", "<|endoftext|>", "</s>", "<|im_end|>", "<|end_of_text|>", "<eos>"]
BOS_ALIASES = ["<|bos|>", "<|im_start|>", "<s>", "<|begin_of_text|>", "<bos>"]


def is_gguf(model):
    return model.lower().endswith(".gguf") and os.path.isfile(model)


def gguf_fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


def distill_tokenizer(model):
    """(tokenizer, bos, eos) as distill builds them for a checkpoint directory or a GGUF file."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if not is_gguf(model):
        tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
        named = {}
        cfg_path = os.path.join(model, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
            for key in ("bos_token", "eos_token"):
                v = cfg.get(key)
                if isinstance(v, dict):
                    v = v.get("content")
                if v is not None:
                    named[key] = tok.token_to_id(v)

        def find(aliases):
            return next((tok.token_to_id(a) for a in aliases if tok.token_to_id(a) is not None), None)

        eos = named.get("eos_token")
        eos = eos if eos is not None else find(EOS_ALIASES)
        bos = named.get("bos_token")
        bos = bos if bos is not None else find(BOS_ALIASES)
        return tok, (eos if bos is None else bos), eos

    md = gguf_fields(model)
    if md.get("tokenizer.ggml.model") != "gpt2":
        raise SystemExit(f"{model}: only byte-level BPE (gpt2) GGUF tokenizers are supported, as in distill")
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre in ("default", "gpt2", "mpt", "olmo", "jais"):
        tok.pre_tokenizer = byte_level
    elif pre in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        raise SystemExit(f"{model}: tokenizer.ggml.pre = {pre!r} is not supported by distill")
    tok.decoder = decoders.ByteLevel()
    if types is not None:
        control = [AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3]
        user = [AddedToken(t, special=False) for t, ty in zip(tokens, types) if ty == 4]
        tok.add_special_tokens(control)
        if user:
            tok.add_tokens(user)
    eos = md["tokenizer.ggml.eos_token_id"]
    bos = md.get("tokenizer.ggml.bos_token_id", eos)
    return tok, bos, eos


def encode_prompts(model, prompts):
    tok, bos, eos = distill_tokenizer(model)
    return [[bos] + tok.encode(p, add_special_tokens=False).ids for p in prompts], eos


def max_positions(model):
    if is_gguf(model):
        md = gguf_fields(model)
        return int(md.get(f"{md['general.architecture']}.context_length", 1 << 30))
    with open(os.path.join(model, "config.json")) as f:
        return int(json.load(f).get("max_position_embeddings", 1 << 30))


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------


def teacher_prompts(traces_jsonl, n):
    """The first n prompts (by id) of the small run's traces.jsonl: the students' problems,
    which the teacher did not train on, with their expected answers."""
    seen, out = set(), []
    with open(traces_jsonl) as f:
        for line in f:
            r = json.loads(line)
            if r["id"] not in seen:
                seen.add(r["id"])
                out.append({"prompt": r["prompt"], "answer": r["answer"]})
    if len(out) < n:
        raise SystemExit(f"{traces_jsonl} has {len(out)} prompts; {n} wanted")
    return out[:n]


def english_prompts(n, seed=19):
    """n short English requests of varied lengths (1 to 3 sentences), the same for a seed, as a
    user turn of SmolLM2's chat format: distill prepends the BOS token, which for SmolLM2 is
    <|im_start|>, so the model sees `<|im_start|>user ...<|im_end|> <|im_start|>assistant` and
    answers at length (a bare sentence after <|im_start|> mostly ends at once). distill only
    samples prompts that have an answer, so each gets a dummy answer of 0."""
    rng = random.Random(seed)
    openers = [
        "Write a short poem about {t}.",
        "Explain {t} to a ten-year-old.",
        "What are three facts about {t}?",
        "Describe {t} in one paragraph.",
        "Give me a recipe that uses {t}.",
        "Tell a story about {t}.",
        "Why do people care about {t}?",
        "List some pros and cons of {t}.",
    ]
    topics = [
        "the sea", "autumn leaves", "a lighthouse keeper", "the moon", "coffee", "trains",
        "honey bees", "a mountain village", "rain in the city", "an old library", "volcanoes",
        "learning to swim", "the history of bread", "solar panels", "a lost cat", "winter mornings",
    ]
    extras = [
        "Keep it simple.",
        "Use plain words.",
        "It is for a school newsletter, so the readers are parents and teachers.",
        "Be brief.",
        "Start with a question and end with a short summary of the main point.",
        "Mention at least one number.",
    ]
    out = []
    for _ in range(n):
        text = rng.choice(openers).format(t=rng.choice(topics))
        for _ in range(rng.randrange(3)):
            text += " " + rng.choice(extras)
        out.append({"prompt": f"user\n{text}<|im_end|>\n<|im_start|>assistant\n", "answer": 0})
    return out


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# --------------------------------------------------------------------------------------
# Child processes, measured with wait4's rusage
# --------------------------------------------------------------------------------------


def run_measured(cmd, env_extra, log_path):
    """Runs cmd; returns wall seconds, peak RSS (MB), user and system CPU seconds, and the
    machine's 1-minute load average when it ended (the machine is shared: above 2 on 2 cores,
    other work competed for the CPUs)."""
    env = dict(os.environ)
    env.update(env_extra)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}:\n{tail}")
    return {
        "wall_s": wall, "peak_mb": ru.ru_maxrss / 1024, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
        "load": os.getloadavg()[0],
    }


def peer_env():
    return {
        "GLIBC_TUNABLES": GLIBC_TUNABLES,
        "OMP_NUM_THREADS": str(THREADS),
        "MKL_NUM_THREADS": str(THREADS),
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
    }


# --------------------------------------------------------------------------------------
# Peers: these functions run inside the child processes
# --------------------------------------------------------------------------------------


def peer_transformers(spec_path, out_path):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = json.load(open(spec_path))
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    model_path = spec["model"]
    if is_gguf(model_path):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(model_path)),
            gguf_file=os.path.basename(model_path),
            dtype=torch.float32,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    eos, k, max_new = spec["eos"], spec["samples"], spec["max_new_tokens"]
    sampled = spec["temperature"] > 0
    gc = GenerationConfig(
        do_sample=sampled,
        num_beams=1,
        temperature=spec["temperature"] if sampled else None,
        top_p=spec["top_p"] if sampled else None,
        top_k=0 if sampled else None,
        num_return_sequences=k,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    prompts, per_batch = spec["prompt_ids"], spec["prompts_per_batch"]
    with torch.inference_mode():  # warm-up, untimed: one prompt, two tokens
        model.generate(input_ids=torch.tensor(prompts[:1]), generation_config=gc, max_new_tokens=2)
    torch.manual_seed(spec["seed"])
    rows, gen_s = [], 0.0
    for start in range(0, len(prompts), per_batch):
        batch = prompts[start : start + per_batch]
        width = max(len(p) for p in batch)
        caps = [min(max_new, spec["max_positions"] - len(p)) for p in batch]
        ids = torch.full((len(batch), width), eos, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=gc, max_new_tokens=max(caps)
            )
            gen_s += time.perf_counter() - t
        new = out[:, width:].tolist()
        for r, seq in enumerate(new):
            cap = caps[r // k]
            got = []
            finished = False
            for tok in seq[:cap]:
                if tok == eos:
                    finished = True
                    break
                got.append(tok)
            rows.append({"ids": got, "finished": finished})
    json.dump({"rows": rows, "gen_s": gen_s, "load_s": load_s}, open(out_path, "w"))


def peer_llama(spec_path, out_path):
    from llama_cpp import Llama

    spec = json.load(open(spec_path))
    t0 = time.perf_counter()
    prompts, max_new, eos = spec["prompt_ids"], spec["max_new_tokens"], spec["eos"]
    n_ctx = max(len(p) for p in prompts) + max_new + 8
    llm = Llama(
        model_path=spec["model"], n_ctx=n_ctx, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    for _ in zip(range(2), llm.generate(prompts[0], temp=0.0, reset=True)):  # warm-up, untimed
        pass
    rows, gen_s = [], 0.0
    for p in prompts:  # batch 1
        llm.reset()
        got, finished = [], False
        t = time.perf_counter()
        for tok in llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if tok == eos:
                finished = True
                break
            got.append(tok)
            if len(got) == max_new:
                break
        gen_s += time.perf_counter() - t
        rows.append({"ids": got, "finished": finished})
    json.dump({"rows": rows, "gen_s": gen_s, "load_s": load_s}, open(out_path, "w"))


def peer_tokcheck(spec_path, out_path):
    """Whether transformers' own tokenizer encodes the prompts to distill's ids."""
    from transformers import AutoTokenizer

    spec = json.load(open(spec_path))
    m = spec["model"]
    if is_gguf(m):
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(m)), gguf_file=os.path.basename(m))
    else:
        tok = AutoTokenizer.from_pretrained(m)
    same_text = same_default = 0
    for text, ids in zip(spec["prompts"], spec["prompt_ids"]):
        same_text += tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
        same_default += tok(text)["input_ids"] == ids
    json.dump(
        {
            "prompts": len(spec["prompts"]),
            "same_without_bos": same_text,
            "same_with_default_special_tokens": same_default,
            "hf_bos": tok.bos_token_id,
            "distill_bos": spec["prompt_ids"][0][0],
        },
        open(out_path, "w"),
    )


# --------------------------------------------------------------------------------------
# Engines, as the orchestrator runs them
# --------------------------------------------------------------------------------------


def count_tokens(rows):
    return sum(len(r["ids"]) + (1 if r["finished"] else 0) for r in rows)


def run_distill(w, work, bin_path):
    """distill generate on the workload's prompts; tokens/s over the whole process."""
    out = os.path.join(work, "distill-traces.jsonl")
    cmd = [
        bin_path, "generate", "--checkpoint", w["model"], "--input", w["prompts_file"], "--out", out,
        "--force", "--samples", str(w["samples"]), "--max-new-tokens", str(w["max_new_tokens"]),
        "--temperature", str(w["temperature"]), "--top-p", str(w["top_p"]), "--seed", str(w["seed"]),
        "--batch-size", str(w["batch_rows"]), "--keep", "all",
        "--matmul-weights", w.get("matmul_weights", "dense"),
    ]
    env = {"RAYON_NUM_THREADS": str(THREADS)}
    m = run_measured(cmd, env, os.path.join(work, "distill.log"))
    records = [json.loads(line) for line in open(out)]
    records.sort(key=lambda r: (r["id"], r["sample"]))
    rows = [
        {"text": r["completion"], "n": r["tokens"], "finished": r["verdict"] not in ("unfinished", "prompt_too_long")}
        for r in records
    ]
    # Startup: the same command on the first prompt, for one new token.
    one = os.path.join(work, "one-prompt.jsonl")
    with open(w["prompts_file"]) as f:
        open(one, "w").write(f.readline())
    cmd_one = list(cmd)
    cmd_one[cmd_one.index("--input") + 1] = one
    cmd_one[cmd_one.index("--max-new-tokens") + 1] = "1"
    cmd_one[cmd_one.index("--samples") + 1] = "1"
    cmd_one[cmd_one.index("--out") + 1] = os.path.join(work, "distill-one.jsonl")
    startup = run_measured(cmd_one, env, os.path.join(work, "distill-one.log"))["wall_s"]
    tokens = sum(r["n"] + (1 if r["finished"] else 0) for r in rows)
    gen_est = max(m["wall_s"] - startup, 1e-9)
    return dict(
        m, rows=rows, tokens=tokens, tok_s=tokens / m["wall_s"], startup_s=startup, gen_est_s=gen_est,
        tok_s_gen_est=tokens / gen_est,
    )


def run_peer(kind, w, work, python):
    spec = {
        "model": w["model"], "prompt_ids": w["prompt_ids"], "eos": w["eos"], "samples": w["samples"],
        "max_new_tokens": w["max_new_tokens"], "temperature": w["temperature"], "top_p": w["top_p"],
        "seed": w["seed"], "prompts_per_batch": max(w["batch_rows"] // w["samples"], 1),
        "max_positions": w["max_positions"],
    }
    spec_path = os.path.join(work, f"{kind}-spec.json")
    out_path = os.path.join(work, f"{kind}-out.json")
    json.dump(spec, open(spec_path, "w"))
    cmd = [python, os.path.abspath(__file__), f"peer-{kind}", spec_path, out_path]
    m = run_measured(cmd, peer_env(), os.path.join(work, f"{kind}.log"))
    res = json.load(open(out_path))
    tokens = count_tokens(res["rows"])
    return dict(m, rows=res["rows"], tokens=tokens, gen_s=res["gen_s"], load_s=res["load_s"], tok_s=tokens / res["gen_s"])


def decode_rows(w, rows):
    tok, _, _ = distill_tokenizer(w["model"])
    return [
        {"text": tok.decode(r["ids"], skip_special_tokens=True), "n": len(r["ids"]), "finished": r["finished"]}
        for r in rows
    ]


def agreement(distill_rows, other_rows):
    """Samples whose text, token count and end (EOS or not) are the same on both sides."""
    return sum(
        a["text"] == b["text"] and a["n"] == b["n"] and a["finished"] == b["finished"]
        for a, b in zip(distill_rows, other_rows)
    )


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


def workloads(args):
    small = dict(model=args.teacher, temperature=0.0, top_p=1.0, seed=1234, max_new_tokens=96, batch_rows=128)
    smol = dict(model=args.gguf, temperature=0.0, top_p=1.0, seed=0, max_new_tokens=64, samples=1)
    n_small = 32 if args.quick else 256
    n_smol = 8 if args.quick else 32
    return {
        "a": dict(small, title=f"small teacher, greedy, {n_small} prompts, batch 128, 96 new",
                  prompts="teacher", n=n_small, samples=1, engines=["distill", "transformers"]),
        "b": dict(small, title=f"small teacher, T 0.7 top-p 0.95, 4 x {n_small} prompts, batch 128, 96 new",
                  prompts="teacher", n=n_small, samples=4, temperature=0.7, top_p=0.95,
                  engines=["distill", "transformers"]),
        "c": dict(smol, title=f"SmolLM2-135M f32, greedy, {n_smol} prompts, batch 8, 64 new",
                  prompts="english", n=n_smol, batch_rows=8, engines=["distill", "transformers"]),
        "d": dict(smol, title=f"SmolLM2-135M f32, greedy, {n_smol} prompts, batch 1, 64 new",
                  prompts="english", n=n_smol, batch_rows=1, engines=["distill", "transformers"]),
        "e": dict(smol, title=f"SmolLM2-135M Q4_1 (llama.cpp), greedy, {n_smol} prompts, batch 1, 64 new",
                  prompts="english", n=n_smol, batch_rows=1, engines=["llama"]),
        "f": dict(smol, title=f"SmolLM2-135M int8 weights (distill), greedy, {n_smol} prompts, batch 1, 64 new",
                  prompts="english", n=n_smol, batch_rows=1, engines=["distill"], matmul_weights="int8"),
    }


def prepare_workload(name, w, args, work_root):
    work = os.path.join(work_root, name)
    os.makedirs(work, exist_ok=True)
    if w["prompts"] == "teacher":
        prompts = teacher_prompts(args.teacher_prompts, w["n"])
    else:
        prompts = english_prompts(w["n"])
    w["prompts_file"] = os.path.join(work, "prompts.jsonl")
    write_jsonl(w["prompts_file"], prompts)
    w["texts"] = [p["prompt"] for p in prompts]
    w["prompt_ids"], w["eos"] = encode_prompts(w["model"], w["texts"])
    w["max_positions"] = max_positions(w["model"])
    w["work"] = work
    return w


def run_engine(engine, w, args):
    if engine == "distill":
        return run_distill(w, w["work"], args.distill_bin)
    r = run_peer(engine, w, w["work"], sys.executable)
    r["rows"] = decode_rows(w, r["rows"])
    return r


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(name, w, runs):
    """Medians over rounds, and parity of the first round (greedy runs are deterministic;
    every round's parity is checked and the worst is kept)."""
    s = {"title": w["title"], "engines": {}}
    for engine, rs in runs.items():
        e = {k: median([r.get(k) for r in rs]) for k in
             ("tok_s", "tok_s_gen_est", "wall_s", "gen_s", "gen_est_s", "startup_s", "peak_mb", "sys_s", "user_s", "load")}
        e["tokens"] = rs[0]["tokens"]
        e["tokens_per_round"] = [r["tokens"] for r in rs]
        e["rounds"] = len(rs)
        s["engines"][engine] = e
    samples = w["n"] * w["samples"]
    if w["temperature"] == 0 and "distill" in runs:
        for other in ("transformers", "llama"):
            if other in runs:
                s[f"agree_{other}"] = min(agreement(d["rows"], o["rows"]) for d, o in zip(runs["distill"], runs[other]))
        # Determinism across rounds, on each side.
        for engine, rs in runs.items():
            s.setdefault("stable", {})[engine] = all(r["rows"] == rs[0]["rows"] for r in rs)
    s["samples"] = samples
    return s


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def fmt(x, spec=",.0f", none="-"):
    return none if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def print_table(summaries, tokchecks, args, file=None):
    file = file or sys.stdout
    print(file=file)
    print(f"rounds: {args.rounds}, threads: {THREADS}, distill: {args.distill_bin}", file=file)
    print("tok/s: new tokens (EOS included) per second. distill: whole process (load included), and in", file=file)
    print("brackets an estimate of generation alone (whole minus a 1-prompt, 1-token run). transformers", file=file)
    print("and llama.cpp: their timed generate/decode calls only. peak: peak RSS of the process. load: the", file=file)
    print("machine's 1-minute load average as the process ended (2 cores: above 2, others competed). Medians.", file=file)
    print(file=file)
    head = f"{'':2} {'workload':<68} {'engine':<13} {'tokens':>7} {'tok/s':>17} {'wall s':>7} {'sys s':>6} {'peak MB':>8} {'load':>5}"
    print(head, file=file)
    print("-" * len(head), file=file)
    for name, s in summaries.items():
        for i, (engine, e) in enumerate(s["engines"].items()):
            label = "llama.cpp" if engine == "llama" else engine
            tps = fmt(e["tok_s"], ",.1f")
            if engine == "distill":
                tps += f" [{fmt(e['tok_s_gen_est'], ',.0f')}]"
            print(
                f"{name if i == 0 else '':2} {s['title'] if i == 0 else '':<68} {label:<13} {e['tokens']:>7,} "
                f"{tps:>17} {fmt(e['wall_s'], '.1f'):>7} {fmt(e['sys_s'], '.1f'):>6} {fmt(e['peak_mb'], ',.0f'):>8} {fmt(e['load'], '.1f'):>5}",
                file=file,
            )
    print(file=file)
    print("ratios (distill / other; tok/s: distill whole process [generation estimate]; memory: peak RSS)", file=file)
    d_batch1 = summaries.get("d", {}).get("engines", {}).get("distill")
    for name, s in summaries.items():
        d = s["engines"].get("distill")
        t = s["engines"].get("transformers")
        if d and t:
            line = (
                f"  {name}: distill/transformers tok/s {fmt(ratio(d['tok_s'], t['tok_s']), '.2f')} "
                f"[{fmt(ratio(d['tok_s_gen_est'], t['tok_s']), '.2f')}], peak memory "
                f"{fmt(ratio(d['peak_mb'], t['peak_mb']), '.2f')}"
            )
            if "agree_transformers" in s:
                line += f"; greedy parity with transformers: {s['agree_transformers']}/{s['samples']} prompts agree"
            else:
                line += "; sampled, parity not checkable"
            if "stable" in s:
                line += f"; same output every round: {', '.join(f'{k} {v}' for k, v in s['stable'].items())}"
            print(line, file=file)
        lc = s["engines"].get("llama")
        if lc:
            both = [(k, summaries.get(k, {}).get("engines", {}).get("distill")) for k in ("d", "f")]
            for k, dk in [(k, dk) for k, dk in both if dk]:
                weights = "f32" if k == "d" else "int8"
                print(
                    f"  {name}: distill ({k}, {weights}, batch 1) / llama.cpp (Q4_1) tok/s "
                    f"{fmt(ratio(dk['tok_s'], lc['tok_s']), '.2f')} "
                    f"[{fmt(ratio(dk['tok_s_gen_est'], lc['tok_s']), '.2f')}], peak memory "
                    f"{fmt(ratio(dk['peak_mb'], lc['peak_mb']), '.2f')}",
                    file=file,
                )
            if not any(dk for _, dk in both):
                print(f"  {name}: run workload d or f too for distill / llama.cpp", file=file)
    for name, s in summaries.items():
        if "agree_llama" in s:
            print(f"  {name}: llama.cpp (Q4_1) greedy text equal to distill's (f32): {s['agree_llama']}/{s['samples']}", file=file)
        if "agree_f32" in s:
            print(f"  {name}: distill int8 greedy text equal to distill f32 (d): {s['agree_f32']}/{s['samples']}", file=file)
        if "agree_llama_int8" in s:
            print(f"  {name}: distill int8 greedy text equal to llama.cpp (Q4_1): {s['agree_llama_int8']}/{s['samples']}", file=file)
    if tokchecks:
        print(file=file)
        print("transformers' own tokenizer (AutoTokenizer) against the ids distill feeds the model:", file=file)
        for model, c in tokchecks.items():
            print(
                f"  {model}: {c['same_without_bos']}/{c['prompts']} prompts encode alike without special "
                f"tokens; with transformers' default special tokens {c['same_with_default_special_tokens']}/"
                f"{c['prompts']} (distill prepends BOS id {c['distill_bos']}; the tokenizer's bos_token_id is "
                f"{c['hf_bos']})",
                file=file,
            )


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main():
    if len(sys.argv) >= 2 and sys.argv[1].startswith("peer-"):
        {"peer-transformers": peer_transformers, "peer-llama": peer_llama, "peer-tokcheck": peer_tokcheck}[
            sys.argv[1]
        ](sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--distill-bin", required=True)
    ap.add_argument("--teacher", required=True, help="small.toml's teacher checkpoint directory")
    ap.add_argument("--teacher-prompts", required=True, help="the small run's traces.jsonl")
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="a,b,c,d,e,f", help="workloads, e.g. a,c")
    ap.add_argument("--quick", action="store_true", help="1 round, fewer prompts: a smoke test")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp (workload e)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write raw results and medians here")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    chosen = [x.strip() for x in args.only.split(",") if x.strip()]
    all_w = workloads(args)
    bad = [c for c in chosen if c not in all_w]
    if bad:
        raise SystemExit(f"unknown workloads {bad}; choose from {','.join(all_w)}")
    if "e" in chosen and args.no_llama:
        print("llama.cpp: not available (llama-cpp-python is not installed); workload e skipped")
        chosen.remove("e")
    work_root = args.work or tempfile.mkdtemp(prefix="bench-rollout-")
    ws = {n: prepare_workload(n, all_w[n], args, work_root) for n in chosen}

    tokchecks = {}
    for n, w in ws.items():
        key = os.path.basename(os.path.normpath(w["model"]))
        if w["engines"] != ["llama"] and key not in tokchecks:
            spec = {"model": w["model"], "prompts": w["texts"], "prompt_ids": w["prompt_ids"]}
            sp, op = os.path.join(w["work"], "tokcheck-spec.json"), os.path.join(w["work"], "tokcheck.json")
            json.dump(spec, open(sp, "w"))
            subprocess.run([sys.executable, os.path.abspath(__file__), "peer-tokcheck", sp, op], check=True,
                           env=dict(os.environ, **peer_env()))
            tokchecks[key] = json.load(open(op))

    runs = {n: {} for n in ws}
    # Workload e's llama.cpp rows are compared with d's distill rows when both run.
    for rnd in range(args.rounds):
        for n, w in ws.items():
            engines = w["engines"][rnd % len(w["engines"]):] + w["engines"][: rnd % len(w["engines"])]
            for engine in engines:
                t = time.strftime("%H:%M:%S")
                print(f"[{t}] round {rnd + 1}/{args.rounds}, workload {n}: {engine} ...", file=sys.stderr, flush=True)
                r = run_engine(engine, w, args)
                runs[n].setdefault(engine, []).append(r)
                extra = f" [{r['tok_s_gen_est']:,.0f} gen est.]" if engine == "distill" else ""
                print(f"    {r['tokens']:,} tokens, {r['tok_s']:,.1f} tok/s{extra}, peak {r['peak_mb']:,.0f} MB",
                      file=sys.stderr, flush=True)

        # After each round: the results so far, so that a run cut short still leaves them.
        summaries = save_results(ws, runs, tokchecks, args, rnd + 1)
        if rnd + 1 < args.rounds:
            print(f"\nafter round {rnd + 1} of {args.rounds}:", file=sys.stderr)
            print_table(summaries, tokchecks, args, file=sys.stderr)
    print_table(summaries, tokchecks, args)
    if args.json:
        print(f"\nresults: {args.json}")


def save_results(ws, runs, tokchecks, args, rounds_done):
    summaries = {n: summarize(n, ws[n], runs[n]) for n in ws}
    if "e" in runs and "d" in runs and "distill" in runs["d"]:
        summaries["e"]["agree_llama"] = min(
            agreement(d["rows"], o["rows"]) for d in runs["d"]["distill"] for o in runs["e"]["llama"]
        )
    if "f" in runs and "d" in runs and "distill" in runs["d"]:
        summaries["f"]["agree_f32"] = min(
            agreement(q["rows"], d["rows"]) for q in runs["f"]["distill"] for d in runs["d"]["distill"]
        )
    if "f" in runs and "e" in runs:
        summaries["f"]["agree_llama_int8"] = min(
            agreement(q["rows"], o["rows"]) for q in runs["f"]["distill"] for o in runs["e"]["llama"]
        )
    if args.json:
        raw = {n: {e: [{k: v for k, v in r.items() if k != "rows"} for r in rs] for e, rs in runs[n].items()} for n in runs}
        out = {"rounds_done": rounds_done, "summaries": summaries, "tokenizer_checks": tokchecks, "raw": raw}
        json.dump(out, open(args.json, "w"), indent=1)
    return summaries


if __name__ == "__main__":
    main()
