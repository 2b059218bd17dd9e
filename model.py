"""Wan2.1 text-to-video DiT: bidirectional teacher/critic and block-causal streaming student.

Paper objects: the Wan2.1 DiT (REFERENCE §2), per-frame timestep modulation and the block-causal student (§3.1-3.2),
the KV cache with sliding window + sink (LongLive, §3.6) and EMA-sink (Reward Forcing, §3.7), and one loader for every
public checkpoint format (§2.8-2.9).

Layouts: latents x [B, F, C, H, W] (frame-major); timesteps t [B] or [B, F] floats in [0, 1000]; text context
[B, L <= text_len, text_dim]. Inside the network the residual stream is [B, F, S, D] with S = (H/ph)(W/pw) tokens per
frame in row-major (h, w) order; attention runs on [B, F*S, heads, head_dim] through SDPA. Output v = eps - x0, like x.

Precision (REFERENCE §2.6, official mode), the same on CPU and CUDA: fp32 parameters (bf16 for frozen networks under
bf16, config.build_net) under bf16 autocast, which runs linears, the patch conv and attention in bf16; fp32 islands
(Linear32, LayerNorm) for the time embedding and projection, the modulation adds and the head; the residual stream is
fp32 after the first add; RoPE angles float64. Without autocast everything is fp32 (the CPU default).
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from checkpoint import LazyTensor, atomic_write, load_shards, open_weights

ROPE_THETA = 10000.0  # REFERENCE §2.5
ROPE_MAX_POSITIONS = 1024  # Wan's rope_params(1024, ...): positions >= 1024 never trained (§2.5, §10.12)
TIME_MAX_PERIOD = 10000.0  # sinusoidal time embedding, omega_i = 10000^(-i/half) (§2.3)


@dataclass
class WanConfig:
    """Wan DiT shape (REFERENCE §2.1). head_dim = dim / num_heads; temporal patch 1 (every Wan2.1 model)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size (RoPE pairs)")
        if self.patch_size[0] != 1:
            raise ValueError(f"temporal patch size must be 1 (all Wan2.1 models; the cache counts latent frames), "
                             f"got patch_size={self.patch_size}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even (cos | sin halves), got {self.freq_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def wan_1_3b(cls) -> "WanConfig":
        return cls(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)

    @classmethod
    def wan_14b(cls) -> "WanConfig":
        return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)


def mixed_precision_policy():
    """FSDP2 policy for every fully_shard'ed WanModel module (blocks and root), run under bf16 autocast: bf16 compute
    copies, fp32 gradient reduction, and no input cast, which would round t (937.5 -> 936) at the root and the fp32
    residual stream and modulation at each block (REFERENCE §2.6); autocast makes the compute casts instead."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan time embedding (REFERENCE §2.3): [cos(t w), sin(t w)], w_i = 10000^(-i/(dim/2)), in float64.

    t: [N] floats -> [N, dim] float64 (cos first).
    """
    half = dim // 2
    omega = TIME_MAX_PERIOD ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = t.double()[:, None] * omega
    return torch.cat([arg.cos(), arg.sin()], dim=1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims per RoPE axis as Wan splits them (REFERENCE §2.5): h, w get 2*(d//6), t the rest (44/42/42 at 128)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(frame_pos: torch.Tensor, grid_h: int, grid_w: int, head_dim: int) -> torch.Tensor:
    """3-D RoPE rotations for tokens on a (frames x grid_h x grid_w) grid (REFERENCE §2.5).

    Per axis a with real dims d_a: angle_j = pos * theta^(-2j/d_a), j < d_a/2 (each axis normalised by its own dims).
    frame_pos: [Fk] temporal positions; h and w positions start at 0. Built in float64, returned as fp32 (cos, sin)
    of each angle: [Fk*grid_h*grid_w, 1, head_dim/2, 2] (the 1 broadcasts over heads).
    """
    device = frame_pos.device

    def angles(pos, d):  # pos * omega per axis, float64
        return torch.outer(pos.double(), ROPE_THETA ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))

    dt, dh, dw = rope_axis_dims(head_dim)
    nf = frame_pos.numel()
    at = angles(frame_pos, dt)[:, None, None].expand(nf, grid_h, grid_w, -1)
    ah = angles(torch.arange(grid_h, device=device), dh)[None, :, None].expand(nf, grid_h, grid_w, -1)
    aw = angles(torch.arange(grid_w, device=device), dw)[None, None, :].expand(nf, grid_h, grid_w, -1)
    ang = torch.cat([at, ah, aw], dim=-1).reshape(-1, 1, head_dim // 2)
    return torch.stack([ang.cos(), ang.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) = (a, b): (a + ib) exp(i angle) = (a cos - b sin, a sin + b cos)
    (REFERENCE §2.5). Wan's rope_apply multiplies complex numbers, the same products; in real arithmetic because
    inductor fuses real ops and leaves complex ones to eager kernels (and its CUDA code generation has failed on them).

    x: [B, L, heads, head_dim]; rot: [L, 1, head_dim/2, 2] (cos, sin) fp32. Returns fp32 like Wan.
    """
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rot.unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class RopeTables(NamedTuple):
    """RoPE for the new tokens (queries and their keys) and, in relative-cache mode, the cached keys (KVCache.past
    applies it once per cache state). Depends only on the geometry, so a cache keeps the last one (rope_for)."""

    new: torch.Tensor
    past: torch.Tensor | None  # None: no past keys, or past keys were cached already roped
    cache_roped: bool  # which key the cache stores: roped (absolute geometry) or before RoPE (relative)


class Linear32(nn.Linear):
    """nn.Linear in fp32 whatever the parameter dtype and autocast (fp32 islands, §2.6); no-op casts in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), self.bias.float())


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (with fp32 copies of bf16 affine weights) and cast back (WanLayerNorm, §2.4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class RMSNorm(nn.Module):
    """q/k RMSNorm over the full width (across heads): x * rsqrt(mean x^2 + eps) in fp32, cast back, times weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_tokens: int | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v through SDPA. q [B, Lq, n, d], k/v [B, Lk, n, d] -> [B, Lq, n*d];
    bias [1, Lk] logit offsets per key (the merged padding row, WanModel.text_context) or None.

    chunk_tokens: block-causal full sequence (REFERENCE §3.2, Lq == Lk): queries of chunk c see keys of chunks <= c.
    Done as one SDPA call per chunk over the key prefix: the same result as the boolean block mask without building an
    Lq x Lk mask (1 GB at 32,760 tokens) and with the fused kernels that refuse masks.
    """
    q, k, v = (rearrange(z, "b l n d -> b n l d") for z in (q, k, v))
    if chunk_tokens is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    else:
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, s:s + chunk_tokens], k[:, :, :s + chunk_tokens],
                                                        v[:, :, :s + chunk_tokens])
                         for s in range(0, q.shape[2], chunk_tokens)], dim=2)
    return rearrange(out, "b n l d -> b l (n d)")


