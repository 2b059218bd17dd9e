"""Wan2.1 VAE: causal 3-D convolutional autoencoder, 4x time and 8x space compression (REFERENCE.md §5).

Layouts: pixels [B, T, 3, H, W] in [-1, 1]; latents [B, F, z_dim, H/8, W/8], normalised with the Wan mean/std, with
T = 4(F - 1) + 1 (the first latent frame holds one frame, every later one four). Inside the network tensors are
[B, C, T, H, W], as in Wan. Module and parameter names are Wan's (`wan/modules/vae.py`), so Wan2.1_VAE.pth loads as is.
"""
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from checkpoint import LazyTensor, load_shards, open_weights

# Latent normalisation of the 16-channel Wan2.1 VAE: z_normalised = (mu - mean) / std (REFERENCE.md §5.3).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Stream state: causal conv -> its last input frames; temporal Resample -> its previous frame (down) or a
# started-marker (up). One dict per clip (encode) or per stream (StreamDecoder).
Cache = dict[nn.Module, Tensor | None]


# ----------------------------------------------------------------------------------------------------------------
# building blocks (§5.1)

class CausalConv3d(nn.Conv3d):
    """3-D conv with all temporal padding in front: out[t] sees inputs t-2..t only (kernel 3, padding 1 in time).

    The 2 * padding_t frames before the chunk come from the cache (zeros at the stream start, = Wan's F.pad), so a
    clip processed in chunks gives the frames of one pass. Spatial padding is the conv's own zero padding.
    x: [B, C, t, H, W] -> [B, C_out, t', H', W'].
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, (kt, kh, kw), stride=stride, padding=(0, ph, pw))
        self.history = 2 * pt

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        if self.history:
            cache = {} if cache is None else cache
            prev = cache.get(self)
            if prev is None:
                prev = x.new_zeros(*x.shape[:2], self.history, *x.shape[3:])
            x = torch.cat([prev, x], dim=2)
            cache[self] = x[:, :, -self.history:].clone()  # a copy, not a view that keeps the whole chunk alive
        return super().forward(x)


class RMS_norm(nn.Module):
    """x / ||x||_C * sqrt(C) * gamma over the channel dim 1 (F.normalize, eps 1e-12); fp32 norm for low precision."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class Resample(nn.Module):
    """2x spatial up/down sampling, optionally with 2x in time (modes 'upsample2d/3d', 'downsample2d/3d').

    up: nearest-exact 2x + 3x3 conv to dim // 2; upsample3d first doubles the frames with a causal (3, 1, 1) conv
    dim -> 2 dim whose halves become frames 2t, 2t+1, except on the stream's first chunk (latent 0 -> 1 frame).
    down: right/bottom zero pad + stride-2 3x3 conv; downsample3d then applies a stride-2 (3, 1, 1) conv to
    [previous chunk's last frame | chunk], except on the first chunk (frame 0 -> latent 0).
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        b = x.shape[0]
        if self.mode == "upsample3d":
            if self in cache:
                x = rearrange(self.time_conv(x, cache), "b (two c) t h w -> b c (t two) h w", two=2)
            cache[self] = None  # the stream has started: later chunks are upsampled in time
        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = rearrange(self.resample(x), "(b t) c h w -> b c t h w", b=b)
        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], dim=2))
        return x


class ResidualBlock(nn.Module):
    """x -> shortcut(x) + Conv3(Dropout(SiLU(RMS(Conv3(SiLU(RMS(x))))))); shortcut is a 1^3 conv if in != out."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(  # indices 0, 2, 3, 6 hold the weights, as in Wan
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        return self.shortcut(x) + _run(self.residual, x, cache)


