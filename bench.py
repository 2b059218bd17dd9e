"""Benchmarks and the toy ablation (not tests): speed, memory, and what each weighting component does. Results:
BENCHMARKS.md (speed, memory) and the README's ablation table.

    python bench.py SECTION [--flags] [--write]       # python bench.py SECTION -h lists a section's flags

CPU sections (fp32, one thread by default: the 2 shared cores make 2 threads stall each other):
  diffusers   bidirectional DiT forward, ours vs diffusers' WanTransformer3DModel, same weights and input (ratio)
  chunks      time per chunk vs chunk index: window 9 + EMA-sink 3 vs a global cache (late/early ratio)
  memory      peak RSS and cache bytes vs stream length (toy student, 5 s vs 60 s at 16 fps), global cache for contrast
  train_step  one toy DMD step broken into rollout, teacher, critic, VAE decode, reward, saliency, optimizer:
              Stream-R1 vs plain DMD (ratio)
  sample_fps  toy sample.py FPS and per-chunk latency (first / median / last)
  ablation    toy ablation: plain DMD, Re-DMD, Stream-R1 with components added one at a time, several seeds
  blur        saliency blur stress test: blur the lower half of toy videos, where do the Stream-R1 weights go
  drift       60-s toy streams per cache setting: colour / direction accuracy, speed and frozen share per 5-s window
  plan        per-GPU memory plan of a preset on N GPUs (--config FILE --gpus N), on fake tensors: nothing allocated;
              last line `peak <X> GiB per GPU`
GPU section (each part skipped without a GPU):
  gpu         the one-shot GPU check: (a) Wan-1.3B streaming FPS at 832x480, eager / torch.compile, VAE decode in /
              out, vs 17.0 / 23.1 FPS; (b) one Stream-R1 training step, time and peak memory vs the plan;
              (c) bf16 vs fp32 streaming error; --parts=fp8: (d) FP8 Linears, FPS and error vs bf16

--write appends what the section printed, with the machine, command and date, to BENCHMARKS.md (ablation and blur:
to ABLATION_MD, for the README). Toy sections use the shipped assets/ when present, else random-init networks of the
same toy configs (speed does not depend on the weights); the output says which.
"""
import argparse
import contextlib
import dataclasses
import functools
import gc
import inspect
import io
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import weakref
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_model
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

import config
import dmd
import reward
import text
import sample
import toy
import train
import vae
import weighting
from model import KVCache, WanConfig, WanModel, load_wan_weights, save_wan_weights

ROOT = Path(__file__).resolve().parent
ABLATION_MD = Path("out/ablation.md")
PUBLISHED_FPS = {"Self-Forcing": 17.0, "Reward Forcing": 23.1}  # Wan-1.3B, 832x480, one H100 (issue 7)
REWARD_FORCING_CACHE = dict(window_frames=9, sink_frames=3, ema_alpha=0.999)  # REFERENCE §3.7
WAN_VAE_SPATIAL_FACTOR = 8  # Wan2.1 VAE (REFERENCE §5.1), for the analytic cache size without building the VAE


# --------------------------------------------------------------------------------------------- helpers
def timed(fn, reps: int) -> list[float]:
    """Wall-clock seconds of reps calls of fn (after one warm-up call)."""
    fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def toy_assets() -> tuple[list[str], str]:
    """train.py / sample.py overrides for the toy networks, and a line saying which: the shipped assets/ when all three
    files exist, else random-init stand-ins of the current toy configs, rewritten on every call (seed 0: the same
    files each time, so resumed runs see the same stand-ins) to out/bench/random_init/."""
    cfg = config.Config()
    keys = ("teacher_path", "student_path", "text_path")
    if all(Path(getattr(cfg, k)).exists() for k in keys):
        return [], "shipped toy assets (assets/)"
    files = {k: ROOT / "out" / "bench" / "random_init" / Path(getattr(cfg, k)).name for k in keys}
    files["text_path"].parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_wan_weights(WanModel(toy.toy_dit_config()), files["teacher_path"])
        save_wan_weights(WanModel(toy.toy_dit_config(), causal=True, chunk_frames=cfg.chunk_frames),
                         files["student_path"])
    save_model(toy.toy_text_encoder(), str(files["text_path"]))  # tied embeddings: save_model, not save_file
    args = [f"--{k}={p}" for k, p in files.items()] + [f"--critic_path={files['teacher_path']}"]
    return args, "RANDOM-INIT stand-ins (assets/ missing): speed only"


def cache_bytes(cache) -> int:
    """Bytes held by a KVCache: the self-attention K/V buffers of every layer (their whole capacity, the chunk's slot
    included), the rotated keys of relative mode (k_attn), the fp32 EMA-sink accumulator behind a lower-precision
    sink (sink32), the RoPE tables of the last geometry (rope_memo) and the prompt's cross-attention K/V with the
    merged padding row's bias (one tensor for every layer)."""
    rope = [] if cache.rope_memo is None else [z for z in cache.rope_memo[1] if isinstance(z, torch.Tensor)]
    tensors = [z for z in cache.k_buf + cache.v_buf + cache.k_attn if z is not None] + list(cache.sink32.values()) + \
        rope + [z for kv in cache.cross_kv or [] for z in kv if z is not None]
    return sum(z.numel() * z.element_size() for z in {id(z): z for z in tensors}.values())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
               platform.processor())
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}; "
            f"{torch.get_num_threads()} thread(s); load average {os.getloadavg()[0]:.1f} at start")