class WanAttention(nn.Module):
    """Wan self-/cross-attention weights: q, k, v, o Linears and RMSNorm on q and k (REFERENCE §2.4)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def heads(self, z: torch.Tensor) -> torch.Tensor:
        return z.unflatten(-1, (self.num_heads, -1))

    def self_attention(self, x: torch.Tensor, rope: RopeTables, past: tuple[torch.Tensor, torch.Tensor, int] | None,
                       chunk_tokens: int | None, kv_only: bool = False
                       ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, F, S, D] -> (out [B, F, S, D], (k, v) of these tokens [B, F*S, n, d] for the cache).

        q = RoPE(RMS(W_q x)), k = RoPE(RMS(W_k x)), v = W_v x; keys/values = [past | new]: past = (k, v, n), the
        cache's buffers [B, frames, S, n, d] whose first n frames are the cached ones, keys already rotated
        (KVCache.past). Without autograd the new K/V go into the slot behind them and attention reads the buffers;
        with it, [past | new] is a new tensor of the graph. kv_only: out is None, only (k, v) are computed (the cache
        refresh's last block).
        """
        nf, S = x.shape[1:3]
        x = x.flatten(1, 2)
        k, v = self.heads(self.norm_k(self.k(x))), self.heads(self.v(x))
        k_roped = apply_rope(k, rope.new)
        if kv_only:
            return None, (k_roped if rope.cache_roped else k, v)
        q = apply_rope(self.heads(self.norm_q(self.q(x))), rope.new)
        keys, values = k_roped, v
        if past is not None:
            past_k, past_v, n = past
            if torch.is_grad_enabled():
                keys, values = (torch.cat([p[:, :n].flatten(1, 2), z], dim=1) for p, z in ((past_k, k_roped),
                                                                                              (past_v, v)))
            else:
                past_k[:, n:n + nf] = k_roped.unflatten(1, (nf, S))
                past_v[:, n:n + nf] = v.unflatten(1, (nf, S))
                keys, values = past_k[:, :n + nf].flatten(1, 2), past_v[:, :n + nf].flatten(1, 2)
        out = self.o(attention(q, keys, values, chunk_tokens)).unflatten(1, (nf, S))
        return out, (k_roped if rope.cache_roped else k, v)

    def cross_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text keys/values: RMS(W_k ctx), W_v ctx. ctx [B, text_len, D] -> two [B, text_len, n, d]."""
        return self.heads(self.norm_k(self.k(ctx))), self.heads(self.v(ctx))

    def cross_attention(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, F, S, D] attends all text_len context rows, unmasked, no RoPE (REFERENCE §2.3, §10.17); k/v
        [B, L, n, d] with L = text_len, or fewer rows with bias [1, L] standing for merged padding rows."""
        q = self.heads(self.norm_q(self.q(x.flatten(1, 2))))
        return self.o(attention(q, k, v, bias=bias)).unflatten(1, x.shape[1:3])


