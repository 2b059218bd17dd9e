"""Streaming generation of long videos: chunk by chunk with the EMA-sink KV cache and the streaming VAE decoder.

    python sample.py                                     # toy world, latest checkpoint in out/toy (or the shipped ODE init)
    python sample.py --config configs/wan1.3b_stream_r1.yaml --ckpt rewardforcing.pt --prompt "..." --seconds 60
    python sample.py --prompt A --prompt B --switch_at 2 --seconds 6 --out x.mp4     # prompt B from 2 s on
    python sample.py --init clip.mp4 --prompt A --seconds 4                         # continue a clip (or an image)
    python sample.py --prompt_file F --samples_per_prompt 5 --video_dir D --score=true   # D/{prompt}-{i}.mp4
    python sample.py --compile=true ...                  # torch.compile the network, CUDA graphs on a GPU (compiles
                                                         # for 2-3 chunks first)
    torchrun --nproc_per_node=8 sample.py --config ... --ckpt ... --prompt_file F ...   # each rank its share of F

Frames are appended to the mp4 as each chunk is decoded, so memory stays bounded at any length in every mode: the cache
holds at most `window_frames` latent frames, and beside it the stream keeps the clean latents of as many frames (what
a prompt switch re-caches) and one chunk. Uses the same `dmd.generate_chunk` as the training rollout, and writes given
latents (--init, the re-cache) with the `write_cache` forward of its refresh: one code path for the cache.
One video: prints FPS (decoded frames / wall time, VAE included) and per-chunk latency at the end.
"""
import bisect
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import dmd
import reward
import toy
import vae
from checkpoint import atomic_write, latest_checkpoint, network_weights, open_safetensors
from config import (FIELDS, Components, Config, autocast, build_net, load_config, parse_flags, setup_distributed,
                    typed)
from model import KVCache, WanModel

FPS = 16  # Wan's sample_fps (REFERENCE §1.2); one toy latent is one frame, so the toy plays at the same rate
# sample.py's own flags, (type, default); the others are train.py's Config. --prompt may repeat; --prompt_file (a
# Config field) given on the command line means batch generation.
OWN = {"ckpt": (str, ""), "prompt": (str, None), "seconds": (float, 10.0), "frames": (int, None), "out": (str, ""),
       "upscale": (int, 8), "switch_at": (tuple, ()), "init": (str, ""), "samples_per_prompt": (int, 1),
       "video_dir": (str, ""), "score": (bool, False), "compile": (bool, False)}
BATCH_ONLY = ("samples_per_prompt", "video_dir", "score")
ONE_VIDEO_ONLY = ("switch_at", "init", "out")
INIT_SUFFIXES = (".png", ".jpg", ".jpeg", ".mp4")
COMPILED_ROWS = 64  # --compile: a prompt's text rows rounded up to a multiple of this (real_rows): fewer graphs
NAME_MAX = 255  # bytes in a file name (ext4, XFS, APFS, ...)


