"""Stream-R1 and Re-DMD loss weights from reward scores and reward-gradient saliency (REFERENCE §8).

Paper objects: the inter-reliability weight exp(beta * r_final) per rollout, Re-DMD's exp(beta * z_MQ), adaptive reward
balancing (r_final = mean_a z_a - lam * std_a(Delta_a)), saliency fusion favouring the weaker axis, and the
intra-perplexity weight W = w_t[f] * w_s[f, h, w] (the code's "Intra-Complexity", §8.1). Every weight is a
stop-gradient tensor for dmd_loss(weight=...). Layouts: per-rollout weights [B]; saliency [B, A, F, h, w] or
[B, F, h, w]; intra weights [B, F, 1, h, w], broadcast over latent channels. Defaults: SR1's shipped config
(§8.3, §8.4).
"""
import math
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor


def inter_reliability_weight(r_final: Tensor, beta: float = 2.0, normalize: bool = False) -> Tensor:
    """Stream-R1 inter-reliability: w = exp(beta * r_final), one weight per rollout, no gradient (REFERENCE §8.3).

    r_final: [B]. normalize=True (beyond the paper): w / mean(w) over the global batch, all-reduced across processes
    when torch.distributed is initialized, so the weights only rank rollouts and the loss keeps plain DMD's scale.
    """
    w = torch.exp(beta * r_final.detach().float())
    if normalize:
        total = torch.stack([w.sum(), torch.tensor(float(w.numel()), device=w.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        w = w / (total[0] / total[1])
    return w


def re_dmd_weight(r_mq: Tensor, beta: float = 2.0) -> Tensor:
    """Reward Forcing's Re-DMD weight w = exp(beta * z_MQ) per rollout, no gradient (REFERENCE §8.2). r_mq: [B]."""
    return torch.exp(beta * r_mq.detach().float())


class RewardBalancer:
    """Adaptive reward balancing (SR1 BalancedOverall, REFERENCE §8.3).

    Per axis a, H_a holds the last `window` z-scores. update(z) appends each rollout's finite z, then returns
        r_final = mean_a z_a - lam * std_unbiased_a(Delta_a),  Delta_a = mean(H_a[h:]) - mean(H_a[:h]),
        h = max(1, |H_a| // 2),
    once `warmup` rollouts were seen and every |H_a| >= 4; before that the penalty is 0. The penalty is one number for
    all rollouts of a call: it rescales the loss and re-weights no axis (§10.9). With B = 1 per call this is SR1's
    per-micro-step rule; with B > 1 the history advances by B rollouts per call.
    """

    def __init__(self, window: int = 50, warmup: int = 50, lam: float = 0.5, num_axes: int = 3):
        if window < 4:
            raise ValueError(f"window must be >= 4 (the penalty needs 4 entries per axis), got {window}")
        self.window, self.warmup, self.lam, self.num_axes = window, warmup, lam, num_axes
        self.history = [deque(maxlen=window) for _ in range(num_axes)]
        self.seen = 0
        self.last_penalty = 0.0

    def penalty(self) -> float:
        """lam * std_unbiased(Delta) after warm-up, else 0."""
        if self.seen < self.warmup or any(len(h) < 4 for h in self.history):
            return 0.0
        deltas = []
        for h in self.history:
            v = torch.tensor(list(h), dtype=torch.float64)
            half = max(1, len(v) // 2)
            deltas.append(v[half:].mean() - v[:half].mean())
        return self.lam * torch.stack(deltas).std(unbiased=True).item()

    def update(self, z: Tensor) -> Tensor:
        """z: [B, num_axes] z-scored rewards (VQ, MQ, TA) -> r_final [B], no gradient."""
        if z.dim() != 2 or z.shape[1] != self.num_axes:
            raise ValueError(f"z must be [B, {self.num_axes}], got {tuple(z.shape)}")
        z = z.detach().float()
        for row in z.cpu().tolist():
            if not all(math.isfinite(v) for v in row):  # its loss is skipped; kept, it would poison `window` calls
                continue
            for h, v in zip(self.history, row):
                h.append(v)
            self.seen += 1
        self.last_penalty = self.penalty()
        return z.mean(1) - self.last_penalty

    def state_dict(self) -> dict:
        """JSON-friendly state for checkpoints."""
        return {"window": self.window, "warmup": self.warmup, "lam": self.lam, "seen": self.seen,
                "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["history"]) != self.num_axes:
            raise ValueError(f"balancer state has {len(state['history'])} axes, expected {self.num_axes}")
        self.window, self.warmup, self.lam, self.seen = state["window"], state["warmup"], state["lam"], state["seen"]
        self.history = [deque(h, maxlen=self.window) for h in state["history"]]
        self.last_penalty = self.penalty()


def fuse_saliency(maps: Tensor, z: Tensor, temperature: float = 1.0) -> Tensor:
    """Adaptive fusion S = sum_m softmax(-z / T)_m * S_m per sample: the weaker axis weighs more (REFERENCE §8.3).

    maps: [B, A, F, h, w]; z: [B, A] z-scores in the same axis order -> [B, F, h, w], no gradient.
    """
    if maps.dim() != 5 or z.shape != maps.shape[:2]:
        raise ValueError(f"maps must be [B, A, F, h, w] and z [B, A], got {tuple(maps.shape)} and {tuple(z.shape)}")
    a = torch.softmax(-z.detach().float() / temperature, dim=1)
    return torch.einsum("ba,bafhw->bfhw", a, maps.detach().float())


def _minmax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """(x - min) / (max - min) over dims; ones where the range is <= 1e-8 (SR1's degenerate case)."""
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    flat = (hi - lo) <= 1e-8
    return torch.where(flat, torch.ones_like(x), (x - lo) / torch.where(flat, torch.ones_like(hi), hi - lo))


def intra_perplexity_weights(S: Tensor, spatial_floor: float = 0.15, temporal_floor: float = 0.2,
                             temporal_strength: float = 1.0, spatial_strength: float = 1.0,
                             factorised: bool = True) -> Tensor:
    """Stream-R1 intra-perplexity weight by SR1's factorised normalisation (REFERENCE §8.3), per sample:

        tau_f  = mean_{h,w} S[f];  w_t = max((1 - s_t) + s_t * minmax_f(tau), tau_min);  w_t /= mean_f w_t
        w_s[f] = max((1 - s_s) + s_s * minmax_{h,w}(S[f]), sigma_min);  w_s[f] /= mean_{h,w} w_s[f]
        W = w_t[f] * w_s[f];  W /= mean W
    factorised=False is SR1 without temporal_saliency_weighting (its "+ spatial W_s" ablation row): one min-max over
    the whole clip, W = max((1 - s_s) + s_s * minmax_{f,h,w}(S), sigma_min), W /= mean W, so frames keep their
    relative saliency (tau_min and s_t unused).
    A constant map gives all ones. S: [B, F, h, w] or [F, h, w] -> [B, F, 1, h, w] or [F, 1, h, w], no gradient.
    """
    if S.dim() not in (3, 4):
        raise ValueError(f"saliency must be [B, F, h, w] or [F, h, w], got {tuple(S.shape)}")
    if not torch.isfinite(S).all():
        raise ValueError("saliency holds NaN or inf")
    x = S.detach().float()
    x = x[None] if x.dim() == 3 else x
    if factorised:
        tau = x.mean((2, 3))  # [B, F]
        w_t = ((1 - temporal_strength) + temporal_strength * _minmax(tau, (1,))).clamp_min(temporal_floor)
        w_t = w_t / w_t.mean(1, keepdim=True)
        w_s = ((1 - spatial_strength) + spatial_strength * _minmax(x, (2, 3))).clamp_min(spatial_floor)
        w_s = w_s / w_s.mean((2, 3), keepdim=True)
        W = w_t[:, :, None, None] * w_s
    else:
        W = ((1 - spatial_strength) + spatial_strength * _minmax(x, (1, 2, 3))).clamp_min(spatial_floor)
    W = (W / W.mean((1, 2, 3), keepdim=True))[:, :, None]
    return W[0] if S.dim() == 3 else W


def _heat(v: Tensor) -> Tensor:
    """Blue-cyan-green-yellow-red colour map: v [...] in [0, 1] -> [..., 3] in [0, 1]."""
    anchors = v.new_tensor([[0, 0, 1], [0, 1, 1], [0, 1, 0], [1, 1, 0], [1, 0, 0]])
    pos = v.clamp(0, 1) * (len(anchors) - 1)
    lo = pos.floor().long().clamp(max=len(anchors) - 2)
    frac = (pos - lo)[..., None]
    return anchors[lo] * (1 - frac) + anchors[lo + 1] * frac


def render_weight_map(frames: Tensor, weight: Tensor, saliency: dict[str, Tensor] | None, path: str | Path,
                      max_columns: int = 8, alpha: float = 0.55) -> Path:
    """Write a PNG strip showing where the loss is concentrated: the decoded frames, then the intra weight W, then one
    row per saliency axis, each a heat-map overlay with one colour scale per row (so temporal changes show).

    frames: [T, 3, H, W] in [-1, 1]; weight: [F, 1, h, w]; saliency: axis -> [F, h, w]. A column shows latent frame f
    over pixel frame round(f * (T-1) / (F-1)); at most max_columns latent frames, evenly spaced.
    """
    if frames.dim() != 4 or frames.shape[1] != 3 or weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"frames must be [T, 3, H, W] and weight [F, 1, h, w], "
                         f"got {tuple(frames.shape)} and {tuple(weight.shape)}")
    maps = {"weight": weight[:, 0], **(saliency or {})}
    n_f = weight.shape[0]
    for name, m in maps.items():
        if m.dim() != 3 or m.shape[0] != n_f:
            raise ValueError(f"map '{name}' must be [F={n_f}, h, w], got {tuple(m.shape)}")
    T, _, H, W = frames.shape
    cols = torch.linspace(0, n_f - 1, min(max_columns, n_f)).round().long()
    pix = ((frames.detach().float().cpu()[(cols * (T - 1) / max(n_f - 1, 1)).round().long()] + 1) / 2).clamp(0, 1)
    rows = [pix.permute(0, 2, 3, 1)]  # [columns, H, W, 3]
    for m in maps.values():
        m = F.interpolate(m.detach().float().cpu()[cols][:, None], size=(H, W), mode="bilinear", align_corners=False)
        rows.append((1 - alpha) * rows[0] + alpha * _heat(_minmax(m[:, 0], (0, 1, 2))))
    grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0)  # [rows * H, columns * W, 3]
    img = Image.fromarray((grid.numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(["frames", *maps]):
        draw.text((2, i * H + 2), name, fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