class WanBlock(nn.Module):
    """WanAttentionBlock (REFERENCE §2.4), modulation per frame (§3.1):

    m0..m5 = modulation + e0;  x += SelfAttn(LN(x)(1+m1) + m0) m2;  x += CrossAttn(LN3_affine(x), ctx);
    x += FFN(LN(x)(1+m4) + m3) m5.
    """

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    @torch.compiler.nested_compile_region  # compiled once for all the identical blocks (a no-op in eager)
    def forward(self, x, e0, ctx, cross_kv, rope, past, chunk_tokens, kv_only=False):
        """x [B, F, S, D]; e0 [B, F or 1, 6, D] fp32; ctx [B, text_len, D] (used when cross_kv, the cached
        (k, v, bias) of WanModel.text_context, is None).

        Returns x (None with kv_only: the block stops after its K/V) and this block's (k, v) for the cache.
        """
        if e0.dtype != torch.float32:  # FSDP2's default input cast: the residual stream would be rounded too
            raise ValueError(f"block got the modulation in {e0.dtype}; shard with model.mixed_precision_policy()")
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e0).chunk(6, dim=2)  # each [B, F|1, 1, D]
        y, kv = self.self_attn.self_attention(self.norm1(x) * (1 + scale1) + shift1, rope, past, chunk_tokens,
                                              kv_only)
        if kv_only:
            return None, kv
        x = x + y * gate1
        x = x + self.cross_attn.cross_attention(self.norm3(x), *(cross_kv or self.cross_attn.cross_kv(ctx)))
        x = x + self.ffn(self.norm2(x) * (1 + scale2) + shift2) * gate2
        return x, kv


class Head(nn.Module):
    """Output head (REFERENCE §2.3 step 5): head(LN(x)(1 + scale) + shift), (shift, scale) = modulation + e."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = Linear32(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, F, S, D], e [B, F|1, D] fp32 -> [B, F, S, out_dim*prod(patch)] fp32."""
        shift, scale = (self.modulation + e[:, :, None]).chunk(2, dim=2)
        return self.head(self.norm(x.float()) * (1 + scale) + shift)


