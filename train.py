"""Training, all stages, one loop: teacher pretraining (toy world), ODE-regression init, and DMD with reward weighting.

    python train.py                                   # distills the built-in toy world on CPU (Stream-R1 weighting)
    python train.py --stage=teacher --max_steps=4000  # flow-matching pretraining of the toy teacher
    torchrun --nproc_per_node=8 train.py --config configs/wan1.3b_stream_r1.yaml

The DMD step reads like the paper's algorithm box (Self-Forcing + Stream-R1, REFERENCE.md §6, §8.3):
sample prompts -> self-forcing rollout -> [generator step: DMD gradient, reward + weights, weighted DMD loss] ->
critic step on a fresh no-grad rollout -> log -> checkpoint. `weighting` switches between plain DMD (`none`),
Reward Forcing's Re-DMD (`re_dmd`, exp(beta z_MQ)) and Stream-R1 (`stream_r1`); `spatial`, `temporal` and `balance`
turn its components on one at a time.

Counters are optimizer steps: each step is one critic update, and every `gen_every`-th step also one generator
update first (Self-Forcing's dfake_gen_update_ratio); each update averages `grad_accum` micro-batches of
`batch_size` per rank (Stream-R1's correct accumulation, not Reward Forcing's broken one, REFERENCE §10.4).
"""
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file, save_model
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

import dmd
import toy
import vae
import weighting
from model import WanConfig, WanModel, load_wan_weights


@dataclass
class Config:
    # run
    stage: str = "dmd"                  # teacher | ode | dmd
    weighting: str = "stream_r1"        # none | re_dmd | stream_r1
    world: str = "toy"                  # toy | wan
    out_dir: str = "out/toy"
    seed: int = 0
    max_steps: int = 160                # optimizer steps (critic updates for dmd); toy: ~5 min on 2 CPU cores
    ckpt_every: int = 40
    sample_every: int = 0               # 0: only at the end
    evaluate: bool = True               # toy: held-out evaluation + sample strip at sample_every and at the end
    # networks (toy: files shipped in assets/; wan: Wan2.1 / distilled checkpoints on disk)
    model_size: str = "toy"             # toy | 1.3b | 14b  (student and critic)
    teacher_size: str = "toy"
    teacher_path: str = "assets/toy_teacher.safetensors"
    critic_path: str = ""               # empty: initialised from the teacher
    student_path: str = "assets/toy_ode_init.safetensors"   # wan: ode_init.pt
    text_path: str = "assets/toy_text_encoder.safetensors"  # wan: models_t5_umt5-xxl-enc-bf16.pth or text_encoder/
    tokenizer_dir: str = ""             # wan: google/umt5-xxl tokenizer folder
    vae_path: str = ""                  # wan: Wan2.1_VAE.pth
    reward_base_dir: str = ""           # wan: Qwen2-VL-2B-Instruct folder
    reward_release_dir: str = ""        # wan: VideoReward release folder
    prompt_file: str = ""               # wan: one prompt per line
    negative_prompt: str = ""           # "" for the toy (zero context); Wan's default for real runs
    # geometry (latent frames; pixels for height/width)
    num_frames: int = toy.TOY_FRAMES
    chunk_frames: int = toy.TOY_CHUNK
    window_frames: int = toy.TOY_WINDOW   # 0: a global cache (no eviction)
    sink_frames: int = toy.TOY_SINK
    ema_alpha: float = toy.TOY_EMA_ALPHA  # 0: a plain sink, never fused (no EMA)
    height: int = toy.TOY_SIZE
    width: int = toy.TOY_SIZE
    # schedule (REFERENCE §1.4-1.6)
    steps: tuple = (1000, 750, 500, 250)
    shift: float = 5.0
    guidance: float = 4.0               # Wan form u + g(c - u); Self-Forcing's guidance_scale 3.0
    refresh_t: float = 0.0
    # ODE init (REFERENCE §6.6)
    ode_pairs: int = 256
    ode_steps: int = 48
    ode_shift: float = 5.0             # = shift: kept states 12/24/36 of 48 land exactly on the warped steps
    ode_guidance: float = 6.0
    # optimisation (REFERENCE §6.4)
    batch_size: int = 8                 # per rank, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4                    # generator (or teacher / ODE student); Wan recipe 2e-6
    lr_critic: float = 2e-4             # Wan recipe 4e-7
    betas: tuple = (0.0, 0.999)
    weight_decay: float = 0.01
    clip: float = 10.0
    gen_every: int = 4                  # Wan recipe 5
    ema_decay: float = 0.9              # toy: 40 generator updates; Wan recipe 0.99
    ema_start: int = 80                 # every stage keeps an EMA of what it trains from here; it is what is exported
    cfg_dropout: float = 0.1            # teacher stage: context dropped to the negative context
    # reward weighting (REFERENCE §8.3-8.4)
    beta: float = 2.0
    spatial: bool = True                # false (with temporal): temporal weight w_t only
    temporal: bool = True               # false (with spatial): SR1's unfactorised W_s, one min-max per clip
    balance: bool = True
    balance_window: int = 50
    balance_warmup: int = 50
    balance_lambda: float = 0.5
    spatial_floor: float = 0.15
    temporal_floor: float = 0.2
    temperature: float = 1.0
    normalize_weights: bool = False
    # systems
    parallel: str = "ddp"               # ddp (replicated, gradients all-reduced) | fsdp (FSDP2 fully_shard)
    bf16: bool = True                   # autocast on CUDA; CPU always fp32
    grad_checkpointing: bool = False
    max_bad_steps: int = 3              # consecutive skipped updates of one network (non-finite loss or gradient)


