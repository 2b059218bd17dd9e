"""Streaming generation of long videos: chunk by chunk with the EMA-sink KV cache and the streaming VAE decoder.

    python sample.py                                     # toy world, latest checkpoint in out/toy (or the shipped ODE init)
    python sample.py --config configs/wan1.3b_stream_r1.yaml --ckpt rewardforcing.pt --prompt "..." --seconds 60

Frames are appended to the mp4 as each chunk is decoded, so memory stays bounded at any length (the cache holds at most
`window_frames` latent frames). Uses the same `dmd.generate_chunk` as the training rollout: one code path for the cache.
Prints FPS (decoded frames / wall time, VAE included) and per-chunk latency at the end.
"""
import math
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

import dmd
from checkpoint import latest_checkpoint, network_weights, open_safetensors
from config import FIELDS, Components, Config, autocast, build_net, load_config, parse_flags, typed

FPS = 16  # Wan's sample_fps (REFERENCE §1.2); one toy latent is one frame, so the toy plays at the same rate
OWN = {"ckpt": (str, ""), "prompt": (str, None), "seconds": (float, 10.0), "frames": (int, None), "out": (str, ""),
       "upscale": (int, 8)}  # sample.py's own flags: (type, default); the others are train.py's Config


def parse(argv: list[str]) -> tuple[Config, dict]:
    """sample.py's own flags (OWN), then train.py's Config from the rest; --key=value or --key value."""
    flags = parse_flags(argv)
    own = {key: typed(key, flags.pop(key), kind) if key in flags else default for key, (kind, default) in OWN.items()}
    unknown = [k for k in flags if k not in FIELDS and k != "config"]
    if unknown:
        raise SystemExit(f"unknown flag --{unknown[0]}; sample.py takes --{', --'.join(OWN)} and the config's keys: "
                         f"{', '.join(FIELDS)}")
    if own["prompt"] is not None and not own["prompt"].strip():
        raise SystemExit("--prompt is empty: give the text to generate, or leave --prompt out for the world's first")
    for key in ("seconds", "frames", "upscale"):
        if own[key] is not None and not 0 < own[key] < math.inf:
            raise SystemExit(f"--{key}={own[key]}: expected a number > 0")
    return load_config({**flags, "stage": "dmd", "weighting": "none"}, sampling=True), own


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


def main(argv: list[str]) -> None:
    cfg, own = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    parts = Components(cfg, device)
    weights, source = student_weights(cfg, own["ckpt"])
    student = build_net(cfg.model_size, weights, device, causal=True, chunk_frames=cfg.chunk_frames, cfg=cfg,
                        frozen=True)
    prompt = own["prompt"] or parts.prompts[0]
    frames_wanted = own["frames"] or int(own["seconds"] * FPS)
    tf = parts.vae.temporal_factor
    latents = max(1, -(-(frames_wanted - 1) // tf) + 1)               # pixel frames 1 + tf (F - 1)
    chunks = -(-latents // cfg.chunk_frames)
    out = Path(own["out"] or Path(cfg.out_dir) / "sample.mp4")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"student: {source}\nprompt: {prompt!r}\n{chunks} chunks of {cfg.chunk_frames} latent frames -> {out}")

    ctx = parts.context([prompt])
    _, channels, height, width = parts.latent_shape()
    cache = student.new_cache(1, **cfg.cache_options())
    steps = dmd.warped_steps(cfg.steps, cfg.shift)
    decoder, latency, n_frames = parts.vae.stream_decoder(), [], 0
    up = own["upscale"] if cfg.world == "toy" else 1
    start = time.perf_counter()
    with imageio.get_writer(out, fps=FPS, codec="libx264", quality=8, macro_block_size=1) as writer, torch.no_grad(), \
            autocast(cfg, device):
        for _ in tqdm(range(chunks), desc="chunks"):
            t0 = time.perf_counter()
            noise = torch.randn(1, cfg.chunk_frames, channels, height, width, device=device)
            pixels = decoder(dmd.generate_chunk(student, noise, ctx, cache, steps))[0].float()
            frames = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            if device.type == "cuda":
                torch.cuda.synchronize()
            latency.append(time.perf_counter() - t0)
            for frame in frames:
                writer.append_data(np.kron(frame, np.ones((up, up, 1), dtype=np.uint8)) if up > 1 else frame)
            n_frames += len(frames)
    total = time.perf_counter() - start
    print(f"wrote {n_frames} frames ({n_frames / FPS:.1f} s at {FPS} fps) to {out}")
    print(f"speed: {n_frames / total:.1f} FPS (VAE decode and mp4 writing included); chunk latency "
          f"first {latency[0] * 1e3:.1f} ms, median {np.median(latency) * 1e3:.1f} ms, last {latency[-1] * 1e3:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
