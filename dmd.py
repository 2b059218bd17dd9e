"""DMD distillation of a streaming video student (Self-Forcing recipe; REFERENCE.md §1, §3.4, §6, §10).

Paper objects, top to bottom: the flow-matching schedule, the DMD/critic timestep and exit-step samplers, the per-chunk
few-step procedure shared by training and sampling, the Self-Forcing rollout, the DMD gradient and generator loss, the
critic's flow loss, and the ODE initialisation.

Layouts: latents [B, F, C, H, W]; timesteps t are floats in [0, 1000], per sample [B] or per frame [B, F]. Every network
predicts the flow v = eps - x0 and is called as net(x, t, context[, cache=..., write_cache=...]) (model.py).
sigma = t / 1000 always, never a nearest-grid lookup (REFERENCE.md §10.14).
"""
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from model import KVCache, WanModel

NUM_TRAIN_TIMESTEPS = 1000  # t = 1000 * sigma (REFERENCE.md §1.3)
STUDENT_STEPS = (1000, 750, 500, 250)  # denoising_step_list before warping (§1.4)
STUDENT_SHIFT = 5.0  # generator shift (§1.3, §1.4)
DMD_T_MIN, DMD_T_MAX = 20, 980  # clamp of the DMD / critic timestep, int(0.02 * 1000), int(0.98 * 1000) (§1.5)
# The published trainers refresh the cache with add_noise(x0, eps, 0), which their nearest-grid lookup snaps to
# the smallest shift-5 training-grid time 1000 * shift5(1/1000) ~= 4.98 (sigma ~= 0.005, §3.4). Inference refreshes
# with the clean x0 (t = 0), our default everywhere (§10.15); pass this as refresh_t for the published variant.
PUBLISHED_TRAIN_REFRESH_T = NUM_TRAIN_TIMESTEPS * STUDENT_SHIFT * 1e-3 / (1 + (STUDENT_SHIFT - 1) * 1e-3)


# ----------------------------------------------------------------------------------------------------------------
# flow-matching schedule (§1.3, §1.4, §1.5)

def sigma(t: Tensor | float, shift: float = 1.0) -> Tensor | float:
    """Noise level of time t, warped by the shift (§1.3).

    s = t / 1000; sigma = shift * s / (1 + (shift - 1) * s). t: float or tensor of any shape; same shape out.
    """
    s = t / NUM_TRAIN_TIMESTEPS
    return shift * s / (1 + (shift - 1) * s)


def _frame_sigma(t: Tensor, x: Tensor) -> Tensor:
    """sigma(t) as float64 [B, F, 1, 1, 1] for latents x [B, F, C, H, W]; t is [B] (shared by all frames) or [B, F]."""
    if x.dim() != 5:
        raise ValueError(f"latents must be [B, F, C, H, W], got shape {tuple(x.shape)}")
    B, F = x.shape[:2]
    if t.shape == (B,):
        t = t[:, None].expand(B, F)
    if t.shape != (B, F):
        raise ValueError(f"t must be [B]={B} or [B, F]=[{B}, {F}] for latents {tuple(x.shape)}, got {tuple(t.shape)}")
    return sigma(t.double())[:, :, None, None, None]