# --------------------------------------------------------------------------------------------- config I/O
def load_config(argv: list[str], sampling: bool = False) -> Config:
    """Defaults <- `--config file.yaml` <- `--key=value` overrides (typed by the field's default); `sampling` checks
    only the files sample.py reads."""
    values, overrides = {}, {}
    args = list(argv)
    while args:
        a = args.pop(0)
        if not a.startswith("--"):
            raise SystemExit(f"unexpected argument {a!r}: use --key=value")
        key, _, val = a[2:].partition("=")
        if not _:
            if not args:
                raise SystemExit(f"--{key} needs a value")
            val = args.pop(0)
        if key == "config":
            path = Path(val)
            if not path.is_file():
                raise SystemExit(f"config file not found: {path}")
            values.update(yaml.safe_load(path.read_text()) or {})
        else:
            overrides[key] = val
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key in list(values) + list(overrides):
        if key not in fields:
            raise SystemExit(f"unknown config key {key!r}; known: {', '.join(fields)}")
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    for key, val in overrides.items():
        setattr(cfg, key, parse_value(val, getattr(cfg, key), key))
    validate_config(cfg, sampling)
    return cfg


def parse_value(text: str, default, key: str):
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(default, tuple):
            return tuple(type(default[0])(v) for v in text.strip("()[]").split(","))
        return type(default)(text)
    except ValueError:
        raise SystemExit(f"--{key}={text}: expected a {type(default).__name__} like {default!r}") from None


def validate_config(cfg: Config, sampling: bool = False) -> None:
    """Clear errors before any work: choices, geometry, and every file the run will read."""
    choices = {"stage": ("teacher", "ode", "dmd"), "weighting": ("none", "re_dmd", "stream_r1"),
               "world": ("toy", "wan"), "parallel": ("ddp", "fsdp")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"{key}={getattr(cfg, key)!r}: expected one of {allowed}")
    if cfg.stage == "teacher" and cfg.world != "toy":
        raise SystemExit("stage=teacher pretrains the toy teacher only; real runs load the Wan2.1 teacher")
    if cfg.num_frames % cfg.chunk_frames:
        raise SystemExit(f"num_frames={cfg.num_frames} is not a multiple of chunk_frames={cfg.chunk_frames}")
    wan_vae_factor = 2 ** (len(inspect.signature(vae.WanVAE).parameters["dim_mult"].default) - 1)  # 8 (REFERENCE §5.1)
    factor = (toy.ToyVAE.spatial_factor if cfg.world == "toy" else wan_vae_factor) * dit_config(cfg.model_size).patch_size[1]
    if cfg.height % factor or cfg.width % factor:
        raise SystemExit(f"resolution {cfg.height}x{cfg.width} must divide by {factor} (VAE factor x patch size)")
    rewarded = cfg.stage == "dmd" and cfg.weighting != "none" and not sampling
    needed = {"teacher_path": cfg.stage != "teacher" and not sampling, "student_path": cfg.stage == "dmd" and not sampling,
              "text_path": cfg.world == "wan" or cfg.stage != "teacher" or bool(cfg.text_path),
              "critic_path": bool(cfg.critic_path) and not sampling}
    if cfg.world == "wan":
        needed.update(tokenizer_dir=True, vae_path=True, prompt_file=True, reward_base_dir=rewarded,
                      reward_release_dir=rewarded)
    for key, need in needed.items():
        path = getattr(cfg, key)
        if need and not (path and Path(path).exists()):
            raise SystemExit(f"{key}: {path or '(empty)'} does not exist; the {cfg.stage} stage needs it")
    if cfg.prompt_file and not any(line.strip() for line in Path(cfg.prompt_file).read_text().splitlines()):
        raise SystemExit(f"prompt_file {cfg.prompt_file} holds no prompt")


