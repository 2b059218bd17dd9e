"""weighting.py: Stream-R1 / Re-DMD weights against hand-computed values and SR1's loop-form rules (REFERENCE §8.3),
fp32 CPU."""
import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from weighting import (RewardBalancer, fuse_saliency, inter_reliability_weight, intra_perplexity_weights, re_dmd_weight,
                       render_weight_map)


def test_inter_reliability_and_re_dmd_weights_are_exp_beta_r_without_gradient():
    r = torch.tensor([-1.0, 0.0, 0.5], requires_grad=True)
    for w, beta in ((inter_reliability_weight(r), 2.0), (re_dmd_weight(r, beta=1.5), 1.5)):
        assert not w.requires_grad, "weights must be detached"
        assert torch.allclose(w, torch.exp(beta * r.detach())), f"got {w.tolist()}, expected exp({beta} r)"
    w = inter_reliability_weight(r, normalize=True)
    expect = torch.exp(2 * r.detach()) / torch.exp(2 * r.detach()).mean()
    assert torch.allclose(w, expect) and abs(w.mean().item() - 1) < 1e-6, f"normalized weights {w.tolist()}: mean != 1"


def _normalize_worker(rank: int, world: int, init_file: str, out_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    r = [torch.tensor([0.0, 1.0]), torch.tensor([2.0])][rank]  # unequal local batches
    w = inter_reliability_weight(r, normalize=True)
    torch.save(w, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_inter_reliability_normalize_averages_over_the_global_batch():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_normalize_worker, args=(2, os.path.join(d, "init"), os.path.join(d, "w")), nprocs=2)
        w = [torch.load(os.path.join(d, f"w.{k}")) for k in range(2)]
    mean = (1 + math.e ** 2 + math.e ** 4) / 3
    expect = [torch.tensor([1.0, math.e ** 2]) / mean, torch.tensor([math.e ** 4]) / mean]
    for k in range(2):
        assert torch.allclose(w[k], expect[k], rtol=1e-6), f"rank {k}: {w[k].tolist()}, expected {expect[k].tolist()}"


# -------------------------------------------------------------------------------- balancing

# (z_VQ, z_MQ, z_TA) per call, window 4, warm-up 3, lam 0.5; r_final by hand from REFERENCE §8.3
SEQUENCE = [([1, 0, 0], 1 / 3),                          # before warm-up: r = mean z
            ([2, 0, 1], 1.0),
            ([3, 0, 2], 5 / 3),                          # warm-up reached but only 3 entries per axis: still no penalty
            ([4, 1, 3], 8 / 3 - 0.5 * math.sqrt(0.75)),  # Delta = (2, 0.5, 2): std_unbiased = sqrt(0.75)
            ([0, 0, 0], 0.0 - 0.5 * 0.5)]                # window slides: Delta = (-0.5, 0.5, 0): std = 0.5


def test_balancer_penalty_zero_before_warmup_then_lam_std_delta():
    bal = RewardBalancer(window=4, warmup=3, lam=0.5)
    for k, (z, expect) in enumerate(SEQUENCE):
        got = bal.update(torch.tensor([z], dtype=torch.float32))
        assert got.shape == (1,) and abs(got.item() - expect) < 1e-6, \
            f"call {k + 1}: r_final {got.item():.6f}, expected {expect:.6f}"


def test_balancer_batch_appends_every_rollout_and_shares_the_penalty():
    bal = RewardBalancer(window=4, warmup=3, lam=0.5)
    bal.update(torch.tensor([z for z, _ in SEQUENCE[:2]], dtype=torch.float32))
    got = bal.update(torch.tensor([z for z, _ in SEQUENCE[2:4]], dtype=torch.float32))
    p = 0.5 * math.sqrt(0.75)  # history after 4 rollouts, as in the B = 1 sequence
    assert torch.allclose(got, torch.tensor([5 / 3 - p, 8 / 3 - p])), f"got {got.tolist()}"


def test_balancer_leaves_non_finite_rewards_out_of_its_history():
    a, b = RewardBalancer(window=4, warmup=3, lam=0.5), RewardBalancer(window=4, warmup=3, lam=0.5)
    for z, _ in SEQUENCE[:4]:
        a.update(torch.tensor([z], dtype=torch.float32))
        b.update(torch.tensor([z], dtype=torch.float32))
    got = a.update(torch.tensor([[float("nan"), 0.0, 0.0], SEQUENCE[4][0]]))
    assert math.isnan(got[0]) and torch.allclose(got[1:], b.update(torch.tensor([SEQUENCE[4][0]], dtype=torch.float32)))
    assert a.state_dict() == b.state_dict(), "the NaN row must not enter the history"


def test_balancer_state_round_trip_through_json():
    a = RewardBalancer(window=4, warmup=3, lam=0.5)
    for z, _ in SEQUENCE[:4]:
        a.update(torch.tensor([z], dtype=torch.float32))
    b = RewardBalancer(window=50, warmup=50, lam=0.1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    z = torch.tensor([SEQUENCE[4][0]], dtype=torch.float32)
    assert b.state_dict() == a.state_dict() and torch.equal(a.update(z), b.update(z)), "restored balancer diverges"


# -------------------------------------------------------------------------------- saliency fusion

def test_fuse_saliency_favours_the_lower_scoring_axis():
    maps = torch.zeros(1, 3, 2, 3, 4)
    maps[0, 0, 0, 0, 0] = maps[0, 1, 1, 2, 3] = maps[0, 2, 0, 1, 1] = 1.0  # each axis hot in its own spot
    z = torch.tensor([[0.5, -1.5, 1.0]])  # MQ scores lowest
    fused = fuse_saliency(maps, z)
    a = torch.softmax(torch.tensor([-0.5, 1.5, -1.0]), 0)
    assert fused.shape == (1, 2, 3, 4)
    assert torch.allclose(fused[0, 1, 2, 3], a[1]) and torch.allclose(fused[0, 0, 0, 0], a[0]), "fused != sum_m a_m S_m"
    assert fused.max() == fused[0, 1, 2, 3], "the weakest axis' hot spot must dominate the fused map"
    flat = fuse_saliency(maps, z, temperature=1e6)
    assert torch.allclose(flat, maps.mean(1), atol=1e-6), "a very high temperature must average the axes"


# -------------------------------------------------------------------------------- intra-perplexity

def sr1_loop_reference(S: np.ndarray, s_min=0.15, t_min=0.2, s_t=1.0, s_s=1.0) -> np.ndarray:
    """SR1's factorised normalisation written frame by frame (REFERENCE §8.3), float64."""
    n_f = S.shape[0]
    tau = np.array([S[f].mean() for f in range(n_f)])
    rng = tau.max() - tau.min()
    tau_n = (tau - tau.min()) / rng if rng > 1e-8 else np.ones(n_f)
    w_t = np.maximum((1 - s_t) + s_t * tau_n, t_min)
    w_t = w_t / w_t.mean()
    W = np.empty_like(S)
    for f in range(n_f):
        rng = S[f].max() - S[f].min()
        s_n = (S[f] - S[f].min()) / rng if rng > 1e-8 else np.ones_like(S[f])
        w_s = np.maximum((1 - s_s) + s_s * s_n, s_min)
        if w_s.mean() > 1e-8:
            w_s = w_s / w_s.mean()
        W[f] = w_t[f] * w_s
    return W / W.mean()


def test_intra_perplexity_weights_match_sr1_loops_means_and_floors():
    torch.manual_seed(0)
    S = torch.rand(2, 5, 6, 7) ** 3
    W = intra_perplexity_weights(S)
    assert W.shape == (2, 5, 1, 6, 7) and not W.requires_grad
    for b in range(2):
        ref = sr1_loop_reference(S[b].double().numpy())
        err = np.abs(W[b, :, 0].double().numpy() - ref).max()
        assert err < 1e-5, f"sample {b} differs from SR1's loop form by {err}"
        frame_means = W[b, :, 0].mean((1, 2))
        assert abs(W[b].mean().item() - 1) < 1e-5, f"mean weight {W[b].mean().item()}, expected 1"
        assert frame_means.min() / frame_means.max() >= 0.2 - 1e-6, "temporal floor 0.2 violated"
        within = W[b, :, 0].flatten(1)
        assert (within.amin(1) / within.amax(1)).min() >= 0.15 - 1e-6, "spatial floor 0.15 violated"
    ref = sr1_loop_reference(S[0].double().numpy(), 0.5, 0.3, 0.6, 0.4)
    got = intra_perplexity_weights(S[0], 0.5, 0.3, temporal_strength=0.6, spatial_strength=0.4)
    err = np.abs(got[:, 0].double().numpy() - ref).max()
    assert got.shape == (5, 1, 6, 7) and err < 1e-5, f"strengths / floors not applied: off by {err}"


def test_unfactorised_intra_weights_are_sr1_global_path_and_keep_frame_saliency():
    """SR1 without temporal_saliency_weighting: one min-max over [F, h, w], floor, mean 1 (its else branch)."""
    torch.manual_seed(0)
    S = torch.rand(2, 5, 6, 7) ** 3
    S[:, 2] *= 4  # one frame much more salient than the rest
    W = intra_perplexity_weights(S, spatial_floor=0.15, factorised=False)
    assert W.shape == (2, 5, 1, 6, 7)
    for b in range(2):
        x = S[b].double().numpy()
        ref = np.maximum((x - x.min()) / (x.max() - x.min()), 0.15)
        ref = ref / ref.mean()
        err = np.abs(W[b, :, 0].double().numpy() - ref).max()
        assert err < 1e-5, f"sample {b} differs from SR1's global normalisation by {err}"
        frame_means = W[b, :, 0].mean((1, 2))
        others = frame_means[[0, 1, 3, 4]]
        assert frame_means[2] > 1.5 * others.max(), \
            f"the salient frame must keep more weight, frame means {frame_means.tolist()}"
    half = intra_perplexity_weights(S[0], spatial_floor=0.3, spatial_strength=0.5, factorised=False)[:, 0].double()
    x = S[0].double()
    ref = (0.5 + 0.5 * (x - x.min()) / (x.max() - x.min())).clamp_min(0.3)
    assert torch.allclose(half, ref / ref.mean(), atol=1e-5), "strength / floor not applied on the global path"


@pytest.mark.parametrize("fill", [0.0, 3.7])
def test_intra_perplexity_weights_of_constant_saliency_are_ones(fill):
    W = intra_perplexity_weights(torch.full((4, 3, 5), fill))
    assert torch.equal(W, torch.ones(4, 1, 3, 5)), f"constant saliency {fill} gave weights in [{W.min()}, {W.max()}]"


def test_intra_perplexity_weights_one_hot_spot():
    S = torch.zeros(3, 4, 5)
    S[1, 2, 3] = 1.0
    W = intra_perplexity_weights(S)[:, 0]
    w_t = torch.tensor([0.2, 1.0, 0.2]) / (1.4 / 3)  # temporal: hot frame 1, others at the floor
    w_s = torch.full((4, 5), 0.15)
    w_s[2, 3] = 1.0
    w_s = w_s / w_s.mean()  # hot frame: spot 1, rest at the floor 0.15
    expect = torch.stack([torch.full((4, 5), w_t[0]), w_t[1] * w_s, torch.full((4, 5), w_t[2])])
    assert torch.allclose(W, expect, atol=1e-5), f"hot spot weight {W[1, 2, 3]:.4f} (expected {expect[1, 2, 3]:.4f})"


def test_intra_perplexity_weights_reject_nan():
    with pytest.raises(ValueError, match="NaN"):
        intra_perplexity_weights(torch.tensor([[[float("nan")]]]))


# -------------------------------------------------------------------------------- rendering

def test_render_weight_map_heat_follows_the_weight(tmp_path):
    T, H, W, F, h, w = 9, 32, 48, 3, 4, 6
    frames = torch.zeros(T, 3, H, W)
    S = torch.ones(F, h, w)
    S[:, h // 2:] = 4.0  # the lower half is salient, as in SR1's blur stress test
    weight = intra_perplexity_weights(S)
    path = render_weight_map(frames, weight, {"VQ": S, "MQ": S.flip(1)}, tmp_path / "w.png")
    img = np.asarray(Image.open(path)).astype(float)
    assert img.shape == (4 * H, F * W, 3), f"strip is {img.shape}, expected 4 rows of {H} x {F} columns of {W}"
    row = img[H:2 * H]  # the weight row
    redness = row[..., 0] - row[..., 2]
    top, bottom = redness[4:H // 2 - 2].mean(), redness[H // 2 + 2:].mean()  # away from the label and the blend seam
    assert bottom > top + 50, f"heat must follow the weight: red - blue top {top:.0f}, bottom {bottom:.0f}"
    with pytest.raises(ValueError, match="map 'VQ'"):
        render_weight_map(frames, weight, {"VQ": S[:2]}, tmp_path / "bad.png")
