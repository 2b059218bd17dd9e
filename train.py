"""Training, all stages, one loop: teacher pretraining (toy world), ODE-regression init, and DMD with reward weighting.

    python train.py                                   # distills the built-in toy world on CPU (Stream-R1 weighting)
    python train.py --stage=teacher --max_steps=4000  # flow-matching pretraining of the toy teacher
    torchrun --nproc_per_node=8 train.py --config configs/wan1.3b_stream_r1.yaml

`dmd_step` is the paper's algorithm box (Self-Forcing + Stream-R1, REFERENCE.md §6, §8.3), each arrow one call into
dmd.py / weighting.py / the reward model: sample prompts -> self-forcing rollout -> DMD gradient -> reward weight ->
weighted DMD loss -> generator step (every gen_every-th step) -> critic step on a fresh no-grad rollout; `main` then
logs and checkpoints. `weighting` switches between plain DMD (`none`), Reward Forcing's Re-DMD (`re_dmd`,
exp(beta z_MQ)) and Stream-R1 (`stream_r1`); `spatial`, `temporal` and `balance` turn its components on one at a time.

Counters are optimizer steps: each step is one critic update, and every `gen_every`-th step also one generator
update first (Self-Forcing's dfake_gen_update_ratio); each update averages `grad_accum` micro-batches of
`batch_size` per rank (Stream-R1's correct accumulation, not Reward Forcing's broken one, REFERENCE §10.4).
The config and what it builds are in config.py, checkpoint I/O in checkpoint.py, the toy teacher's loss and the
held-out evaluation in toy.py.
"""
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_model
from tqdm import tqdm

import checkpoint
import dmd
import toy
import weighting
from config import (DDP, Components, Config, autocast, build_net, config_changes, everywhere, load_config, replicate,
                    setup_distributed, shard, sharded, teacher_mask)
from model import WanModel


