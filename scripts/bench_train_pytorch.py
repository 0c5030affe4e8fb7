#!/usr/bin/env python3
"""PyTorch eager baseline for the train-step benchmark (crates/distill/benches/train_step.rs;
both are driven by scripts/bench-train.sh).

The same model M1, written out here so that nothing but PyTorch eager runs it: Llama-style,
no biases, untied head; vocab 8192, hidden 256, 4 layers, 8 heads of 32 (8 KV heads),
SwiGLU 688, RMSNorm eps 1e-5, rotary theta 10000 (rotate-half, as Hugging Face Llama);
batch 8 x 256 tokens; f32. One step: forward, mean cross-entropy over every position,
backward, clip_grad_norm_(1.0), torch.optim.AdamW with distill's TrainSpec defaults
(lr 1e-3, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices, 0 on norm gains),
zero_grad(set_to_none=True). Weights start N(0, 0.02), norm gains 1.

--attn matmul (default): attention as q @ k^T, causal mask, softmax, @ v (what distill does);
--attn sdpa: F.scaled_dot_product_attention(is_causal=True), PyTorch's fused kernel.

Timing: WARMUP untimed steps, then STEPS timed ones, each split into forward (+loss),
backward, optimizer (clip + AdamW + zero_grad). CPU ops are synchronous, so the clock
reads are exact. MFU = 3 x forward FLOPs (ModelConfig::forward_flops_per_token: 2 per
matmul weight + 4 * layers * heads * head_dim * T per token) / step time / the best rate
of a square f32 matmul (PEAK_SIZE, default 2048) measured in this process after the steps.
Peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss (kB on Linux).

Setup (a virtual environment with torch, outside the repository):

    python3 -m venv ~/venvs/bench && ~/venvs/bench/bin/pip install torch
    ~/venvs/bench/bin/python scripts/bench_train_pytorch.py --threads 2 --steps 10
    PYTHON=~/venvs/bench/bin/python scripts/bench-train.sh       # side by side with distill

--device cuda (scripts/gpu-check.sh, against the Rust bench's DEVICE=cuda): the same step on
the GPU, the batch copied to it inside the step (as distill's make_batch does), each phase
ended by torch.cuda.synchronize(), the matmul probe run on the GPU. f32 matmuls stay f32
(PyTorch's default: no TF32).

The last line is machine-readable: `RESULT pytorch tokens_per_s=... step_ms=... ...`.
"""

import argparse
import math
import os
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, HIDDEN, LAYERS, HEADS, FFN = 8192, 256, 4, 8, 688
HEAD_DIM = HIDDEN // HEADS
EPS, THETA, INIT_STD = 1e-5, 10_000.0, 0.02


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn_impl = attn
        self.input_layernorm = RMSNorm(HIDDEN)
        self.post_attention_layernorm = RMSNorm(HIDDEN)
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

    def attention(self, x, cos, sin, mask):
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, T, D)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(HEAD_DIM)) + mask  # (B, H, T, T)
            y = torch.softmax(att, dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(b, t, HIDDEN))

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class M1(nn.Module):
    def __init__(self, attn, max_pos):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block(attn) for _ in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        inv = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=INIT_STD)

    def forward(self, ids):
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]  # (T, D), broadcast over (B, H)
        mask = torch.full((t, t), float("-inf"), device=ids.device).triu(1)  # (T, T)
        x = self.embed_tokens(ids)  # (B, T, d)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))  # (B, T, V)


