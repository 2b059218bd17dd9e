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
CUDA section (skipped without a GPU):
  cuda        Wan-1.3B-shape streaming at 832x480, bf16, eager vs torch.compile, VAE decode in/out; vs 17.0 / 23.1 FPS

--write appends what the section printed, with the machine, command and date, to BENCHMARKS.md (ablation and blur:
to ABLATION_MD, for the README). Toy sections use the shipped assets/ when present, else random-init networks of the
same toy configs (speed does not depend on the weights); the output says which.
"""
import argparse
import contextlib
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
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_model

import dmd
import config
import sample
import toy
import train
import weighting
from model import WanConfig, WanModel, load_wan_weights, save_wan_weights

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
    """Bytes held by a KVCache: self-attention K/V of every layer plus the prompt's cross-attention K/V."""
    tensors = [z for z in cache.k + cache.v if z is not None] + [z for kv in cache.cross_kv or [] for z in kv]
    return sum(z.numel() * z.element_size() for z in tensors)


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
    teacher = config.build_net(cfg.teacher_size, cfg.teacher_path, device).requires_grad_(False).eval()
    student = config.build_net(cfg.model_size, cfg.student_path, device, causal=True, chunk_frames=cfg.chunk_frames)
    critic = config.build_net(cfg.model_size, cfg.critic_path, device)
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
        clock("reward forward, score only", lambda: parts.reward.score_and_saliency(pixels, prompts, axes=train.AXES))
        clock("reward forward + saliency backwards (part of reward_weight)", lambda: parts.reward.score_and_saliency(
            pixels, prompts, latent_shape=(lat[0], *lat[2:]), axes=train.AXES))
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
              for a in train.AXES}
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
    res = toy.ToyReward().score_and_saliency(videos, prompts, axes=train.AXES)
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
    cols = ["color_accuracy", "direction_accuracy", "teacher_distance", *(f"eval_{a}" for a in train.AXES),
            *(f"train_{a}" for a in train.AXES)]
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
        res = reward.score_and_saliency(videos, prompts, latent_shape=latent, axes=train.AXES)
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
        ax.set(xlabel="seconds into the stream", title=key, ylim=(-0.05, 1.25 if "speed" in key else 1.05))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"toy drift: {source}", fontsize=8)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80, bbox_inches="tight")
    print(f"plot: {png}; strip (prompts 0, 9, 18, 27; one frame per second, {toy.TOY_EMA_ALPHA} EMA-sink): {strip}")


# --------------------------------------------------------------------------------------------- CUDA
def stream_chunks(net: WanModel, vae, ctx: torch.Tensor, height: int, width: int, n_chunks: int,
                  decode: bool) -> tuple[list[float], int]:
    """n_chunks of a fresh stream as sample.py makes it: dmd.generate_chunk (student steps + refresh, window 9 /
    sink 3 / EMA 0.999) then, if decode, the streaming VAE decoder; bf16 autocast on CUDA. Returns per-chunk seconds
    (device synchronised) and the pixel frames made (counted as the decoder would make them when decode is off)."""
    dev, tf = ctx.device, vae.temporal_factor
    h, w = height // vae.spatial_factor, width // vae.spatial_factor
    cache, decoder, steps = net.new_cache(1, **REWARD_FORCING_CACHE), vae.stream_decoder(), dmd.warped_steps()
    latency, frames = [], 0
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        for i in range(n_chunks):
            start = time.perf_counter()
            noise = torch.randn(1, net.chunk_frames, net.cfg.in_dim, h, w, device=dev)
            x0 = dmd.generate_chunk(net, noise, ctx, cache, steps)
            frames += decoder(x0).shape[1] if decode else tf * net.chunk_frames - (tf - 1 if i == 0 else 0)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            latency.append(time.perf_counter() - start)
    return latency, frames


def bench_cuda(chunks: int = 20, warmup: int = 3, height: int = 480, width: int = 832):
    """Wan-1.3B-shape streaming on one GPU (random weights: speed does not depend on them): 3-frame chunks, 4 steps +
    refresh, window 9 / sink 3 / EMA, bf16 autocast; eager vs torch.compile of each DiT block (regional: one
    compiled code for the 30 identical blocks, one graph per cache fill 0 / 3 / 6 frames, compiled in the warm-up);
    Wan VAE (default config) streaming decode included and excluded. FPS = pixel frames / wall time."""
    if not torch.cuda.is_available():
        print("### cuda: no CUDA device, section skipped")
        return
    import vae as wan_vae

    dev = torch.device("cuda")
    cfg = WanConfig.wan_1_3b()
    net = WanModel(cfg, causal=True, chunk_frames=3).to(dev).eval().requires_grad_(False)
    decoder_vae = wan_vae.WanVAE().to(dev).eval().requires_grad_(False)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev)
    grid = [n // decoder_vae.spatial_factor // p for n, p in zip((height, width), cfg.patch_size[1:])]
    print(f"### Wan-1.3B streaming, {width}x{height} ({grid[0]}x{grid[1]} tokens/frame), chunks of 3 latent frames,"
          f" {len(dmd.STUDENT_STEPS)} steps + refresh, window 9 / sink 3 / EMA 0.999, bf16 autocast, "
          f"{torch.cuda.get_device_name()}; {chunks} chunks after a {warmup}-chunk warm-up\n")
    print("| DiT | VAE decode | FPS | first chunk (ms) | chunk median / last (ms) | peak GiB (fp32 weights incl.) |"
          "\n| --- | --- | --- | --- | --- | --- |")
    for compiled in (False, True):
        if compiled:
            for block in net.blocks:
                block.compile(dynamic=False)
        stream_chunks(net, decoder_vae, ctx, height, width, warmup, decode=True)
        for decode in (True, False):
            torch.cuda.reset_peak_memory_stats()
            latency, frames = stream_chunks(net, decoder_vae, ctx, height, width, chunks, decode)
            fps = frames / sum(latency)
            print(f"| {'torch.compile' if compiled else 'eager'} | {'included' if decode else 'excluded'} | "
                  f"**{fps:.1f}** | {ms(latency[0])} | {ms(statistics.median(latency))} / {ms(latency[-1])} | "
                  f"{torch.cuda.max_memory_allocated() / 2**30:.1f} |")
    print("\nFirst chunk with decode included = first-frame latency (the first chunk's frames come out together). "
          "Published, Wan-1.3B 832x480 on one H100, VAE included: " +
          ", ".join(f"{k} {v} FPS" for k, v in PUBLISHED_FPS.items()) + "; aim >= 40 FPS.")


# --------------------------------------------------------------------------------------------- command line
SECTIONS = {"diffusers": bench_diffusers, "chunks": bench_chunks, "memory": bench_memory,
            "train_step": bench_train_step, "sample_fps": bench_sample_fps, "ablation": bench_ablation,
            "blur": bench_blur, "drift": bench_drift, "cuda": bench_cuda}


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
