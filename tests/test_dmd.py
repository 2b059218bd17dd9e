"""Tests for dmd.py: schedule values (REFERENCE.md §1.3-1.5), DMD gradient / loss / critic loss against hand-written
oracles with small test doubles, the exit step across gloo ranks, and rollout / ODE init on a tiny real WanModel
(fp32, CPU)."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dmd
from model import WanConfig, WanModel

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=16, text_len=8)
LATENT = (4, 4, 4)  # C, H, W of the tiny latents


# ---------------------------------------------------------------------------------------------------------------
# schedule

def test_warped_steps_match_reference_values():
    # REFERENCE.md §1.4: shift 5 -> [1000, 937.5, 833.33, 625]; shift 8 -> [1000, 960, 888.9, 727.3]
    for shift, want in ((5.0, [1000.0, 937.5, 2500 / 3, 625.0]), (8.0, [1000.0, 960.0, 8000 / 9, 8000 / 11])):
        got = dmd.warped_steps((1000, 750, 500, 250), shift)
        assert got == pytest.approx(want, abs=1e-9), f"shift {shift}: {got} != {want}"
    assert dmd.warped_steps() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-9)
    with pytest.raises(ValueError, match="steps"):
        dmd.warped_steps((1000, 0))


def test_sigma_shift_formula_and_published_refresh_time():
    t = torch.tensor([0.0, 100.0, 500.0, 1000.0], dtype=torch.float64)
    assert torch.equal(dmd.sigma(t), t / 1000)
    s = t / 1000
    for k in (3.0, 5.0, 8.0):
        want = k * s / (1 + (k - 1) * s)
        assert torch.allclose(dmd.sigma(t, k), want, atol=1e-15), f"shift {k}"
    # §3.4: the published training refresh snaps to the smallest shift-5 grid time 1000 * shift5(0.001) ~= 4.98
    assert dmd.PUBLISHED_TRAIN_REFRESH_T == pytest.approx(4.98008, abs=1e-5)


def test_add_noise_and_x0_from_flow_invert_each_other_per_frame():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    t = torch.tensor([[1000.0, 500.0, 0.0], [937.5, 20.0, 625.0]])
    x_t = dmd.add_noise(x0, eps, t)
    s = (t / 1000)[:, :, None, None, None]
    assert torch.allclose(x_t, (1 - s) * x0 + s * eps, atol=1e-6)
    assert torch.equal(x_t[:, 2][0], x0[0, 2]), "t = 0 must return x0 unchanged"
    back = dmd.x0_from_flow(x_t, eps - x0, t)
    assert (back - x0).abs().max() < 1e-6, f"x0 round trip off by {(back - x0).abs().max():.2e}"
    # a [B] time broadcasts over frames
    t_b = torch.tensor([300.0, 700.0])
    assert torch.equal(dmd.add_noise(x0, eps, t_b), dmd.add_noise(x0, eps, t_b[:, None].expand(2, 3)))
    with pytest.raises(ValueError, match="t must be"):
        dmd.add_noise(x0, eps, torch.zeros(2, 2))


def test_dmd_timestep_sampler_is_shifted_uniform_clamped_to_20_980():
    t = dmd.sample_dmd_timestep(200_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert t.min() >= 20 and t.max() <= 980, f"range [{t.min()}, {t.max()}]"
    # every value is clamp(1000 * shift5(i / 1000)) for an integer i (§1.5)
    grid = (1000 * dmd.sigma(torch.arange(1000, dtype=torch.float64), 5.0)).clamp(20, 980).float()
    assert torch.isin(t, grid).all(), "a draw is off the shifted integer grid"
    # clamp rates: t_raw <= 4 -> 20 (0.5%), t_raw >= 908 -> 980 (9.2%); half of all draws above 833.3 (§1.5)
    rates = (("t == 20", t == 20, 0.005), ("t == 980", t == 980, 0.092), ("t > 833.4", t > 833.4, 0.499))
    for name, hit, want in rates:
        got = hit.float().mean()
        assert abs(got - want) < 0.004, f"{name}: rate {got:.4f}, expected {want}"


# ---------------------------------------------------------------------------------------------------------------
# exit step and long-tuning window start: identical on every rank

def _draws(seed: int) -> list[int]:
    """8 exit steps from a generator seeded `seed`, then 8 window starts of a 21-frame rollout (global RNG, seeded)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return [dmd.sample_exit_step(4, "cpu", g) for _ in range(8)] + [dmd.sample_window_start(21, 12, 3, "cpu")
                                                                    for _ in range(8)]