# --------------------------------------------------------------------------------------------- distributed
def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun's environment -> process group (nccl on CUDA, gloo on CPU); plain `python train.py` is rank 0 of 1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def everywhere(flag: bool, device: torch.device, world: int) -> bool:
    """True iff `flag` holds on every rank: one decision for all (a rank that skips a step or a teacher forward while
    the others run collectives would hang them)."""
    ok = torch.tensor(float(flag), device=device)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def broadcast_from_rank0(module: torch.nn.Module, world: int) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does at construction)."""
    if world > 1:
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Replicated data parallelism: average gradients across ranks (what DDP does, without bucketing)."""
    if world > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def shard(net: torch.nn.Module, cfg: Config, per_block: bool, frozen: bool) -> torch.nn.Module:
    """FSDP2: each block then the root (per_block), or the root only; bf16 compute with fp32 reduction on CUDA.
    The cache-using student is sharded at the root only: its streaming path computes the prompt's cross-attention
    K/V outside the blocks' forward, where a per-block shard would not be gathered (1.3B in bf16: 2.6 GB).
    FSDP2 keeps the root gathered after a forward, for the backward that reshards it; `frozen` modules (teacher, EMA)
    have no backward, so they reshard after every forward (else the 14B teacher would stay whole on every GPU and the
    EMA would be updated as a gathered copy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.bf16 and torch.cuda.is_available() else MixedPrecisionPolicy()
    reshard = True if frozen else None  # None: FSDP2's default (blocks reshard, the root waits for the backward)
    for block in net.blocks if per_block else ():
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(net, mp_policy=mp, reshard_after_forward=reshard)
    return net


# --------------------------------------------------------------------------------------------- components
class World:
    """Everything the loop needs that differs between the toy world and real Wan runs: VAE, text, reward, prompts."""

    def __init__(self, cfg: Config, device: torch.device, rank: int, world: int):
        import text
        self.cfg, self.device = cfg, device
        if cfg.world == "toy":
            self.vae = toy.ToyVAE().to(device)
            encoder = toy.toy_text_encoder(cfg.text_path or None)  # empty: a fresh one (teacher stage only)
            self.text = text.TextEncoder(encoder.to(device), toy.toy_tokenizer(), text_len=toy.TOY_TEXT_LEN)
            self.reward = toy.ToyReward() if cfg.stage == "dmd" and cfg.weighting != "none" else None
            self.prompts = toy.toy_prompts()
        else:
            import reward
            self.vae = vae.WanVAE().to(device).eval()
            vae.load_vae_weights(self.vae, cfg.vae_path)
            self.text = text.load_text_encoder(cfg.text_path, cfg.tokenizer_dir, device=device)
            self.reward = None
            if cfg.stage == "dmd" and cfg.weighting != "none":
                self.reward = reward.VideoReward.from_pretrained(cfg.reward_base_dir, cfg.reward_release_dir,
                                                                 device=device,
                                                                 gradient_checkpointing=cfg.grad_checkpointing)
            self.prompts = [p.strip() for p in Path(cfg.prompt_file).read_text().splitlines() if p.strip()]
        self.vae.requires_grad_(False)
        self.rank, self.world = rank, world

    def sample_prompts(self, n: int) -> list[str]:
        idx = torch.randint(len(self.prompts), (n,)).tolist()
        return [self.prompts[i] for i in idx]

    def context(self, prompts: list[str]) -> torch.Tensor:
        return self.text.encode(prompts).to(self.device)

    def negative_context(self, n: int) -> torch.Tensor:
        """Wan's negative prompt for real runs; the toy world's unconditional context is all zeros (padding)."""
        if self.cfg.negative_prompt:
            return self.context([self.cfg.negative_prompt]).expand(n, -1, -1)
        return torch.zeros(n, self.text.text_len, self.text.model.config.d_model, device=self.device)

    def latent_shape(self) -> tuple[int, int, int, int]:
        s = self.vae.spatial_factor
        return self.cfg.num_frames, self.vae.z_dim, self.cfg.height // s, self.cfg.width // s


def dit_config(size: str) -> WanConfig:
    return {"toy": toy.toy_dit_config, "1.3b": WanConfig.wan_1_3b, "14b": WanConfig.wan_14b}[size]()


def build_net(size: str, path: str, device: torch.device, causal: bool = False, chunk_frames: int = 3) -> WanModel:
    net = WanModel(dit_config(size), causal=True, chunk_frames=chunk_frames) if causal else WanModel(dit_config(size))
    if path:
        load_wan_weights(net, path)
    return net.to(device)


# --------------------------------------------------------------------------------------------- weighting
AXES = ("VQ", "MQ", "TA")


def reward_weight(cfg: Config, x0: torch.Tensor, prompts: list[str], w: World, balancer) -> tuple[torch.Tensor | None, dict]:
    """The loss weight for `dmd.dmd_loss`: None (plain DMD), exp(beta z_MQ) [B] (Re-DMD), or
    exp(beta r_final)[B] x W_intra[B,F,1,h,w] (Stream-R1). Decode and reward only here, i.e. on generator steps."""
    if cfg.weighting == "none":
        return None, {}
    with torch.no_grad():
        pixels = w.vae.decode(x0.detach().float())
    saliency = cfg.weighting == "stream_r1" and (cfg.spatial or cfg.temporal)
    res = w.reward.score_and_saliency(pixels, prompts, latent_shape=(x0.shape[1], *x0.shape[3:]) if saliency else None,
                                      axes=AXES)
    stats = {f"reward_{a}": res.z[:, i].mean().item() for i, a in enumerate(res.axes)}
    if cfg.weighting == "re_dmd":
        weight = weighting.re_dmd_weight(res.z[:, res.axes.index("MQ")], beta=cfg.beta)
    else:
        r = balancer.update(res.z) if cfg.balance else res.z.mean(dim=1)
        weight = weighting.inter_reliability_weight(r, beta=cfg.beta, normalize=cfg.normalize_weights)
        stats["r_final"] = r.mean().item()
        if saliency:
            fused = weighting.fuse_saliency(res.saliency, res.z, temperature=cfg.temperature)
            intra = weighting.intra_perplexity_weights(
                fused, spatial_floor=cfg.spatial_floor, temporal_floor=cfg.temporal_floor,
                spatial_strength=float(cfg.spatial), factorised=cfg.temporal)
            stats["intra_max"] = intra.max().item()
            weight = weight.view(-1, 1, 1, 1, 1) * intra
    stats["weight_mean"] = weight.mean().item()
    return weight.to(x0.device), stats


# --------------------------------------------------------------------------------------------- one micro-step each
def generator_loss(cfg, student, teacher, critic, w: World, prompts, noise, exit_step, t, eps, balancer):
    """Self-forcing rollout -> DMD gradient at (t, eps) -> (reward-weighted) DMD loss. Returns (loss, stats)."""
    ctx, neg = w.context(prompts), w.negative_context(len(prompts))
    x0 = dmd.self_forcing_rollout(student, noise, ctx, dmd.warped_steps(cfg.steps, cfg.shift), exit_step,
                                  cache_options(cfg), refresh_t=cfg.refresh_t)
    g = dmd.dmd_gradient(x0, t, eps, teacher, critic, ctx, neg, cfg.guidance)
    weight, stats = reward_weight(cfg, x0, prompts, w, balancer)
    return dmd.dmd_loss(x0, g, weight), stats


def critic_step_loss(cfg, student, critic, w: World, prompts, noise, exit_step, t, eps):
    """A fresh no-grad rollout, then the critic's flow-matching loss on it at (t, eps) (unweighted, REFERENCE §6.3)."""
    ctx = w.context(prompts)
    with torch.no_grad():
        x0 = dmd.self_forcing_rollout(student, noise, ctx, dmd.warped_steps(cfg.steps, cfg.shift), exit_step,
                                      cache_options(cfg), refresh_t=cfg.refresh_t)
    return dmd.critic_loss(critic, x0, t, eps, ctx)