class Tee(io.StringIO):
    """Prints and keeps a copy: --write appends exactly what the section printed."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def write(self, s: str) -> int:
        self.out.write(s)
        self.out.flush()  # a run killed at its time limit keeps every table printed so far
        return super().write(s)


# --------------------------------------------------------------------------------------------- DiT speed
def bench_diffusers(frames: int = 6, height: int = 16, width: int = 32, reps: int = 15):
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
    print(f"### bidirectional forward: dim {cfg.dim}, {cfg.num_heads}x{cfg.head_dim} heads, {cfg.num_layers} layers, "
          f"{tokens} tokens ({frames}x{height}x{width} latent), text {cfg.text_len}x{cfg.text_dim}, fp32, {reps} reps")
    print(f"ours      median {statistics.median(t_ours) * 1e3:8.1f} ms  min {min(t_ours) * 1e3:8.1f} ms")
    print(f"diffusers median {statistics.median(t_ref) * 1e3:8.1f} ms  min {min(t_ref) * 1e3:8.1f} ms")
    print(f"ours / diffusers: min {min(t_ours) / min(t_ref):.2f}, median "
          f"{statistics.median(t_ours) / statistics.median(t_ref):.2f}; output rel err {err:.1e}")


def bench_chunks(n_chunks: int = 40, height: int = 8, width: int = 16, repeats: int = 7):
    """Per-chunk time (one write_cache forward per chunk) vs chunk index: window 9 / sink 3 / EMA 0.999 vs global cache.

    Minimum over repeats per chunk index, to damp noise from other processes.
    """
    cfg = WanConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, text_len=64)
    net = WanModel(cfg, causal=True, chunk_frames=3).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, cfg.in_dim, height, width, generator=gen)
    t = torch.zeros(1, 3)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    options = {"window 9 + EMA-sink 3": REWARD_FORCING_CACHE, "global cache": {}}
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
    print(f"### streaming: dim {cfg.dim}, {cfg.num_heads}x{cfg.head_dim} heads, {cfg.num_layers} layers, chunks of 3 "
          f"frames x {(height // 2) * (width // 2)} tokens, min of {repeats} runs, ms per chunk")
    print("chunk | " + " | ".join(times))
    for i in sorted({0, 1, 2, 3, 4, 9, 19, 29, n_chunks - 1} & set(range(n_chunks))):
        print(f"{i:5d} | " + " | ".join(f"{times[n][i] * 1e3:8.1f}" for n in times))
    for name, ts in times.items():
        early, late = statistics.median(ts[3:8]), statistics.median(ts[-5:])
        print(f"{name}: late/early = {late / early:.2f} (median of chunks {n_chunks - 5}-{n_chunks - 1} over 3-7)")


# --------------------------------------------------------------------------------------------- memory
def stream_memory(args: list[str], seconds: float, threads: int, result) -> None:
    """Child process (spawned: a fresh heap): stream `seconds` of toy video as sample.py does (dmd.generate_chunk, the
    streaming decoder, frames to uint8 and dropped); put peak RSS before/after and cache bytes into `result`."""
    torch.set_num_threads(threads)
    cfg = config.load_config(args)
    device = torch.device("cpu")
    parts = config.Components(cfg, device)
    student = config.build_net(cfg.model_size, cfg.student_path, device, causal=True,
                              chunk_frames=cfg.chunk_frames).eval()
    ctx = parts.context([parts.prompts[0]])
    _, c, h, width = parts.latent_shape()
    steps = dmd.warped_steps(cfg.steps, cfg.shift)
    chunks = math.ceil(seconds * sample.FPS / parts.vae.temporal_factor / cfg.chunk_frames)
    cache, decoder = student.new_cache(1, **cfg.cache_options()), parts.vae.stream_decoder()
    latency, most, after_first = [], 0, 0.0
    with torch.no_grad():
        for _ in range(chunks):
            start = time.perf_counter()
            noise = torch.randn(1, cfg.chunk_frames, c, h, width)
            pixels = decoder(dmd.generate_chunk(student, noise, ctx, cache, steps))
            ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()  # what sample.py hands the writer
            latency.append(time.perf_counter() - start)
            most = max(most, cache_bytes(cache))
            after_first = after_first or peak_rss_mb()
    result.put(dict(chunks=chunks, frames=cache.frames_written, after_first=after_first, peak=peak_rss_mb(),
                    cache_end=cache_bytes(cache), cache_max=most, ms=statistics.median(latency) * 1e3))


def bench_memory(short: float = 5.0, long: float = 60.0, global_seconds: float = 20.0):
    """Peak memory vs stream length: the toy student streams `short` and `long` seconds at 16 fps with window 9 /
    sink 3 / EMA-sink (config.Config's toy geometry), and `global_seconds` with a global cache (window None), each in
    a fresh spawned process. Peak RSS growth = peak RSS at the end - peak RSS after the first chunk."""
    asset_args, which = toy_assets()
    cfg = config.load_config(asset_args)
    window = [f"--window_frames={cfg.window_frames}", f"--sink_frames={cfg.sink_frames}",
              f"--ema_alpha={cfg.ema_alpha}"]
    runs = [(f"window {cfg.window_frames} + EMA-sink {cfg.sink_frames}", short, window),
            (f"window {cfg.window_frames} + EMA-sink {cfg.sink_frames}", long, window),
            ("global cache", global_seconds, ["--window_frames=0", "--sink_frames=0", "--ema_alpha=0"])]
    spawn = multiprocessing.get_context("spawn")
    print(f"### memory vs stream length: toy student ({which}), batch 1, {toy.TOY_SIZE}x{toy.TOY_SIZE} px, "
          f"chunks of {cfg.chunk_frames} frames, {len(cfg.steps)} steps + refresh, streaming decode, frames dropped\n")
    print("| cache | seconds | chunks | peak RSS (MiB) | RSS growth after chunk 1 (MiB) | cache at end (KiB) | "
          "cache max (KiB) | ms/chunk (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, seconds, opts in runs:
        result = spawn.Queue()
        child = spawn.Process(target=stream_memory, args=(asset_args + opts, seconds, torch.get_num_threads(), result))
        child.start()
        r = result.get()
        child.join()
        print(f"| {name} | {seconds:g} | {r['chunks']} | {r['peak']:.1f} | {r['peak'] - r['after_first']:.1f} | "
              f"{r['cache_end'] / 1024:.1f} | {r['cache_max'] / 1024:.1f} | {r['ms']:.1f} |")
    wan = WanConfig.wan_1_3b()
    tokens = math.prod(n // WAN_VAE_SPATIAL_FACTOR // p for n, p in zip((480, 832), wan.patch_size[1:]))
    frames = cfg.window_frames - cfg.chunk_frames  # frames held between chunks
    print(f"\nAt Wan-1.3B shape (832x480, {tokens} tokens/frame, bf16) the same window holds {frames} frames between "
          f"chunks: {frames * tokens * wan.dim * wan.num_layers * 2 * 2 / 2**30:.2f} GiB of K/V, at any length.")


# --------------------------------------------------------------------------------------------- training step
def bench_train_step(reps: int = 5):
    """One toy DMD step, piece by piece, each piece the function train.py calls (median of reps after a warm-up).

    Generator update: rollout (with graph) -> dmd_gradient (teacher CFG + critic fake score) -> [reward_weight: VAE
    decode, reward forward + saliency backwards, weights] -> weighted dmd_loss backward -> optimizer step. Critic
    update: no-graph rollout -> critic loss forward + backward -> optimizer step. Exit step fixed at the last step
    (4 denoising forwards + refresh per chunk, the inference cost); train.py draws it uniformly. Then train's own
    generator_loss + backward + step end to end for each weighting.
    """
    asset_args, which = toy_assets()
    cfgs = {wt: config.load_config(asset_args + [f"--weighting={wt}"]) for wt in ("none", "re_dmd", "stream_r1")}
    cfg, device = cfgs["stream_r1"], torch.device("cpu")
    parts = config.Components(cfg, device)
    teacher = config.build_net(cfg.teacher_size, cfg.teacher_path, device, **config.teacher_mask(cfg))
    teacher.requires_grad_(False).eval()
    student = config.build_net(cfg.model_size, cfg.student_path, device, causal=True, chunk_frames=cfg.chunk_frames)
    critic = config.build_net(cfg.model_size, cfg.critic_path, device, **config.teacher_mask(cfg))
    opt_net, opt_critic = train.make_optimizer(student, cfg.lr, cfg), train.make_optimizer(critic, cfg.lr_critic, cfg)
    balancer = weighting.RewardBalancer(cfg.balance_window, cfg.balance_warmup, cfg.balance_lambda)
    B, lat, steps = cfg.batch_size, parts.latent_shape(), dmd.warped_steps(cfg.steps, cfg.shift)
    exit_step, cache = len(steps) - 1, cfg.cache_options()
    prompts = parts.sample_prompts(B)
    ctx, neg = parts.context(prompts), parts.negative_context(B)
    times = defaultdict(list)

    def clock(name, fn):
        start = time.perf_counter()
        out = fn()
        times[name].append(time.perf_counter() - start)
        return out

    def rollout():
        return dmd.self_forcing_rollout(student, torch.randn(B, *lat), ctx, steps, exit_step, cache, cfg.refresh_t)

    for rep in range(reps + 1):  # the first round warms up and is dropped below
        t, eps = dmd.sample_dmd_timestep(B, shift=cfg.shift), torch.randn(B, *lat)
        x0 = clock("rollout (student, with graph)", rollout)
        with torch.no_grad():
            x_t = dmd.add_noise(x0.detach(), eps, t)
            clock("teacher CFG real score (part of dmd_gradient)", lambda: dmd._cfg_flow(teacher, x_t, t, ctx, neg,
                                                                                     cfg.guidance))
            clock("critic fake score (part of dmd_gradient)", lambda: critic(x_t, t, ctx))
        g = clock("dmd_gradient (teacher + critic)", lambda: dmd.dmd_gradient(x0, t, eps, teacher, critic, ctx, neg,
                                                                              cfg.guidance))
        with torch.no_grad():
            pixels = clock("VAE decode (part of reward_weight)", lambda: parts.vae.decode(x0.detach().float()))
        clock("reward forward, score only", lambda: parts.reward.score_and_saliency(pixels, prompts))
        clock("reward forward + saliency backwards (part of reward_weight)", lambda: parts.reward.score_and_saliency(
            pixels, prompts, latent_shape=(lat[0], *lat[2:])))
        weight, _ = clock("reward_weight (decode, reward, saliency, weights)",
                          lambda: train.reward_weight(cfg, x0, prompts, parts, balancer))
        clock("generator backward (weighted dmd_loss)", lambda: dmd.dmd_loss(x0, g, weight).backward())
        clock("generator optimizer step", lambda: train.optimizer_step(student, opt_net, cfg.clip))
        with torch.no_grad():
            x0 = clock("critic rollout (no graph)", rollout)
        clock("critic loss forward + backward", lambda: dmd.critic_loss(critic, x0, t, eps, ctx).backward())
        clock("critic optimizer step", lambda: train.optimizer_step(critic, opt_critic, cfg.clip))
        for wt in list(cfgs)[rep % 3:] + list(cfgs)[:rep % 3]:  # rotated, so load drift hits all alike
            c, draw = cfgs[wt], (prompts, torch.randn(B, *lat), exit_step, t, eps)
            clock(f"e2e {wt}", lambda: (train.generator_loss(c, student, teacher, critic, parts, *draw, balancer)[0]
                                        .backward(), train.optimizer_step(student, opt_net, c.clip)))
    med = {name: statistics.median(ts[1:]) for name, ts in times.items()}
    plain_gen = sum(med[k] for k in ("rollout (student, with graph)", "dmd_gradient (teacher + critic)",
                                     "generator backward (weighted dmd_loss)", "generator optimizer step"))
    sr1_gen = plain_gen + med["reward_weight (decode, reward, saliency, weights)"]
    critic_upd = sum(med[k] for k in ("critic rollout (no graph)", "critic loss forward + backward",
                                      "critic optimizer step"))
    print(f"### one toy training step: batch {B}, {lat[0]} frames of {lat[1]}x{lat[2]}x{lat[3]} latents, "
          f"{len(steps)} steps + refresh, exit step {exit_step}; {which}; median of {reps} (ms)\n")
    print("| piece | ms | used by |\n| --- | --- | --- |")
    for name, t_med in med.items():
        used = "Re-DMD" if "score only" in name else "Re-DMD, Stream-R1" if "reward_weight" in name \
            else "Stream-R1" if "saliency" in name else "all weightings"
        if not name.startswith("e2e"):
            print(f"| {name} | {ms(t_med)} | {used} |")
    scored = med["reward forward + saliency backwards (part of reward_weight)"]
    weights_only = (med["reward_weight (decode, reward, saliency, weights)"] - scored
                    - med["VAE decode (part of reward_weight)"])
    saliency = scored - med["reward forward, score only"]
    print(f"\nsaliency backwards alone {ms(saliency)} ms; weights (balance, inter, fuse, intra) about "
          f"{ms(weights_only)} ms (differences of medians)")
    print(f"generator update, sum of pieces: plain DMD {ms(plain_gen)} ms, Stream-R1 {ms(sr1_gen)} ms, "
          f"ratio **{sr1_gen / plain_gen:.2f}**")
    k = cfg.gen_every
    print(f"per optimizer step (1 generator update per {k} critic updates of {ms(critic_upd)} ms): ratio "
          f"{(sr1_gen + k * critic_upd) / (plain_gen + k * critic_upd):.2f}")
    e2e = {wt: med[f"e2e {wt}"] for wt in cfgs}  # noisier than the pieces: one call each per round
    print("train.generator_loss + backward + optimizer step, end to end: " + ", ".join(
        f"{wt} {ms(s)} ms ({s / e2e['none']:.2f}x)" for wt, s in e2e.items()))


# --------------------------------------------------------------------------------------------- sample.py speed
def bench_sample_fps(seconds: float = 10.0):
    """Toy sample.py, run in-process to a temporary mp4: FPS (VAE decode and mp4 writing included) and per-chunk
    latency first / median / last, parsed from what sample.py prints."""
    import tempfile

    asset_args, which = toy_assets()
    with tempfile.TemporaryDirectory() as tmp:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            sample.main(asset_args + [f"--seconds={seconds}", f"--out_dir={tmp}", f"--out={tmp}/sample.mp4"])
    text = printed.getvalue()
    wrote = re.search(r"wrote (\d+) frames", text)
    speed = re.search(r"speed: ([\d.]+) FPS.*first ([\d.]+) ms, median ([\d.]+) ms, last ([\d.]+) ms", text)
    if not (wrote and speed):
        raise SystemExit(f"could not parse sample.py's output:\n{text}")
    chunks = re.search(r"(\d+) chunks of", text).group(1)
    print(f"### toy sample.py: {which}; `python sample.py --seconds={seconds:g}` in-process\n")
    print("| seconds | frames | chunks | FPS (decode + mp4 included) | chunk latency first / median / last (ms) |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {seconds:g} | {wrote.group(1)} | {chunks} | {speed.group(1)} | "
          f"{speed.group(2)} / {speed.group(3)} / {speed.group(4)} |")


# --------------------------------------------------------------------------------------------- toy ablation
ABLATION = {  # run folder key: (label, train.py overrides); components added one at a time
    "dmd": ("plain DMD", ["--weighting=none"]),
    "re_dmd": ("Re-DMD (exp(beta z_MQ))", ["--weighting=re_dmd"]),
    "sr1_inter": ("Stream-R1: inter-reliability only",
                  ["--weighting=stream_r1", "--spatial=false", "--temporal=false", "--balance=false"]),
    "sr1_spatial": ("+ spatial", ["--weighting=stream_r1", "--spatial=true", "--temporal=false", "--balance=false"]),
    "sr1_temporal": ("+ temporal", ["--weighting=stream_r1", "--spatial=true", "--temporal=true", "--balance=false"]),
    "sr1_full": ("+ balancing (full Stream-R1)",
                 ["--weighting=stream_r1", "--spatial=true", "--temporal=true", "--balance=true"]),
}


def final_eval(out: Path, steps: int) -> dict | None:
    """The run's held-out eval at `steps` and its mean logged reward z over the last 20% of generator steps
    (None where the run did not log rewards: plain DMD), or None if the run has not finished."""
    log = out / "log.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    evals = [line["eval"] for line in lines if "eval" in line and line["step"] == steps]
    if not evals:
        return None
    gen = [line for line in lines if "gen_loss" in line and line["step"] <= steps]
    tail = gen[len(gen) - max(1, round(0.2 * len(gen))):]
    logged = {a: statistics.fmean(line[f"reward_{a}"] for line in tail) if tail and f"reward_{a}" in tail[0] else None
              for a in reward.AXES}
    return dict(evals[-1], **{f"train_{a}": v for a, v in logged.items()})


def held_out_reward(args: list[str], out: Path, logged: dict) -> dict:
    """Toy reward z per axis, mean over the held-out videos toy.evaluate scored (EVAL_PROMPTS, seed 1234, the
    final model.safetensors = the EMA or generator it evaluated): the reward axes for every variant alike. `logged`:
    that eval's line, to check these are the same videos."""
    cfg, device = config.load_config(args), torch.device("cpu")
    parts = config.Components(cfg, device)
    student = config.build_net(cfg.model_size, str(out / "model.safetensors"), device, causal=True,
                              chunk_frames=cfg.chunk_frames).eval()
    prompts = list(toy.EVAL_PROMPTS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        videos = toy.stream_samples(student, parts, cfg, prompts, cfg.num_frames)
    again = toy.evaluate_videos(videos, prompts)
    if any(again[k] != logged[k] for k in again):
        raise SystemExit(f"{out}: regenerated held-out videos give {again}, toy.evaluate logged {logged}")
    res = toy.ToyReward().score_and_saliency(videos, prompts)
    return {f"eval_{a}": res.z[:, i].mean().item() for i, a in enumerate(res.axes)}


def bench_ablation(steps: int = config.Config.max_steps, seeds: int = 2, jobs: int = 1,
                   variants: str = ",".join(ABLATION)):
    """Toy ablation table: each variant x seed is `python train.py <overrides> --seed=S --out_dir=out/ablation/<key>_sS
    --max_steps=N` (same compute), `jobs` at a time, one thread each; finished runs are skipped and interrupted ones
    resume from their checkpoints. Columns: toy.evaluate's held-out colour/direction accuracy and teacher distance,
    the toy reward z on the same held-out videos, and the logged training reward z (last 20% of generator steps)."""
    asset_args, which = toy_assets()
    root = Path("out/ablation" if not asset_args else "out/ablation_random_init")  # never mix real and stand-in runs
    keys = variants.split(",")
    unknown = [k for k in keys if k not in ABLATION]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(ABLATION)}")

    def args(key: str, seed: int) -> list[str]:
        return asset_args + ABLATION[key][1] + [f"--seed={seed}", f"--out_dir={root / f'{key}_s{seed}'}",
                                                f"--max_steps={steps}"]

    def launch(run: tuple[str, int]) -> int:
        out, start = root / f"{run[0]}_s{run[1]}", time.time()
        out.mkdir(parents=True, exist_ok=True)
        # toy.evaluate's teacher videos are the same in every run (same teacher, prompts, seed 1234 after the same
        # number of draws): copy them from a finished run (model.safetensors written) instead of 48 teacher steps
        name = "teacher_eval.safetensors"
        donor = next((d / name for d in root.glob("*_s*")
                      if (d / name).exists() and (d / "model.safetensors").exists()), None)
        if donor and not (out / name).exists():
            shutil.copy(donor, out / name)
        print(f"start {out}", file=sys.stderr)
        with open(out / "train.out", "a") as log:
            code = subprocess.run([sys.executable, "train.py", *args(*run)], stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))).returncode
        print(f"{'done' if code == 0 else f'FAILED (exit {code}, see {out}/train.out)'} {out} "
              f"in {time.time() - start:.0f} s", file=sys.stderr)
        return code

    runs = [(k, s) for k in keys for s in range(seeds)]
    todo = [r for r in runs if final_eval(root / f"{r[0]}_s{r[1]}", steps) is None]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to run, {jobs} at a time",
          file=sys.stderr)
    with ThreadPoolExecutor(jobs) as pool:
        if any(list(pool.map(launch, todo))):
            raise SystemExit("some runs failed (see above); rerun the same command to resume them")
    cols = ["color_accuracy", "direction_accuracy", "teacher_distance", *(f"eval_{a}" for a in reward.AXES),
            *(f"train_{a}" for a in reward.AXES)]
    gen_updates = math.ceil(steps / config.Config.gen_every)
    print(f"### toy ablation: {steps} optimizer steps per run (generator updates: {gen_updates}), seeds "
          f"0-{seeds - 1}, mean ± sample std over seeds; {which}\n")
    print("| variant | colour acc. | direction acc. | teacher dist. (lower is better) | held-out VQ | held-out MQ | "
          "held-out TA | training VQ | training MQ | training TA |")
    print("| --- " * (len(cols) + 1) + "|")
    for key in keys:
        rows = []
        for s in range(seeds):
            out = root / f"{key}_s{s}"
            logged = final_eval(out, steps)
            if logged is None:
                raise SystemExit(f"{out} has no held-out eval at step {steps} (it ran further?); use another --steps")
            rows.append(dict(logged, **held_out_reward(args(key, s), out, logged)))
        cells = []
        for col in cols:
            vals = [r[col] for r in rows if r[col] is not None]
            spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.fmean(vals):.3f} ± {spread:.3f}" if vals else "–")
        print(f"| {ABLATION[key][0]} | " + " | ".join(cells) + " |")
    print(f"\nCommand per run: `python train.py <overrides> --seed=S --out_dir={root}/<variant>_sS --max_steps={steps}`"
          f" (OMP_NUM_THREADS={torch.get_num_threads()}). Held-out: {len(toy.EVAL_PROMPTS)} eval prompts (every "
          f"colour x shape x direction), chance 0.25 per accuracy; reward columns are toy reward z-scores (higher is "
          f"better), training ones are what the weighting saw (plain DMD computes none).")


