"""The built-in toy world: the whole pipeline on one CPU with no downloaded weights (nanoGPT's Shakespeare, for video).

Videos of one coloured shape gliding over a dim textured background, with prompts "a {color} {shape} moving
{direction}" (4 colours x 2 shapes x 4 directions = 32 prompts). The world is a torus: the object leaves one edge and
comes back at the opposite one, and the background texture is periodic, so a stream of any length stays in the
distribution the teacher learned from 12-frame clips (what sample.py's long streams need).

Stand-ins, with the interfaces of the real components (REFERENCE.md §1.2 for the real shapes):
- `ToyVAE`: lossless pixel-unshuffle "VAE", one latent per frame: [B, T, 3, H, W] <-> [B, T, 48, H/4, W/4].
- `toy_tokenizer` / `toy_text_config` / `toy_text_encoder`: word-level tokenizer and tiny umT5 for text.TextEncoder
  (<pad>=0, </s>=1 appended, <unk>=2, as umT5, REFERENCE §4.3).
- `toy_dit_config`: the tiny Wan DiT shared by teacher, critic and student.
- `ToyReward`: hand-written, differentiable VQ / MQ / TA reward with VideoReward's `score_and_saliency` (§7.5, §8.3).
- `evaluate_videos`, `teacher_distance`: the held-out evaluation (plain measurements, not the reward); `evaluate`
  runs it on a student's streamed samples during training.
- `teacher_loss`: the toy teacher's flow-matching pretraining (train.py --stage=teacher).
Pixels are [B, T, 3, H, W] in [-1, 1]; pixel coordinates x (column) to the right, y (row) down.
"""
import itertools
import math
from collections.abc import Callable
from pathlib import Path

import imageio.v2 as imageio
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, load_model, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

import dmd
from checkpoint import atomic_write
from model import WanConfig
from reward import RewardResult

# ------------------------------------------------------------------------------------------------ the world
COLORS = {  # saturated, all at the same distance (1.39) from the grey axis, far from the dim grey background
    "red": (0.9, -0.8, -0.8),
    "green": (-0.8, 0.9, -0.8),
    "blue": (-0.8, -0.8, 0.9),
    "yellow": (0.9, 0.9, -0.8),
}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y down
OBJECT_RADIUS = 4.5     # px: circle radius, square half-side (about 9 px across, 2-3 DiT tokens of 8 px)
EDGE_SOFTNESS = 0.4     # px: sigmoid edge width, anti-aliased and smooth
SPEED = 1.0             # px per frame
START_SPACING = 8       # px between the possible starts: one DiT token (ToyVAE's 4 x the patch's 2)
BACKGROUND_LEVEL = (-0.55, -0.35)   # grey level range; texture and tint keep it dim and nearly grey
BACKGROUND_TINT = 0.05
TEXTURE_AMPLITUDE = 0.06            # per sinusoid (3 of them), so the texture spans at most +-0.18
TEXTURE_MAX_FREQ = 2                # integer cycles across the image: periodic on the torus

# Geometry of the toy runs (train.py reads these). One toy latent is one frame (ToyVAE.temporal_factor = 1).
TOY_SIZE = 32           # px; 8x8 latents; 4x4 DiT tokens per frame
TOY_CHUNK = 3           # latent frames per chunk, as Self-Forcing / Reward Forcing (REFERENCE §3.4)
TOY_WINDOW = 9          # Reward Forcing's local_attn_size (REFERENCE §3.7): sink + the 6 most recent frames
TOY_SINK = 3            # Reward Forcing's sink_size (§3.7)
TOY_EMA_ALPHA = 0.99    # Reward Forcing fixes 0.999 (§3.7); 0.99 lets the sink visibly move within a toy stream
TOY_FRAMES = 12         # 4 chunks: the smallest clip in which the last chunk evicts frames into the EMA sink
TOY_TEXT_LEN = 8        # "a red circle moving left" is 5 words + </s>


def toy_prompts() -> list[str]:
    """All prompts of the world, "a {color} {shape} moving {direction}", in a fixed order (32 of them)."""
    return [f"a {c} {s} moving {d}" for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]


EVAL_PROMPTS = tuple(toy_prompts())  # the held-out evaluation set: every combination once


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """"a red circle moving left" -> ("red", "circle", "left"); ValueError naming the word that is not in the world."""
    words = prompt.lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"toy prompt must read 'a {{color}} {{shape}} moving {{direction}}', got {prompt!r}")
    for word, allowed, what in ((words[1], COLORS, "color"), (words[2], SHAPES, "shape"),
                                (words[4], DIRECTIONS, "direction")):
        if word not in allowed:
            raise ValueError(f"unknown {what} {word!r} in toy prompt {prompt!r}; expected one of {list(allowed)}")
    return words[1], words[2], words[4]