class AttentionBlock(nn.Module):
    """Single-head attention over each frame's H*W pixels: x + proj(SDPA(q, k, v)), q, k, v = to_qkv(RMS(x))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        q, k, v = rearrange(self.to_qkv(self.norm(frames)), "n c h w -> n 1 (h w) c").chunk(3, dim=-1)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "n 1 (h w) c -> n c h w", h=h)
        return x + rearrange(self.proj(out), "(b t) c h w -> b c t h w", b=b)


def _run(layers: nn.Sequential, x: Tensor, cache: Cache) -> Tensor:
    """Apply layers in order, handing the stream cache to those that look back in time."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder3d(nn.Module):
    """Pixels [B, 3, t, H, W] -> [B, out_dim, t', H/8, W/8]: conv1, downsamples (res blocks + Resample per level),
    middle [Res, Attn, Res], head [RMS, SiLU, Conv3]. Wan `Encoder3d` (attn_scales = [])."""

    def __init__(self, dim: int, out_dim: int, dim_mult, num_res_blocks: int, temporal_downsample):
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(d_in, d_out))
                d_in = d_out
            if i < len(dim_mult) - 1:
                layers.append(Resample(d_out, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1])
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], out_dim, 3, padding=1))

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = self.conv1(x, cache)
        for part in (self.downsamples, self.middle, self.head):
            x = _run(part, x, cache)
        return x