def add_noise(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Forward flow-matching process (§1.3): x_t = (1 - sigma) x0 + sigma eps, sigma = t / 1000.

    x0, eps: [B, F, C, H, W]; t: [B] or [B, F]. Computed in float64, returned in x0's dtype.
    """
    s = _frame_sigma(t, x0)
    return ((1 - s) * x0.double() + s * eps.double()).to(x0.dtype)


def x0_from_flow(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """Clean estimate from a flow prediction v = eps - x0 (§1.3): x0 = x_t - sigma v, sigma = t / 1000.

    x_t, v: [B, F, C, H, W]; t: [B] or [B, F]. Computed in float64, returned in x_t's dtype; differentiable in v.
    """
    return (x_t.double() - _frame_sigma(t, x_t) * v.double()).to(x_t.dtype)


def warped_steps(steps: tuple[float, ...] = STUDENT_STEPS, shift: float = STUDENT_SHIFT) -> list[float]:
    """The student's few-step times (§1.4, `warp_denoising_step`): t_i' = 1000 * sigma(t_i, shift).

    Self-Forcing reads grid[1000 - t_i] of the shifted training grid sigma_j = shift(1 - j/1000), which is exactly this.
    Defaults give [1000, 937.5, 833.33, 625] (shift 5).
    """
    if not steps or any(not 0 < s <= NUM_TRAIN_TIMESTEPS for s in steps):
        raise ValueError(f"steps must be a non-empty list of times in (0, {NUM_TRAIN_TIMESTEPS}], got {steps}")
    return [float(NUM_TRAIN_TIMESTEPS * sigma(s, shift)) for s in steps]


def sample_dmd_timestep(batch: int, shift: float = STUDENT_SHIFT, t_min: float = DMD_T_MIN, t_max: float = DMD_T_MAX,
                        generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """DMD / critic timestep, one per sample shared by all frames (§1.5).

    t_raw ~ U{0, ..., 999}; t = clamp(1000 * sigma(t_raw, shift), t_min, t_max). Returns float32 [batch], drawn on the
    generator's device (CPU without one), then moved to `device`.
    """
    draw_device = generator.device if generator is not None else "cpu"
    t_raw = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator, device=draw_device)
    t = (NUM_TRAIN_TIMESTEPS * sigma(t_raw.double(), shift)).clamp(t_min, t_max).float()
    return t.to(device) if device is not None else t


def sample_exit_step(num_steps: int, device: torch.device | str, generator: torch.Generator | None = None) -> int:
    """Random exit step k ~ U{0, ..., num_steps - 1} of a rollout (§6.1 item 3).

    With torch.distributed initialised, rank 0's draw is broadcast so every rank exits at the same step. `device` must
    suit the process group's backend (CPU for gloo, the rank's GPU for NCCL).
    """
    draw_device = generator.device if generator is not None else "cpu"
    k = torch.randint(0, num_steps, (1,), generator=generator, device=draw_device).to(device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(k, src=0)
    return int(k.item())


def sample_window_start(rollout_frames: int, window_frames: int, chunk_frames: int, device: torch.device | str) -> int:
    """Start frame of the supervised window in a long rollout (LongLive's long tuning, REFERENCE §3.6): uniform over
    the chunk boundaries 0, k, 2k, ... with the window of window_frames inside rollout_frames. Rank 0's draw is
    broadcast (every rank runs the same number of student forwards, which FSDP2 needs). No draw when the rollout is
    the window itself, so runs without long tuning keep their random stream."""
    choices = (rollout_frames - window_frames) // chunk_frames + 1
    if choices == 1:
        return 0
    s = torch.randint(0, choices, (1,)).to(device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(s, src=0)
    return int(s.item()) * chunk_frames


# ----------------------------------------------------------------------------------------------------------------
# Self-Forcing rollout (§3.4, §6.1)

def _full_t(x: Tensor, t: float) -> Tensor:
    """Per-frame time [B, F] filled with t for latents x [B, F, C, H, W]."""
    return torch.full(x.shape[:2], float(t), dtype=torch.float32, device=x.device)


def _randn_like(x: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """N(0, 1) noise like x [B, ...]; a list of B generators draws each sample's noise from its own, so a sample's
    noise does not depend on the batch it is in (sample.py's seeds)."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def generate_chunk(student: WanModel, noise: Tensor, context: Tensor, cache: KVCache, steps: list[float],
                   exit_step: int | None = None, refresh_t: float = 0.0,
                   generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
    """Few-step generation of one chunk, then the cache refresh (§1.4, §3.4); used by training and sampling alike.

    x = noise; for i = 0..exit_step: x0 = x - sigma_i * student(x, t_i) reading the cache;
    if i < exit_step: x = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps' with FRESH eps' (not an ODE step).
    Steps before exit_step run without graph; the exit step runs in the caller's grad mode, so its x0 carries the only
    gradient ("stochastic gradient truncation", §6.1 item 5). Then one no-graph forward at refresh_t writes the chunk's
    K/V into the cache: the clean x0 at refresh_t = 0 (inference and our training default, §10.15), else
    add_noise(x0, eps'', refresh_t) (PUBLISHED_TRAIN_REFRESH_T reproduces the published trainers).
    noise: [B, k, C, H, W] (k = student.chunk_frames); steps: times, e.g. warped_steps(); exit_step: index into steps
    (None: the last); generator: one, or one per sample (_randn_like). Returns x0 [B, k, C, H, W].
    """
    exit_step = len(steps) - 1 if exit_step is None else exit_step
    if not 0 <= exit_step < len(steps):
        raise ValueError(f"exit_step must index steps (0..{len(steps) - 1}), got {exit_step}")
    if refresh_t < 0:
        raise ValueError(f"refresh_t must be >= 0, got {refresh_t}")
    x = noise
    for i in range(exit_step + 1):
        t = _full_t(x, steps[i])
        with torch.set_grad_enabled(torch.is_grad_enabled() and i == exit_step):
            x0 = x0_from_flow(x, student(x, t, context, cache=cache), t)
        if i < exit_step:
            x = add_noise(x0, _randn_like(x0, generator), _full_t(x0, steps[i + 1]))
    with torch.no_grad():  # no graph from x0 here, and the cache detaches what it stores
        t = _full_t(x0, refresh_t)
        x_refresh = add_noise(x0, _randn_like(x0, generator), t) if refresh_t > 0 else x0
        student(x_refresh, t, context, cache=cache, write_cache=True, kv_only=True)  # output unused
    return x0


def self_forcing_rollout(student: WanModel, noise: Tensor, context: Tensor, steps: list[float],
                         exit_step: int | None, cache_options: dict, refresh_t: float = 0.0,
                         generator: torch.Generator | None = None, grad_from: int = 0) -> Tensor:
    """Autoregressive self-rollout of the student, chunk by chunk (§6.1): the student trains on its own outputs.

    A fresh cache student.new_cache(B, **cache_options) per rollout; for each chunk of student.chunk_frames frames,
    generate_chunk with the same exit_step (`same_step_across_blocks`; draw it with sample_exit_step). The rollout may
    be longer than the cache window, so eviction and the EMA-sink happen in training as at inference (§10.1).
    Chunks that start before frame grad_from run without graph: in a long rollout only the supervised window after
    them trains, the earlier ones just fill the cache (LongLive's long tuning, §3.6).
    noise: [B, F, C, H, W], F a multiple of chunk_frames; context: [B, L, D]. Returns x0 [B, F, C, H, W]; with grad
    enabled, gradient reaches the student only through the exit-step forwards of the chunks from grad_from on.
    """
    k = student.chunk_frames
    if noise.dim() != 5 or noise.shape[1] % k:
        raise ValueError(f"noise must be [B, F, C, H, W] with F a multiple of chunk_frames={k}, "
                         f"got {tuple(noise.shape)}")
    cache, grad, x0 = student.new_cache(noise.shape[0], **cache_options), torch.is_grad_enabled(), []
    for start, chunk in zip(range(0, noise.shape[1], k), noise.split(k, dim=1)):
        with torch.set_grad_enabled(grad and start >= grad_from):
            x0.append(generate_chunk(student, chunk, context, cache, steps, exit_step, refresh_t, generator))
    return torch.cat(x0, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# DMD generator and critic losses (§6.2, §6.3)

def _cfg_flow(net: WanModel, x_t: Tensor, t: Tensor, context: Tensor, negative_context: Tensor,
              guidance: float) -> Tensor:
    """Classifier-free guided flow v = v_uncond + w (v_cond - v_uncond), w as Wan users write it (§1.6, DESIGN.md).

    Conditional and unconditional branches share one forward (batch concatenated). A [1, L', D] negative context is
    expanded to the batch; contexts of different lengths are zero-padded to the longer one, which changes nothing
    because the model zero-pads every context to text_len (§2.3).
    """
    B = x_t.shape[0]
    if negative_context.shape[0] == 1:
        negative_context = negative_context.expand(B, -1, -1)
    if negative_context.shape[0] != B or negative_context.shape[2] != context.shape[2]:
        raise ValueError(f"negative_context {tuple(negative_context.shape)} does not match context "
                         f"{tuple(context.shape)} (batch B or 1, same width)")
    L = max(context.shape[1], negative_context.shape[1])
    both = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, L - c.shape[1])) for c in (context, negative_context)])
    v_cond, v_uncond = net(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def dmd_gradient(x0: Tensor, t: Tensor, noise: Tensor, teacher: WanModel, critic: WanModel,
                 context: Tensor, negative_context: Tensor, guidance: float) -> Tensor:
    """DMD gradient: difference of the fake and real scores in x0 space (DMD eq. 7/8; SF model/dmd.py; §6.2).

    x_t = add_noise(x0, noise, t); x0_real = x0_uncond + w (x0_cond - x0_uncond) from the frozen teacher (w in Wan's
    form: Self-Forcing's guidance_scale 3.0 is w = 4); x0_fake from the critic (no guidance);
    g = (x0_fake - x0_real) / mean_{F,C,H,W} |x0 - x0_real|, per sample, non-finite values zeroed: g = 0 for a sample
    exactly the teacher's (normaliser 0), where Self-Forcing's default nan_to_num gives the dtype's largest value.
    No graph. x0, noise: [B, F, C, H, W]; t: [B] (or [B, F]); context [B, L, D]; negative_context [B or 1, L', D].
    Returns g like x0.
    """
    with torch.no_grad():
        x0 = x0.detach()
        x_t = add_noise(x0, noise, t)
        x0_real = x0_from_flow(x_t, _cfg_flow(teacher, x_t, t, context, negative_context, guidance), t).double()
        x0_fake = x0_from_flow(x_t, critic(x_t, t, context), t).double()
        normaliser = (x0.double() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        g = ((x0_fake - x0_real) / normaliser).to(x0.dtype)
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def _broadcast_weight(weight: Tensor, x0: Tensor) -> Tensor:
    """Per-sample [B], per-position [B, F, 1, H, W] or full-shape weight, viewed to broadcast against x0."""
    B, F, C, H, W = x0.shape
    if weight.shape == (B,):
        return weight.view(B, 1, 1, 1, 1)
    if weight.shape in ((B, F, 1, H, W), x0.shape):
        return weight
    raise ValueError(f"weight must be [B]=[{B}], [B, F, 1, H, W]=[{B}, {F}, 1, {H}, {W}] or x0's shape "
                     f"{list(x0.shape)}, got {list(weight.shape)}")


def dmd_loss(x0: Tensor, g: Tensor, weight: Tensor | None = None) -> Tensor:
    """DMD generator loss (DMD2 eq. 7; SF model/dmd.py; §6.2), the single hook for Re-DMD and Stream-R1 weights.

    L = 0.5 * mean(weight * (x0 - sg(x0 - g))^2) in float64, so dL/dx0 = weight * g / N (N = x0.numel()).
    x0: [B, F, C, H, W] student rollout with graph; g: same shape, from dmd_gradient;
    weight: [B], [B, F, 1, H, W] or x0's shape, detached. Returns a float32 scalar.
    """
    if g.shape != x0.shape:
        raise ValueError(f"g must have x0's shape {list(x0.shape)}, got {list(g.shape)}")
    x = x0.double()
    sq = (x - (x - g.double()).detach()) ** 2
    if weight is not None:
        sq = _broadcast_weight(weight.detach().double(), x0) * sq
    return (0.5 * sq.mean()).float()


def critic_loss(critic: WanModel, x0: Tensor, t: Tensor, noise: Tensor, context: Tensor) -> Tensor:
    """Critic (fake score) flow-matching loss on the detached rollout (SF critic_loss, flow target; §6.3).

    x_t = add_noise(sg(x0), noise, t); L = mean((critic(x_t, t, context) - (noise - sg(x0)))^2).
    x0, noise: [B, F, C, H, W]; t: [B] or [B, F]; context: [B, L, D]. Returns a float32 scalar.
    """
    x0 = x0.detach()
    v = critic(add_noise(x0, noise, t), t, context)
    return ((v.float() - (noise - x0).float()) ** 2).mean()


# ----------------------------------------------------------------------------------------------------------------
# ODE initialisation (CausVid / Self-Forcing; §6.6)

@torch.no_grad()
def teacher_trajectory(teacher: WanModel, noise: Tensor, context: Tensor, negative_context: Tensor,
                       guidance: float = 6.0, num_steps: int = 48, shift: float = 8.0,
                       keep: tuple[int, ...] = (0, 12, 24, 36, -1)) -> Tensor:
    """The teacher's many-step Euler flow sampler with CFG, keeping states for ODE regression (SF ODE pairs; §6.6).

    sigma_i = shift(1 - i / num_steps), i = 0..num_steps (sigma_0 = 1, sigma_N = 0); x_0 = noise;
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * (v_u + w (v_c - v_u)) with t_i = 1000 sigma_i (w in Wan's form, §1.6).
    State i has time 1000 * sigma(1000 * (1 - i / num_steps), shift). keep indexes the states 0..num_steps
    (-1 = the final clean sample). noise: [B, F, C, H, W]; returns [B, len(keep), F, C, H, W].
    """
    if not keep or any(not -(num_steps + 1) <= i <= num_steps for i in keep):
        raise ValueError(f"keep must index the {num_steps + 1} states of a {num_steps}-step trajectory, got {keep}")
    sigmas = [sigma(1000.0 * (1 - i / num_steps), shift) for i in range(num_steps + 1)]
    wanted = [i % (num_steps + 1) for i in keep]
    x, kept = noise, {0: noise}  # only the kept states are held (48 full-size states would not fit beside a 14B)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:]), start=1):
        t = torch.full((x.shape[0],), NUM_TRAIN_TIMESTEPS * s, dtype=torch.float32, device=x.device)
        x = x + (s_next - s) * _cfg_flow(teacher, x, t, context, negative_context, guidance)
        if i in wanted:
            kept[i] = x
    return torch.stack([kept[i] for i in wanted], dim=1)


def ode_regression_loss(student: WanModel, trajectory: Tensor, context: Tensor, steps: list[float],
                        generator: torch.Generator | None = None) -> Tensor:
    """ODE regression of the block-causal student onto teacher trajectories (CausVid; SF ode_regression; §6.6).

    trajectory: [B, K, F, C, H, W] from teacher_trajectory, the last state clean. Per chunk of student.chunk_frames
    frames draw j ~ U{0..K-2} (shared within the chunk); the chunk's input is trajectory[:, j] at t = steps[j], so
    len(steps) must be K - 1 and steps[j] labels kept state j. As in Self-Forcing the labels are the student's
    few-step times (warped_steps(), shift 5), while the teacher states sit at 1000 * sigma(1000 (1 - keep_j / N),
    shift_teacher): the defaults pair states at 1000, 960, 888.9, 727.3 (N = 48, shift 8) with 1000, 937.5, 833.3, 625;
    pass those state times as steps, or build the trajectory at the student's shift, for an exact alignment.
    One full-sequence block-causal forward (no cache); L = mean over frames with t != 0 of |x0_from_flow - x_clean|^2.
    """
    B, K, F = trajectory.shape[:3]
    k = student.chunk_frames
    if trajectory.dim() != 6 or F % k or len(steps) != K - 1:
        raise ValueError(f"trajectory must be [B, K, F, C, H, W] with F a multiple of chunk_frames={k} and K - 1 = "
                         f"len(steps)={len(steps)}, got {tuple(trajectory.shape)}")
    draw_device = generator.device if generator is not None else "cpu"
    j = torch.randint(0, K - 1, (B, F // k), generator=generator, device=draw_device).to(trajectory.device)
    j = j.repeat_interleave(k, dim=1)  # [B, F]: one state per chunk
    x = trajectory[torch.arange(B, device=trajectory.device)[:, None], j, torch.arange(F, device=trajectory.device)]
    t = torch.tensor(steps, dtype=torch.float32, device=trajectory.device)[j]
    x0 = x0_from_flow(x, student(x, t, context), t)
    mask = (t != 0).to(x0.dtype)[:, :, None, None, None]
    sq = (x0 - trajectory[:, -1]) ** 2 * mask
    return sq.sum() / (mask.sum() * sq[0, 0].numel()).clamp_min(1)


@torch.no_grad()
def ode_pairs(teacher: WanModel, parts, num_pairs: int, batch_size: int, guidance: float, num_steps: int,
              shift: float) -> tuple[Tensor, list[str]]:
    """Teacher trajectories for ode_regression_loss (CausVid / Self-Forcing ODE pairs, §6.6): per batch, prompts from
    parts.sample_prompts(batch_size), fresh noise [B, *parts.latent_shape()], teacher_trajectory with the default
    kept states. `parts`: config.Components. Returns (trajectories [N, K, F, C, H, W] on CPU, their N prompts),
    N = batch_size * ceil(num_pairs / batch_size)."""
    trajs, prompts = [], []
    quiet = dist.is_initialized() and dist.get_rank() != 0
    for _ in tqdm(range(0, num_pairs, batch_size), desc="ode pairs", disable=quiet):
        p = parts.sample_prompts(batch_size)
        noise = torch.randn(batch_size, *parts.latent_shape(), device=parts.device)
        trajs.append(teacher_trajectory(teacher, noise, parts.context(p), parts.negative_context(len(p)),
                                        guidance=guidance, num_steps=num_steps, shift=shift).cpu())
        prompts += p
    return torch.cat(trajs), prompts