def forward_flops_per_token(model, ctx):
    """distill's ModelConfig::forward_flops_per_token: 2 per matmul weight (the embedding
    lookup and norms excluded, the untied head included) + 4 * layers * heads * head_dim * ctx."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "embed_tokens.weight")
    return 2.0 * matmul + 4.0 * LAYERS * HEADS * HEAD_DIM * ctx, matmul


def matmul_peak(size, sync, dev, repeats=5):
    a, b = torch.rand(size, size, device=dev) * 2 - 1, torch.rand(size, size, device=dev) * 2 - 1
    a @ b
    sync()
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        secs.append(time.perf_counter() - t0)
    flops = 2.0 * size**3
    return flops / min(secs), flops / statistics.median(secs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 2)))
    ap.add_argument("--steps", type=int, default=int(os.environ.get("STEPS", 10)))
    ap.add_argument("--warmup", type=int, default=int(os.environ.get("WARMUP", 2)))
    ap.add_argument("--batch", type=int, default=int(os.environ.get("BATCH", 8)))
    ap.add_argument("--seq", type=int, default=int(os.environ.get("SEQ", 256)))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("SEED", 0)))
    ap.add_argument("--attn", choices=["matmul", "sdpa"], default="matmul")
    ap.add_argument("--peak-size", type=int, default=int(os.environ.get("PEAK_SIZE", 2048)))
    ap.add_argument("--device", default=os.environ.get("DEVICE", "cpu"), help="cpu (default) or cuda / cuda:N")
    args = ap.parse_args()
    steps = max(args.steps, 1)
    dev = torch.device(args.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = M1(args.attn, max(args.seq, 512)).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed ^ 0x7261696E)
    data = [
        torch.randint(3, VOCAB, (args.batch, args.seq + 1), generator=gen) for _ in range(args.warmup + steps)
    ]
    tokens = args.batch * args.seq
    fpt, matmul_params = forward_flops_per_token(model, args.seq)
    train_flops = 3.0 * fpt * tokens
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"pytorch {torch.__version__} eager train step, model M1, attention {args.attn}: vocab {VOCAB}, "
        f"hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads x {HEAD_DIM}, FFN {FFN}; "
        f"batch {args.batch} x seq {args.seq} = {tokens} tokens; f32; device {dev}"
    )
    print(
        f"params {n_params} ({matmul_params} in matmuls); train FLOPs/step {train_flops:.3e}; "
        f"torch threads {torch.get_num_threads()}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )

    timed = []
    for i, batch in enumerate(data):
        t0 = time.perf_counter()
        batch = batch.to(dev)
        ids, targets = batch[:, :-1], batch[:, 1:]
        logits = model(ids)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss_v = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if not (math.isfinite(loss_v) and math.isfinite(norm.item())):
            raise SystemExit(f"step {i}: non-finite loss {loss_v} or gradient norm {norm.item()}")
        s = (t1 - t0, t2 - t1, t3 - t2)
        kind = "warm-up" if i < args.warmup else "timed"
        print(
            f"step {i + 1:>2} ({kind:<7}) {sum(s) * 1e3:8.1f} ms  fwd {s[0] * 1e3:7.1f}  bwd {s[1] * 1e3:7.1f}  "
            f"opt {s[2] * 1e3:6.1f}  {tokens / sum(s):7.0f} tok/s  loss {loss_v:.4f}"
        )
        if i >= args.warmup:
            timed.append(s)
        del logits, loss

    totals = [sum(s) for s in timed]
    step_s = statistics.median(totals)
    fwd, bwd, opt_s = (statistics.median(s[k] for s in timed) for k in range(3))
    tok_s = tokens / step_s
    if args.peak_size > 0:
        best, med = matmul_peak(args.peak_size, sync, dev)
        print(
            f"matmul probe {args.peak_size}^3: best {best / 1e9:.1f} GFLOP/s, median {med / 1e9:.1f} GFLOP/s "
            f"({torch.get_num_threads()} threads)"
        )
        peak_gflops, mfu = best / 1e9, train_flops / step_s / best
    else:
        peak_gflops, mfu = float("nan"), float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    ph = fwd + bwd + opt_s
    print(
        f"{steps} timed steps: median {step_s * 1e3:.1f} ms (min {min(totals) * 1e3:.1f}, "
        f"max {max(totals) * 1e3:.1f}), {tok_s:.0f} tokens/s, {train_flops / step_s / 1e9:.1f} GFLOP/s achieved, "
        f"MFU {mfu * 100:.1f}% of the probe's best"
    )
    print(
        f"phases (medians): forward+loss {fwd * 1e3:.1f} ms ({100 * fwd / ph:.0f}%), backward {bwd * 1e3:.1f} ms "
        f"({100 * bwd / ph:.0f}%), clip+AdamW {opt_s * 1e3:.1f} ms ({100 * opt_s / ph:.0f}%)"
    )
    print(f"peak RSS (ru_maxrss) {rss:.0f} MiB")
    print(
        f"RESULT pytorch-{args.attn} tokens_per_s={tok_s:.1f} step_ms={step_s * 1e3:.2f} "
        f"min_ms={min(totals) * 1e3:.2f} max_ms={max(totals) * 1e3:.2f} fwd_ms={fwd * 1e3:.2f} "
        f"bwd_ms={bwd * 1e3:.2f} opt_ms={opt_s * 1e3:.2f} mfu={mfu:.4f} peak_gflops={peak_gflops:.1f} "
        f"peak_rss_mb={rss:.1f} threads={torch.get_num_threads()} steps={steps} device={dev.type}"
    )


if __name__ == "__main__":
    main()