def _rand(generator: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand(shape, generator=generator)


def _wrap(d: Tensor, size: int) -> Tensor:
    """Shortest signed offset on a torus of `size` px: d mod size in [-size/2, size/2)."""
    return torch.remainder(d + size / 2, size) - size / 2


def render_video(prompt: str, num_frames: int, size: int = TOY_SIZE,
                 generator: torch.Generator | None = None) -> Tensor:
    """One toy video for `prompt`: [T, 3, size, size] in [-1, 1].

    Background: grey level + small tint + 3 sinusoids with integer frequencies (periodic, static). Object: soft-edged
    circle or square of radius OBJECT_RADIUS, alpha = sigmoid((R - dist) / EDGE_SOFTNESS), moving SPEED px/frame along
    the prompt's direction with wrap-around, from the centre shifted along that line by a random multiple of
    START_SPACING. Where the object is then says nothing about how long it has moved: every position on the line is
    reached within a clip, so a clip's future follows from its recent frames, not from the frame index (with a centred
    start, position was a function of time, and streams froze past the 12 trained frames). Token-sized shifts keep the
    world as learnable as the centred one for a translation-equivariant DiT: starts uniform along the line (or on the
    whole torus) gave teachers that drew fragmented objects after 12000 (4000) CPU steps, measured.
    frame = (1 - alpha) bg + alpha color.
    `generator` None uses torch's global RNG (train.py saves its state for bit-exact resume).
    """
    color, shape, direction = parse_prompt(prompt)
    if num_frames < 1 or size < 4 * OBJECT_RADIUS:
        raise ValueError(f"render_video needs num_frames >= 1 and size >= {4 * OBJECT_RADIUS}, "
                         f"got {num_frames}, {size}")
    coords = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(coords, coords, indexing="ij")

    level = BACKGROUND_LEVEL[0] + (BACKGROUND_LEVEL[1] - BACKGROUND_LEVEL[0]) * _rand(generator, 1)
    tint = BACKGROUND_TINT * (2 * _rand(generator, 3) - 1)
    freq = torch.randint(-TEXTURE_MAX_FREQ, TEXTURE_MAX_FREQ + 1, (3, 2), generator=generator).float()
    phase, amp = 2 * math.pi * _rand(generator, 3), TEXTURE_AMPLITUDE * _rand(generator, 3)
    fx, fy, phase = freq[:, 0, None, None], freq[:, 1, None, None], phase[:, None, None]
    waves = torch.sin(2 * math.pi * (fx * x + fy * y) / size + phase)
    background = level + tint[:, None, None] + (amp[:, None, None] * waves).sum(0)          # [3, H, W]

    t = torch.arange(num_frames, dtype=torch.float32)[:, None, None]
    dx, dy = DIRECTIONS[direction]
    shift = START_SPACING * torch.randint(size // START_SPACING, (1,), generator=generator)
    start = size / 2 + shift * torch.tensor([abs(dx), abs(dy)])  # on its line of motion, a whole DiT token apart
    ox = _wrap(x - (start[0] + SPEED * dx * t), size)                                        # [T, H, W]
    oy = _wrap(y - (start[1] + SPEED * dy * t), size)
    if shape == "circle":
        alpha = torch.sigmoid((OBJECT_RADIUS - (ox**2 + oy**2).sqrt()) / EDGE_SOFTNESS)
    else:
        alpha = (torch.sigmoid((OBJECT_RADIUS - ox.abs()) / EDGE_SOFTNESS)
                 * torch.sigmoid((OBJECT_RADIUS - oy.abs()) / EDGE_SOFTNESS))
    alpha = alpha[:, None]                                                                  # [T, 1, H, W]
    rgb = torch.tensor(COLORS[color])[None, :, None, None]
    return (1 - alpha) * background + alpha * rgb


def toy_batch(batch: int, num_frames: int, generator: torch.Generator | None = None,
              prompts: list[str] | None = None, size: int = TOY_SIZE) -> tuple[Tensor, list[str]]:
    """(videos [B, T, 3, size, size], prompts): `prompts` given (length B) or drawn uniformly from toy_prompts()."""
    if prompts is None:
        pool = toy_prompts()
        prompts = [pool[i] for i in torch.randint(len(pool), (batch,), generator=generator).tolist()]
    elif len(prompts) != batch:
        raise ValueError(f"toy_batch: {len(prompts)} prompts for batch {batch}")
    return torch.stack([render_video(p, num_frames, size, generator) for p in prompts]), list(prompts)


def save_strip(videos: Tensor, path: str | Path, upscale: int = 4) -> None:
    """PNG contact sheet of videos [B, T, 3, H, W] in [-1, 1]: one row per video, frames left to right."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"save_strip expects videos [B, T, 3, H, W], got {tuple(videos.shape)}")
    grid = rearrange(videos.detach().float().cpu().clamp(-1, 1), "b t c h w -> (b h) (t w) c")
    grid = grid.repeat_interleave(upscale, 0).repeat_interleave(upscale, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, ((grid + 1) * 127.5).round().to(torch.uint8).numpy())


# ------------------------------------------------------------------------------------------------ toy VAE
# Per-RGB-channel mean/std of toy pixels: 256 videos of TOY_FRAMES frames, generator seed 0:
#   python -c "import toy, torch; v = toy.toy_batch(256, toy.TOY_FRAMES, torch.Generator().manual_seed(0))[0]; \
#              print(v.mean((0, 1, 3, 4)), v.std((0, 1, 3, 4)))"
LATENT_MEAN = (-0.4109, -0.4118, -0.4417)
LATENT_STD = (0.2480, 0.2418, 0.1933)


class ToyVAE(nn.Module):
    """Lossless pixel-unshuffle "VAE" with WanVAE's interface, so latents mean something without training a VAE.

    encode: [B, T, 3, H, W] -> pixel_unshuffle by s = 4 -> [B, T, 3 s^2, H/s, W/s], normalized (x - mean_c) / std_c
    with the RGB statistics of toy videos (LATENT_MEAN/STD), so latents have about unit variance like Wan's.
    decode: the exact inverse, clamped to [-1, 1]. One latent per frame: temporal_factor 1, frames = F.
    No parameters; the statistics are non-persistent buffers (nothing to save or load).
    """

    temporal_factor = 1
    spatial_factor = 4
    z_dim = 3 * spatial_factor**2

    def __init__(self):
        super().__init__()
        block = self.spatial_factor**2                      # pixel_unshuffle keeps each RGB channel's s^2 latents together
        self.register_buffer("mean", torch.tensor(LATENT_MEAN).repeat_interleave(block), persistent=False)
        self.register_buffer("std", torch.tensor(LATENT_STD).repeat_interleave(block), persistent=False)

    def encode(self, pixels: Tensor) -> Tensor:
        """pixels [B, T, 3, H, W] in [-1, 1] -> normalized latents [B, T, z_dim, H/4, W/4]."""
        s = self.spatial_factor
        if pixels.dim() != 5 or pixels.shape[2] != 3 or pixels.shape[-1] % s or pixels.shape[-2] % s:
            raise ValueError(f"ToyVAE.encode expects pixels [B, T, 3, H, W] with H, W divisible by {s}, "
                             f"got {tuple(pixels.shape)}")
        lat = F.pixel_unshuffle(pixels.flatten(0, 1), s).unflatten(0, pixels.shape[:2])
        return (lat - self.mean[:, None, None]) / self.std[:, None, None]

    def decode(self, latents: Tensor) -> Tensor:
        """normalized latents [B, F, z_dim, h, w] -> pixels [B, F, 3, 4h, 4w] clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[2] != self.z_dim:
            raise ValueError(f"ToyVAE.decode expects latents [B, F, {self.z_dim}, h, w], got {tuple(latents.shape)}")
        lat = latents * self.std[:, None, None].to(latents.dtype) + self.mean[:, None, None].to(latents.dtype)
        return F.pixel_shuffle(lat.flatten(0, 1), self.spatial_factor).unflatten(0, latents.shape[:2]).clamp(-1, 1)

    def stream_decoder(self) -> Callable[[Tensor], Tensor]:
        """Chunk-by-chunk decoder (WanVAE's interface); frames are independent here, so it is `decode` itself."""
        return self.decode


# ------------------------------------------------------------------------------------------------ text
VOCAB = ("<pad>", "</s>", "<unk>", "a", "moving", *COLORS, *SHAPES, *DIRECTIONS)


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the toy vocabulary, umT5's special ids: <pad>=0, </s>=1, <unk>=2 (REFERENCE §4.3).

    Lowercases, splits on whitespace/punctuation; add_special_tokens=True appends </s> as umT5 does.
    """
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TOY_TEXT_LEN)


def toy_text_config() -> UMT5Config:
    """A tiny umT5 encoder (umT5-XXL's structure, REFERENCE §4.1: gated-gelu FFN, relative position buckets)."""
    return UMT5Config(vocab_size=len(VOCAB), d_model=32, d_kv=16, num_heads=2, num_layers=2, d_ff=64,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)


def toy_text_encoder(path: str | Path | None = None) -> UMT5EncoderModel:
    """UMT5EncoderModel(toy_text_config()), eval mode: weights from a safetensors file (safetensors.torch.save_model),
    or without `path` a fixed random init (seed 0, global RNG untouched): a frozen random encoder still tells the 32
    prompts apart, which is all the toy DiT needs."""
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = UMT5EncoderModel(toy_text_config())
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"toy text encoder weights {path} not found")
        model = UMT5EncoderModel(toy_text_config())
        load_model(model, str(path), strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------ toy DiT
def toy_dit_config() -> WanConfig:
    """The tiny Wan DiT for teacher, critic and student: 48-channel ToyVAE latents, 4x4 tokens per 8x8 latent frame,
    text from the tiny umT5 (d_model 32, TOY_TEXT_LEN tokens). The width must be at least the 2*2*48 = 192 values of a
    patch: a narrower token cannot represent the noise it has to predict, and the part of the noise outside the head's
    range is never removed by the sampler (samples stay grainy). 2.6 M parameters, sized for 2 CPU cores."""
    return WanConfig(dim=192, ffn_dim=576, num_heads=4, num_layers=4, in_dim=ToyVAE.z_dim, out_dim=ToyVAE.z_dim,
                     text_dim=toy_text_config().d_model, text_len=TOY_TEXT_LEN, patch_size=(1, 2, 2))


# ------------------------------------------------------------------------------------------------ toy reward
MASK_CHROMA = 0.7       # object mask threshold on the distance to the grey axis: object 1.39, background < 0.1
MASK_TEMP = 0.1
NOISE_DELTA = 0.1       # Charbonnier scale of the Laplacian: smooth texture ~0.01 costs ~0, noise costs |lap|
MASS_WEIGHT = 10.0      # (d log mass / frame)^2 against acceleration (px / frame^2)^2: a 10 % flicker ~ 0.3 px/frame^2
REWARD_AXES = ("VQ", "MQ", "TA")
# z = (raw - mean) / std per axis, calibrated once on a mix of clean and corrupted toy videos (REFERENCE §7.5's role):
#   python -c "import toy; print(toy.calibrate_reward_norm())"
REWARD_MEAN = {"VQ": -0.6534, "MQ": -1.7764, "TA": -1.7299}
REWARD_STD = {"VQ": 0.4957, "MQ": 2.3711, "TA": 1.9603}


def _torus_centroid(mask: Tensor) -> Tensor:
    """Circular mean position of a mask [..., H, W] on the torus -> [..., 2] as (x, y) px (differentiable)."""
    out = []
    for dim in (-1, -2):
        n = mask.shape[dim]
        theta = 2 * math.pi * torch.arange(n, device=mask.device, dtype=mask.dtype) / n
        marginal = mask.sum(-2 if dim == -1 else -1)                                  # [..., n]
        s, c = (marginal * theta.sin()).sum(-1), (marginal * theta.cos()).sum(-1)
        out.append(torch.atan2(s, c + 1e-6) * n / (2 * math.pi))                      # eps: no 0/0 on an empty mask
    return torch.stack(out, -1)


def toy_reward_raw(pixels: Tensor, colors: Tensor, directions: Tensor) -> dict[str, Tensor]:
    """The toy reward's raw axes, each [B], differentiable w.r.t. pixels [B, T, 3, H, W] (T >= 3).

    colors [B, 3] and directions [B, 2] come from the prompts. The soft object mask is
    m = sigmoid((|p - grey(p)| - MASK_CHROMA) / MASK_TEMP) (the object is the only saturated thing), c_t its torus
    centroid, v_t = c_{t+1} - c_t (wrapped).
      VQ = mean_t log topk_k |grad p_t| - mean Charb(lap p): log edge contrast (mean of the k = 2 pi R strongest
           gradients, the object's perimeter; log: blurrier frames gain more) minus high-frequency energy (noise
           everywhere; a render has it only on the object's edge), Charb(x) = sqrt(|x|^2 + delta^2) - delta.
      MQ = -log(1 + mean_t |v_{t+1} - v_t|^2 + MASS_WEIGHT mean_t (log M_{t+1} - log M_t)^2), M_t = sum m_t:
           smooth motion and a steady object.
      TA = -|mean_t v_t - SPEED d| / SPEED - |sum m p / sum m - color|: moves along the prompt's direction at the
           world's speed, with the prompt's colour (<= 0; about -0.2 on renders, whose soft edges blend the colour).
    """
    size_y, size_x = pixels.shape[-2:]
    grey = pixels.mean(2, keepdim=True)
    chroma = ((pixels - grey).pow(2).sum(2) + 1e-6).sqrt()                             # [B, T, H, W]
    mask = torch.sigmoid((chroma - MASK_CHROMA) / MASK_TEMP)

    grad = ((pixels.roll(-1, -1) - pixels).pow(2) + (pixels.roll(-1, -2) - pixels).pow(2)).sum(2).add(1e-6).sqrt()
    edge = grad.flatten(2).topk(round(2 * math.pi * OBJECT_RADIUS), dim=-1).values.mean(-1).log().mean(1)
    lap = 4 * pixels - pixels.roll(1, -1) - pixels.roll(-1, -1) - pixels.roll(1, -2) - pixels.roll(-1, -2)
    noise = ((lap.pow(2).sum(2) + NOISE_DELTA**2).sqrt() - NOISE_DELTA).mean((1, 2, 3))

    centroid = _torus_centroid(mask)                                                  # [B, T, 2]
    size = torch.tensor([size_x, size_y], device=pixels.device, dtype=pixels.dtype)
    velocity = torch.remainder(centroid.diff(dim=1) + size / 2, size) - size / 2      # [B, T-1, 2] px/frame
    accel = velocity.diff(dim=1).pow(2).sum(-1).mean(1)
    log_mass = mask.sum((-1, -2)).add(1e-6).log()
    flicker = log_mass.diff(dim=1).pow(2).mean(1)

    color = (mask[:, :, None] * pixels).sum((1, 3, 4)) / mask.sum((1, 2, 3))[:, None].add(1e-6)
    return {"VQ": edge - noise,
            "MQ": -torch.log1p(accel + MASS_WEIGHT * flicker),
            "TA": -(velocity.mean(1) - SPEED * directions).norm(dim=-1) / SPEED - (color - colors).norm(dim=-1)}


class ToyReward:
    """The toy world's VideoReward: same `score_and_saliency` and RewardResult as reward.VideoReward (REFERENCE §8.3).

    raw from toy_reward_raw; z = (raw - REWARD_MEAN) / REWARD_STD (§7.5's role); saliency = |d z_a / d pixels|_2 over
    RGB, average-pooled to the latent grid: z-units, the same convention as VideoReward (REFERENCE §10.8).
    """

    def score_and_saliency(self, frames: Tensor, prompts: list[str], latent_shape: tuple[int, int, int] | None = None,
                           axes: tuple[str, ...] = REWARD_AXES, fps: float = 16.0) -> RewardResult:
        """frames [B, T, 3, H, W] in [-1, 1] (T >= 3), one prompt per video; latent_shape (F, h, w), or None to score
        only.

        One forward; with latent_shape one autograd.grad per axis w.r.t. the pixels -> saliency [B, A, F, h, w].
        `fps` is accepted for VideoReward's signature; the toy measures motion per frame. Outputs are detached.
        """
        if frames.dim() != 5 or frames.shape[2] != 3 or frames.shape[1] < 3:
            raise ValueError(f"ToyReward expects frames [B, T>=3, 3, H, W], got {tuple(frames.shape)}")
        if len(prompts) != frames.shape[0]:
            raise ValueError(f"ToyReward: {len(prompts)} prompts for {frames.shape[0]} videos")
        if not axes or any(a not in REWARD_AXES for a in axes):
            raise ValueError(f"ToyReward axes must be a non-empty subset of {REWARD_AXES}, got {axes}")
        if latent_shape is not None and (len(latent_shape) != 3 or any(
                not 0 < n <= m for n, m in zip(latent_shape, (frames.shape[1], *frames.shape[-2:])))):
            raise ValueError(f"latent_shape must be (F, h, w) no larger than frames (T, H, W) = "
                             f"{(frames.shape[1], *frames.shape[-2:])}, got {latent_shape}")
        parsed = [parse_prompt(p) for p in prompts]
        colors = torch.tensor([COLORS[c] for c, _, _ in parsed], device=frames.device)
        directions = torch.tensor([DIRECTIONS[d] for _, _, d in parsed], device=frames.device)
        pixels = frames.detach().float().requires_grad_(latent_shape is not None)
        with torch.set_grad_enabled(latent_shape is not None):
            scores = toy_reward_raw(pixels, colors, directions)
            raw = torch.stack([scores[a] for a in axes], 1)                             # [B, A]
        mean = torch.tensor([REWARD_MEAN[a] for a in axes], device=frames.device)
        std = torch.tensor([REWARD_STD[a] for a in axes], device=frames.device)
        saliency = None
        if latent_shape is not None:
            grads = [torch.autograd.grad(raw[:, i].sum(), pixels, retain_graph=i < len(axes) - 1)[0]
                     for i in range(len(axes))]                                         # samples are independent
            pixel_saliency = torch.stack([g.norm(dim=2) for g in grads], 1) / std.view(1, -1, 1, 1, 1)  # [B,A,T,H,W]
            saliency = F.adaptive_avg_pool3d(pixel_saliency, tuple(latent_shape))
        raw = raw.detach()
        return RewardResult(raw=raw, z=(raw - mean) / std, saliency=saliency, axes=tuple(axes))


def _box_blur(video: Tensor, passes: int) -> Tensor:
    """3x3 box blur of video [T, 3, H, W], `passes` times, wrapping around (the world is a torus)."""
    for _ in range(passes):
        video = F.avg_pool2d(F.pad(video, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    return video


def calibrate_reward_norm(videos_per_kind: int = 64, seed: int = 0) -> tuple[dict, dict]:
    """Per-axis (mean, std) of toy_reward_raw over rendered TOY_FRAMES clips and five corruptions of them in equal
    parts: Gaussian noise (sigma ~ U(0, 0.5)), box blur (1-3 passes), shuffled frames, another prompt, decoded N(0, 1)
    latents.
    So z > 0 reads "better than a typical corrupted video" and z < 0 "worse". Returns ({axis: mean}, {axis: std})."""
    g = torch.Generator().manual_seed(seed)
    n = videos_per_kind
    clean, prompts = toy_batch(n, TOY_FRAMES, g)
    noisy = (clean + 0.5 * _rand(g, n, 1, 1, 1, 1) * torch.randn(clean.shape, generator=g)).clamp(-1, 1)
    blurred = torch.stack([_box_blur(v, 1 + i % 3) for i, v in enumerate(clean)])
    shuffled = torch.stack([v[torch.randperm(len(v), generator=g)] for v in clean])
    vae = ToyVAE()
    noise = vae.decode(torch.randn(vae.encode(clean).shape, generator=g))     # what an untrained generator makes
    pool = toy_prompts()
    shift = torch.randint(1, len(pool), (n,), generator=g).tolist()                    # never the right prompt
    others = [pool[(pool.index(p) + k) % len(pool)] for p, k in zip(prompts, shift)]
    videos = torch.cat([clean, noisy, blurred, shuffled, clean, noise])
    raw = ToyReward().score_and_saliency(videos, prompts * 4 + others + prompts).raw
    return ({a: round(raw[:, i].mean().item(), 4) for i, a in enumerate(REWARD_AXES)},
            {a: round(raw[:, i].std().item(), 4) for i, a in enumerate(REWARD_AXES)})


# ------------------------------------------------------------------------------------------------ held-out evaluation
EVAL_CHROMA = 0.25        # object pixels: distance to the grey axis above this (background < 0.1, palette 1.39), so a
                          # faded or blurred object still counts
EVAL_MIN_SPEED = 0.25     # px/frame: slower counts as "not moving" (no direction)


@torch.no_grad()
def _track_object(videos: Tensor) -> dict[str, Tensor]:
    """Plain measurements of the moving object in videos [B, T, 3, H, W] (no gradients, hard thresholds).

    Object pixels have chroma q = p - grey(p) with |q| > EVAL_CHROMA; each takes the hue of the palette colour its q
    points to most (argmax_k q . q_k). color: index into COLORS of the most frequent hue over the video (-1: no object
    pixels); velocity [B, 2]: mean wrapped frame-to-frame displacement of that hue's torus centroid (px/frame; frame
    pairs where it is absent are skipped); rgb [B, 3]: mean pixel value under that hue; area: its mean pixel count per
    frame relative to a circle of OBJECT_RADIUS.
    """
    if videos.dim() != 5 or videos.shape[2] != 3 or videos.shape[1] < 2:
        raise ValueError(f"expected videos [B, T>=2, 3, H, W], got {tuple(videos.shape)}")
    videos = videos.detach().float().cpu()
    palette = torch.tensor(list(COLORS.values()))                                       # [K, 3]
    chroma = videos - videos.mean(2, keepdim=True)
    hue = torch.einsum("btchw,kc->btkhw", chroma, palette - palette.mean(1, keepdim=True)).argmax(2)   # [B, T, H, W]
    hits = F.one_hot(hue, len(palette)).movedim(-1, 2).bool() & (chroma.norm(dim=2) > EVAL_CHROMA)[:, :, None]
    counts = hits.sum((1, 3, 4))                                                        # [B, K]
    color = torch.where(counts.amax(1) > 0, counts.argmax(1), -1)
    mask = hits[torch.arange(len(videos)), :, color.clamp(min=0)].float()                # [B, T, H, W]
    mask[color < 0] = 0
    size = torch.tensor([videos.shape[-1], videos.shape[-2]], dtype=torch.float32)      # (W, H) as (x, y)
    step = torch.remainder(_torus_centroid(mask).diff(dim=1) + size / 2, size) - size / 2
    present = mask.sum((-1, -2)) > 0
    pair = (present[:, 1:] & present[:, :-1]).float()[..., None]                         # [B, T-1, 1]
    velocity = (step * pair).sum(1) / pair.sum(1).clamp(min=1)
    rgb = (mask[:, :, None] * videos).sum((1, 3, 4)) / mask.sum((1, 2, 3))[:, None].clamp(min=1)
    area = mask.sum((2, 3)).mean(1) / (math.pi * OBJECT_RADIUS**2)
    return {"color": color, "velocity": velocity, "rgb": rgb, "area": area}


def evaluate_videos(videos: Tensor, prompts: list[str]) -> dict[str, float]:
    """Held-out evaluation, not the reward: colour and direction accuracy of the moving object.

    videos [B, T, 3, H, W] in [-1, 1], one prompt each. colour: the palette hue of most saturated pixels;
    direction: argmax_d v . d of the object's mean velocity, or none if slower than EVAL_MIN_SPEED. Chance is 1/4 each.
    """
    if len(prompts) != len(videos):
        raise ValueError(f"evaluate_videos: {len(prompts)} prompts for {len(videos)} videos")
    parsed = [parse_prompt(p) for p in prompts]
    track = _track_object(videos)
    want_color = torch.tensor([list(COLORS).index(c) for c, _, _ in parsed])
    want_dir = torch.tensor([list(DIRECTIONS).index(d) for _, _, d in parsed])
    v = track["velocity"]
    nearest = (v @ torch.tensor(list(DIRECTIONS.values())).T).argmax(1)
    got_dir = torch.where(v.norm(dim=-1) >= EVAL_MIN_SPEED, nearest, -1)
    return {"color_accuracy": (track["color"] == want_color).float().mean().item(),
            "direction_accuracy": (got_dir == want_dir).float().mean().item()}


def teacher_distance(student_videos: Tensor, teacher_videos: Tensor) -> float:
    """Mean over prompts of |f(student_i) - f(teacher_i)|_2, f = the object's (mean RGB, velocity px/frame, relative
    area) from _track_object: how far the student's objects are from the teacher's, prompt by prompt. Both
    [B, T, 3, H, W] generated from the same prompts in the same order; positions and backgrounds (random) are ignored.
    Two sets of renders of the same prompts give about 0.1 (video-to-video spread of the measured colour and area)."""
    if student_videos.shape != teacher_videos.shape:
        raise ValueError(f"teacher_distance: student {tuple(student_videos.shape)} vs teacher "
                         f"{tuple(teacher_videos.shape)}; generate both from the same prompts and frame count")
    feats = [torch.cat([t["rgb"], t["velocity"], t["area"][:, None]], 1)
             for t in (_track_object(student_videos), _track_object(teacher_videos))]
    return (feats[0] - feats[1]).norm(dim=1).mean().item()


SINK_REPEAT = 0.02        # mean |frame - sink frame| below this: the frame repeats one of the stream's first frames


def drift(videos: Tensor, prompts: list[str], window: int, sink_frames: int) -> list[dict[str, float]]:
    """Held-out evaluation of long streams, window by window (Stream-R1's drift: quality decay over time).

    videos [B, T, 3, H, W] in [-1, 1], one prompt each; consecutive windows of `window` frames (a last partial one
    dropped). Per window: colour and direction accuracy (evaluate_videos on the window alone), speed (mean over
    videos of |mean object velocity|, px/frame; the world's is SPEED), and frozen: the share of videos whose object
    moves slower than EVAL_MIN_SPEED or whose frames mostly repeat one of the first sink_frames frames (what a cache
    that copies its sink shows). Returns one dict per window with its first frame as "start".
    """
    if videos.dim() != 5 or videos.shape[1] < max(window, 2) or window < 2:
        raise ValueError(f"drift needs videos [B, T, 3, H, W] with T >= window >= 2, got {tuple(videos.shape)}, "
                         f"window={window}")
    videos, rows = videos.detach().float().cpu(), []
    sink = videos[:, :sink_frames, None]                                                # [B, S, 1, 3, H, W]
    for start in range(0, videos.shape[1] - window + 1, window):
        clip = videos[:, start:start + window]
        speed = _track_object(clip)["velocity"].norm(dim=1)
        repeats = ((clip[:, None] - sink).abs().mean((3, 4, 5)).amin(1) < SINK_REPEAT).float().mean(1)   # [B]
        frozen = (speed < EVAL_MIN_SPEED) | (repeats > 0.5)
        rows.append({"start": start, **evaluate_videos(clip, prompts), "speed": speed.mean().item(),
                     "frozen": frozen.float().mean().item()})
    return rows


# ------------------------------------------------------------------------------------------------ toy training stage
def teacher_loss(net: nn.Module, parts, prompts: list[str], videos: Tensor, cfg_dropout: float) -> Tensor:
    """Flow-matching pretraining loss of the toy teacher on videos [B, T, 3, H, W] (train.py --stage=teacher).

    x0 = encode(videos); context dropped to the negative context with prob cfg_dropout (for CFG); t = 1000 sigma,
    sigma ~ U(0, 1), not shifted: the teacher must be accurate at every noise level its samplers and the DMD gradient
    query (few draws near sigma = 0 leave residual noise in its samples); L = mean |net(x_t, t) - (eps - x0)|^2.
    `parts`: config.Components (vae, context, negative_context).
    """
    x0 = parts.vae.encode(videos)
    ctx = parts.context(prompts)
    drop = torch.rand(len(prompts), device=x0.device) < cfg_dropout
    ctx = torch.where(drop.view(-1, 1, 1), parts.negative_context(len(prompts)), ctx)
    t = 1000 * torch.rand(len(prompts), device=x0.device)
    eps = torch.randn_like(x0)
    return (net(dmd.add_noise(x0, eps, t), t, ctx) - (eps - x0)).pow(2).mean()


# ------------------------------------------------------------------------------------------------ held-out evaluation
EVAL_SEED = 1234


@torch.no_grad()
def stream_samples(student: nn.Module, parts, cfg, prompts: list[str], num_frames: int) -> Tensor:
    """Chunk-by-chunk generation with the same cache code as training: pixels [B, T, 3, H, W] in [-1, 1].
    `parts`: config.Components; `cfg`: config.Config (steps, shift, chunk_frames, the cache geometry)."""
    ctx = parts.context(prompts)
    _, channels, height, width = parts.latent_shape()
    cache = student.new_cache(len(prompts), **cfg.cache_options())
    steps = dmd.warped_steps(cfg.steps, cfg.shift)
    decoder, frames = parts.vae.stream_decoder(), []
    for _ in range(num_frames // cfg.chunk_frames):
        noise = torch.randn(len(prompts), cfg.chunk_frames, channels, height, width, device=ctx.device)
        frames.append(decoder(dmd.generate_chunk(student, noise, ctx, cache, steps)))
    return torch.cat(frames, dim=1)


def evaluate(student: nn.Module, teacher: nn.Module, parts, cfg, out: Path, step: int) -> dict:
    """Held-out evaluation (not the reward): colour / direction accuracy on EVAL_PROMPTS and the distance to the
    teacher's samples, from seed EVAL_SEED (the training RNG untouched); rank 0 saves a strip of 8 videos.
    Every rank calls it: a sharded forward is a collective."""
    prompts = list(EVAL_PROMPTS)
    with torch.random.fork_rng():
        torch.manual_seed(EVAL_SEED)
        videos = stream_samples(student, parts, cfg, prompts, cfg.num_frames)
        teacher_videos = teacher_samples(teacher, parts, cfg, prompts, out)
    stats = evaluate_videos(videos, prompts)
    stats["teacher_distance"] = teacher_distance(videos, teacher_videos)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_strip(videos[:8], out / f"samples_{step:06d}.png")
    return stats


def teacher_samples(teacher: nn.Module, parts, cfg, prompts: list[str], out: Path) -> Tensor:
    """The teacher's many-step CFG samples [B, T, 3, H, W] of `prompts` (ode_steps Euler steps at ode_guidance),
    computed once per run folder (teacher_eval.safetensors)."""
    path = out / "teacher_eval.safetensors"
    cached = path.exists()
    if dist.is_initialized():  # every rank decides before any writes: a sharded teacher needs all ranks in its forwards
        dist.barrier()
    if cached:
        return load_file(str(path))["videos"]
    noise = torch.randn(len(prompts), *parts.latent_shape(), device=parts.device)
    traj = dmd.teacher_trajectory(teacher, noise, parts.context(prompts), parts.negative_context(len(prompts)),
                                  guidance=cfg.ode_guidance, num_steps=cfg.ode_steps, shift=cfg.ode_shift, keep=(-1,))
    videos = parts.vae.decode(traj[:, -1]).cpu()
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write(path, lambda p: save_file({"videos": videos.contiguous()}, p))
    return videos