class WanModel(nn.Module):
    """Wan2.1 DiT (REFERENCE §2). causal=True: the block-causal student, chunks of chunk_frames latent frames (§3).

    forward(x [B,F,C,H,W], t [B] or [B,F], context [B,L,text_dim], cache=None, write_cache=False) -> v like x.
    Parameter names are the original Wan state-dict keys (§2.2).
    """

    def __init__(self, cfg: WanConfig, causal: bool = False, chunk_frames: int | None = None):
        super().__init__()
        if causal != (chunk_frames is not None) or (chunk_frames is not None and chunk_frames < 1):
            raise ValueError(f"chunk_frames (>= 1) goes with causal=True and only then; got causal={causal}, "
                             f"chunk_frames={chunk_frames}")
        self.cfg, self.causal, self.chunk_frames = cfg, causal, chunk_frames
        self.gradient_checkpointing = False  # per-block activation checkpointing for large-model training
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(Linear32(cfg.freq_dim, D), nn.SiLU(), Linear32(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear32(D, 6 * D))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.init_weights()

    def init_weights(self):
        """From-scratch init of Wan (REFERENCE §2.4): xavier Linears/patch conv, zero biases, normal(0.02) text/time
        MLPs, zero head weight; modulations keep randn/sqrt(D)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding.modules(), *self.time_embedding.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def new_cache(self, batch_size: int, window_frames: int | None = None, sink_frames: int = 0,
                  ema_alpha: float | None = None, rope: str = "relative") -> "KVCache":
        """An empty KV cache for streaming chunk by chunk (see KVCache for the geometry)."""
        if not self.causal:
            raise ValueError("new_cache needs the block-causal student: WanModel(cfg, causal=True, chunk_frames=k)")
        return KVCache(self.cfg.num_layers, batch_size, self.chunk_frames, window_frames, sink_frames, ema_alpha, rope)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] or [B, F] -> e [B, F|1, D] (for the head), e0 [B, F|1, 6, D] (for the blocks), fp32 (§2.3, §3.1)."""
        t = t if t.ndim == 2 else t[:, None]
        e = self.time_embedding(sinusoidal_embedding(t.flatten(), self.cfg.freq_dim).float())
        e0 = self.time_projection(e)
        return e.unflatten(0, t.shape), e0.unflatten(0, t.shape).unflatten(-1, (6, -1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cache: "KVCache | None" = None,
                write_cache: bool = False, kv_only: bool = False) -> torch.Tensor | None:
        """Flow prediction v = eps - x0 (REFERENCE §2.3): x [B,F,C,H,W], t [B] or [B,F] in [0, 1000],
        context [B, L <= text_len, text_dim] (zero-padded to text_len here) -> v [B,F,C,H,W] fp32.

        cache=None: full sequence (bidirectional, or block-causal over chunks of chunk_frames for the student).
        cache given: x is one chunk of chunk_frames frames attending [cached frames | chunk]; write_cache=True then
        appends the chunk's K/V to the cache (eviction / EMA-sink there). Gradient flows through the chunk only.
        kv_only (with write_cache): only the cache write, returns None; the last block stops after its K/V (its
        attention, cross-attention, FFN and the head would be thrown away: the refresh of dmd.generate_chunk).
        """
        t = torch.as_tensor(t, device=x.device)
        self.check_inputs(x, t, context, cache, write_cache)
        if kv_only and not write_cache:
            raise ValueError("kv_only=True computes only the cache write: it needs write_cache=True")
        _, nf, _, H, W = x.shape
        _, ph, pw = self.cfg.patch_size
        rope = self.rope_for(nf, H // ph, W // pw, cache, x.device)
        ctx, cross = self.text_context(context, cache)
        past = [cache.past(i, rope.past) for i in range(len(self.blocks))] if cache else None
        if past and past[0] and torch.is_grad_enabled():
            # the buffers change in place after this call, and the backward may read the past again (a checkpointed
            # block recomputes from its inputs): the graph gets a copy
            past = [(k[:, :n].clone(), v[:, :n].clone(), n) for k, v, n in past]
        # canonical strides, of size-1 dims too: a compiled core guards on them, and a chunk sliced from a clip (the
        # re-cache) would otherwise recompile the graph a generated chunk made
        x = x.clone(memory_format=torch.contiguous_format)
        out, new_kv = self.core(x, t, ctx, cross, rope, past, write_cache, kv_only)
        if write_cache:
            cache.write(new_kv, (H // ph) * (W // pw))
        return out

    def core(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor | None, cross: list | None, rope: RopeTables,
             past: list | None, write_cache: bool, kv_only: bool
             ) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The network on tensors only, between forward's cache reads and its cache write: patch and time embedding,
        the blocks, the head -> (v or None with kv_only, per-layer (k, v) of the chunk when write_cache, else []).

        No Python state is read or changed here, so `torch.compile(net.core, fullgraph=True)` compiles it whole
        (sample.py --compile, bench.py): the cache bookkeeping and the prompt check stay eager around it, and once
        the window is full every chunk has the same shapes, so nothing recompiles.
        """
        _, nf, _, H, W = x.shape
        _, ph, pw = self.cfg.patch_size
        gh, gw = H // ph, W // pw
        h = rearrange(self.patch_embedding(rearrange(x, "b f c h w -> b c f h w")), "b d f h w -> b f (h w) d")
        h = h.contiguous()  # a permuted residual stream would make every later op copy
        e, e0 = self.embed_time(t)
        chunk_tokens = self.chunk_frames * gh * gw if self.causal and past is None else None
        new_kv = []
        for i, block in enumerate(self.blocks):
            args = (h, e0, ctx, cross[i] if cross else None, rope, past[i] if past else None, chunk_tokens,
                    kv_only and i == len(self.blocks) - 1)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h, kv = checkpoint(block, *args, use_reentrant=False)
            else:
                h, kv = block(*args)
            if write_cache:  # else dropped at once: a no-graph forward would hold every layer's K/V to its end
                new_kv.append(kv)
        if kv_only:
            return None, new_kv
        out = self.head(h, e)
        return rearrange(out, "b f (h w) (ph pw c) -> b f c (h ph) (w pw)", h=gh, ph=ph, pw=pw), new_kv

    def check_inputs(self, x, t, context, cache, write_cache):
        """Clear errors before any work (shapes, chunk size, cache compatibility)."""
        cfg = self.cfg
        if x.ndim != 5 or x.shape[2] != cfg.in_dim:
            raise ValueError(f"x must be [B, F, {cfg.in_dim}, H, W] latents, got {tuple(x.shape)}")
        B, nf, _, H, W = x.shape
        _, ph, pw = cfg.patch_size
        if H % ph or W % pw:
            raise ValueError(f"latent H x W = {H} x {W} is not divisible by the patch ({ph}, {pw})")
        if not (t.shape == (B,) or t.shape == (B, nf)):
            raise ValueError(f"t must be [B]=[{B}] or [B, F]=[{B}, {nf}], got {tuple(t.shape)}")
        if t.dtype in (torch.bfloat16, torch.float16):  # e.g. FSDP2's default input cast: 937.5 -> 936
            raise ValueError(f"t must be fp32 or fp64, got {t.dtype}; shard with model.mixed_precision_policy()")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B={B}, L, text_dim={cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} rows, more than text_len={cfg.text_len}")
        if max(H // ph, W // pw) >= ROPE_MAX_POSITIONS:
            raise ValueError(f"token grid {H // ph} x {W // pw} reaches the RoPE table length {ROPE_MAX_POSITIONS}")
        if write_cache and cache is None:
            raise ValueError("write_cache=True needs a cache (net.new_cache(...))")
        if cache is None:
            if self.causal and nf % self.chunk_frames:
                raise ValueError(f"full-sequence causal forward needs a multiple of chunk_frames={self.chunk_frames} "
                                 f"frames, got {nf}")
            if nf > ROPE_MAX_POSITIONS:
                raise ValueError(f"{nf} frames exceed the RoPE table length {ROPE_MAX_POSITIONS}; stream with a cache")
            return
        if not self.causal or cache.chunk_frames != self.chunk_frames or len(cache.k) != cfg.num_layers:
            raise ValueError("this cache was not made by this model's new_cache")
        if nf != self.chunk_frames:
            raise ValueError(f"a chunk must have chunk_frames={self.chunk_frames} frames, got {nf}")
        if B != cache.batch_size:
            raise ValueError(f"batch {B} differs from the cache's batch_size {cache.batch_size}")
        if cache.tokens_per_frame not in (None, (H // ph) * (W // pw)):
            raise ValueError(f"chunk has {(H // ph) * (W // pw)} tokens per frame, cache holds "
                             f"{cache.tokens_per_frame}")
        if cache.rope == "absolute" and cache.frames_written + nf > ROPE_MAX_POSITIONS:
            raise ValueError(f"absolute RoPE positions up to {cache.frames_written + nf - 1} reach the table length "
                             f"{ROPE_MAX_POSITIONS} (REFERENCE §10.12); use rope='relative' for longer videos")

    def rope_for(self, nf: int, gh: int, gw: int, cache: "KVCache | None", device: torch.device) -> RopeTables:
        """Temporal positions: absolute 0..F-1 without a cache; [cache | chunk] -> 0..n-1 in relative mode (the chunk
        last, REFERENCE §3.7); absolute frame indices with keys cached roped in absolute mode (§3.5-3.6)."""
        new = torch.arange(nf, device=device)
        d = self.cfg.head_dim
        if cache is None:
            return RopeTables(rope_tables(new, gh, gw, d), None, False)
        # the chunk's first position fixes the tables (relative: past keys at 0..start-1); kept on the cache, not in a
        # module-level memo, so that bench.py's plan (fake tensors) and real runs never share a tensor
        start = cache.frames_written if cache.rope == "absolute" else cache.past_frames
        key = (start, nf, gh, gw)
        if cache.rope_memo is not None and cache.rope_memo[0] == key:
            return cache.rope_memo[1]
        if cache.rope == "absolute":
            tables = RopeTables(rope_tables(start + new, gh, gw, d), None, True)
        elif start + nf > ROPE_MAX_POSITIONS:
            raise ValueError(f"{start + nf} attended frames reach the RoPE table length {ROPE_MAX_POSITIONS}; "
                             f"set window_frames")
        else:
            past = rope_tables(torch.arange(start, device=device), gh, gw, d) if start else None
            tables = RopeTables(rope_tables(start + new, gh, gw, d), past, False)
        cache.rope_memo = key, tables
        return tables

    def text_context(self, context: torch.Tensor, cache: "KVCache | None"):
        """Zero-pad context to text_len rows (REFERENCE §2.3) and embed it; or reuse the cache's cross-attention K/V.

        The cached K/V are used only with autograd off: under grad they are recomputed so the text path keeps its
        gradient. They merge the padding added here (§10.17: attended, unmasked): the n = text_len - L >= 2 zero rows
        embed to one key and one value, and n equal terms exp(s) v are exp(s + log n) v, so the L rows plus one
        padding row with logit bias log n give the same attention. n comes from the shape, not the data (the same
        under bench.py's fake-tensor plan): a caller that passes only the rows it has (L < text_len) gets the merge.
        Returns (ctx [B, text_len, D] or None, per-layer (k, v, bias [1, L + 1] or None) or None).
        """
        n_pad = self.cfg.text_len - context.shape[1]
        if cache is None or torch.is_grad_enabled():
            return self.text_embedding(F.pad(context, (0, 0, 0, n_pad))), None
        # the same tensor object, unmodified in place since (its version counter): the same prompt, without
        # comparing [B, L, text_dim] values on every call
        if cache.cross_context is not context or cache.cross_version != context._version:
            cache.cross_context, cache.cross_version = context, context._version
            ctx = self.text_embedding(F.pad(context, (0, 0, 0, min(n_pad, 1))))  # n_pad <= 1: all rows
            bias = None
            if n_pad >= 2:
                bias = torch.zeros(1, ctx.shape[1], device=ctx.device)
                bias[0, -1] = math.log(n_pad)
            cache.cross_kv = [(*block.cross_attn.cross_kv(ctx), bias) for block in self.blocks]
        return None, cache.cross_kv


class KVCache:
    """Streaming self-attention K/V per layer, stored per latent frame, plus the prompt's cross-attention K/V.

    Geometry with window_frames=W, sink_frames=S and chunks of k frames (REFERENCE §3.6-3.7, DESIGN.md):
    - the first S frames ever written are the sink; a chunk attends [sink | most recent W-S frames incl. itself];
    - write(): append the chunk, then evict the oldest non-sink frames the next chunk will not see (keep W-S-k), and
      with ema_alpha fuse them into the sink per layer/token, K and V: sink = a*sink + (1-a)*evicted (§3.7; the
      evicted count must equal S, §10.3; accumulated in fp32, §10.26). ema_alpha=None: a fixed sink.
    - rope="relative": K cached before RoPE, positions 0..n-1 over [sink | window | chunk] at attention time
      (Reward Forcing; with W=None these are the absolute positions). rope="absolute": K cached after RoPE at
      absolute frame positions (Self-Forcing / LongLive geometry), capped at 1024 frames.
    Storage: per layer, buffers [B, capacity, S_tok, heads, head_dim] allocated once (capacity W; grown by doubling
    without a window) holding [sink | recent] in their first `past_frames` frames and, behind them, a slot for the
    chunk: without autograd a call writes its chunk's K/V into the slot and attention reads the buffers as they are
    (no [past | chunk] concatenation; fixed addresses, which CUDA graphs read in place: sample.compiled_core). k_buf
    holds the keys as cached, k_attn the keys as attended (relative mode: k_buf rotated at 0..past_frames-1 once per
    cache state; absolute: k_buf itself), v_buf the values. Memory is bounded by W frames. Written K/V are detached:
    the cache never holds an autograd graph.
    """

    def __init__(self, num_layers: int, batch_size: int, chunk_frames: int, window_frames: int | None,
                 sink_frames: int, ema_alpha: float | None, rope: str):
        if rope not in ("relative", "absolute"):
            raise ValueError(f"rope must be 'relative' or 'absolute', got {rope!r}")
        if sink_frames < 0 or (window_frames is not None and window_frames < sink_frames + chunk_frames):
            raise ValueError(f"need sink_frames >= 0 and window_frames >= sink_frames + chunk_frames; got "
                             f"window={window_frames}, sink={sink_frames}, chunk={chunk_frames}")
        if ema_alpha is not None:
            if not 0.0 <= ema_alpha <= 1.0:
                raise ValueError(f"ema_alpha must be in [0, 1], got {ema_alpha}")
            if window_frames is None or rope != "relative":
                raise ValueError("ema_alpha needs window_frames (eviction) and rope='relative' (position-free keys)")
            if sink_frames != chunk_frames or (window_frames - sink_frames) % chunk_frames:
                raise ValueError(f"EMA-sink fuses exactly sink_frames evicted frames per chunk (REFERENCE §10.3): "
                                 f"need sink_frames == chunk_frames and (window - sink) % chunk == 0; got window="
                                 f"{window_frames}, sink={sink_frames}, chunk={chunk_frames}")
        self.batch_size, self.chunk_frames = batch_size, chunk_frames
        self.window_frames, self.sink_frames, self.ema_alpha, self.rope = window_frames, sink_frames, ema_alpha, rope
        self.frames_written = 0  # frames ever written
        self.past_frames = 0  # frames cached now, the ones the next chunk attends (sink + recent)
        self.tokens_per_frame = None
        self.k_buf, self.v_buf = [None] * num_layers, [None] * num_layers  # the buffers (class doc)
        self.k_attn = self.k_buf if rope == "absolute" else [None] * num_layers
        self.roped = [False] * num_layers  # relative mode: k_attn[:past_frames] is k_buf rotated for this cache state
        self.sink32 = {}  # ("k" | "v", layer): fp32 EMA-sink behind a lower-precision sink
        self.rope_memo = None  # (geometry key, RopeTables) of the last forward: WanModel.rope_for
        self.cross_context, self.cross_version, self.cross_kv = None, None, None  # cross_kv: per layer (k, v, bias)

    @property
    def k(self) -> list[torch.Tensor | None]:
        """Cached keys per layer, as cached (before RoPE in relative mode): views [B, past_frames, S, heads, d]."""
        return [None if b is None or not self.past_frames else b[:, :self.past_frames] for b in self.k_buf]

    @property
    def v(self) -> list[torch.Tensor | None]:
        """Cached values per layer: views [B, past_frames, S, heads, head_dim]."""
        return [None if b is None or not self.past_frames else b[:, :self.past_frames] for b in self.v_buf]

    @property
    def sink_len(self) -> int:
        return min(self.frames_written, self.sink_frames)

    def past(self, layer: int, rot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(k_attn, v_buf, n = past_frames) of a layer: the buffers [B, capacity, S, heads, head_dim] whose first n
        frames attention reads and whose next chunk_frames frames are the chunk's slot; None when empty.

        rot (relative mode, RopeTables.past): k_attn[:n] = apply_rope(k_buf[:n], rot), computed once per
        cache state: the 4 denoising calls and the refresh of a chunk attend the same rotated keys. In the cache's
        dtype: with bf16 keys (bf16 parameters under autocast) attention reads them in bf16 anyway.
        """
        if not self.past_frames:
            return None
        if rot is not None and not self.roped[layer]:
            n, k = self.past_frames, self.k_buf[layer]
            self.k_attn[layer][:, :n] = apply_rope(k[:, :n].flatten(1, 2), rot).unflatten(1, (n, -1))
            self.roped[layer] = True
        return self.k_attn[layer], self.v_buf[layer], self.past_frames

    def changed(self) -> None:
        """Drop what was computed from the cached keys (k_attn in relative mode): called whenever k_buf changes."""
        self.roped = [False] * len(self.k_buf)

    def next_chunk_frames(self) -> tuple[list[int], list[int]]:
        """(absolute frame indices, temporal RoPE positions) of the keys the next chunk attends, itself last."""
        n_recent = self.past_frames - self.sink_len
        end = self.frames_written + self.chunk_frames
        frames = [*range(self.sink_len), *range(self.frames_written - n_recent, end)]
        return frames, frames if self.rope == "absolute" else list(range(len(frames)))

    def write(self, kv: list[tuple[torch.Tensor, torch.Tensor]], tokens_per_frame: int):
        """Append a chunk's per-layer (k, v) [B, k*S, heads, head_dim], detached; then evict / EMA-fuse (class doc)."""
        self.tokens_per_frame = tokens_per_frame
        nf = kv[0][0].shape[1] // tokens_per_frame
        n = self.past_frames + nf
        keep = None if self.window_frames is None else self.window_frames - self.sink_frames - self.chunk_frames
        sink_after = min(self.frames_written + nf, self.sink_frames)
        n_evict = 0 if keep is None else max(n - sink_after - keep, 0)
        for i, (k, v) in enumerate(kv):
            for name, bufs, z in (("k", self.k_buf, k), ("v", self.v_buf, v)):
                z = z.detach().unflatten(1, (nf, tokens_per_frame))
                buf = self.reserve(bufs, i, z, n)
                buf[:, self.past_frames:n] = z
                if n_evict:
                    self.evict(buf[:, :n], (name, i), sink_after, n_evict)
            if self.k_attn is not self.k_buf:
                self.reserve(self.k_attn, i, self.k_buf[i], n)
        self.past_frames = n - n_evict
        self.frames_written += nf
        self.changed()

    def reserve(self, bufs: list, layer: int, like: torch.Tensor, frames: int) -> torch.Tensor:
        """bufs[layer] with room for `frames` frames and the next chunk's slot, allocated like `like` [B, f, ...] on
        first use: W frames with a window, else grown by doubling (the cached frames copied over)."""
        old, need = bufs[layer], self.window_frames or frames + self.chunk_frames
        if old is not None and old.shape[1] >= need:
            return old
        capacity = need if old is None or self.window_frames else max(need, 2 * old.shape[1])
        bufs[layer] = like.new_empty(like.shape[0], capacity, *like.shape[2:])
        if old is not None:
            bufs[layer][:, :self.past_frames] = old[:, :self.past_frames]
        return bufs[layer]

    def rewind(self, frames: int) -> None:
        """Drop the cached frames after the sink and set frames_written = `frames`, so that the frames from `frames` on
        are written again by write() (sample.py's re-cache at a prompt switch). `frames` is at most the oldest dropped
        frame (nothing dropped stays unwritten) and at least sink_len."""
        sink, oldest = self.sink_len, self.frames_written - (self.past_frames - self.sink_len)
        if not sink <= frames <= oldest:
            raise ValueError(f"rewind to a frame in [sink_len={sink}, oldest cached non-sink frame={oldest}], "
                             f"got {frames}")
        self.past_frames, self.frames_written = sink, frames
        self.changed()

    def evict(self, z: torch.Tensor, key: tuple[str, int], sink_len: int, n_evict: int) -> None:
        """In place on z [B, frames, ...]: drop the oldest n_evict non-sink frames, the rest moved up behind the sink;
        EMA: sink = a*sink + (1-a)*evicted in fp32: a bf16 sink would freeze (§10.26), so below fp32 the sink
        accumulates in sink32[key] and z holds it rounded."""
        if self.ema_alpha is not None:  # n_evict == sink_len: the geometry __init__ accepts (§10.3)
            sink, evicted = z[:, :sink_len], z[:, sink_len:sink_len + n_evict]
            fused = self.ema_alpha * self.sink32.get(key, sink).float() + (1 - self.ema_alpha) * evicted.float()
            if z.dtype != fused.dtype:
                self.sink32[key] = fused
            sink.copy_(fused)
        z[:, sink_len:z.shape[1] - n_evict] = z[:, sink_len + n_evict:].clone()  # the two ranges may overlap


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: original Wan, diffusers WanTransformer3DModel, ComfyUI, Self-Forcing-family .pt (REFERENCE §2.8-2.9)

DIFFUSERS_TO_WAN = [  # REFERENCE §2.8, applied in order to each diffusers key
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"_attn\.to_out\.0\.", "_attn.o."),
    (r"_attn\.to_([qkv])\.", r"_attn.\1."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
]
TRAINER_ENTRIES = ("generator_ema", "generator", "model", "critic")  # Self-Forcing / Stream-R1 / LongLive dicts (§2.9)


def read_checkpoint(src, which: str | None) -> tuple[dict, str]:
    """A path or dict as a flat {original Wan key: tensor} dict, with a description of the format. Nothing is read
    yet (checkpoint.open_weights): the values are LazyTensors or mmap'd tensors for files and folders."""
    if isinstance(src, dict):
        sd, fmt = src, "state dict"
    else:
        path = Path(src)
        if path.is_dir() and not any(path.glob("*.safetensors*")) and (path / "transformer").is_dir():
            path = path / "transformer"  # a diffusers pipeline folder
        sd, fmt = open_weights(path)
    entries = [name for name in TRAINER_ENTRIES if isinstance(sd.get(name), dict)]
    if entries:
        pick = which or next((n for n in TRAINER_ENTRIES[:3] if n in entries), None)
        if pick not in entries:
            raise KeyError(f"{fmt}: trainer checkpoint has entries {entries}; which={which!r} is not one of them")
        sd, fmt = sd[pick], f"{fmt}, trainer checkpoint entry '{pick}'"
    elif which is not None:
        raise KeyError(f"{fmt}: which={which!r} given but the checkpoint is a flat state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, (torch.Tensor, LazyTensor))]
    if bad:
        raise ValueError(f"{fmt}: non-tensor entries {bad[:5]}; not a state dict")
    sd = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in sd.items()}
    for prefix in ("model.diffusion_model.", "model."):  # ComfyUI, then Self-Forcing wrapper / Reward Forcing flat
        if sd and all(k.startswith(prefix) for k in sd):
            sd, fmt = {k[len(prefix):]: v for k, v in sd.items()}, f"{fmt}, prefix '{prefix}' stripped"
            break
    if any(k.startswith("condition_embedder.") or k == "scale_shift_table" for k in sd):
        converted = {}
        for k, v in sd.items():
            for pattern, repl in DIFFUSERS_TO_WAN:
                k = re.sub(pattern, repl, k)
            converted[k] = v
        return converted, f"{fmt}, diffusers WanTransformer3DModel names (converted)"
    return sd, f"{fmt}, original Wan names"


def load_wan_weights(net: WanModel, path_or_state_dict, which: str | None = None) -> str:
    """Load Wan DiT weights strictly; returns the detected format (REFERENCE §2.8-2.9, §10.20).

    Accepts original Wan safetensors (file, or folder/index json for shards), diffusers WanTransformer3DModel (file,
    folder or pipeline folder), ComfyUI (`model.diffusion_model.`), .pt/.pth trainer dicts with generator /
    generator_ema / critic / model entries (`model.` and `_fsdp_wrapped_module.` stripped; which picks the entry,
    default generator_ema, then generator, then model), or a flat dict (Reward Forcing release). Keys and shapes are
    checked from the headers before any tensor is read; then each rank reads only what it holds of an FSDP2-sharded
    `net` (checkpoint.load_shards). Parameters keep their dtype; a net on the meta device is materialised on the CPU.
    """
    sd, fmt = read_checkpoint(path_or_state_dict, which)
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint does not match the model (detected format: {fmt}). "
                         f"{len(missing)} missing, e.g. {missing[:5]}; {len(unexpected)} unexpected, e.g. "
                         f"{unexpected[:5]}; {len(shapes)} shape mismatches, e.g. {shapes[:5]}")
    load_shards(net, sd)
    return fmt


def save_wan_weights(net: WanModel, path: str | Path):
    """Write the weights as safetensors with original Wan key names, atomically (checkpoint.atomic_write)."""
    weights = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(Path(path), lambda p: save_file(weights, p))
