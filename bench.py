"""Benchmarks (not tests): the Wan DiT forward against diffusers, and streaming cost per chunk. Results: BENCHMARKS.md.

CPU sections (fp32, torch.no_grad, random weights, tiny-but-shaped configs: head_dim 128 as in Wan2.1):
1. bidirectional forward, ours vs diffusers' WanTransformer3DModel with the same weights and inputs;
2. per-chunk time vs chunk index, streaming 3-frame chunks: window 9 + EMA-sink 3 (Reward Forcing) vs global cache.
Run: python bench.py (one thread; see the note in __main__)
"""
import statistics
import time

import torch

from model import WanConfig, WanModel, load_wan_weights


def timed(fn, reps: int) -> list[float]:
    """Wall-clock seconds of reps calls of fn (after one warm-up call)."""
    fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_bidirectional_vs_diffusers(frames=6, height=16, width=32, reps=15):
    """Same weights, same input: forward time of model.WanModel and diffusers' WanTransformer3DModel, calls
    alternated so that load from other processes hits both alike."""
    from diffusers import WanTransformer3DModel

    cfg = WanConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=2)
    ref = WanTransformer3DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ours = WanModel(cfg).eval()
    load_wan_weights(ours, ref.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, frames, cfg.in_dim, height, width, generator=gen)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)  # full length: both models see the same rows
    with torch.no_grad():
        want = ref(x.transpose(1, 2), t, ctx).sample.transpose(1, 2)
        err = ((ours(x, t, ctx) - want).norm() / want.norm()).item()
        t_ours, t_ref = [], []
        for _ in range(reps):
            t_ours += timed(lambda: ours(x, t, ctx), 1)
            t_ref += timed(lambda: ref(x.transpose(1, 2), t, ctx), 1)
    tokens = frames * (height // 2) * (width // 2)
    print(f"## bidirectional forward: dim {cfg.dim}, {cfg.num_heads}x{cfg.head_dim} heads, {cfg.num_layers} layers, "
          f"{tokens} tokens ({frames}x{height}x{width} latent), text {cfg.text_len}x{cfg.text_dim}, fp32, {reps} reps")
    print(f"ours      median {statistics.median(t_ours) * 1e3:8.1f} ms  min {min(t_ours) * 1e3:8.1f} ms")
    print(f"diffusers median {statistics.median(t_ref) * 1e3:8.1f} ms  min {min(t_ref) * 1e3:8.1f} ms")
    print(f"ours / diffusers: min {min(t_ours) / min(t_ref):.2f}, median "
          f"{statistics.median(t_ours) / statistics.median(t_ref):.2f}; output rel err {err:.1e}")


def bench_streaming_chunks(n_chunks=40, height=8, width=16, repeats=7):
    """Per-chunk time (one write_cache forward per chunk) vs chunk index: window 9 / sink 3 / EMA 0.999 vs global cache.

    Minimum over repeats per chunk index, to damp noise from other processes.
    """
    cfg = WanConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, text_len=64)
    net = WanModel(cfg, causal=True, chunk_frames=3).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, cfg.in_dim, height, width, generator=gen)
    t = torch.zeros(1, 3)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    options = {"window 9 + EMA-sink 3": dict(window_frames=9, sink_frames=3, ema_alpha=0.999), "global cache": {}}
    runs = {name: [] for name in options}
    with torch.no_grad():
        for _ in range(repeats):
            for name, opts in options.items():
                cache, run = net.new_cache(1, **opts), []
                for _ in range(n_chunks):
                    start = time.perf_counter()
                    net(x, t, ctx, cache=cache, write_cache=True)
                    run.append(time.perf_counter() - start)
                runs[name].append(run)
    times = {name: [min(r[i] for r in rs) for i in range(n_chunks)] for name, rs in runs.items()}
    print(f"\n## streaming: dim {cfg.dim}, {cfg.num_heads}x{cfg.head_dim} heads, {cfg.num_layers} layers, chunks of 3 "
          f"frames x {(height // 2) * (width // 2)} tokens, min of {repeats} runs, ms per chunk")
    print("chunk | " + " | ".join(times))
    for i in [0, 1, 2, 3, 4, 9, 19, 29, n_chunks - 1]:
        print(f"{i:5d} | " + " | ".join(f"{times[n][i] * 1e3:8.1f}" for n in times))
    for name, ts in times.items():
        early, late = statistics.median(ts[3:8]), statistics.median(ts[-5:])
        print(f"{name}: late/early = {late / early:.2f} (median of chunks {n_chunks - 5}-{n_chunks - 1} over 3-7)")


if __name__ == "__main__":
    torch.set_num_threads(1)  # the 2 cores are shared with other jobs; 2 threads then stall each other (5-20x noise)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    bench_bidirectional_vs_diffusers()
    bench_streaming_chunks()