# --------------------------------------------------------------------------------------------- flags
def parse(argv: list[str]) -> tuple[Config, dict]:
    """sample.py's own flags (OWN; own["prompt"] lists every --prompt, or --prompt_file's prompts), then train.py's
    Config from the rest; --key=value or --key value. Every conflict, count and file is checked here, before any
    network is built."""
    prompts, rest, args = [], [], list(argv)
    while args:  # parse_flags keeps the last of a repeated key; --prompt repeats (one per stretch of the stream)
        arg = args.pop(0)
        if arg == "--prompt" and args:
            prompts.append(args.pop(0))
        elif arg.startswith("--prompt="):
            prompts.append(arg[len("--prompt="):])
        else:
            rest.append(arg)
    flags = parse_flags(rest)
    given = {key for key in OWN if key in flags} | ({"prompt"} if prompts else set())
    own = {key: typed(key, flags.pop(key), kind) if key in flags else default for key, (kind, default) in OWN.items()}
    unknown = [k for k in flags if k not in FIELDS and k != "config"]
    if unknown:
        raise SystemExit(f"unknown flag --{unknown[0]}; sample.py takes --{', --'.join(OWN)} and the config's keys: "
                         f"{', '.join(FIELDS)}")
    own["batch"] = "prompt_file" in flags
    own["rows_multiple"] = COMPILED_ROWS if own["compile"] else 1
    own["prompt"] = prompt_lines(flags["prompt_file"]) if own["batch"] else prompts
    check_flags(own, given)
    # Components loads a reward model for weighted runs only; ranks sample on their own prompts: nothing is sharded
    cfg = load_config({**flags, "stage": "dmd", "weighting": "stream_r1" if own["score"] else "none",
                       "parallel": "ddp"}, sampling=True)
    if own["switch_at"] and cfg.sink_frames % cfg.chunk_frames:
        raise SystemExit(f"--switch_at with sink_frames={cfg.sink_frames}: the re-cache re-runs whole chunks after "
                         f"the sink; expected sink_frames a multiple of chunk_frames={cfg.chunk_frames}")
    if own["score"] and cfg.world == "toy":
        for prompt in own["prompt"]:
            try:
                toy.parse_prompt(prompt)
            except ValueError as err:
                raise SystemExit(f"--score: the toy reward scores toy prompts only; {err}") from None
    if own["score"] and cfg.world == "wan":
        for key in ("reward_base_dir", "reward_release_dir"):
            if not Path(getattr(cfg, key)).exists():
                raise SystemExit(f"--score: {key}={getattr(cfg, key)!r}: expected the VideoReward folder")
    try:  # mp4 in and out go through ffmpeg: if it is missing, say so before any network is built
        import imageio_ffmpeg  # here, not on top: bench.py's GPU check imports this file where there is no ffmpeg
        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise SystemExit(f"sample.py writes mp4 through imageio-ffmpeg's ffmpeg (requirements.txt): {err}") from None
    return cfg, own


def check_flags(own: dict, given: set[str]) -> None:
    """sample.py's own flags alone: values, which go together, --switch_at against the prompts, --init's file."""
    if any(not p.strip() for p in own["prompt"]):
        raise SystemExit("--prompt is empty: give the text to generate, or leave --prompt out for the world's first")
    for key in ("seconds", "frames", "upscale", "samples_per_prompt"):
        if own[key] is not None and not 0 < own[key] < math.inf:
            raise SystemExit(f"--{key}={own[key]}: expected a number > 0")
    if own["batch"] and given & {"prompt", *ONE_VIDEO_ONLY}:
        key = min(given & {"prompt", *ONE_VIDEO_ONLY})
        raise SystemExit(f"--prompt_file with --{key}: --prompt_file makes samples_per_prompt videos of each of its "
                         f"prompts into --video_dir; --{key} is for one video")
    if not own["batch"] and given & set(BATCH_ONLY):
        raise SystemExit(f"--{min(given & set(BATCH_ONLY))} goes with --prompt_file (batch generation)")
    times, n = own["switch_at"], len(own["prompt"])
    if (n > 1 or times) and not own["batch"]:
        shown = ",".join(f"{t:g}" for t in times)
        if len(times) != n - 1:
            raise SystemExit(f"--switch_at={shown}: {len(times)} times for {n} --prompt; expected {n - 1} (prompt "
                             f"i + 1 streams from the i-th time)")
        if times[0] <= 0 or any(b <= a for a, b in zip(times, times[1:])):
            raise SystemExit(f"--switch_at={shown}: expected increasing times > 0 (seconds into the video)")
    if own["init"] and not (Path(own["init"]).is_file() and own["init"].lower().endswith(INIT_SUFFIXES)):
        raise SystemExit(f"--init {own['init']}: expected an existing {', '.join(INIT_SUFFIXES)} file")