def cache_options(cfg: Config) -> dict:
    return dict(window_frames=cfg.window_frames or None, sink_frames=cfg.sink_frames, ema_alpha=cfg.ema_alpha or None)


def teacher_loss(cfg, net, w: World, prompts, videos):
    """Flow matching on encoded toy videos, context dropped with prob cfg_dropout. sigma ~ U(0, 1), not shifted: the
    teacher must be accurate at every noise level its samplers and the DMD gradient query (few draws near sigma = 0
    leave residual noise in its samples)."""
    x0 = w.vae.encode(videos)
    ctx = w.context(prompts)
    drop = torch.rand(len(prompts), device=x0.device) < cfg.cfg_dropout
    ctx = torch.where(drop.view(-1, 1, 1), w.negative_context(len(prompts)), ctx)
    t = 1000 * torch.rand(len(prompts), device=x0.device)
    eps = torch.randn_like(x0)
    return (net(dmd.add_noise(x0, eps, t), t, ctx) - (eps - x0)).pow(2).mean()


# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, step: int, nets: dict, opts: dict, state: dict, balancer, rank: int,
                    keep: int = 2) -> None:
    """Atomic: step_N.safetensors (networks under Wan names, optimizer states, every rank's RNG), then step_N.json
    (`state`, every rank's balancer), then latest.json (each by os.replace); older checkpoints removed. Called on every
    rank: gathering FSDP2 shards and the per-rank RNG / balancer states are collectives."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    models = {name: get_model_state_dict(net, options=full) for name, net in nets.items() if net is not None}
    optims = {name: get_optimizer_state_dict(net, opt, options=full) for name, (net, opt) in opts.items()}
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    rngs, balancers = gather_from_ranks(rng), gather_from_ranks(balancer.state_dict())  # each rank has its own
    if rank != 0:  # the full state lands on rank 0 only
        return
    tensors = {f"{name}.{k}": v.contiguous() for name, sd in models.items() for k, v in sd.items()}
    for name, sd in optims.items():
        for param, st in sd["state"].items():
            tensors.update({f"opt.{name}.{param}.{k}": v.reshape(1) if v.dim() == 0 else v.contiguous() for k, v in st.items()})
    groups = {name: sd["param_groups"] for name, sd in optims.items()}
    tensors.update({f"rng.{r}.{k}": v for r, st in enumerate(rngs) for k, v in st.items()})
    stem = out / f"step_{step:06d}"
    atomic_write(stem.with_suffix(".safetensors"), lambda p: save_file(tensors, p))
    meta = dict(state, step=step, opt_groups=groups, balancers=balancers, file=stem.with_suffix(".safetensors").name)
    atomic_write(stem.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    atomic_write(out / "latest.json", lambda p: Path(p).write_text(json.dumps({"step": step, "json": stem.name + ".json"})))
    for old in sorted(out.glob("step_*.json"))[:-keep]:
        old.unlink()
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def gather_from_ranks(obj) -> list:
    """`obj` of every rank, in rank order; [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (those steps run again), and a line cut short by
    the kill."""
    def logged_by(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except json.JSONDecodeError:
            return False

    if path.exists():
        keep = [line for line in path.read_text().splitlines() if logged_by(line)]
        atomic_write(path, lambda p: Path(p).write_text("".join(line + "\n" for line in keep)))


def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def latest_checkpoint(out: Path) -> dict | None:
    """The JSON state of the latest complete checkpoint in `out`, or None for a fresh run."""
    if not (out / "latest.json").exists():
        return None
    return json.loads((out / json.loads((out / "latest.json").read_text())["json"]).read_text())


def network_weights(tensors: dict, name: str) -> dict:
    """One network's state dict (Wan key names) out of a checkpoint's tensors, where it is stored as `name.<key>`."""
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}


def restore_checkpoint(out: Path, meta: dict, nets: dict, opts: dict, balancer, rank: int, world: int) -> None:
    """Networks, optimizers, this rank's RNG and balancer restored in place from the checkpoint `meta` names (every
    rank reads it). The per-rank states need the world size the checkpoint was written with."""
    if len(meta["balancers"]) != world:
        raise SystemExit(f"{out / meta['file']} was written by {len(meta['balancers'])} process(es), this run has "
                         f"{world}: resume with the same number of processes (each keeps its own RNG stream)")
    tensors = load_file(str(out / meta["file"]))
    full = StateDictOptions(full_state_dict=True)
    for name, net in nets.items():
        if net is not None:
            set_model_state_dict(net, network_weights(tensors, name), options=full)
    for name, (net, opt) in opts.items():
        state = {}
        for key, v in tensors.items():
            if key.startswith(f"opt.{name}."):
                param, k = key[len(f"opt.{name}."):].rsplit(".", 1)
                state.setdefault(param, {})[k] = v.reshape(()) if k == "step" else v
        set_optimizer_state_dict(net, opt, {"state": state, "param_groups": meta["opt_groups"][name]}, options=full)
    torch.set_rng_state(tensors[f"rng.{rank}.cpu"])
    if f"rng.{rank}.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.{rank}.cuda"])
    balancer.load_state_dict(meta["balancers"][rank])


# --------------------------------------------------------------------------------------------- helpers
def make_optimizer(net: torch.nn.Module, lr: float, cfg: Config) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, betas=cfg.betas,
                             weight_decay=cfg.weight_decay)


def new_ema(cfg: Config, net: WanModel, device: torch.device) -> WanModel:
    """The EMA of the trained network (teacher, ODE student or generator): a twin of the same shape and sharding,
    starting from its weights (FSDP2 modules cannot be deep-copied); built under fork_rng so its creation does not
    move the training RNG."""
    with torch.random.fork_rng(devices=[]):
        ema = WanModel(net.cfg, net.causal, net.chunk_frames).to(device).requires_grad_(False)
    if cfg.parallel == "fsdp":
        ema = shard(ema, cfg, per_block=False, frozen=True)
    ema.load_state_dict(net.state_dict())
    return ema


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    for m in (ema, net):  # FSDP2: a no-grad forward (critic rollout, evaluation) leaves the root gathered
        if hasattr(m, "reshard"):
            m.reshard()
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p.detach(), 1 - decay)


def optimizer_step(net, opt, cfg: Config, world: int) -> float:
    """All-reduce (replicated) -> clip -> step; returns the pre-clip gradient norm. A non-finite norm (a finite loss
    whose backward overflowed) skips the step; every rank sees the same norm of the reduced gradient, so all skip."""
    params = [p for p in net.parameters() if p.requires_grad]
    if cfg.parallel == "ddp":
        all_reduce_grads(params, world)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if math.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def autocast(cfg: Config, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


@torch.no_grad()
def stream_samples(student, w: World, cfg: Config, prompts: list[str], num_frames: int) -> torch.Tensor:
    """Chunk-by-chunk generation with the same cache code as training; pixels [B, T, 3, H, W] in [-1, 1]."""
    ctx = w.context(prompts)
    f, c, h, wd = w.latent_shape()
    cache = student.new_cache(len(prompts), **cache_options(cfg))
    steps = dmd.warped_steps(cfg.steps, cfg.shift)
    decoder, frames = w.vae.stream_decoder(), []
    for _ in range(num_frames // cfg.chunk_frames):
        noise = torch.randn(len(prompts), cfg.chunk_frames, c, h, wd, device=ctx.device)
        frames.append(decoder(dmd.generate_chunk(student, noise, ctx, cache, steps)))
    return torch.cat(frames, dim=1)


def evaluate(student, teacher, w: World, cfg: Config, out: Path, step: int) -> dict:
    """Toy held-out evaluation (not the reward): colour/direction accuracy on EVAL_PROMPTS, distance to the teacher."""
    prompts = list(toy.EVAL_PROMPTS)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        videos = stream_samples(student, w, cfg, prompts, cfg.num_frames)
        teacher_videos = teacher_samples(teacher, w, cfg, prompts, out)
    stats = toy.evaluate_videos(videos, prompts)
    stats["teacher_distance"] = toy.teacher_distance(videos, teacher_videos)
    if w.rank == 0:
        toy.save_strip(videos[:8], out / f"samples_{step:06d}.png")
    return stats


def teacher_samples(teacher, w: World, cfg: Config, prompts: list[str], out: Path) -> torch.Tensor:
    """The teacher's many-step CFG samples for the eval prompts, computed once per run folder."""
    path = out / "teacher_eval.safetensors"
    cached = path.exists()
    if w.world > 1:  # every rank decides before any writes: a sharded teacher needs all ranks in its forwards
        dist.barrier()
    if cached:
        return load_file(str(path))["videos"]
    noise = torch.randn(len(prompts), *w.latent_shape(), device=w.device)
    traj = dmd.teacher_trajectory(teacher, noise, w.context(prompts), w.negative_context(len(prompts)),
                                  guidance=cfg.ode_guidance, num_steps=cfg.ode_steps, shift=cfg.ode_shift, keep=(-1,))
    videos = w.vae.decode(traj[:, -1]).cpu()
    if w.rank == 0:
        atomic_write(path, lambda p: save_file({"videos": videos.contiguous()}, p))
    return videos


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    rank, world, device = setup_distributed()
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed + rank)
    w = World(cfg, device, rank, world)
    lat = w.latent_shape()

    # networks: `net` is what this stage trains (teacher, ODE student or DMD generator)
    teacher = critic = ema = None
    if cfg.stage == "teacher":
        net = build_net(cfg.teacher_size, "", device)
        for m in (net, w.text.model):  # random inits (seed + rank) differ per rank: all start from rank 0's
            broadcast_from_rank0(m, world)
        if cfg.world == "toy" and not cfg.text_path and rank == 0:
            save_model(w.text.model, str(out / "text_encoder.safetensors"))  # tied embeddings: save_model, not save_file
    else:
        teacher = build_net(cfg.teacher_size, cfg.teacher_path, device).requires_grad_(False).eval()
        init = cfg.student_path if cfg.stage == "dmd" else cfg.teacher_path
        net = build_net(cfg.model_size, init, device, causal=True, chunk_frames=cfg.chunk_frames)
    if cfg.stage == "dmd":
        critic = build_net(cfg.model_size, cfg.critic_path or cfg.teacher_path, device)
    if cfg.parallel == "fsdp":
        net = shard(net, cfg, per_block=cfg.stage == "teacher", frozen=False)
        critic = critic and shard(critic, cfg, per_block=True, frozen=False)
        teacher = teacher and shard(teacher, cfg, per_block=True, frozen=True)
    if cfg.grad_checkpointing:
        for m in (net, critic):
            if m is not None:
                m.gradient_checkpointing = True
    opt = make_optimizer(net, cfg.lr, cfg)
    opts = {"net": (net, opt)}
    if critic is not None:
        opts["critic"] = (critic, make_optimizer(critic, cfg.lr_critic, cfg))
    balancer = weighting.RewardBalancer(cfg.balance_window, cfg.balance_warmup, cfg.balance_lambda)
    pairs = None

    def nets():
        return {"net": net, "critic": critic, "ema": ema}

    step, bad = 0, {}  # consecutive skipped updates per loss
    meta = latest_checkpoint(out)
    if cfg.ema_start == 0 or meta and meta["has_ema"]:
        ema = new_ema(cfg, net, device)
    if meta is not None:
        restore_checkpoint(out, meta, nets(), opts, balancer, rank, world)
        step = meta["step"]
        if rank == 0:
            print(f"resumed from {out / meta['file']} at step {step}")
            truncate_log(out / "log.jsonl", step)
    if cfg.stage == "ode":
        pairs = ode_pairs(cfg, teacher, w, out, rank)

    log = open(out / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, desc=cfg.stage)
    while step < cfg.max_steps:
        t0, stats = time.time(), {}
        with autocast(cfg, device):
            if cfg.stage == "dmd":
                stats = dmd_step(cfg, step, net, teacher, critic, w, lat, balancer, opts, world, device)
            else:
                loss = 0.0
                for _ in range(cfg.grad_accum):
                    if cfg.stage == "teacher":
                        videos, prompts = toy.toy_batch(cfg.batch_size, cfg.num_frames)
                        micro = teacher_loss(cfg, net, w, prompts, videos.to(device))
                    else:
                        idx = torch.randint(len(pairs["traj"]), (cfg.batch_size,))
                        micro = dmd.ode_regression_loss(net, pairs["traj"][idx].to(device),
                                                        w.context([pairs["prompts"][i] for i in idx]),
                                                        dmd.warped_steps(cfg.steps, cfg.shift))
                    (micro / cfg.grad_accum).backward()
                    loss += micro.item() / cfg.grad_accum
                stats = {"loss": loss}
                if everywhere(math.isfinite(loss), device, world):
                    stats["grad_norm"] = optimizer_step(net, opt, cfg, world)
                else:
                    opt.zero_grad(set_to_none=True)
        # an update was taken iff its loss and gradient norm are finite (gen_loss -> gen_grad_norm, loss -> grad_norm)
        taken = {k: math.isfinite(v) and math.isfinite(stats.get(k.replace("loss", "grad_norm"), math.nan))
                 for k, v in stats.items() if k.endswith("loss")}
        for k, ok in taken.items():
            bad[k] = 0 if ok else bad.get(k, 0) + 1
            if bad[k] >= cfg.max_bad_steps:
                raise SystemExit(f"step {step}: {bad[k]} consecutive {k} updates skipped (non-finite loss or gradient) "
                                 f"{stats}; stopping")
        if not all(taken.values()):
            stats["skipped"] = [k for k, ok in taken.items() if not ok]
        step += 1
        if ema is None and step >= cfg.ema_start:
            ema = new_ema(cfg, net, device)
        elif ema is not None and taken.get("gen_loss" if cfg.stage == "dmd" else "loss"):
            ema_update(ema, net, cfg.ema_decay)
        stats.update(step=step, time=round(time.time() - t0, 3))
        if log:
            log.write(json.dumps(stats) + "\n")
            log.flush()
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if "loss" in k})
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save_checkpoint(out, step, nets(), opts, {"has_ema": ema is not None, "config": dataclasses.asdict(cfg)},
                            balancer, rank)
            if world > 1:
                dist.barrier()
        if cfg.world == "toy" and cfg.stage != "teacher" and cfg.evaluate and (
                step == cfg.max_steps or cfg.sample_every and step % cfg.sample_every == 0):
            ev = evaluate(ema or net, teacher, w, cfg, out, step)  # every rank: a sharded forward is a collective
            if log:
                log.write(json.dumps({"step": step, "eval": ev}) + "\n")
                print(f"step {step} held-out eval: {ev}")
    bar.close()
    if log:
        log.close()
    if world > 1:
        dist.barrier()
    final = get_model_state_dict(ema or net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # the trained network alone, original Wan names: what assets/ ships and --student_path reads
        atomic_write(out / "model.safetensors", lambda p: save_file({k: v.contiguous() for k, v in final.items()}, p))
    if world > 1:
        dist.destroy_process_group()


def dmd_step(cfg, step, net, teacher, critic, w: World, lat, balancer, opts, world, device) -> dict:
    """One optimizer step: (every gen_every-th) generator update, then a critic update, each over grad_accum micro-batches."""
    stats = {}

    def draw():  # every random input of one micro-step, drawn here so the micro-step is a function of them
        return (w.sample_prompts(cfg.batch_size), torch.randn(cfg.batch_size, *lat, device=device),
                dmd.sample_exit_step(len(cfg.steps), device),
                dmd.sample_dmd_timestep(cfg.batch_size, shift=cfg.shift).to(device),
                torch.randn(cfg.batch_size, *lat, device=device))

    if step % cfg.gen_every == 0:
        gen_loss, extra = 0.0, {}
        for _ in range(cfg.grad_accum):
            loss, extra = generator_loss(cfg, net, teacher, critic, w, *draw(), balancer)
            (loss / cfg.grad_accum).backward()
            gen_loss += loss.item() / cfg.grad_accum
        stats.update(extra, gen_loss=gen_loss)
        if everywhere(math.isfinite(gen_loss), device, world):
            stats["gen_grad_norm"] = optimizer_step(net, opts["net"][1], cfg, world)
        else:
            opts["net"][1].zero_grad(set_to_none=True)
    critic_loss = 0.0
    for _ in range(cfg.grad_accum):
        loss = critic_step_loss(cfg, net, critic, w, *draw())
        (loss / cfg.grad_accum).backward()
        critic_loss += loss.item() / cfg.grad_accum
    stats["critic_loss"] = critic_loss
    if everywhere(math.isfinite(critic_loss), device, world):
        stats["critic_grad_norm"] = optimizer_step(critic, opts["critic"][1], cfg, world)
    else:
        opts["critic"][1].zero_grad(set_to_none=True)
    return stats


def ode_pairs(cfg: Config, teacher, w: World, out: Path, rank: int) -> dict:
    """Teacher ODE trajectories (REFERENCE §6.6), generated once per run folder and reused on resume: by every rank
    or by none (a sharded teacher's forward is a collective), and only with the settings that made them."""
    path, names = out / f"ode_pairs_rank{rank}.safetensors", out / f"ode_prompts_rank{rank}.json"
    settings = {k: getattr(cfg, k) for k in ("teacher_path", "seed", "ode_pairs", "ode_steps", "ode_guidance",
                                             "ode_shift", "num_frames", "height", "width")}
    if everywhere(path.exists() and names.exists(), w.device, w.world):
        saved = json.loads(names.read_text())
        if saved["settings"] != settings:
            raise SystemExit(f"{path} holds ODE pairs made with {saved['settings']}; this run asks for {settings}: "
                             f"use another out_dir, or delete the ode_* files to make new ones")
        return {"traj": load_file(str(path))["traj"], "prompts": saved["prompts"]}
    trajs, prompts = [], []
    for _ in tqdm(range(0, cfg.ode_pairs, cfg.batch_size), desc="ode pairs", disable=rank != 0):
        p = w.sample_prompts(cfg.batch_size)
        noise = torch.randn(cfg.batch_size, *w.latent_shape(), device=w.device)
        with torch.no_grad():
            trajs.append(dmd.teacher_trajectory(teacher, noise, w.context(p), w.negative_context(len(p)),
                                                guidance=cfg.ode_guidance, num_steps=cfg.ode_steps,
                                                shift=cfg.ode_shift).cpu())
        prompts += p
    data = {"traj": torch.cat(trajs), "prompts": prompts}
    atomic_write(names, lambda p: Path(p).write_text(json.dumps({"settings": settings, "prompts": prompts})))
    atomic_write(path, lambda p: save_file({"traj": data["traj"].contiguous()}, p))
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