# --------------------------------------------------------------------------------------------- one DMD step
def draw_inputs(cfg: Config, parts: Components) -> tuple[list[str], torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Every random input of one DMD micro-step, so that the micro-step is a function of them: prompts, rollout noise
    [B, s + F, C, H, W] (s: start of the supervised window of F = num_frames, rank 0's; 0 unless rollout_frames >
    num_frames), the exit step (rank 0's), the DMD / critic time t [B] and its noise eps [B, F, C, H, W]."""
    b, (f, *lat), device = cfg.batch_size, parts.latent_shape(), parts.device
    s = dmd.sample_window_start(cfg.rollout_frames or f, f, cfg.chunk_frames, device)
    return (parts.sample_prompts(b), torch.randn(b, s + f, *lat, device=device),
            dmd.sample_exit_step(len(cfg.steps), device), dmd.sample_dmd_timestep(b, shift=cfg.shift).to(device),
            torch.randn(b, f, *lat, device=device))


def reward_weight(cfg: Config, x0: torch.Tensor, prompts: list[str], parts: Components,
                  balancer) -> tuple[torch.Tensor | None, dict]:
    """The loss weight for `dmd.dmd_loss`: None (plain DMD), exp(beta z_MQ) [B] (Re-DMD), or
    exp(beta r_final)[B] x W_intra[B,F,1,h,w] (Stream-R1). Decode and reward only here, i.e. on generator steps."""
    if cfg.weighting == "none":
        return None, {}
    with torch.no_grad():
        pixels = parts.vae.decode(x0.detach().float())
    saliency = cfg.weighting == "stream_r1" and (cfg.spatial or cfg.temporal)
    res = parts.reward.score_and_saliency(pixels, prompts, latent_shape=(x0.shape[1], *x0.shape[3:]) if saliency
                                          else None)
    stats = {f"reward_{a}": res.z[:, i].mean().item() for i, a in enumerate(res.axes)}
    if cfg.weighting == "re_dmd":
        weight = weighting.re_dmd_weight(res.z[:, res.axes.index("MQ")], beta=cfg.beta)
    else:
        r = balancer.update(res.z) if cfg.balance else res.z.mean(dim=1)
        weight = weighting.inter_reliability_weight(r, beta=cfg.beta, normalize=cfg.normalize_weights)
        stats["r_final"] = r.mean().item()
        if saliency:
            intra = intra_weight(cfg, res)
            stats["intra_max"] = intra.max().item()
            weight = weight.view(-1, 1, 1, 1, 1) * intra
    stats["weight_mean"] = weight.mean().item()
    return weight.to(x0.device), stats


def intra_weight(cfg: Config, res) -> torch.Tensor:
    """Stream-R1's intra-perplexity weight W [B, F, 1, h, w] of a scored rollout (res: the reward model's result with
    saliency [B, A, F, h, w] and z [B, A]): saliency fused across axes by z, then factored (weighting.py). A
    non-finite saliency gives NaN weights: the loss is NaN and every rank skips the update (weighting.py would raise
    on this rank alone, and the others would wait in their next collective)."""
    fused = weighting.fuse_saliency(res.saliency, res.z, temperature=cfg.temperature)
    if not torch.isfinite(fused).all():
        return torch.full_like(fused[:, :, None], math.nan)
    return weighting.intra_perplexity_weights(fused, spatial_floor=cfg.spatial_floor, temporal_floor=cfg.temporal_floor,
                                              spatial_strength=float(cfg.spatial), factorised=cfg.temporal)


def render_weights(cfg: Config, net: WanModel, parts: Components, path: Path, rank: int) -> None:
    """Where Stream-R1 concentrates the loss: one no-grad rollout of the generator on the world's first prompt (seed
    cfg.seed; the training RNG untouched), scored with saliency, rendered by weighting.render_weight_map to `path`
    (rank 0): the frames, the intra weight W and the saliency of each reward axis. Every rank calls it (a sharded
    forward is a collective)."""
    prompts = parts.prompts[:1]
    with torch.random.fork_rng(devices=[parts.device] if parts.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        noise = torch.randn(1, *parts.latent_shape(), device=parts.device)
        with torch.no_grad():
            x0 = dmd.self_forcing_rollout(net, noise, parts.context(prompts), dmd.warped_steps(cfg.steps, cfg.shift),
                                          None, cfg.cache_options(), refresh_t=cfg.refresh_t)
            pixels = parts.vae.decode(x0.float())
    res = parts.reward.score_and_saliency(pixels, prompts, latent_shape=(x0.shape[1], *x0.shape[3:]))
    if rank == 0:
        weighting.render_weight_map(pixels[0], intra_weight(cfg, res)[0],
                                    {a: res.saliency[0, i] for i, a in enumerate(res.axes)}, path)


def generator_loss(cfg: Config, student, teacher, critic, parts: Components, prompts, noise, exit_step, t, eps,
                   balancer) -> tuple[torch.Tensor, dict]:
    """Self-forcing rollout -> DMD gradient at (t, eps) -> reward weight -> weighted DMD loss. Returns (loss, stats).
    A rollout longer than eps is supervised on its last eps.shape[1] frames: teacher, critic and reward see that
    window, the only part with graph."""
    ctx, neg = parts.context(prompts), parts.negative_context(len(prompts))
    s = noise.shape[1] - eps.shape[1]
    x0 = dmd.self_forcing_rollout(student, noise, ctx, dmd.warped_steps(cfg.steps, cfg.shift), exit_step,
                                  cfg.cache_options(), refresh_t=cfg.refresh_t, grad_from=s)[:, s:]
    g = dmd.dmd_gradient(x0, t, eps, teacher, critic, ctx, neg, cfg.guidance)
    weight, stats = reward_weight(cfg, x0, prompts, parts, balancer)
    return dmd.dmd_loss(x0, g, weight), stats


def critic_step_loss(cfg: Config, student, critic, parts: Components, prompts, noise, exit_step, t,
                     eps) -> torch.Tensor:
    """A fresh no-grad rollout, then the critic's flow-matching loss at (t, eps) on its last eps.shape[1] frames
    (unweighted, REFERENCE §6.3)."""
    ctx = parts.context(prompts)
    with torch.no_grad():
        x0 = dmd.self_forcing_rollout(student, noise, ctx, dmd.warped_steps(cfg.steps, cfg.shift), exit_step,
                                      cfg.cache_options(), refresh_t=cfg.refresh_t)[:, noise.shape[1] - eps.shape[1]:]
    return dmd.critic_loss(critic, x0, t, eps, ctx)


def dmd_step(cfg: Config, step: int, student, teacher, critic, parts: Components, balancer,
             opts: dict) -> tuple[dict, dict]:
    """One optimizer step of DMD: every gen_every-th step a generator update, then a critic update, each over
    grad_accum micro-batches of fresh draws. `student` and `critic` are what the loop calls (DDP when replicated).
    Returns (stats, {"generator": taken (on generator steps), "critic": taken})."""
    def generator_micro_step():
        prompts, noise, exit_step, t, eps = draw_inputs(cfg, parts)
        return generator_loss(cfg, student, teacher, critic, parts, prompts, noise, exit_step, t, eps, balancer)

    def critic_micro_step():
        prompts, noise, exit_step, t, eps = draw_inputs(cfg, parts)
        return critic_step_loss(cfg, student, critic, parts, prompts, noise, exit_step, t, eps), {}

    stats, taken = {}, {}
    if step % cfg.gen_every == 0:
        loss, norm, taken["generator"], extra = update(student, opts["net"], generator_micro_step, cfg)
        stats.update(extra, gen_loss=loss, gen_grad_norm=norm)
    loss, norm, taken["critic"], _ = update(critic, opts["critic"], critic_micro_step, cfg)
    stats.update(critic_loss=loss, critic_grad_norm=norm)
    return stats, taken


def pretrain_step(cfg: Config, model, parts: Components, pairs: dict | None, opt) -> tuple[dict, dict]:
    """One update of the toy teacher (flow matching on fresh toy videos) or of the ODE student (regression onto the
    teacher's ODE pairs). Returns (stats, {"net": taken})."""
    def micro_step():
        if cfg.stage == "teacher":
            videos, prompts = toy.toy_batch(cfg.batch_size, cfg.num_frames)
            return toy.teacher_loss(model, parts, prompts, videos.to(parts.device), cfg.cfg_dropout), {}
        idx = torch.randint(len(pairs["traj"]), (cfg.batch_size,))
        return dmd.ode_regression_loss(model, pairs["traj"][idx].to(parts.device),
                                       parts.context([pairs["prompts"][i] for i in idx]),
                                       dmd.warped_steps(cfg.steps, cfg.shift)), {}

    loss, norm, taken, _ = update(model, opt, micro_step, cfg)
    return {"loss": loss, "grad_norm": norm}, {"net": taken}


# --------------------------------------------------------------------------------------------- one update
def update(model, opt: torch.optim.Optimizer, micro_step, cfg: Config) -> tuple[float, float, bool, dict]:
    """One optimizer update over grad_accum micro-batches: micro_step() -> (loss, stats), each loss / grad_accum
    back-propagated (a DDP model reduces across ranks once, on the last); then, if the mean loss is finite on every
    rank, optimizer_step. Returns (mean loss, pre-clip gradient norm (nan when the loss was not finite), whether the
    update was taken, the last micro-batch's stats)."""
    loss, stats = 0.0, {}
    for i in range(cfg.grad_accum):
        last = i == cfg.grad_accum - 1
        with contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            micro, stats = micro_step()
            (micro / cfg.grad_accum).backward()
        loss += micro.item() / cfg.grad_accum
    norm = optimizer_step(model, opt, cfg.clip) if everywhere(math.isfinite(loss)) else math.nan
    opt.zero_grad(set_to_none=True)
    return loss, norm, math.isfinite(loss) and math.isfinite(norm), stats


def optimizer_step(model, opt: torch.optim.Optimizer, clip: float) -> float:
    """Clip the gradient to norm `clip`, then step unless its norm is non-finite (a finite loss whose backward
    overflowed); returns the pre-clip norm. Every rank sees the norm of the same reduced gradient, so all skip alike."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if math.isfinite(norm):
        opt.step()
    return norm


def make_optimizer(net: torch.nn.Module, lr: float, cfg: Config) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, betas=cfg.betas,
                             weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------------------------- EMA
def new_ema(net: WanModel, cfg: Config, device: torch.device) -> WanModel:
    """A twin of the trained network (teacher, ODE student or generator) with its weights, fp32 (an EMA step is
    below bf16's resolution), sharded like it (FSDP2 modules cannot be deep-copied). Built on the meta device, so it
    neither draws random numbers nor is ever whole on a sharding rank."""
    with torch.device("meta"):
        ema = WanModel(net.cfg, net.causal, net.chunk_frames).requires_grad_(False)
    if sharded(cfg):
        shard(ema, cfg, (), frozen=True)
    ema.to_empty(device=device).load_state_dict(net.state_dict())
    return ema


@torch.no_grad()
def ema_after_step(ema: WanModel | None, net: WanModel, step: int, taken: bool, cfg: Config,
                   device: torch.device) -> WanModel | None:
    """The EMA after optimizer step `step`: made as a copy of `net` once step >= ema_start, then
    ema = d ema + (1 - d) net after every taken update of `net` (a skipped update, or a critic-only step, leaves it)."""
    if ema is None:
        return new_ema(net, cfg, device) if step >= cfg.ema_start else None
    if taken:
        for m in (ema, net):  # FSDP2: a no-grad forward (critic rollout, evaluation) leaves the root gathered
            if hasattr(m, "reshard"):
                m.reshard()
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p.detach(), 1 - cfg.ema_decay)
    return ema


# --------------------------------------------------------------------------------------------- the loop
def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    rank, world_size, device = setup_distributed()
    out = Path(cfg.out_dir)
    meta = checkpoint.latest_checkpoint(out)  # the newest intact checkpoint, or None: a fresh run
    changes = config_changes(cfg, meta["config"]) if meta else {}
    if changes and not cfg.allow_config_change:
        diff = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
        raise SystemExit(f"{out / meta['file']} was trained with other settings ({diff}): resume with the same ones, "
                         f"use another out_dir, or pass --allow_config_change=true to apply them")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed + rank)
    parts = Components(cfg, device)

    # networks, sharded as they are built under FSDP2: `net` is what this stage trains (teacher, ODE student or DMD
    # generator)
    teacher = critic = None
    if cfg.stage == "teacher":
        net = build_net(cfg.teacher_size, "", device, cfg=cfg, **teacher_mask(cfg))
        if cfg.world == "toy" and not cfg.text_path and rank == 0:
            save_model(parts.text.model, str(out / "text_encoder.safetensors"))  # tied embeddings: save_model
        sources = {"teacher (trained)": ""}
    else:
        teacher = build_net(cfg.teacher_size, cfg.teacher_path, device, cfg=cfg, frozen=True, **teacher_mask(cfg))
        net = build_net(cfg.model_size, cfg.student_path, device, causal=True, chunk_frames=cfg.chunk_frames, cfg=cfg)
        sources = {"teacher": cfg.teacher_path, "student (trained)": cfg.student_path}
    if cfg.stage == "dmd":
        critic = build_net(cfg.model_size, cfg.critic_path, device, cfg=cfg, **teacher_mask(cfg))
        sources["critic"] = cfg.critic_path
    if rank == 0:
        sources["text encoder"] = cfg.text_path
        print("\n".join(f"{name} <- {path or 'random init'}" for name, path in sources.items()))
    opts = {"net": make_optimizer(net, cfg.lr, cfg)}
    if critic is not None:
        opts["critic"] = make_optimizer(critic, cfg.lr_critic, cfg)
    balancer = weighting.RewardBalancer(cfg.balance_window, cfg.balance_warmup, cfg.balance_lambda)
    ema = new_ema(net, cfg, device) if (meta["has_ema"] if meta else cfg.ema_start == 0) else None

    step, bad = 0, {}  # bad: consecutive skipped updates per network
    if meta:
        checkpoint.restore_checkpoint(out, meta, {"net": net, "critic": critic, "ema": ema}, opts, balancer, rank,
                                      world_size)
        step = meta["step"]
        if rank == 0:
            print(f"resumed from {out / meta['file']} at step {step}" + (f" with changed {changes}" if changes else ""))
            checkpoint.truncate_log(out / "log.jsonl", step)
    model, critic_model = replicate(net, cfg, world_size), replicate(critic, cfg, world_size)
    pairs = None
    if cfg.stage == "ode":
        settings = {k: getattr(cfg, k) for k in ("teacher_path", "seed", "ode_pairs", "ode_steps", "ode_guidance",
                                                 "ode_shift", "num_frames", "height", "width")}
        with autocast(cfg, device):
            pairs = checkpoint.ode_pairs(out, rank, settings, lambda: dmd.ode_pairs(
                teacher, parts, cfg.ode_pairs, cfg.batch_size, cfg.ode_guidance, cfg.ode_steps, cfg.ode_shift))

    log = open(out / "log.jsonl", "a") if rank == 0 else None
    if log and changes:
        log.write(json.dumps({"step": step, "config_change": changes}) + "\n")
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, desc=cfg.stage)
    while step < cfg.max_steps:
        t0 = time.time()
        with autocast(cfg, device):
            if cfg.stage == "dmd":
                stats, taken = dmd_step(cfg, step, model, teacher, critic_model, parts, balancer, opts)
            else:
                stats, taken = pretrain_step(cfg, model, parts, pairs, opts["net"])
        step += 1
        for name, ok in taken.items():
            bad[name] = 0 if ok else bad.get(name, 0) + 1
            if bad[name] >= cfg.max_bad_steps:
                raise SystemExit(f"step {step}: {bad[name]} consecutive {name} updates skipped (non-finite loss or "
                                 f"gradient) {stats}; stopping")
        if not all(taken.values()):
            stats["skipped"] = [name for name, ok in taken.items() if not ok]
        ema = ema_after_step(ema, net, step, taken.get("generator" if cfg.stage == "dmd" else "net", False), cfg,
                             device)
        stats.update(step=step, time=round(time.time() - t0, 3))
        if log:
            log.write(json.dumps(stats) + "\n")
            log.flush()
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if "loss" in k})
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            checkpoint.save_checkpoint(out, step, {"net": net, "critic": critic, "ema": ema}, opts,
                                       {"has_ema": ema is not None, "config": dataclasses.asdict(cfg)}, balancer, rank)
            if world_size > 1:
                dist.barrier()
        sampling = step == cfg.max_steps or cfg.sample_every and step % cfg.sample_every == 0
        if cfg.world == "toy" and cfg.stage != "teacher" and cfg.evaluate and sampling:
            with autocast(cfg, device):  # every rank: FSDP2 forwards are collectives
                ev = toy.evaluate(ema or net, teacher, parts, cfg, out, step)
            if log:
                log.write(json.dumps({"step": step, "eval": ev}) + "\n")
                print(f"step {step} held-out eval: {ev}")
        if cfg.stage == "dmd" and cfg.weighting == "stream_r1" and (cfg.spatial or cfg.temporal) and sampling:
            with autocast(cfg, device):
                render_weights(cfg, net, parts, out / f"weights_{step:06d}.png", rank)
    bar.close()
    if log:
        log.close()
    if world_size > 1:
        dist.barrier()
    checkpoint.export_weights(ema or net, out / "model.safetensors", rank)  # the EMA once there is one
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