class Decoder3d(nn.Module):
    """Latents [B, z_dim, t, h, w] -> pixels [B, 3, t', 8h, 8w]: conv1, middle, upsamples (num_res_blocks + 1 res
    blocks + Resample per level; each Resample halves the channels), head. Wan `Decoder3d` (attn_scales = [])."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temporal_upsample):
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            d_in = d_in // 2 if i > 0 else d_in  # the previous level's Resample halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(d_in, d_out))
                d_in = d_out
            if i < len(dim_mult) - 1:
                layers.append(Resample(d_out, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = self.conv1(x, cache)
        for part in (self.middle, self.upsamples, self.head):
            x = _run(part, x, cache)
        return x


# ----------------------------------------------------------------------------------------------------------------
# the VAE (§5.2)

class WanVAE(nn.Module):
    """Wan2.1 VAE (`WanVAE_` + the normalisation of `WanVAE`), 126.9 M parameters at the defaults (§5.1).

    temporal_factor = 2 ** sum(temporal_downsample) (4), spatial_factor = 2 ** (len(dim_mult) - 1) (8).
    conv1 (quant, 2 z_dim -> 2 z_dim) follows the encoder, conv2 (post-quant, z_dim -> z_dim) precedes the decoder.
    latents_mean / latents_std: z_dim values; Wan2.1's (§5.3) by default when z_dim == 16.
    """

    def __init__(self, base_dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 temporal_downsample=(False, True, True), latents_mean=None, latents_std=None):
        super().__init__()
        if len(temporal_downsample) != len(dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs len(dim_mult) - 1 = {len(dim_mult) - 1} entries (one per "
                             f"down level), got {tuple(temporal_downsample)}")
        if latents_mean is None and latents_std is None and z_dim == len(WAN21_LATENTS_MEAN):
            latents_mean, latents_std = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
        if latents_mean is None or latents_std is None or len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean and latents_std must both be given with z_dim = {z_dim} values each "
                             f"(Wan2.1's 16 are the default only for z_dim = 16), got {latents_mean} and {latents_std}")
        self.z_dim, self.num_res_blocks = z_dim, num_res_blocks
        self.temporal_factor = 2 ** sum(map(bool, temporal_downsample))
        self.spatial_factor = 2 ** (len(dim_mult) - 1)
        self.encoder = Encoder3d(base_dim, 2 * z_dim, dim_mult, num_res_blocks, temporal_downsample)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(base_dim, z_dim, dim_mult, num_res_blocks, tuple(temporal_downsample)[::-1])
        # python floats, not in the state dict (Wan2.1_VAE.pth holds the network only), nor cast with a bf16 VAE
        self.latents_mean, self.latents_std = tuple(map(float, latents_mean)), tuple(map(float, latents_std))

    def _check_latents(self, latents: Tensor) -> None:
        if latents.dim() != 5 or latents.shape[2] != self.z_dim or latents.shape[1] == 0:
            raise ValueError(f"latents must be [B, F >= 1, z_dim={self.z_dim}, h, w], got {tuple(latents.shape)}")

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """mean, std as [1, 1, z_dim, 1, 1] in like's dtype and device."""
        return tuple(torch.tensor(s, dtype=like.dtype, device=like.device)[None, None, :, None, None]
                     for s in (self.latents_mean, self.latents_std))

    def encode(self, pixels: Tensor) -> Tensor:
        """Normalised posterior mean: pixels [B, 1 + tf*k, 3, H, W] in [-1, 1] -> [B, 1 + k, z_dim, H/sf, W/sf].

        Chunks of 1, tf, tf, ... frames share one stream cache (Wan's 1, 4, 4, ...); mu, logvar = conv1(out).chunk(2);
        returns (mu - mean) / std (§5.2, §5.3).
        """
        tf, sf = self.temporal_factor, self.spatial_factor
        if pixels.dim() != 5 or pixels.shape[2] != 3:
            raise ValueError(f"pixels must be [B, T, 3, H, W], got {tuple(pixels.shape)}")
        T, H, W = pixels.shape[1], pixels.shape[3], pixels.shape[4]
        if T % tf != 1 % tf or T == 0:
            raise ValueError(f"the VAE encodes 1 + {tf}k frames, got T = {T}")
        if H % sf or W % sf:
            raise ValueError(f"H and W must be divisible by the spatial factor {sf}, got {H}x{W}")
        x = rearrange(pixels, "b t c h w -> b c t h w").to(self.conv1.weight.dtype)
        cache: Cache = {}
        chunks = [x[:, :, :1]] + [x[:, :, i:i + tf] for i in range(1, T, tf)]
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu = rearrange(self.conv1(out).chunk(2, dim=1)[0], "b c f h w -> b f c h w").float()
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, F, z_dim, h, w] -> pixels [B, 1 + tf(F - 1), 3, sf h, sf w] in [-1, 1] (§5.2)."""
        return self.stream_decoder()(latents)

    def stream_decoder(self) -> "StreamDecoder":
        """A fresh chunk-by-chunk decoder; concatenating its outputs over any chunking equals decode(all)."""
        return StreamDecoder(self)


class StreamDecoder:
    """Decodes a latent stream chunk by chunk with a persistent cache per causal conv (exactly causal, §5.2).

    dec(latents [B, f, z_dim, h, w]) -> [B, n, 3, sf h, sf w] in [-1, 1], n = 1 + tf(f - 1) for the stream's first
    chunk and tf f afterwards. Per latent frame: z * std + mean -> conv2 -> decoder -> clamp(-1, 1), one frame at a
    time (Wan's decode loop), so memory does not grow with the chunk or the stream length.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.cache: Cache = {}
        self.shape: tuple[int, int, int] | None = None  # (B, h, w) of the stream

    def __call__(self, latents: Tensor) -> Tensor:
        self.vae._check_latents(latents)
        shape = (latents.shape[0], latents.shape[3], latents.shape[4])
        if self.shape not in (None, shape):
            raise ValueError(f"this stream is [B, h, w] = {list(self.shape)}, the chunk {tuple(latents.shape)} is not")
        self.shape = shape
        mean, std = self.vae._stats(latents)
        z = rearrange(latents * std + mean, "b f c h w -> b c f h w").to(self.vae.conv2.weight.dtype)
        frames = [self.vae.decoder(self.vae.conv2(z[:, :, i:i + 1]), self.cache).float().clamp(-1, 1)
                  for i in range(z.shape[2])]
        return rearrange(torch.cat(frames, dim=2), "b c t h w -> b t c h w")


# ----------------------------------------------------------------------------------------------------------------
# weights: Wan2.1_VAE.pth (original names) or diffusers AutoencoderKLWan (§5.4)

# Original Wan name -> diffusers name (diffusers `convert_vae`, REFERENCE.md §5.4); applied in order, once each.
_WAN_TO_DIFFUSERS = [
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"\.residual\.0\.", ".norm1."),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
]