def prompt_lines(path: str) -> list[str]:
    """The distinct non-empty lines of a prompt file, stripped, in order; a clear error if it cannot be read."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"--prompt_file {path}: cannot read it ({err})") from None
    prompts = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not prompts:
        raise SystemExit(f"--prompt_file {path}: holds no prompt, expected one per line")
    return prompts


def student_weights(cfg: Config, ckpt: str) -> tuple[str | dict, str]:
    """--ckpt (any format load_wan_weights reads, or one of train.py's step checkpoints: its EMA, else its generator),
    else the EMA (or generator) of the latest checkpoint in out_dir, else the configured student init."""
    if ckpt:
        if not Path(ckpt).exists():
            raise SystemExit(f"--ckpt {ckpt} does not exist")
        if not ckpt.endswith(".safetensors"):
            return ckpt, ckpt
        tensors = open_safetensors(Path(ckpt))  # the header only: the network's tensors are read when loaded
        name = next((n for n in ("ema", "net") if f"{n}.patch_embedding.weight" in tensors), None)
        return (network_weights(tensors, name), f"{ckpt} ({name})") if name else (tensors, ckpt)
    meta = latest_checkpoint(Path(cfg.out_dir))
    if meta is None:
        if not Path(cfg.student_path).exists():
            raise SystemExit(f"no --ckpt, no checkpoint in {cfg.out_dir}, and student_path {cfg.student_path or '(empty)'}"
                             f" does not exist: nothing to sample from")
        return cfg.student_path, cfg.student_path
    name = "ema" if meta["has_ema"] else "net"
    return network_weights(open_safetensors(Path(cfg.out_dir) / meta["file"]), name), f"{meta['file']} ({name})"


# --------------------------------------------------------------------------------------------- timing
def temporal_factor(cfg: Config) -> int:
    """Pixel frames per latent frame after the first (toy 1, Wan 4), from a VAE on the meta device (nothing read)."""
    if cfg.world == "toy":
        return toy.ToyVAE.temporal_factor
    with torch.device("meta"):
        return vae.WanVAE().temporal_factor


def frames_before(latent: int, tf: int) -> int:
    """Pixel frames decoded from latent frames 0 .. latent - 1 (the first latent frame is one pixel frame, each later
    one tf), i.e. the index of latent frame `latent`'s first pixel frame."""
    return 0 if latent == 0 else 1 + tf * (latent - 1)


def schedule(cfg: Config, own: dict, tf: int, n_init: int) -> tuple[int, list[int]]:
    """(chunks to generate, the chunk each later prompt starts at). The chunks make at least --frames (else --seconds x
    FPS) frames after the n_init latent frames of --init. A switch time t counts in the output video (--init's frames
    included) and is rounded up to a chunk boundary: prompt i + 1 starts with the first chunk whose first frame is at
    or after frame ceil(t x FPS), LongLive's "first block starting at or after the switch frame" (REFERENCE §3.6)."""
    k, wanted, first = cfg.chunk_frames, own["frames"] or int(own["seconds"] * FPS), frames_before(n_init, tf)
    chunks = next(c for c in itertools.count(1) if frames_before(n_init + c * k, tf) - first >= wanted)
    starts = [frames_before(n_init + c * k, tf) for c in range(chunks)]
    times = own["switch_at"]
    switches = [bisect.bisect_left(starts, math.ceil(round(t * FPS, 6))) for t in times]
    for i, (t, c) in enumerate(zip(times, switches)):
        if c == 0:
            raise SystemExit(f"--switch_at {t:g}: at or before the first generated frame ({first / FPS:g} s, after "
                             f"--init's frames); expected a later time")
        if c == chunks:
            raise SystemExit(f"--switch_at {t:g}: after the last chunk starts ({starts[-1] / FPS:g} s); the video "
                             f"ends at {frames_before(n_init + chunks * k, tf) / FPS:g} s")
        if i and c == switches[i - 1]:
            raise SystemExit(f"--switch_at {times[i - 1]:g} and {t:g} land on the same chunk (at {starts[c] / FPS:g} "
                             f"s; chunks start every {k * tf / FPS:g} s)")
    return chunks, switches


# --------------------------------------------------------------------------------------------- the stream
def write_context(student: WanModel, latents: Tensor, context: Tensor, cache: KVCache) -> None:
    """Clean latents [B, n k, C, h, w] into the cache as context, chunk by chunk: the refresh forward of
    dmd.generate_chunk (t = 0, write_cache=True, kv_only=True), so eviction and the EMA-sink run as if the student had
    made them."""
    k = student.chunk_frames
    for s in range(0, latents.shape[1], k):
        chunk = latents[:, s:s + k]
        student(chunk, torch.zeros(chunk.shape[:2], device=chunk.device), context, cache=cache, write_cache=True,
                kv_only=True)


def recache(student: WanModel, cache: KVCache, held: Tensor, context: Tensor) -> None:
    """LongLive's re-cache at a prompt switch (REFERENCE §3.6), once, before the new prompt's first chunk: the cached
    self-attention K/V of the frames after the sink are recomputed under the new prompt from their clean latents, at
    their positions, chunk by chunk through the write_cache forward (write_context); the cross-attention K/V follow the
    new context (WanModel.text_context recomputes them when the context changes).

    The sink is kept as it is. An EMA-sink is a running mix of the K/V of every frame evicted so far, each computed
    under the prompt of its time: no latent frame has those K/V, so nothing can be re-run to recompute them, and
    replacing them would erase the stream's long-range memory. After a switch it still carries the earlier prompts,
    fading as frames made under the new one are fused in (by 1 - alpha per chunk), while the window speaks the new
    prompt at once. A plain sink (ema_alpha 0) is kept too, under its old prompt for the rest of the stream, as
    LongLive's shipped global_sink keeps it (its other setting overwrites the sink with window frames).
    The re-run starts at the chunk boundary at or before the oldest cached frame after the sink: with a window that is
    not whole chunks after the sink (a plain sink only) up to k - 1 older frames are re-run and write() evicts them
    again. held: clean latents [B, n, C, h, w] of the last n frames written, n >= the frames re-run.
    """
    written, k = cache.frames_written, cache.chunk_frames
    start = (written - (cache.past_frames - cache.sink_len)) // k * k
    cache.rewind(start)
    write_context(student, held[:, held.shape[1] - (written - start):], context, cache)


def real_rows(context: Tensor, multiple: int = 1) -> Tensor:
    """context [B, L, D] without its trailing all-zero rows (the text encoder's padding after the longest prompt):
    the student pads them back and attends them as one merged row (WanModel.text_context), the same attention over
    a few dozen rows instead of 512. multiple: keep a multiple of this many rows (at most L), zero rows attended
    one by one, the same attention again; under --compile, prompts of similar length then share one graph."""
    rows = context.abs().amax((0, 2)).nonzero()
    n = int(rows.max()) + 1 if len(rows) else 1
    return context[:, :min(-(-n // multiple) * multiple, context.shape[1])]


@torch.no_grad()
def stream(student: WanModel, parts: Components, cfg: Config, contexts: list[Tensor], switches: list[int],
           chunks: int, generators: list[torch.Generator], init: Tensor | None = None,
           rows_multiple: int = 1) -> Iterator[Tensor]:
    """The video chunk by chunk: yields decoded pixels [B, t, 3, H, W] in [-1, 1], first (given `init`) the given
    frames, then each of `chunks` generated chunks (dmd.generate_chunk, as in training).

    contexts: one [B, L, D] per prompt; contexts[i] conditions the chunks from switches[i - 1] on, recache() at each
    switch. generators: one per sample (its noise, whatever the batch). init: clean latents [B, n, C, h, w] of a given
    clip, written into the cache first (write_context). A prefix that is not a whole number of chunks is completed in
    front with copies of its first frame (k - n mod k of them): the cache sees the clip's first frame held still for a
    moment, the output shows only the given frames. Holds the cache, the clean latents of the last window_frames frames
    written (what recache() reads; all of them with the global cache, window_frames = 0) and one chunk.
    rows_multiple: real_rows' multiple.
    """
    contexts = [real_rows(c, rows_multiple) for c in contexts]
    B, k, device = contexts[0].shape[0], cfg.chunk_frames, contexts[0].device
    _, C, h, w = parts.latent_shape()
    cache, decoder = student.new_cache(B, **cfg.cache_options()), parts.vae.stream_decoder()
    steps, ctx = dmd.warped_steps(cfg.steps, cfg.shift), contexts[0]
    held = torch.zeros(B, 0, C, h, w, device=device)
    if init is not None:
        held = torch.cat([init[:, :1].expand(-1, -init.shape[1] % k, -1, -1, -1), init], dim=1)
        write_context(student, held, ctx, cache)
        held = held[:, -cfg.window_frames:]  # -0: every frame (the global cache)
        yield decoder(init)
    for c in range(chunks):
        if c in switches:
            ctx = contexts[switches.index(c) + 1]
            recache(student, cache, held, ctx)
        noise = torch.stack([torch.randn(k, C, h, w, generator=g, device=device) for g in generators])
        x0 = dmd.generate_chunk(student, noise, ctx, cache, steps, generator=generators)
        held = torch.cat([held, x0], dim=1)[:, -cfg.window_frames:]
        yield decoder(x0)


def read_init(path: str, cfg: Config, tf: int) -> Tensor:
    """--init as pixels [1, T, 3, height, width] in [-1, 1]: an image (T = 1) or a video's frames, each scaled to cover
    the configured size and centre-cropped (aspect kept). A video keeps its last 1 + tf m frames, the lengths the VAE
    encodes (REFERENCE §5.2), so that the continuation follows its last frame."""
    try:
        if path.lower().endswith(".mp4"):
            with imageio.get_reader(path) as reader:
                frames = [np.atleast_3d(f) for f in reader]
        else:
            frames = [np.atleast_3d(imageio.imread(path))]
    except Exception as err:  # imageio's errors differ by plugin and format; any of them means this file
        raise SystemExit(f"--init {path}: cannot read it ({type(err).__name__}: {err})") from None
    if not frames:
        raise SystemExit(f"--init {path}: holds no frame")
    x = torch.from_numpy(np.stack(frames)).float() * (2 / np.iinfo(frames[0].dtype).max) - 1
    x = (x[..., :3] if x.shape[-1] >= 3 else x[..., :1].expand(*x.shape[:-1], 3)).permute(0, 3, 1, 2)  # RGB(A), grey
    T, _, H, W = x.shape
    if (H, W) != (cfg.height, cfg.width):
        scale = max(cfg.height / H, cfg.width / W)
        size = (max(cfg.height, round(H * scale)), max(cfg.width, round(W * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - cfg.height) // 2, (size[1] - cfg.width) // 2
        x = x[:, :, top:top + cfg.height, left:left + cfg.width]
    return x[(T - 1) % tf:][None]


def to_uint8(pixels: Tensor, up: int) -> np.ndarray:
    """Pixels [..., 3, H, W] in [-1, 1] -> uint8 [..., H up, W up, 3] for the mp4 writer (each pixel an up x up block)."""
    frames = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1)
    return frames.repeat_interleave(up, -3).repeat_interleave(up, -2).cpu().numpy()


def mp4_writer(path: Path):
    return imageio.get_writer(path, fps=FPS, codec="libx264", quality=8, macro_block_size=1)


# --------------------------------------------------------------------------------------------- one video
def sample_one(cfg: Config, own: dict, parts: Components, student: WanModel, chunks: int, switches: list[int],
               init: Tensor | None) -> None:
    """One video to --out (default out_dir/sample.mp4), seed cfg.seed: --init's frames, then the generated chunks,
    prompt i + 1 from chunk switches[i] on. Prints FPS and chunk latency."""
    prompts, device, k = own["prompt"] or parts.prompts[:1], parts.device, cfg.chunk_frames
    latents = parts.vae.encode(init.to(device)) if init is not None else None
    n_init, tf = 0 if latents is None else latents.shape[1], parts.vae.temporal_factor
    out = Path(own["out"] or Path(cfg.out_dir) / "sample.mp4")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"prompt: {prompts[0]!r}" + (f" after {n_init} latent frames of {own['init']}" if n_init else ""))
    for c, prompt in zip(switches, prompts[1:]):
        print(f"from {frames_before(n_init + c * k, tf) / FPS:.2f} s (chunk {c}): {prompt!r}")
    print(f"{chunks} chunks of {k} latent frames -> {out}")
    up = own["upscale"] if cfg.world == "toy" else 1
    frames = stream(student, parts, cfg, [parts.context([p]) for p in prompts], switches, chunks,
                    [torch.Generator(device).manual_seed(cfg.seed)], latents, own["rows_multiple"])
    latency, n_frames, start = [], 0, time.perf_counter()
    with mp4_writer(out) as writer:
        t0 = start
        for pixels in tqdm(frames, total=chunks + (latents is not None), desc="chunks"):
            video = to_uint8(pixels[0], up)
            if device.type == "cuda":
                torch.cuda.synchronize()
            latency.append(time.perf_counter() - t0)
            for frame in video:
                writer.append_data(frame)
            n_frames += len(video)
            t0 = time.perf_counter()
    total = time.perf_counter() - start
    print(f"wrote {n_frames} frames ({n_frames / FPS:.1f} s at {FPS} fps) to {out}")
    print(f"speed: {n_frames / total:.1f} FPS (VAE decode and mp4 writing included); chunk latency "
          f"first {latency[0] * 1e3:.1f} ms, median {np.median(latency) * 1e3:.1f} ms, last {latency[-1] * 1e3:.1f} ms")


# --------------------------------------------------------------------------------------------- batches
def video_name(prompt: str, sample: int) -> str:
    """VBench's file name `{prompt}-{sample}.mp4`. A prompt that cannot be a file name as it is (a '/' or NUL, or over
    NAME_MAX bytes with the suffix) has those characters replaced by '_', is cut to fit, and ends in '~' and 8 hex
    digits of its SHA-1, so that no two prompts share a name; index.json maps every name back to its prompt."""
    suffix = f"-{sample}.mp4"
    if not re.search("[/\0]", prompt) and len((prompt + suffix).encode()) <= NAME_MAX:
        return prompt + suffix
    tag = f"~{hashlib.sha1(prompt.encode()).hexdigest()[:8]}{suffix}"
    stem = re.sub("[/\0]", "_", prompt).encode()[:NAME_MAX - len(tag.encode())].decode(errors="ignore")
    return stem + tag


def reward_frames(rm, total: int) -> tuple[Tensor, float]:
    """(indices, fps): the frames of a `total`-frame video at FPS that the reward model reads, and the rate to hand
    them over at. VideoReward: its 2-fps selection (REFERENCE §7.4), handed over at its own fps, at which its
    preprocessing keeps every one of them; the toy reward measures motion frame to frame: every frame."""
    if isinstance(rm, reward.VideoReward):
        return reward.frame_indices(total, FPS, rm.fps, rm.all_frames), rm.fps
    return torch.arange(total), FPS


def sample_batch(cfg: Config, own: dict, parts: Components, student: WanModel, chunks: int, rank: int,
                 world: int) -> None:
    """--prompt_file: samples_per_prompt videos of each prompt to video_dir/video_name(prompt, i), batch_size at a
    time; under torchrun rank r takes every world-th prompt from the r-th. A video's seed is cfg.seed + crc32 of its
    file name (its noise is its own, whatever the batch): `--prompt P --seed S` remakes it. Files already there are
    skipped, and a video enters video_dir only when whole (written in video_dir/.partial, then renamed), so a rerun
    after a kill fills the gaps. index.json lists every name with its prompt, sample and seed. With --score, the
    reward model's raw and z per video go to scores.jsonl, and rank 0 prints the means."""
    video_dir = Path(own["video_dir"] or Path(cfg.out_dir) / "videos")
    partial, device = video_dir / ".partial", parts.device
    jobs = [{"video": video_name(p, i), "prompt": p, "sample": i} for p in own["prompt"]
            for i in range(own["samples_per_prompt"])]
    for job in jobs:
        job["seed"] = cfg.seed + zlib.crc32(job["video"].encode())
    partial.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        index = json.loads((video_dir / "index.json").read_text()) if (video_dir / "index.json").exists() else {}
        index.update({j["video"]: {k: j[k] for k in ("prompt", "sample", "seed")} for j in jobs})
        atomic_write(video_dir / "index.json", lambda p: Path(p).write_text(json.dumps(index, indent=1)))
    mine = set(own["prompt"][rank::world])
    todo = [j for j in jobs if j["prompt"] in mine and not (video_dir / j["video"]).exists()]
    print(f"rank {rank}: {len(todo)} of {sum(j['prompt'] in mine for j in jobs)} videos to make -> {video_dir}")
    total = frames_before(chunks * cfg.chunk_frames, parts.vae.temporal_factor)
    picked, rm_fps = reward_frames(parts.reward, total) if own["score"] else (None, None)
    up = own["upscale"] if cfg.world == "toy" else 1
    bar = tqdm(total=len(todo) * chunks, desc="video chunks", unit="chunk", disable=rank != 0)  # integers: exact
    for b in range(0, len(todo), cfg.batch_size):
        batch, kept, n = todo[b:b + cfg.batch_size], [], 0
        with ExitStack() as files:
            writers = [files.enter_context(mp4_writer(partial / j["video"])) for j in batch]
            for pixels in stream(student, parts, cfg, [parts.context([j["prompt"] for j in batch])], [], chunks,
                                 [torch.Generator(device).manual_seed(j["seed"]) for j in batch],
                                 rows_multiple=own["rows_multiple"]):
                for writer, video in zip(writers, to_uint8(pixels, up)):
                    for frame in video:
                        writer.append_data(frame)
                if own["score"]:
                    kept.append(pixels[:, picked[(picked >= n) & (picked < n + pixels.shape[1])] - n].cpu())
                n += pixels.shape[1]
                bar.update(len(batch))
        if own["score"]:
            res = parts.reward.score_and_saliency(torch.cat(kept, 1).to(device), [j["prompt"] for j in batch],
                                                  fps=rm_fps)
            with open(video_dir / "scores.jsonl", "a") as f:  # one write per line: ranks append side by side
                for j, raw, z in zip(batch, res.raw.tolist(), res.z.tolist()):
                    f.write(json.dumps({**j, **dict(zip(res.axes, raw)),
                                        **{f"{a}_z": v for a, v in zip(res.axes, z)}}) + "\n")
        for j in batch:
            os.replace(partial / j["video"], video_dir / j["video"])
    bar.close()
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        if not any(partial.iterdir()):
            partial.rmdir()
        if own["score"]:
            print_score_means(video_dir, {j["video"] for j in jobs})


def print_score_means(video_dir: Path, videos: set[str]) -> None:
    """Mean raw and z per axis over the latest score of each of `videos` in video_dir/scores.jsonl."""
    rows, path = {}, video_dir / "scores.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if row["video"] in videos:
            rows[row["video"]] = row
    axes = [key[:-2] for key in next(iter(rows.values()), {}) if key.endswith("_z")]
    print(f"scores, mean over {len(rows)} of {len(videos)} videos: " + ", ".join(
        f"{a} {np.mean([r[a] for r in rows.values()]):.4f} (z {np.mean([r[a + '_z'] for r in rows.values()]):+.3f})"
        for a in axes))


# --------------------------------------------------------------------------------------------- main
def compiled_core(core, mode: str):
    """WanModel.core compiled whole (fullgraph, static shapes; mode "reduce-overhead": CUDA graphs). Each call first
    marks the cache's K/V buffers as static addresses: CUDA graphs then read them and write the chunk's slot in place,
    instead of copying the past into the graph's memory on every replay (and a graph writing into an input not so
    marked is refused its CUDA graph); a new cache's buffers make the graphs record again, not recompile."""
    compiled = torch.compile(core, fullgraph=True, dynamic=False, mode=mode)

    def call(x, t, ctx, cross, rope, past, write_cache, kv_only):
        for k, v, _ in filter(None, past or []):
            torch._dynamo.mark_static_address(k)
            torch._dynamo.mark_static_address(v)
        return compiled(x, t, ctx, cross, rope, past, write_cache, kv_only)

    return call


def compile_core(student: WanModel, device: torch.device) -> None:
    """--compile: the tensor part of each call (WanModel.core) compiled whole, a graph per cache fill, prompt length
    bucket and batch size; on CUDA the graphs replay as CUDA graphs, without a launch per kernel (KVCache.write copies
    the K/V out of the graphs' memory, which their next replay overwrites)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # fullgraph: else fatal
    student.core = compiled_core(student.core, "reduce-overhead" if device.type == "cuda" else "default")


def main(argv: list[str]) -> None:
    cfg, own = parse(argv)
    tf = temporal_factor(cfg)
    init = read_init(own["init"], cfg, tf) if own["init"] else None
    chunks, switches = schedule(cfg, own, tf, 0 if init is None else 1 + (init.shape[1] - 1) // tf)
    weights, source = student_weights(cfg, own["ckpt"])
    rank, world, device = setup_distributed(timedelta(days=7))  # the last barrier waits for the longest share
    if world > 1 and not own["batch"]:
        raise SystemExit("torchrun shares --prompt_file's prompts among the ranks; one video runs in one process")
    parts = Components(cfg, device)
    student = build_net(cfg.model_size, weights, device, causal=True, chunk_frames=cfg.chunk_frames, cfg=cfg,
                        frozen=True)
    print(f"student: {source}")
    if own["compile"]:
        compile_core(student, device)
    with torch.no_grad(), autocast(cfg, device):
        if own["batch"]:
            sample_batch(cfg, own, parts, student, chunks, rank, world)
        else:
            sample_one(cfg, own, parts, student, chunks, switches, init)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