def _exit_step_worker(rank: int, world: int, init_file: str, out_dir: str, seeds: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(",".join(map(str, _draws(seeds[rank]))))
    finally:
        dist.destroy_process_group()


def test_exit_step_and_window_start_identical_across_two_gloo_ranks(tmp_path):
    seeds = [0, 1]
    local = [_draws(s) for s in seeds]
    assert local[0][:8] != local[1][:8] and local[0][8:] != local[1][8:], \
        "precondition: the two ranks' own draws must differ for this test to mean anything"
    procs = mp.start_processes(_exit_step_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), seeds), nprocs=2,
                               join=False, start_method="fork")  # fork: the children need not re-import torch
    deadline = time.monotonic() + 60
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("gloo ranks did not finish within 60 s")
    got = [[int(k) for k in (tmp_path / f"rank{r}.txt").read_text().split(",")] for r in range(2)]
    assert got[0] == got[1] == local[0], f"rank 0 {got[0]}, rank 1 {got[1]}, rank 0's own draws {local[0]}"


# ---------------------------------------------------------------------------------------------------------------
# DMD gradient, generator loss, critic loss (test doubles for the networks)

class AffineFlowNet(torch.nn.Module):
    """Test double: v = a x + t / 1000 + sum(context) / 100 per sample (zero rows change nothing, as in Wan §2.3)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a
        self.batches = []

    def forward(self, x, t, context):
        self.batches.append(x.shape[0])
        t = t[:, None] if t.dim() == 1 else t
        text = context.sum(dim=(1, 2))[:, None, None, None, None] / 100
        return self.a * x + (t / 1000)[:, :, None, None, None] + text


def _dmd_inputs(B=2, F=3, C=4, H=2, W=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, F, C, H, W, generator=g), torch.tensor([300.0, 850.0])[:B],
            torch.randn(B, F, C, H, W, generator=g), torch.randn(B, 5, 8, generator=g),
            torch.randn(1, 7, 8, generator=g))


def test_dmd_gradient_matches_separate_cfg_calls_in_x0_space():
    x0, t, noise, ctx, neg = _dmd_inputs()
    teacher, critic, w = AffineFlowNet(0.7), AffineFlowNet(-0.3), 4.0
    g = dmd.dmd_gradient(x0, t, noise, teacher, critic, ctx, neg, w)
    assert teacher.batches == [4] and critic.batches == [2], "teacher cond + uncond must share one batched forward"
    # oracle: two separate teacher calls, CFG in x0 space, per-sample normaliser (§6.2)
    x_t = dmd.add_noise(x0, noise, t)
    x0_c = dmd.x0_from_flow(x_t, teacher(x_t, t, ctx), t).double()
    x0_u = dmd.x0_from_flow(x_t, teacher(x_t, t, neg.expand(2, -1, -1)), t).double()
    x0_real = x0_u + w * (x0_c - x0_u)
    x0_fake = dmd.x0_from_flow(x_t, critic(x_t, t, ctx), t).double()
    want = (x0_fake - x0_real) / (x0.double() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    err = (g.double() - want).abs().max() / want.abs().max()
    assert g.shape == x0.shape and err < 1e-6, f"g differs from the two-call oracle by {err:.2e} (relative)"


def test_dmd_gradient_is_zero_for_a_sample_exactly_the_teachers():
    x0 = torch.zeros(2, 3, 4, 2, 2)
    t = torch.tensor([500.0, 500.0])
    zero_net = lambda x, t, c: torch.zeros_like(x)  # noqa: E731 -- x0_real = x_t - s*0 = 0 = x0: normaliser exactly 0
    ctx = torch.zeros(2, 5, 8)
    g_same = dmd.dmd_gradient(x0, t, torch.zeros_like(x0), zero_net, zero_net, ctx, ctx, 4.0)
    assert torch.equal(g_same, torch.zeros_like(x0)), "x0 == x0_real == x0_fake must give g = 0"
    one_net = lambda x, t, c: torch.ones_like(x)  # noqa: E731 -- fake != real while the normaliser is 0
    x0[1] = 1.0  # sample 1 differs from the teacher's x0_real = x_t = 0.5 x0 at t = 500
    g = dmd.dmd_gradient(x0, t, torch.zeros_like(x0), zero_net, one_net, ctx, ctx, 4.0)
    assert torch.equal(g[0], torch.zeros_like(g[0])), "normaliser 0 (x0 exactly the teacher's): g must be 0"
    assert torch.allclose(g[1], torch.full_like(g[1], -0.5 / 0.5)), "the other sample keeps its own normaliser"


@pytest.mark.parametrize("weight_shape", ["none", "B", "BF1HW", "full"])
def test_dmd_loss_gradient_is_weight_times_g_over_n(weight_shape):
    gen = torch.Generator().manual_seed(1)
    B, F, C, H, W = 2, 3, 4, 5, 6
    x0 = torch.randn(B, F, C, H, W, generator=gen).requires_grad_()
    g = torch.randn(B, F, C, H, W, generator=gen)
    shapes = {"none": None, "B": (B,), "BF1HW": (B, F, 1, H, W), "full": (B, F, C, H, W)}
    weight = None if shapes[weight_shape] is None else torch.rand(shapes[weight_shape], generator=gen) + 0.5
    loss = dmd.dmd_loss(x0, g, weight)
    loss.backward()
    wb = torch.ones(()) if weight is None else weight.view(B, 1, 1, 1, 1) if weight.dim() == 1 else weight
    n = x0.numel()
    want_grad = (wb.double() * g.double() / n).float()
    want_loss = (0.5 * (wb.double() * g.double() ** 2).mean()).float()
    assert torch.equal(x0.grad, want_grad), f"dL/dx0 != weight*g/N: max diff {(x0.grad - want_grad).abs().max():.2e}"
    assert torch.allclose(loss, want_loss, rtol=1e-6), f"loss {loss.item()} != 0.5 mean(w g^2) {want_loss.item()}"


def test_dmd_loss_rejects_bad_weight_shape_and_detaches_weight():
    x0, g = torch.randn(2, 3, 4, 5, 6, requires_grad=True), torch.randn(2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match=r"weight must be \[B\]"):
        dmd.dmd_loss(x0, g, torch.ones(2, 3))
    w = torch.rand(2, requires_grad=True)
    dmd.dmd_loss(x0, g, w).backward()
    assert w.grad is None, "the weight must carry no gradient"


def test_critic_loss_is_zero_for_the_true_flow_and_mse_otherwise():
    x0, t, noise, ctx, _ = _dmd_inputs()
    x0 = x0.requires_grad_()
    true_flow = lambda x_t, t, c: (noise - x0).detach()  # noqa: E731 -- the exact flow target eps - x0
    assert dmd.critic_loss(true_flow, x0, t, noise, ctx).item() == 0.0
    critic = AffineFlowNet(0.5)
    loss = dmd.critic_loss(critic, x0, t, noise, ctx)
    x_t = dmd.add_noise(x0.detach(), noise, t)
    want = ((critic(x_t, t, ctx) - (noise - x0.detach())) ** 2).mean()
    assert torch.allclose(loss, want, rtol=1e-6), f"{loss.item()} != {want.item()}"
    assert not loss.requires_grad, "the critic loss must not reach the student's rollout"


# ---------------------------------------------------------------------------------------------------------------
# ODE initialisation with test doubles

class ConstantFlowNet(torch.nn.Module):
    """Test double: v = sum(context) per sample, independent of x and t, so Euler is exact."""

    def forward(self, x, t, context):
        return context.sum(dim=(1, 2))[:, None, None, None, None].expand_as(x)


def test_teacher_trajectory_keeps_euler_states_with_cfg():
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 3, 4, 2, 2, generator=gen)
    ctx, neg = torch.randn(2, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    w, n, shift, keep = 6.0, 8, 3.0, (0, 2, 5, -1)
    traj = dmd.teacher_trajectory(ConstantFlowNet(), noise, ctx, neg, guidance=w, num_steps=n, shift=shift, keep=keep)
    assert traj.shape == (2, len(keep), 3, 4, 2, 2)
    v = (neg.sum() + w * (ctx.sum(dim=(1, 2)) - neg.sum()))[:, None, None, None, None]
    for slot, i in enumerate(keep):
        s = dmd.sigma(1000 * (1 - (i % (n + 1)) / n), shift)  # state i sits at sigma_i; x_i = noise + (sigma_i - 1) v
        want = noise + (s - 1) * v
        err = (traj[:, slot] - want).abs().max()
        assert err < 1e-5, f"kept state {i}: off by {err:.2e}"
    with pytest.raises(ValueError, match="keep"):
        dmd.teacher_trajectory(ConstantFlowNet(), noise, ctx, neg, num_steps=n, keep=(0, 9))


class RecordingStudent(torch.nn.Module):
    """Test double of the block-causal student: v = 0 (so x0 = x), records its inputs."""

    chunk_frames = 3

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context):
        self.calls.append((x, t))
        return torch.zeros_like(x)


def test_ode_regression_draws_one_kept_state_per_chunk_and_masks_t0():
    gen = torch.Generator().manual_seed(3)
    B, K, F = 2, 4, 9
    traj = torch.randn(B, K, F, 4, 2, 2, generator=gen)
    steps = [1000.0, 800.0, 0.0]  # a step at t = 0 is excluded from the loss, as in CausVid / SF
    student = RecordingStudent()
    loss = dmd.ode_regression_loss(student, traj, torch.zeros(B, 5, 8), steps, generator=gen)
    (x, t), = student.calls
    assert t.shape == (B, F)
    for b in range(B):
        for f in range(F):
            j = steps.index(t[b, f].item())
            assert torch.equal(x[b, f], traj[b, j, f]), f"sample {b} frame {f}: input is not kept state {j}"
        assert (t[b].view(-1, 3) == t[b].view(-1, 3)[:, :1]).all(), f"t not shared within chunks: {t[b].tolist()}"
    mask = t != 0
    assert mask.any() and not mask.all(), "precondition: the draw must include masked and unmasked chunks"
    want = ((x - traj[:, -1]) ** 2)[mask].mean()
    assert torch.allclose(loss, want, rtol=1e-6), f"loss {loss.item()} != masked MSE {want.item()}"
    with pytest.raises(ValueError, match="len\\(steps\\)"):
        dmd.ode_regression_loss(student, traj, torch.zeros(B, 5, 8), [1000.0, 500.0])


class IdentityStudent(torch.nn.Module):
    """Test double of the cached student: v = 0 (so x0 = x); records (x, t, write_cache) per call."""

    chunk_frames = 3

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context, cache=None, write_cache=False, kv_only=False):
        self.calls.append((x.clone(), t.clone(), write_cache))
        return None if kv_only else torch.zeros_like(x)


@pytest.mark.parametrize("refresh_t", [0.0, dmd.PUBLISHED_TRAIN_REFRESH_T])
def test_generate_chunk_renoises_with_fresh_noise_between_steps(refresh_t):
    noise = torch.randn(2, 3, *LATENT, generator=torch.Generator().manual_seed(9))
    student, steps = IdentityStudent(), [1000.0, 500.0, 250.0]
    x0 = dmd.generate_chunk(student, noise, torch.zeros(2, 6, 16), None, steps, refresh_t=refresh_t,
                            generator=torch.Generator().manual_seed(10))
    draws = torch.Generator().manual_seed(10)  # the same stream: one fresh draw per re-noising, then the refresh
    eps1, eps2, eps3 = (torch.randn(noise.shape, generator=draws) for _ in range(3))
    x1 = 0.5 * noise + 0.5 * eps1  # x0 of step 0 is the noise itself (v = 0), re-noised to sigma 0.5
    x2 = 0.75 * x1 + 0.25 * eps2
    s = refresh_t / 1000
    want_inputs = [noise, x1, x2, x2 if refresh_t == 0 else (1 - s) * x2 + s * eps3]
    want_t = steps + [refresh_t]
    assert [c[2] for c in student.calls] == [False, False, False, True], "three reads, then one cache write"
    for i, ((x, t, _), want, tw) in enumerate(zip(student.calls, want_inputs, want_t)):
        assert torch.allclose(t, torch.full((2, 3), tw)), f"call {i}: t {t[0, 0].item()} != {tw}"
        assert (x - want).abs().max() < 1e-6, f"call {i}: input off by {(x - want).abs().max():.2e}"
    assert torch.equal(x0, student.calls[2][0]), "the output is the last step's x0 (v = 0: its input)"


# ---------------------------------------------------------------------------------------------------------------
# rollout and ODE init on a tiny real WanModel (fp32, CPU)


def _tiny(causal: bool, seed: int) -> WanModel:
    torch.manual_seed(seed)
    net = WanModel(WanConfig(**TINY), causal=causal, chunk_frames=3 if causal else None)
    torch.nn.init.normal_(net.head.head.weight, std=0.1)  # Wan zero-inits the head: v would be 0 for every input
    return net


def _record_calls(student: WanModel) -> list[tuple[bool, bool, float]]:
    """Wrap forward to log (grad enabled, write_cache, t) per call."""
    calls, forward = [], student.forward

    def recording(x, t, context, cache=None, write_cache=False, kv_only=False):
        calls.append((torch.is_grad_enabled(), write_cache, round(t.flatten()[0].item(), 2)))
        return forward(x, t, context, cache=cache, write_cache=write_cache, kv_only=kv_only)

    student.forward = recording
    return calls


def _capture_caches(student: WanModel) -> list:
    caches, new_cache = [], student.new_cache
    student.new_cache = lambda *a, **kw: caches.append(new_cache(*a, **kw)) or caches[-1]
    return caches


def _replay_cache(student: WanModel, x0: torch.Tensor, ctx: torch.Tensor, options: dict):
    """A fresh cache written chunk by chunk with the given clean latents at t = 0 (no denoising)."""
    cache = student.new_cache(x0.shape[0], **options)
    with torch.no_grad():
        for chunk in x0.split(student.chunk_frames, dim=1):
            student(chunk, torch.zeros(chunk.shape[:2]), ctx, cache=cache, write_cache=True)
    return cache


def _max_cache_diff(a, b) -> float:
    same_layout = len(a.k) == len(b.k) and all(x.shape == y.shape for x, y in zip(a.k + a.v, b.k + b.v))
    assert same_layout, "cache layouts differ"
    return max((x - y).abs().max().item() for x, y in zip(a.k + a.v, b.k + b.v))


@pytest.fixture
def student():
    return _tiny(causal=True, seed=0)


def test_rollout_shape_and_gradient_only_through_exit_steps():
    gen = torch.Generator().manual_seed(4)
    B, F = 2, 9
    noise, ctx = torch.randn(B, F, *LATENT, generator=gen), torch.randn(B, 6, 16, generator=gen)
    steps, exit_step = dmd.warped_steps(), 2
    net = _tiny(causal=True, seed=0)
    calls, caches = _record_calls(net), _capture_caches(net)
    x0 = dmd.self_forcing_rollout(net, noise, ctx, steps, exit_step, {}, generator=torch.Generator().manual_seed(5))
    assert x0.shape == noise.shape and x0.requires_grad
    assert not any(z.requires_grad for z in caches[-1].k + caches[-1].v), "the cache must hold no graph"
    # per chunk: steps 0..exit-1 without graph, the exit step with graph, then the no-graph cache write at t = 0
    per_chunk = [(False, False, round(s, 2)) for s in steps[:exit_step]] + [(True, False, round(steps[exit_step], 2)),
                                                                          (False, True, 0.0)]
    assert calls == per_chunk * (F // 3), f"calls {calls}"
    x0.square().sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, "no gradient reached student"
    with torch.no_grad():  # the grad mode changes no number beyond rounding (same noise draws): without grad the
        # exit step attends the cached cross K/V with the padding rows merged (WanModel.text_context), with grad all rows
        again = dmd.self_forcing_rollout(net, noise, ctx, steps, exit_step, {},
                                         generator=torch.Generator().manual_seed(5))
    err = ((x0.detach() - again).norm() / again.norm()).item()
    assert err <= 1e-6, f"no-grad rollout differs: rel err {err:.2e}"
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        dmd.self_forcing_rollout(net, noise[:, :8], ctx, steps, exit_step, {})
    with pytest.raises(ValueError, match="exit_step"):
        dmd.self_forcing_rollout(net, noise, ctx, steps, 4, {})


def test_long_rollout_trains_only_its_supervised_window():
    """Long tuning (grad_from): the chunks before the window run without graph and change no number beyond rounding
    (without graph the cross-attention merges the padding rows, WanModel.text_context); the window's chunks keep
    their exit-step graph, and the window start is uniform over chunk boundaries."""
    gen = torch.Generator().manual_seed(8)
    noise, ctx = torch.randn(2, 15, *LATENT, generator=gen), torch.randn(2, 6, 16, generator=gen)
    net, options = _tiny(causal=True, seed=0), dict(window_frames=9, sink_frames=3, ema_alpha=0.5)
    calls = _record_calls(net)
    x0 = dmd.self_forcing_rollout(net, noise, ctx, dmd.warped_steps(), 1, options,
                                  generator=torch.Generator().manual_seed(9), grad_from=9)
    with_graph = [i // 3 for i, (grad, write, _) in enumerate(calls) if grad]  # 3 calls per chunk at exit step 1
    assert with_graph == [3, 4], f"forwards with graph in chunks {with_graph}; want only the window's chunks 3 and 4"
    with torch.no_grad():
        whole = dmd.self_forcing_rollout(net, noise, ctx, dmd.warped_steps(), 1, options,
                                         generator=torch.Generator().manual_seed(9))
    err = ((x0.detach() - whole).norm() / whole.norm()).item()
    assert err <= 1e-6, f"grad_from changed the rollout's values: rel err {err:.2e}"
    x0[:, 9:].sum().backward()
    assert all(p.grad is not None for p in net.parameters()), "the window's chunks must train the student"
    starts = [dmd.sample_window_start(21, 12, 3, "cpu") for _ in range(400)]
    assert set(starts) == {0, 3, 6, 9} and min(starts.count(s) for s in (0, 3, 6, 9)) > 60, \
        f"window starts not uniform over chunk boundaries: {sorted(set(starts))}"
    state = torch.get_rng_state()
    assert dmd.sample_window_start(12, 12, 3, "cpu") == 0 and torch.equal(torch.get_rng_state(), state), \
        "a rollout as long as its window must not draw (runs without long tuning keep their random stream)"


@pytest.mark.parametrize("rope", ["relative", "absolute"])
def test_rollout_refreshes_cache_with_the_clean_chunk(student, rope):
    gen = torch.Generator().manual_seed(6)
    noise, ctx = torch.randn(1, 9, *LATENT, generator=gen), torch.randn(1, 6, 16, generator=gen)
    options = dict(rope=rope)
    caches = _capture_caches(student)
    with torch.no_grad():
        x0 = dmd.self_forcing_rollout(student, noise, ctx, dmd.warped_steps(), 3, options, generator=gen)
    clean = _max_cache_diff(caches[-1], _replay_cache(student, x0, ctx, options))
    assert clean == 0.0, f"rollout cache differs from the cache written with the final x0 at t=0 by {clean:.2e}"
    # the published variant writes add_noise(x0, eps, 4.98): a different cache
    with torch.no_grad():
        x0 = dmd.self_forcing_rollout(student, noise, ctx, dmd.warped_steps(), 3, options,
                                      refresh_t=dmd.PUBLISHED_TRAIN_REFRESH_T, generator=gen)
    noisy = _max_cache_diff(caches[-1], _replay_cache(student, x0, ctx, options))
    assert noisy > 1e-4, f"refresh_t={dmd.PUBLISHED_TRAIN_REFRESH_T:.2f} left the clean-chunk cache (diff {noisy:.2e})"


def test_ema_sink_fires_when_rollout_is_longer_than_window(student):
    gen = torch.Generator().manual_seed(7)
    noise, ctx = torch.randn(1, 12, *LATENT, generator=gen), torch.randn(1, 6, 16, generator=gen)
    a = 0.5
    options = dict(window_frames=9, sink_frames=3, ema_alpha=a)
    caches = _capture_caches(student)
    with torch.no_grad():
        x0 = dmd.self_forcing_rollout(student, noise, ctx, dmd.warped_steps(), 3, options, generator=gen)
    cache = caches[-1]
    # K/V of chunks 0-2 as written: chunks 0-2 fit in the 9-frame window, so a cache without a window sees the same
    full = _replay_cache(student, x0, ctx, {})
    for layer in range(len(cache.k)):
        for got, ref in ((cache.k[layer], full.k[layer]), (cache.v[layer], full.v[layer])):
            c0, c1, c2 = ref[:, 0:3], ref[:, 3:6], ref[:, 6:9]
            assert got.shape[1] == 6, f"cache holds {got.shape[1]} frames; window 9 minus the next chunk's 3 is 6"
            moved = (got[:, :3] - c0).abs().max()
            assert moved > 1e-3, f"layer {layer}: the sink is still chunk 0's K/V (max change {moved:.2e})"
            # writing chunk 2 evicts chunk 1, writing chunk 3 evicts chunk 2 (REFERENCE §3.7)
            want = a * (a * c0 + (1 - a) * c1) + (1 - a) * c2
            err = (got[:, :3] - want).abs().max()
            assert err < 1e-5, f"layer {layer}: sink differs from the two EMA updates by {err:.2e}"


def test_ode_regression_loss_decreases_on_tiny_model():
    gen = torch.Generator().manual_seed(8)
    teacher, student = _tiny(causal=False, seed=1), _tiny(causal=True, seed=2)
    noise, ctx = torch.randn(2, 6, *LATENT, generator=gen), torch.randn(2, 6, 16, generator=gen)
    traj = dmd.teacher_trajectory(teacher, noise, ctx, torch.zeros(1, 6, 16), guidance=3.0, num_steps=8, shift=8.0,
                                  keep=(0, 2, 4, 6, -1))
    assert traj.shape == (2, 5, 6, *LATENT) and torch.equal(traj[:, 0], noise)
    steps = [1000 * dmd.sigma(1000 * (1 - i / 8), 8.0) for i in (0, 2, 4, 6)]  # the kept states' own times

    def loss_at(seed):
        return dmd.ode_regression_loss(student, traj, ctx, steps, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        before = sum(loss_at(s) for s in range(4)).item()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for i in range(10):
        opt.zero_grad()
        loss_at(100 + i).backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_at(s) for s in range(4)).item()
    assert after < 0.5 * before, f"ODE regression loss {before:.4f} -> {after:.4f} after 10 Adam steps"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dmd_step_runs_on_cuda_under_bf16_autocast():
    # precision mode: fp32 parameters under bf16 autocast (official Wan mode, REFERENCE §2.6); checks devices and dtypes
    dev = torch.device("cuda")
    student, teacher, critic = _tiny(True, 0).to(dev), _tiny(False, 1).to(dev), _tiny(False, 2).to(dev)
    noise, ctx = torch.randn(2, 12, *LATENT, device=dev), torch.randn(2, 6, 16, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x0 = dmd.self_forcing_rollout(student, noise, ctx, dmd.warped_steps(), dmd.sample_exit_step(4, dev),
                                      dict(window_frames=9, sink_frames=3, ema_alpha=0.99))
        t = dmd.sample_dmd_timestep(2, device=dev)
        neg = torch.zeros(1, 6, 16, device=dev)
        g = dmd.dmd_gradient(x0, t, torch.randn_like(x0), teacher, critic, ctx, neg, 4.0)
        loss = dmd.dmd_loss(x0, g, torch.rand(2, 12, 1, 4, 4, device=dev))
        closs = dmd.critic_loss(critic, x0, t, torch.randn_like(x0), ctx)
    loss.backward()
    closs.backward()
    assert x0.dtype == torch.float32 and g.device.type == "cuda" and torch.isfinite(g).all()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters()), "non-finite student gradient"
    assert all(torch.isfinite(p.grad).all() for p in critic.parameters()), "non-finite critic gradient"