def bench_blur(passes: int = 2, seed: int = 0, upscale: int = 6, png: str = "assets/blur_stress_test.png"):
    """Saliency blur stress test: one toy video per held-out prompt (toy.EVAL_PROMPTS) with the lower half of every
    frame box-blurred (toy._box_blur, `passes` 3x3 passes), scored by toy.ToyReward with saliency, fused and factored
    into Stream-R1's intra weights with config.Config's floors; mean weight on the blurred vs the sharp half, the same
    videos unblurred as the control. Renders video 0 (frames, weight, per-axis saliency; pixels enlarged `upscale`
    times) with weighting.render_weight_map to `png`."""
    cfg, vae, reward = config.Config(), toy.ToyVAE(), toy.ToyReward()
    prompts = list(toy.EVAL_PROMPTS)
    clean, _ = toy.toy_batch(len(prompts), cfg.num_frames, torch.Generator().manual_seed(seed), prompts=prompts)
    H = clean.shape[-2]
    smooth = torch.stack([toy._box_blur(v, passes) for v in clean])
    blurred = torch.cat([clean[..., :H // 2, :], smooth[..., H // 2:, :]], dim=-2)
    latent = (clean.shape[1], H // vae.spatial_factor, clean.shape[-1] // vae.spatial_factor)
    print(f"### blur stress test: {len(prompts)} toy videos (one per held-out prompt) of {clean.shape[1]} frames, "
          f"lower half box-blurred ({passes} 3x3 passes); Stream-R1 intra weights (floors {cfg.spatial_floor} / "
          f"{cfg.temporal_floor}), mean 1 per video\n")
    print("| videos | z VQ / MQ / TA | mean weight, lower half | mean weight, upper half | lower / upper | "
          "saliency share in lower half VQ / MQ / TA |\n| --- | --- | --- | --- | --- | --- |")
    half = latent[1] // 2
    for name, videos in (("sharp (control)", clean), ("lower half blurred", blurred)):
        res = reward.score_and_saliency(videos, prompts, latent_shape=latent)
        weight = weighting.intra_perplexity_weights(weighting.fuse_saliency(res.saliency, res.z, cfg.temperature),
                                                    spatial_floor=cfg.spatial_floor, temporal_floor=cfg.temporal_floor)
        lower, upper = weight[..., half:, :].mean().item(), weight[..., :half, :].mean().item()
        share = res.saliency[..., half:, :].sum((0, 2, 3, 4)) / res.saliency.sum((0, 2, 3, 4))
        print(f"| {name} | {' / '.join(f'{z:.2f}' for z in res.z.mean(0).tolist())} | {lower:.3f} | {upper:.3f} | "
              f"{lower / upper:.2f} | {' / '.join(f'{s:.2f}' for s in share.tolist())} |")
    frames = blurred[0].repeat_interleave(upscale, -1).repeat_interleave(upscale, -2)  # the last res is the blurred set
    path = weighting.render_weight_map(frames, weight[0], {a: res.saliency[0, i] for i, a in enumerate(res.axes)}, png)
    print(f"\nrendered video 0 of the blurred set ({prompts[0]!r}; rows: frames, weight, saliency "
          f"{', '.join(res.axes)}) to {path}")


# --------------------------------------------------------------------------------------------- drift
DRIFT_SETTINGS = {  # cache geometries of the drift table: name -> train.py overrides
    "global cache": ["--window_frames=0", "--sink_frames=0", "--ema_alpha=0"],
    "window 9 + plain sink 3": ["--window_frames=9", "--sink_frames=3", "--ema_alpha=0"],
    f"window 9 + EMA-sink 3, alpha {toy.TOY_EMA_ALPHA}": ["--window_frames=9", "--sink_frames=3",
                                                         f"--ema_alpha={toy.TOY_EMA_ALPHA}"],
    "window 9 + EMA-sink 3, alpha 0.999": ["--window_frames=9", "--sink_frames=3", "--ema_alpha=0.999"],
}


def bench_drift(ckpt: str = "", seconds: float = 60.0, window_seconds: float = 5.0, seed: int = toy.EVAL_SEED,
                settings: str = "all", png: str = "out/drift.png", strip: str = "out/drift_strip.png"):
    """Drift of long toy streams: the student (--ckpt as sample.py reads it; default the latest out/toy run, else the
    shipped ODE init) streams `seconds` for each of the 32 eval prompts under each cache setting (DRIFT_SETTINGS),
    from seed `seed` (`settings`: "all" or comma-separated indices into DRIFT_SETTINGS); per `window_seconds` window
    toy.drift reports colour and direction accuracy, object speed (px/frame; the world's is 1) and the share of
    frozen streams. Plots accuracy over time per setting to `png` and a strip of 4 prompts over the stream (one frame
    per second, the toy's own cache setting) to `strip`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = config.load_config([])
    weights, source = sample.student_weights(cfg, ckpt)
    prompts, frames = list(toy.EVAL_PROMPTS), round(seconds * sample.FPS / cfg.chunk_frames) * cfg.chunk_frames
    window = round(window_seconds * sample.FPS)
    print(f"### drift: {len(prompts)} eval prompts x {frames} frames ({frames / sample.FPS:g} s at {sample.FPS} fps), "
          f"{window}-frame windows, seed {seed}; student {source}\n")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = list(DRIFT_SETTINGS) if settings == "all" else [list(DRIFT_SETTINGS)[int(i)] for i in settings.split(",")]
    for name in names:
        run = config.load_config(DRIFT_SETTINGS[name])
        parts = config.Components(run, torch.device("cpu"))
        student = config.build_net(run.model_size, "", parts.device, causal=True, chunk_frames=run.chunk_frames)
        load_wan_weights(student, weights)
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            videos = toy.stream_samples(student.eval(), parts, run, prompts, frames)
        rows = toy.drift(videos, prompts, window, run.sink_frames or run.chunk_frames)
        print(f"#### {name} ({time.perf_counter() - start:.0f} s)\n")
        print("| seconds | " + " | ".join(f"{r['start'] / sample.FPS:g}-{(r['start'] + window) / sample.FPS:g}"
                                           for r in rows) + " |")
        print("| --- " * (len(rows) + 1) + "|")
        for key in ("color_accuracy", "direction_accuracy", "speed", "frozen"):
            print(f"| {key.replace('_', ' ')} | " + " | ".join(f"{r[key]:.2f}" for r in rows) + " |")
        print(f"\nworst window: colour {min(r['color_accuracy'] for r in rows):.2f}, direction "
              f"{min(r['direction_accuracy'] for r in rows):.2f}\n")
        t = [(r["start"] + window / 2) / sample.FPS for r in rows]
        for ax, key in zip(axes, ("color_accuracy", "direction_accuracy", "speed")):
            ax.plot(t, [r[key] for r in rows], marker="o", label=name)
        if DRIFT_SETTINGS[name] == DRIFT_SETTINGS[list(DRIFT_SETTINGS)[2]]:  # the toy's own setting
            one_per_second = videos[[0, 9, 18, 27], ::sample.FPS]
            toy.save_strip(one_per_second, strip, upscale=2)
    for ax, key in zip(axes, ("colour accuracy", "direction accuracy", "speed (px/frame)")):
        ax.set(xlabel="seconds into the stream", title=key, ylim=(-0.05, None if "speed" in key else 1.05))
    axes[2].axhline(toy.SPEED, color="grey", linestyle="--", label="the world's speed")
    axes[2].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"toy drift: {source}", fontsize=8)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80, bbox_inches="tight")
    print(f"plot: {png}; strip (prompts 0, 9, 18, 27; one frame per second, {toy.TOY_EMA_ALPHA} EMA-sink): {strip}")


# --------------------------------------------------------------------------------------------- memory plan (issue 13)
GIB = 2 ** 30
# Qwen2-VL-2B-Instruct's config.json, VideoReward's backbone (REFERENCE §7.1); the embeddings resized to VideoAlign's
# tokenizer, 151,657 + 3 reward tokens. The planner builds it with random weights: no file is read.
QWEN2_VL_2B = dict(
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                       temporal_patch_size=2, spatial_merge_size=2),
    text_config=dict(vocab_size=151660, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    tie_word_embeddings=True)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>")
QWEN_CHAT_TEMPLATE = (  # Qwen2-VL's template as VideoAlign renders it: default system turn, one [video, text] user turn
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAN_PROMPT = "a red fox runs through fresh snow in a pine forest at dawn, the camera tracking it from the side"


# DTensor's output-shape propagation (a private method; should a torch lack it, FakeRun warns and mutes nothing)
SHARDING_PROPAGATION = getattr(ShardingPropagator, "_propagate_tensor_meta_non_cached", None)


class FakeRun(TorchDispatchMode):
    """The mode `bench.py plan` runs the project's own training step and sampling loop under, inside torch's
    FakeTensorMode (tensors have shapes, dtypes and devices but no data: nothing is allocated). It counts the bytes of
    every tensor storage alive, as torch.distributed._tools.MemTracker does (weak references to storages, FSDP2's
    storage resize_ patched in; tests/test_bench.py checks the two agree), without its per-module bookkeeping (~40x
    slower at Wan scale) and without DTensor's shape propagation, which under FakeTensorMode runs in the active fake
    mode on global-shape stand-ins that no real run allocates. It also supplies what data a fake tensor cannot:
    - metadata, i.e. integer and boolean tensors made from Python values and everything computed from real tensors
      only (token ids, masks, umT5's position buckets, Qwen2-VL's grid and sequence lengths, device meshes), is
      computed for real and counted (a GPU run holds most of it on the GPU);
    - a number read back from device data (loss, gradient norm, reward z: logs, finite checks, the balancer) is 0,
      and a boolean check (weighting's `torch.isfinite(S).all()`) holds: the step of a normal run, every update taken.
    It keeps the peak while each `phase(name)` runs (nested phases included) and, at the highest point overall, the
    bytes alive per category (`register`, else the phase that made them)."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode
        self.storages: dict[int, tuple[int, str]] = {}  # storage id -> (bytes, category)
        self.by_category: defaultdict[str, int] = defaultdict(int)
        self.live = self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.peak_phase = ""
        self.phases: list[str] = ["resident"]
        self.resident: dict[str, int] = {}
        self.phase_peaks: dict[str, int] = {}
        self.resize = torch.UntypedStorage.resize_
        self.muted = 0

    # ---- counting
    def _grew(self) -> None:
        for label in self.phases:
            self.phase_peaks[label] = max(self.phase_peaks.get(label, 0), self.live)
        if self.live > self.peak:
            self.peak, self.at_peak, self.peak_phase = self.live, dict(self.by_category), self.phases[-1]

    def _add(self, storage, category: str, recategorise: bool = False) -> None:
        key, size = storage._cdata, storage.nbytes()
        if key in self.storages:  # a view of a counted storage, or a registered one changing category
            old, old_category = self.storages[key]
            if recategorise:
                self.by_category[old_category] -= old
                self.by_category[category] += old
                self.storages[key] = (old, category)
            return
        self.storages[key] = (size, category)
        self.by_category[category] += size
        self.live += size
        weakref.finalize(storage, self._drop, key)
        self._grew()

    def _drop(self, key: int) -> None:
        size, category = self.storages.pop(key)
        self.by_category[category] -= size
        self.live -= size

    def _resized(self, storage) -> None:
        key = storage._cdata
        if key in self.storages:
            old, category = self.storages[key]
            self.storages[key] = (storage.nbytes(), category)
            self.by_category[category] += storage.nbytes() - old
            self.live += storage.nbytes() - old
            self._grew()

    def register(self, tensors, category: str) -> int:
        """Count `tensors` (an iterable; DTensors by their local shards) under `category`; returns their bytes."""
        total, seen = 0, set()
        for t in tensors:
            for storage in get_untyped_storages(t):
                if storage._cdata not in seen:
                    seen.add(storage._cdata)
                    total += storage.nbytes()
                    self._add(storage, category, recategorise=True)
        return total

    @contextlib.contextmanager
    def phase(self, name: str):
        self.phases.append(name)
        self._grew()
        try:
            yield
        finally:
            self.phases.pop()

    def reset_peaks(self) -> None:
        """The step starts: what is alive now is resident; the peaks so far (building the networks) are forgotten."""
        self.resident, self.phases = dict(self.by_category), ["step"]
        self.peak, self.at_peak, self.phase_peaks = self.live, dict(self.by_category), {}

    # ---- dispatch
    def __enter__(self):
        mode, resize, propagate = self, self.resize, SHARDING_PROPAGATION

        def resize_(storage, size):  # FSDP2 frees and re-allocates gathered parameters in place
            resize(storage, size)
            mode._resized(storage)

        def propagation(*args, **kwargs):  # DTensor's output-shape propagation runs under the active fake mode
            mode.muted += 1  # on global-shape stand-ins a real run never allocates (it makes its own fake mode)
            try:
                return propagate(*args, **kwargs)
            finally:
                mode.muted -= 1

        torch.UntypedStorage.resize_ = resize_
        if SHARDING_PROPAGATION is None:
            warnings.warn("this torch has no ShardingPropagator._propagate_tensor_meta_non_cached: DTensor's "
                          "global-shape stand-ins are counted, so the plan of FSDP2-sharded networks comes out high")
        else:
            ShardingPropagator._propagate_tensor_meta_non_cached = propagation
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self.resize
        if SHARDING_PROPAGATION is not None:
            ShardingPropagator._propagate_tensor_meta_non_cached = SHARDING_PROPAGATION
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if DTensor in types:
            return NotImplemented  # DTensor runs its local ops, which come back here
        inputs = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))
                  if isinstance(t, torch.Tensor)]
        if inputs and not any(isinstance(t, FakeTensor) for t in inputs):
            with unset_fake_temporarily():  # metadata, computed from real tensors only
                return self._count(func(*args, **kwargs))
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return True if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        out = func(*args, **kwargs)
        if not inputs and isinstance(out, torch.Tensor) and not (out.dtype.is_floating_point or out.dtype.is_complex):
            with unset_fake_temporarily():  # an integer / boolean tensor from Python values: metadata
                out = func(*args, **kwargs)
        return self._count(out)

    def _count(self, out):
        # FakeTensorMode weakly memoises what it wraps on a dispatch-cache miss; a weak reference blocks
        # torch.utils.swap_tensors, which nn.Module.to uses on fake parameters (Components' dtype / device moves)
        self.fake_mode.fake_tensor_converter.tensor_memo.clear()
        if not self.muted:
            category = self.phases[-1]
            for t in (out if isinstance(out, (list, tuple)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self._add(t.untyped_storage(), category)
        return out


@contextlib.contextmanager
def fake_world(gpus: int | None):
    """FakeTensorMode + FakeRun; with `gpus`, this process is rank 0 of a fake process group of that size (torch's
    "fake" backend: collectives return at once), so FSDP2's fully_shard shards and gathers as on rank 0 of gpus."""
    if torch.cuda.is_available():  # FSDP2 would shard onto the GPU, where CPU autocast does not apply
        raise SystemExit("the memory plan runs on the CPU: hide the GPUs (CUDA_VISIBLE_DEVICES=) as bench.py plan does")
    if gpus:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as fake, FakeRun(fake) as run:
            yield run
    finally:
        if gpus:
            dist.destroy_process_group()


def qwen_stand_in_tokenizer() -> "transformers.PreTrainedTokenizerFast":
    """VideoReward's tokenizer without its files: one token per word or punctuation mark of VideoAlign's prompt
    (about as many as Qwen2's BPE gives English), Qwen2-VL's special tokens, the reward tokens, its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = re.findall(r"\w+|[^\w\s]", "system You are a helpful assistant user " + reward.build_prompt(PLAN_PROMPT))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(["[UNK]", *words]))},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>")
    tok.add_tokens([*QWEN_SPECIALS, *reward.REWARD_TOKENS.values()], special_tokens=True)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def wan_components(cfg: config.Config, device: torch.device, vae_kwargs: dict | None = None,
                   text_config: dict | None = None, qwen_config: dict | None = None,
                   reward_kwargs: dict | None = None) -> config.Components:
    """config.Components for world=wan, run as is (its dtypes, devices, sharding, the negative prompt's encoding) with
    only its file reads replaced: the Wan VAE, umT5-XXL and VideoReward (Qwen2-VL-2B) are built at their real shapes
    (or the given ones: WanVAE kwargs, UMT5Config and Qwen2VLConfig fields, VideoReward kwargs) with random weights,
    as their loaders build them (umT5: in `dtype`, then `shard`, on `device`; VideoReward: on `device` in `dtype`),
    with stand-in tokenizers (the umT5 context is padded to text_len whatever the prompt); the prompt file holds
    PLAN_PROMPT."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, UMT5Config, UMT5EncoderModel

    def load_text_encoder(path, tokenizer_dir, text_len=512, dtype=torch.float32, device="cpu", config=None,
                          cache_size=1024, shard=None):
        with torch.device(device):
            model = UMT5EncoderModel._from_config(UMT5Config(**(text_config or config or text.UMT5_XXL_CONFIG)),
                                                  dtype=dtype).eval()
        if shard is not None:
            shard(model)
        return text.TextEncoder(model, toy.toy_tokenizer(), text_len, cache_size)

    def from_pretrained(base_dir, release_dir, dtype=torch.bfloat16, device=None, gradient_checkpointing=False,
                        **_):
        tok = qwen_stand_in_tokenizer()
        ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
        config_ = Qwen2VLConfig(**(qwen_config or QWEN2_VL_2B), **dict(zip(
            ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"), ids)))
        with torch.device(device):
            qwen = Qwen2VLForConditionalGeneration._from_config(config_, dtype=dtype)
        return reward.VideoReward(qwen, tok, gradient_checkpointing=gradient_checkpointing, **(reward_kwargs or {}))

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text(PLAN_PROMPT + "\n")
        targets = [(vae, "load_vae_weights", lambda *a, **k: None), (text, "load_text_encoder", load_text_encoder),
                   (reward.VideoReward, "from_pretrained", from_pretrained)]
        if vae_kwargs:
            targets.append((vae, "WanVAE", functools.partial(vae.WanVAE, **vae_kwargs)))
        with patched(targets):
            return config.Components(dataclasses.replace(cfg, prompt_file=str(prompts)), device)


def plan_config(path: str) -> config.Config:
    """A preset read and checked as train.py reads it, except that its files need not exist (the plan reads none)."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(values) - set(config.FIELDS))
    if unknown:
        raise SystemExit(f"{path}: unknown config keys {unknown}")
    cfg = config.Config(**{k: config.typed(k, v, config.FIELDS[k]) for k, v in values.items()})
    files = {k: path for k in ("teacher_path", "critic_path", "student_path", "text_path", "tokenizer_dir", "vae_path",
                               "reward_base_dir", "reward_release_dir", "prompt_file") if getattr(cfg, k)}
    config.validate_config(dataclasses.replace(cfg, **files))  # every other check, the YAML file standing in for files
    return cfg


def world_components(cfg: config.Config, device: torch.device) -> config.Components:
    """The planner's Components: the toy world's own (a fresh toy text encoder: nothing read), or wan_components."""
    return config.Components(dataclasses.replace(cfg, text_path=""), device) if cfg.world == "toy" else \
        wan_components(cfg, device)


def warm_optimizer(opt: torch.optim.Optimizer) -> None:
    """AdamW's states as its first step creates them (step, exp_avg, exp_avg_sq): the planned step is a steady-state
    one. foreach on, as AdamW defaults to on CUDA (on the CPU it loops per parameter, without the gradient-sized
    temporaries of foreach's step)."""
    for group in opt.param_groups:
        group["foreach"] = True
        for p in group["params"]:
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}


@contextlib.contextmanager
def patched(targets):
    """Set obj.name = value for each (obj, name, value) of `targets`, restored on exit (an instance's own attribute
    removed again, so its class's method shows through)."""
    saved = [(obj, name, obj.__dict__.get(name, _ABSENT)) for obj, name, _ in targets]
    for obj, name, value in targets:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


_ABSENT = object()


def probe(run: FakeRun, fn, label):
    """fn wrapped to run inside run.phase(label); `label` may be a function of fn's arguments."""
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with run.phase(label(*args, **kwargs) if callable(label) else label):
            return fn(*args, **kwargs)
    return inner


class Marks:
    """What training_step and sample_stream tell the counter: FakeRun's interface, doing nothing (real runs, which
    torch's allocator counts)."""

    def register(self, tensors, category: str) -> int:
        return 0

    @contextlib.contextmanager
    def phase(self, name: str):
        yield

    def reset_peaks(self) -> None:
        pass


def training_step(cfg: config.Config, device: torch.device, gpus: int, run=Marks(), parts_fn=None,
                  exit_step: int = 0, every_micro_step: bool = False) -> dict:
    """One generator + critic optimizer step of `cfg` on this rank of a `gpus`-process group (under torchrun: a real
    one; in bench.py plan: fake), everything built as train.main builds it: Components (parts_fn(cfg, device); default
    world_components), teacher, student and critic by config.build_net with random weights, AdamW with its states,
    the EMA. The step is train.dmd_step itself at step 0 (a generator step) with its random branches fixed: the exit
    step (`exit_step`; every k keeps one grad-enabled forward per chunk: the same graph) and, in long tuning, the last
    window start (its chunks attend a full cache); each update runs only the last of its grad_accum micro-steps,
    with the earlier ones' gradients present (every_micro_step: all of them, as train.update does). Under bf16
    autocast if cfg.bf16. `run` gets the resident tensors by category, the
    step's start (reset_peaks) and its phases. Returns {"gradients": {network: bytes}, "kv_cache": bytes (the
    rollout's cache at its largest)}."""
    parts_fn = parts_fn or world_components
    with config.autocast(cfg, device):
        parts = parts_fn(cfg, device)
        teacher = config.build_net(cfg.teacher_size, "", device, cfg=cfg, frozen=True, **config.teacher_mask(cfg))
        net = config.build_net(cfg.model_size, "", device, causal=True, chunk_frames=cfg.chunk_frames, cfg=cfg)
        critic = config.build_net(cfg.model_size, "", device, cfg=cfg, **config.teacher_mask(cfg))
        opts = {"net": train.make_optimizer(net, cfg.lr, cfg),
                "critic": train.make_optimizer(critic, cfg.lr_critic, cfg)}
        for opt in opts.values():
            warm_optimizer(opt)
        ema = train.new_ema(net, cfg, device)
        balancer = weighting.RewardBalancer(cfg.balance_window, cfg.balance_warmup, cfg.balance_lambda)
        model, critic_model = config.replicate(net, cfg, gpus), config.replicate(critic, cfg, gpus)
        for name, m, opt in (("student", net, opts["net"]), ("critic", critic, opts["critic"]),
                             ("student EMA", ema, None), ("teacher", teacher, None), ("VAE", parts.vae, None),
                             ("text encoder", parts.text.model, None), ("VideoReward", parts.reward, None)):
            if isinstance(m, torch.nn.Module):
                run.register([*m.parameters(), *m.buffers()], f"{name}: parameters")
            if opt is not None:
                run.register([v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)],
                             f"{name}: optimizer states")
        run.reset_peaks()

        gradients, kv, updating = {}, [0], [""]
        update_fn, step_fn, backward_fn = train.update, train.optimizer_step, torch.Tensor.backward
        write_fn = KVCache.write

        def update(model_, opt, micro_step, cfg_):  # the last micro-step: the earlier ones left their gradients
            updating[0] = "generator" if model_ is model else "critic"
            if cfg_.grad_accum > 1 and not every_micro_step:
                for p in model_.parameters():
                    p.grad = torch.zeros_like(p) if p.requires_grad else None
                run.register([p.grad for p in model_.parameters() if p.grad is not None],
                             f"{'student' if model_ is model else 'critic'}: gradients")
                cfg_ = dataclasses.replace(cfg_, grad_accum=1)
            with run.phase(f"{updating[0]} update"):
                return update_fn(model_, opt, micro_step, cfg_)

        def backward(loss, *args, **kwargs):
            with run.phase(f"{updating[0]} backward"):
                return backward_fn(loss, *args, **kwargs)

        def optimizer_step(model_, opt, clip):
            name = "student" if model_ is model else "critic"
            gradients[name] = run.register([p.grad for p in model_.parameters() if p.grad is not None],
                                           f"{name}: gradients")
            with run.phase(f"{name} optimizer step"):
                return step_fn(model_, opt, clip)

        def write(cache, *args, **kwargs):  # the cache between chunks, at its largest (no reference kept)
            written = write_fn(cache, *args, **kwargs)
            kv[0] = max(kv[0], cache_bytes(cache))
            return written

        def rollout_label(*args, **kwargs):
            return "generator rollout" if torch.is_grad_enabled() else "critic rollout (no graph)"

        window_start = (cfg.rollout_frames or cfg.num_frames) - cfg.num_frames
        targets = [(dmd, "sample_exit_step", lambda *a, **k: exit_step),
                   (dmd, "sample_window_start", lambda *a, **k: window_start),
                   (train, "update", update), (train, "optimizer_step", optimizer_step), (KVCache, "write", write),
                   (torch.Tensor, "backward", backward),
                   (dmd, "self_forcing_rollout", probe(run, dmd.self_forcing_rollout, rollout_label)),
                   (dmd, "dmd_gradient", probe(run, dmd.dmd_gradient, "DMD gradient")),
                   (dmd, "critic_loss", probe(run, dmd.critic_loss, "critic loss")),
                   (parts.text, "encode", probe(run, parts.text.encode, "text encoder")),
                   (parts.vae, "decode", probe(run, parts.vae.decode, "VAE decode"))]
        if parts.reward is not None:
            targets.append((parts.reward, "score_and_saliency", probe(run, parts.reward.score_and_saliency,
                                                                      "VideoReward")))
        with patched(targets):
            train.dmd_step(cfg, 0, model, teacher, critic_model, parts, balancer, opts)
            with run.phase("EMA update"):
                train.ema_after_step(ema, net, 1, True, cfg, device)
    return dict(gradients=gradients, kv_cache=kv[0])


def sample_stream(cfg: config.Config, device: torch.device, run=Marks(), parts_fn=None, chunks: int = 4) -> dict:
    """sample.py's stream without its mp4: config.Components and the student as sample.py builds them (its config:
    stage dmd, weighting none, so no reward model; random weights), then `chunks` chunks of its loop
    (dmd.generate_chunk with every step and the cache refresh, the streaming VAE decode, uint8 frames) under no_grad
    and the config's autocast; by the third chunk the window is full and the EMA-sink fuses. `run` as in
    training_step. Returns {"kv_cache": bytes}."""
    parts_fn = parts_fn or world_components
    cfg = dataclasses.replace(cfg, stage="dmd", weighting="none")
    with torch.no_grad(), config.autocast(cfg, device):
        parts = parts_fn(cfg, device)
        student = config.build_net(cfg.model_size, "", device, causal=True, chunk_frames=cfg.chunk_frames, cfg=cfg,
                                   frozen=True)
        for name, m in (("student", student), ("VAE", parts.vae), ("text encoder", parts.text.model)):
            if isinstance(m, torch.nn.Module):
                run.register([*m.parameters(), *m.buffers()], f"{name}: parameters")
        run.reset_peaks()
        with run.phase("sampling"):
            _, c, h, w = parts.latent_shape()
            ctx, steps = parts.context([parts.prompts[0]]), dmd.warped_steps(cfg.steps, cfg.shift)
            cache, decoder = student.new_cache(1, **cfg.cache_options()), parts.vae.stream_decoder()
            for _ in range(chunks):
                noise = torch.randn(1, cfg.chunk_frames, c, h, w, device=device)
                pixels = decoder(dmd.generate_chunk(student, noise, ctx, cache, steps))[0].float()
                ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return dict(kv_cache=cache_bytes(cache))


def planned(program, cfg: config.Config, gpus: int | None, **kwargs) -> dict:
    """program(cfg, device, run=..., **kwargs) (training_step or sample_stream) under fake_world(gpus): nothing is
    allocated. Returns what it returned plus "resident" {category: bytes} (alive when the step starts), "phases"
    {phase: peak bytes while it ran, nested phases included}, "peak", "peak_phase" (the innermost phase then) and
    "at_peak" {category: bytes alive at the peak; step tensors by the phase that made them}."""
    with fake_world(gpus) as run:
        out = program(cfg, torch.device("cpu"), run=run, **kwargs)
    return dict(out, resident={k: v for k, v in run.resident.items() if v}, phases=run.phase_peaks, peak=run.peak,
                peak_phase=run.peak_phase, at_peak={k: v for k, v in run.at_peak.items() if v})


PLAN_ROWS = {  # phase -> table row (indented: runs inside the update above it)
    "generator update": "generator update", "text encoder": "· text encoder (both updates)",
    "generator rollout": "· generator rollout (graph, KV cache)",
    "DMD gradient": "· DMD gradient (teacher CFG + critic)",
    "VAE decode": "· VAE decode", "VideoReward": "· VideoReward forward + saliency backward",
    "generator backward": "· generator backward", "student optimizer step": "· student optimizer step",
    "critic update": "critic update", "critic rollout (no graph)": "· critic rollout (no graph)",
    "critic loss": "· critic loss (forward)", "critic backward": "· critic backward",
    "critic optimizer step": "· critic optimizer step", "EMA update": "EMA update"}


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def bench_plan(config: str = "configs/wan1.3b_stream_r1.yaml", gpus: int = 8, both: bool = True, json_out: str = ""):
    """Per-GPU memory plan of a preset on `gpus` GPUs, computed on this CPU without allocating (issue 13): the
    project's own training step (training_step: train.dmd_step on rank 0 of a fake process group, FSDP2's real
    fully_shard) and sample.py's stream (sample_stream), run under FakeTensorMode with FakeRun counting every tensor
    at the real shapes, random weights. Prints the resident bytes per network, the peak while each phase of the step
    runs (with activation checkpointing on and off; `both=false`: only the config's setting), what is alive at the
    peak, and sampling's peak; the last line is `peak <X> GiB per GPU`: the step with the config's checkpointing.
    `json_out`: also write the numbers there. Minutes per variant at Wan shapes (one CPU core)."""
    cfg = plan_config(config)
    if cfg.parallel == "ddp" and gpus > 1:
        raise SystemExit(f"{config}: parallel=ddp on {gpus} GPUs is not planned (DistributedDataParallel does not run "
                         f"on fake tensors); every Wan preset is parallel=fsdp, or plan --gpus 1")
    start = time.perf_counter()
    step = functools.partial(training_step, gpus=gpus)
    runs = {ckpt: planned(step, dataclasses.replace(cfg, grad_checkpointing=ckpt), gpus)
            for ckpt in ([cfg.grad_checkpointing, not cfg.grad_checkpointing] if both else [cfg.grad_checkpointing])}
    sampling = planned(sample_stream, cfg, None)
    print_plan(cfg, config, gpus, runs, sampling, time.perf_counter() - start)
    if json_out:
        Path(json_out).write_text(json.dumps({"config": config, "gpus": gpus, "sampling": sampling, "training": {
            "checkpointing on" if c else "checkpointing off": r for c, r in runs.items()}}, indent=1))


def print_plan(cfg: config.Config, path: str, gpus: int, runs: dict, sampling: dict, seconds: float) -> None:
    """bench.py plan's tables: `runs` {grad_checkpointing: planned training_step}, `sampling` planned
    sample_stream; the last line is `peak <X> GiB per GPU` (the step with the config's checkpointing)."""
    train_run = runs[cfg.grad_checkpointing]
    print(f"### memory plan: {path} on {gpus} GPU(s), per GPU (rank 0), GiB\n")
    print(f"parallel={cfg.parallel}, bf16={cfg.bf16}, batch {cfg.batch_size} x grad_accum {cfg.grad_accum}, "
          f"{cfg.height}x{cfg.width}, {cfg.num_frames} latent frames (rollout {cfg.rollout_frames or cfg.num_frames}), "
          f"student / critic {cfg.model_size}, teacher {cfg.teacher_size}, weighting {cfg.weighting}; FakeTensorMode "
          f"on the CPU (nothing allocated, random weights), {seconds:.0f} s\n")
    print("| resident between steps | GiB |\n| --- | --- |")
    for k, v in sorted(train_run["resident"].items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {gib(v)} |")
    print(f"| **total** | **{gib(sum(train_run['resident'].values()))}** |\n")
    labels = {True: "checkpointing on", False: "checkpointing off"}
    print("| one generator step (generator update, then critic update): peak while it runs | "
          + " | ".join(labels[c] + (" (config)" if c == cfg.grad_checkpointing else "") for c in runs) + " |")
    print("| --- " * (len(runs) + 1) + "|")
    phases = list(PLAN_ROWS) + [p for p in train_run["phases"] if p not in PLAN_ROWS and p != "step"]
    for p in phases:
        if any(p in r["phases"] for r in runs.values()):
            print(f"| {PLAN_ROWS.get(p, p)} | " + " | ".join(gib(r["phases"].get(p, 0)) for r in runs.values()) + " |")
    print("| **step peak** | " + " | ".join(f"**{gib(r['peak'])}**" for r in runs.values()) + " |\n")
    at = sorted(train_run["at_peak"].items(), key=lambda kv: -kv[1])
    print(f"At the step's peak ({labels[cfg.grad_checkpointing]}, in {train_run['peak_phase']}): "
          + ", ".join(f"{k} {gib(v)}" for k, v in at if v >= GIB // 100) + ".")
    print("Gradients held between micro-steps: " + ", ".join(f"{k} {gib(v)}" for k, v in train_run["gradients"].items())
          + f"; the rollout's KV cache at its largest: {gib(train_run['kv_cache'])}.\n")
    print("| sampling (sample.py, one GPU) | GiB |\n| --- | --- |")
    for k, v in sorted(sampling["resident"].items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {gib(v)} |")
    print(f"| **peak while streaming** (KV cache {gib(sampling['kv_cache'])}) | **{gib(sampling['peak'])}** |\n")
    print("Not counted: the CUDA context and NCCL buffers (~1 GiB), cuBLAS / cuDNN workspaces, the caching "
          "allocator's rounding and fragmentation (reserved > allocated): keep ~10 % free.")
    print(f"peak {train_run['peak'] / GIB:.1f} GiB per GPU")


# --------------------------------------------------------------------------------------------- GPU check (issue 12)
GPU_PRESET = "configs/wan1.3b_stream_r1_teacher1.3b.yaml"  # (b): its whole step on one GPU needs more than 80 GB
# (bench.py plan --gpus 1, BENCHMARKS.md): an H200 holds it
GPU_PART_TITLES = {"fps": "(a) streaming FPS, eager / torch.compile / + CUDA graphs, VAE decode in and out",
                   "step": "(b) one Stream-R1 training step, peak memory next to bench.py plan",
                   "precision": "(c) bf16 vs fp32 streaming error",
                   "fp8": "(d) FP8 Linears: streaming FPS as (a), and FP8 vs bf16 streaming error"}
GPU_DEFAULT_PARTS = "fps,step,precision"  # (d) on request: --parts=fp8


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gpu_setup(cfg: config.Config) -> dict:
    """The shapes bench.py gpu runs, derived from the preset as the code derives them (REFERENCE §1.2, §7.4):
    tokens per latent frame, the clip's latents and pixels, and VideoReward's input (2-fps frames, resized, tokens)."""
    wan = config.SIZES[cfg.model_size]()
    spatial = 2 ** (len(inspect.signature(vae.WanVAE).parameters["dim_mult"].default) - 1)
    temporal = 2 ** sum(inspect.signature(vae.WanVAE).parameters["temporal_downsample"].default)
    h, w = cfg.height // spatial, cfg.width // spatial
    pixel_frames = 1 + temporal * (cfg.num_frames - 1)
    rm_frames = len(reward.frame_indices(pixel_frames, sample.FPS))
    rm_h, rm_w = reward.smart_resize(cfg.height, cfg.width)
    return dict(tokens_per_frame=(h // wan.patch_size[1]) * (w // wan.patch_size[2]),
                latent=[cfg.batch_size, cfg.num_frames, wan.in_dim, h, w],
                pixels=[cfg.batch_size, pixel_frames, 3, cfg.height, cfg.width], reward_frames=rm_frames,
                reward_size=[rm_h, rm_w], video_tokens=rm_frames // 2 * (rm_h // 14) * (rm_w // 14) // 4)


def stream_chunks(student: WanModel, parts: config.Components, ctx: torch.Tensor, cfg: config.Config, n_chunks: int,
                  decode: bool) -> tuple[list[float], list[int]]:
    """n_chunks of a fresh stream as sample.py makes it: the prompt's real rows (sample.real_rows), dmd.generate_chunk
    (every step + the cache refresh, cfg's cache geometry) then, if decode, the streaming VAE decoder, under cfg's
    autocast. Returns per-chunk seconds (device synchronised) and pixel frames (counted as the decoder would make
    them when decode is off)."""
    device, tf, ctx = ctx.device, parts.vae.temporal_factor, sample.real_rows(ctx)
    _, c, h, w = parts.latent_shape()
    cache, decoder = student.new_cache(1, **cfg.cache_options()), parts.vae.stream_decoder()
    steps, latency, frames = dmd.warped_steps(cfg.steps, cfg.shift), [], []
    with torch.no_grad(), config.autocast(cfg, device):
        for i in range(n_chunks):
            start = time.perf_counter()
            noise = torch.randn(1, cfg.chunk_frames, c, h, w, device=device)
            x0 = dmd.generate_chunk(student, noise, ctx, cache, steps)
            frames.append(decoder(x0).shape[1] if decode else tf * cfg.chunk_frames - (tf - 1 if i == 0 else 0))
            synchronize(device)
            latency.append(time.perf_counter() - start)
    return latency, frames


def compiled_when_full(core, cfg: config.Config, mode: str):
    """WanModel.core compiled as `sample.py --compile=true` compiles it (fullgraph, static shapes; `mode` "default" or
    "reduce-overhead" for CUDA graphs), used once the window is full and eager before: the steady state is 2 graphs
    (the denoising call and the refresh), where every cache fill would be 6, and a 30-block graph takes tens of seconds
    to compile (minutes of the GPU check for chunks no row's FPS counts)."""
    compiled = sample.compiled_core(core, mode)

    def call(x, t, ctx, cross, rope, past, write_cache, kv_only):
        full = past is not None and past[0] is not None and past[0][2] == cfg.window_frames - cfg.chunk_frames
        return (compiled if full else core)(x, t, ctx, cross, rope, past, write_cache, kv_only)

    return call


class Float8Linear(torch.nn.Module):
    """An nn.Linear in FP8 (e4m3) with row-wise scales, through torch._scaled_mm:
    y = (q(x) q(W)^T) * s_x s_W^T + b, q(z) = e4m3(z / s), s = max|row| / 448 per token of x (at each call) and per
    output row of W (once), accumulated in the tensor cores' fast mode as torchao's forward does. x [..., in] ->
    y [..., out] in autocast's dtype as nn.Linear would give it, else x's (the product in bf16: row-wise scaled FP8
    products on CUDA only output bf16)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight, scale = self.quantize(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.t())  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    @staticmethod
    def quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [rows, n] -> (e4m3 z / s [rows, n], s [rows, 1] fp32)."""
        z = z.float()
        scale = z.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
        return (z / scale).to(torch.float8_e4m3fn), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8, x_scale = self.quantize(x.flatten(0, -2))
        y = torch._scaled_mm(x8, self.weight.t(), x_scale, self.weight_scale, out_dtype=torch.bfloat16,
                             use_fast_accum=True)
        y = y if self.bias is None else y + self.bias
        kind = x.device.type
        return y.unflatten(0, x.shape[:-1]).to(torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind)
                                               else x.dtype)


def float8(net: WanModel) -> WanModel:
    """Every Linear of the blocks (attention q, k, v, o and the FFN: all but a few per-call MFLOP of embeddings and
    head) as a Float8Linear, in place."""
    for block in net.blocks:
        for name, module in list(block.named_modules()):
            if type(module) is torch.nn.Linear:
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, Float8Linear(module))
    return net


def gpu_fps(device: torch.device, cfg: config.Config, chunks: int = 20, warmup: int = 3, compile_: bool = True,
            parts_fn=None, fp8: bool = False) -> None:
    """(a) Streaming as sample.py runs it (Components without a reward model, the student stored as sample.py
    stores it, random weights: speed does not depend on them): eager, then WanModel.core compiled whole as
    `sample.py --compile=true` does, once the window is full (compiled_when_full), then compiled with CUDA graphs
    (mode="reduce-overhead": the fixed shapes replayed without per-kernel launches; the warm-up streamed twice, so
    that both graphs are recorded before a row); VAE decode included and excluded; then eager with each SDPA kernel
    chosen explicitly (MATH allowed only where it refuses: the cross-attention's logit bias for flash). fp8: the
    blocks' Linears in FP8 (float8), no SDPA kernel rows. FPS = pixel frames / wall time, over all chunks and over
    the chunks with a full window (the rate of a long stream). A mode or kernel that fails prints its error in its row
    and the next one runs."""
    parts = (parts_fn or world_components)(dataclasses.replace(cfg, weighting="none"), device)
    student = config.build_net(cfg.model_size, "", device, causal=True, chunk_frames=cfg.chunk_frames, cfg=cfg,
                               frozen=True)
    student = float8(student) if fp8 else student
    ctx = parts.context([PLAN_PROMPT])
    full_at = (cfg.window_frames - cfg.chunk_frames) // cfg.chunk_frames  # the first chunk with a full window
    print("| DiT | VAE decode | FPS | FPS, window full | first chunk (ms) | chunk median / last (ms) | peak GiB |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    eager_core, label = student.core, "FP8 Linears, " if fp8 else ""

    def row(name: str, decode: bool) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        latency, frames = stream_chunks(student, parts, ctx, cfg, chunks, decode)
        peak = f"{torch.cuda.max_memory_allocated() / GIB:.1f}" if device.type == "cuda" else "-"
        print(f"| {label}{name} | {'included' if decode else 'excluded'} | **{sum(frames) / sum(latency):.1f}** | "
              f"{sum(frames[full_at:]) / sum(latency[full_at:]):.1f} | {ms(latency[0])} | "
              f"{ms(statistics.median(latency))} / {ms(latency[-1])} | {peak} |")

    def failed(name: str, err: Exception) -> None:  # say so, measure the next
        print(f"| {label}{name} | | failed: {type(err).__name__}: {str(err).splitlines()[0][:100]} | | | | |")

    names = {"eager": "eager", "default": "torch.compile", "reduce-overhead": "torch.compile + CUDA graphs"}
    for mode in ("eager", "default", "reduce-overhead") if compile_ else ("eager",):
        try:
            if mode != "eager":
                torch._dynamo.reset()
                student.core = compiled_when_full(eager_core, cfg, mode)
            for _ in range(1 if mode == "eager" else 2):
                stream_chunks(student, parts, ctx, cfg, warmup, decode=True)
            for decode in (True, False):
                row(names[mode], decode)
        except Exception as err:  # a compile failure must not cost the rows after it
            failed(names[mode], err)
    student.core = eager_core
    torch._dynamo.reset()  # also frees the CUDA graphs' memory pool before the next rows and parts
    for kernel in () if fp8 else ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel([getattr(SDPBackend, kernel), SDPBackend.MATH]):
                stream_chunks(student, parts, ctx, cfg, warmup, decode=False)
                row(f"eager, SDPA {kernel.lower()}", decode=False)
        except RuntimeError as err:  # a kernel this build or GPU lacks
            failed(f"eager, SDPA {kernel.lower()}", err)
    print(f"\nFPS, window full: chunks {full_at} on. First chunk with decode included = first-frame latency (the "
          "first chunk's frames come out together); compiled rows run their first chunks eager. Published, "
          "Wan-1.3B 832x480 on one H100, VAE included: " +
          ", ".join(f"{k} {v} FPS" for k, v in PUBLISHED_FPS.items()) + "; aim >= 40 FPS.")


class CudaMarks(Marks):
    """training_step's marks on CUDA: torch.cuda.max_memory_allocated while each phase runs (nested phases
    included), the step's wall time and peak."""

    def __init__(self):
        self.phase_peaks, self.open, self.peak, self.resident, self.start = {}, [], 0, 0, 0.0

    def reset_peaks(self) -> None:
        torch.cuda.synchronize()
        self.resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def fold(self) -> None:
        """The peak since the last fold into the step and every open phase; restart the peak count."""
        peak = torch.cuda.max_memory_allocated()
        self.peak = max(self.peak, peak)
        for name in self.open:
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), peak)
        torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.fold()
        self.open.append(name)
        try:
            yield
        finally:
            self.fold()
            self.open.pop()


def gpu_step(device: torch.device, cfg: config.Config, marks: Marks | None = None, parts_fn=None) -> dict:
    """(b) training_step (the step bench.py plan plans) on this device, a 1-process group (nccl on CUDA, gloo on the
    CPU) around it: random weights at the preset's shapes, VideoReward at Qwen2-VL-2B's. Returns the marks' phase
    peaks, the step's peak and its seconds (on CUDA: torch.cuda.max_memory_allocated)."""
    marks = marks or (CudaMarks() if device.type == "cuda" else Marks())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, device_id=device if device.type == "cuda" else None)
    try:
        out = training_step(cfg, device, 1, run=marks, parts_fn=parts_fn)
        synchronize(device)
        seconds = time.perf_counter() - marks.start if isinstance(marks, CudaMarks) else None
        if isinstance(marks, CudaMarks):
            marks.fold()
    finally:
        dist.destroy_process_group()
    return dict(out, seconds=seconds, phases=getattr(marks, "phase_peaks", {}), peak=getattr(marks, "peak", 0),
                resident=getattr(marks, "resident", 0))


def print_step_comparison(measured: dict | None, plan: dict | None, device_name: str) -> None:
    """(b)'s table: the peak while each phase runs, measured (torch.cuda.max_memory_allocated) and planned."""
    print(f"### {GPU_PART_TITLES['step']}: {GPU_PRESET}, one GPU ({device_name})\n")
    if measured is None:
        print("not measured (the part failed above)\n")
        return
    plan_run = next(iter(plan["training"].values())) if plan else None
    print(f"step time (generator + critic update, EMA): **{measured['seconds']:.1f} s**\n")
    print("| phase | measured GiB | planned GiB | planned / measured |\n| --- | --- | --- | --- |")
    rows = [("resident (before the step)", measured["resident"], sum(plan_run["resident"].values()) if plan_run
             else None)]
    rows += [(PLAN_ROWS.get(p, p), m, plan_run["phases"].get(p) if plan_run else None)
             for p, m in measured["phases"].items()]
    rows.append(("**step peak**", measured["peak"], plan_run["peak"] if plan_run else None))
    for name, m, p in rows:
        print(f"| {name} | {gib(m)} | {gib(p) if p else '-'} | {f'{p / m:.2f}' if p else '-'} |")
    print("" if plan_run else "\n(no plan: see above)")


def gpu_precision(device: torch.device, cfg: config.Config, chunks: int = 16, fp8: bool = False) -> None:
    """(c) One random student (every weight N(0, 0.02): the zero-initialised head would make both streams output
    nothing) streamed twice from the same noise: fp32 weights without autocast, and as sample.py runs it (stored
    in bf16 under bf16 autocast, the EMA-sink accumulating in fp32); relative error of each chunk's x0.
    fp8 (part d): as sample.py runs it, and the same with the blocks' Linears in FP8 (float8)."""
    torch.manual_seed(0)
    ref_cfg = cfg if fp8 else dataclasses.replace(cfg, bf16=False)
    ref = config.build_net(cfg.model_size, "", device, causal=True, chunk_frames=cfg.chunk_frames, cfg=ref_cfg,
                           frozen=True)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    low = config.build_net(cfg.model_size, "", device, causal=True, chunk_frames=cfg.chunk_frames, cfg=cfg,
                           frozen=True)
    low.load_state_dict(ref.state_dict())
    low = float8(low) if fp8 else low
    wan = ref.cfg
    spatial = cfg.height // gpu_setup(cfg)["latent"][3]
    ctx = torch.randn(1, wan.text_len, wan.text_dim, device=device)
    noise = torch.randn(chunks, 1, cfg.chunk_frames, wan.in_dim, cfg.height // spatial, cfg.width // spatial,
                        device=device)
    steps, errors = dmd.warped_steps(cfg.steps, cfg.shift), []
    streams = [(ref, ref_cfg), (low, cfg)]
    caches = [net.new_cache(1, **cfg.cache_options()) for net, _ in streams]
    generators = [torch.Generator(device).manual_seed(1) for _ in streams]
    with torch.no_grad():
        for i in range(chunks):
            x0 = []
            for (net, run_cfg), cache, gen in zip(streams, caches, generators):
                with config.autocast(run_cfg, device):
                    x0.append(dmd.generate_chunk(net, noise[i], ctx, cache, steps, generator=gen).float())
            errors.append(((x0[1] - x0[0]).norm() / x0[0].norm()).item())
    print(f"{chunks} chunks of {cfg.chunk_frames} latent frames ({chunks * cfg.chunk_frames * 4 / sample.FPS:.0f} s "
          f"of video), {cfg.model_size} student, cache {cfg.cache_options()}\n")
    print("| chunk | " + " | ".join(str(i) for i in range(chunks)) + " |\n" + "| --- " * (chunks + 1) + "|")
    print(f"| rel. error of x0, {'FP8 vs bf16' if fp8 else 'bf16 vs fp32'} | "
          + " | ".join(f"{e:.1e}" for e in errors) + " |\n")
    print(f"median {statistics.median(errors):.1e}, max {max(errors):.1e}, last {errors[-1]:.1e}")


def start_plan(path: Path) -> subprocess.Popen:
    """`bench.py plan` of GPU_PRESET on one GPU (the config's checkpointing only), on the CPU in a child process
    (GPUs hidden before it starts) while the GPU parts run; its numbers go to `path`."""
    return subprocess.Popen([sys.executable, str(ROOT / "bench.py"), "plan", f"--config={GPU_PRESET}", "--gpus=1",
                             "--both=false", f"--json_out={path}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))


def bench_gpu(parts: str = GPU_DEFAULT_PARTS, chunks: int = 20, warmup: int = 3, precision_chunks: int = 16,
              plan_wait: float = 120.0):
    """The one-shot GPU check (issue 12 item 3) on one H100 / H200, not yet timed on one: run --parts=fps, then
    --parts=step,precision, each meant to take a few minutes (BENCHMARKS.md has the commands). Markdown tables:
    (a) fps: Wan-1.3B-shape streaming FPS at the preset's 832x480, eager, torch.compile and torch.compile + CUDA
        graphs, VAE decode included and excluded (gpu_fps);
    (b) step: one Stream-R1 training step of GPU_PRESET at its real shape with random weights (VideoReward at
        Qwen2-VL-2B's shape; no file is read): its time and the peak memory of each phase
        (torch.cuda.max_memory_allocated), next to bench.py plan's prediction for one GPU, computed on the CPU in a
        child process meanwhile (waited for at most plan_wait seconds after the parts);
    (c) precision: bf16 vs fp32 streaming, relative error per chunk (gpu_precision);
    (d) fp8, only when asked for: (a)'s FPS rows and (c)'s error with the blocks' Linears in FP8 (float8).
    `parts`: which, comma-separated. A part that fails prints its error and the next one runs; without CUDA every
    part prints a skip and nothing touches CUDA."""
    names = [p for p in parts.split(",") if p]
    unknown = [p for p in names if p not in GPU_PART_TITLES]
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; known: {', '.join(GPU_PART_TITLES)}")
    cfg = plan_config(str(ROOT / GPU_PRESET))
    setup = gpu_setup(cfg)
    print(f"### bench.py gpu: {GPU_PRESET}; {cfg.width}x{cfg.height}, {setup['tokens_per_frame']} tokens per latent "
          f"frame, latents {setup['latent']}, pixels {setup['pixels']}; VideoReward on {setup['reward_frames']} "
          f"frames of {setup['reward_size'][0]}x{setup['reward_size'][1]} ({setup['video_tokens']} video tokens)\n")
    if not torch.cuda.is_available():
        for name in names:
            print(f"{GPU_PART_TITLES[name]}: skipped, no CUDA device")
        return
    # with its index: init_process_group's device_id refuses a bare "cuda" (part b)
    device, tmp = torch.device("cuda", torch.cuda.current_device()), Path(tempfile.mkdtemp())
    plan = start_plan(tmp / "plan.json") if "step" in names else None
    measured = None
    for name in names:
        start = time.perf_counter()
        if name != "step":
            print(f"### {GPU_PART_TITLES[name]} ({torch.cuda.get_device_name()})\n")
        try:
            if name == "fps":
                gpu_fps(device, cfg, chunks, warmup)
            elif name == "fp8":
                gpu_precision(device, cfg, precision_chunks, fp8=True)
                gpu_fps(device, cfg, chunks, warmup, fp8=True)
            elif name == "step":
                measured = gpu_step(device, cfg)
                print(f"(b) measured in {time.perf_counter() - start:.0f} s; its table comes last, with the plan\n")
            else:
                gpu_precision(device, cfg, precision_chunks)
        except Exception as err:  # the next part still runs: one crash must not cost the other tables
            print(f"**{GPU_PART_TITLES[name]} FAILED**: {type(err).__name__}: {err}\n```\n"
                  f"{traceback.format_exc()[-3000:]}```")
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        print(f"\n({name}: {time.perf_counter() - start:.0f} s)\n")
    if plan is not None:
        try:
            _, err = plan.communicate(timeout=plan_wait)
            planned_numbers = json.loads((tmp / "plan.json").read_text()) if plan.returncode == 0 else None
            if planned_numbers is None:
                print(f"bench.py plan failed:\n```\n{err[-3000:]}```")
        except subprocess.TimeoutExpired:
            plan.kill()
            planned_numbers = None
            print(f"bench.py plan did not finish within {plan_wait:.0f} s")
        print_step_comparison(measured, planned_numbers, torch.cuda.get_device_name())


# --------------------------------------------------------------------------------------------- command line
SECTIONS = {"diffusers": bench_diffusers, "chunks": bench_chunks, "memory": bench_memory,
            "train_step": bench_train_step, "sample_fps": bench_sample_fps, "ablation": bench_ablation,
            "blur": bench_blur, "drift": bench_drift, "plan": bench_plan, "gpu": bench_gpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = parser.add_subparsers(dest="section", required=True)
    for name, fn in SECTIONS.items():  # each section's flags are its keyword arguments
        sub = sections.add_parser(name, description=fn.__doc__)
        sub.add_argument("--write", action="store_true", help="append the output to BENCHMARKS.md (ablation, blur: "
                                                              f"{ABLATION_MD})")
        sub.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS of children)")
        for p in inspect.signature(fn).parameters.values():
            kind = type(p.default)
            sub.add_argument(f"--{p.name}", default=p.default, help=f"default {p.default}",
                             type=(lambda s: s.lower() in ("1", "true")) if kind is bool else kind)
    opts = vars(parser.parse_args())
    section, write = opts.pop("section"), opts.pop("write")
    if section == "plan":  # a CPU computation on fake tensors: hidden GPUs keep FSDP2's default mesh on the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(opts.pop("threads"))  # shared cores: 2 threads stall each other (5-20x noise)
    os.chdir(ROOT)  # train.py's default paths (assets/, out/) are relative to the repository
    header = (f"\n## `python bench.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
              f"\n\nMachine: {machine()}.\n\n")
    with contextlib.redirect_stdout(Tee(sys.stdout)) as printed:
        SECTIONS[section](**opts)
    if write:
        path = Path(ABLATION_MD if section in ("ablation", "blur") else ROOT / "BENCHMARKS.md")
        with open(path, "a") as f:
            f.write(header + printed.getvalue())
        print(f"appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