def _wan_key_to_diffusers(key: str, num_res_blocks: int) -> str:
    """Wan VAE key -> AutoencoderKLWan key. Decoder level i holds num_res_blocks + 1 res blocks then one upsampler,
    so upsamples.n is up_blocks[n // (R + 2)].resnets[n % (R + 2)], or its upsamplers.0 when n % (R + 2) == R + 1."""
    m = re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key)
    if m:
        level, j = divmod(int(m[1]), num_res_blocks + 2)
        part = "upsamplers.0" if j == num_res_blocks + 1 else f"resnets.{j}"
        key = f"decoder.up_blocks.{level}.{part}.{m[2]}"
    for pattern, repl in _WAN_TO_DIFFUSERS:
        key = re.sub(pattern, repl, key)
    return key


def _read_state_dict(path: Path) -> tuple[dict, dict | None]:
    """The tensors of a .safetensors / .pth file or a diffusers folder, none read yet (checkpoint.open_weights), and
    the folder's config.json (or None)."""
    if not path.exists():
        raise FileNotFoundError(f"VAE weights not found: {path}")
    config = None
    if path.is_dir():
        if not (path / "diffusion_pytorch_model.safetensors").is_file():
            raise FileNotFoundError(f"{path} is a folder without diffusion_pytorch_model.safetensors "
                                    "(expected the diffusers AutoencoderKLWan layout, e.g. Wan2.1-*-Diffusers/vae)")
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        path = path / "diffusion_pytorch_model.safetensors"
    sd = open_weights(path)[0]
    if not isinstance(sd, dict) or not all(isinstance(v, (Tensor, LazyTensor)) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors (got {type(sd).__name__})")
    return sd, config


def _check_diffusers_config(vae: WanVAE, config: dict, path: Path) -> None:
    """The folder's config.json must describe this VAE (architecture and latent mean/std)."""
    if config.get("z_dim", vae.z_dim) != vae.z_dim:
        raise ValueError(f"{path}/config.json has z_dim = {config['z_dim']}, the WanVAE has {vae.z_dim}")
    for name in ("latents_mean", "latents_std"):
        ours, theirs = getattr(vae, name), config.get(name)
        if theirs is not None and (len(theirs) != len(ours) or not torch.allclose(torch.tensor(theirs),
                                                                                  torch.tensor(ours))):
            raise ValueError(f"{path}/config.json has {name} = {theirs}, the WanVAE has {list(ours)}")
    if config.get("is_residual"):
        raise ValueError(f"{path}/config.json describes a residual (Wan2.2) VAE, not the Wan2.1 VAE")


def load_vae_weights(vae: WanVAE, path: str | Path) -> None:
    """Load Wan2.1_VAE.pth (original names, torch.load weights_only) or a diffusers AutoencoderKLWan (safetensors
    file, or a folder with diffusion_pytorch_model.safetensors [+ config.json]) into vae, strictly.

    The format is detected from the keys (`encoder.downsamples.*` vs `encoder.down_blocks.*`); diffusers names are
    mapped back to Wan's (§5.4). Raises before touching vae on any missing / unexpected key or shape mismatch.
    """
    path = Path(path)
    sd, config = _read_state_dict(path)
    if any(k.startswith("encoder.downsamples.") for k in sd):
        fmt = "original Wan VAE"
    elif any(k.startswith("encoder.down_blocks.") for k in sd):
        fmt = "diffusers AutoencoderKLWan"
        if config is not None:
            _check_diffusers_config(vae, config, path)
        to_wan = {_wan_key_to_diffusers(k, vae.num_res_blocks): k for k in vae.state_dict()}
        sd = {to_wan.get(k, k): v for k, v in sd.items()}
    else:
        raise ValueError(f"{path} is not a Wan VAE state dict: neither original (encoder.downsamples.*) nor diffusers "
                         f"(encoder.down_blocks.*) keys; its first keys are {list(sd)[:5]}")
    expected = vae.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path} ({fmt}) does not match this WanVAE: {len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"{path} ({fmt}): {k} has shape {tuple(sd[k].shape)}, "
                             f"this WanVAE expects {tuple(v.shape)}")
    load_shards(vae, sd)
