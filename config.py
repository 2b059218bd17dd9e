"""The run's configuration and what it names: one typed dataclass (its defaults are the toy world, configs/toy.yaml),
YAML presets and command-line flags parsed by the fields' types and checked before any work, the fields a resume may
change, and the things a config builds: the toy or Wan components, the DiTs, the process group with DDP / FSDP2.

    cfg = load_config(["--config", "configs/wan1.3b_stream_r1.yaml", "--lr", "1e-5"])   # or --lr=1e-5

Names: `cfg.world` is the toy | wan switch, `world_size` the number of processes, `Components` the VAE, text encoder,
reward model and prompts of that world.
"""
import dataclasses
import inspect
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

import dmd
import reward
import text
import toy
import vae
from model import KVCache, WanConfig, WanModel, load_wan_weights, mixed_precision_policy

SIZES = {"toy": toy.toy_dit_config, "1.3b": WanConfig.wan_1_3b, "14b": WanConfig.wan_14b}


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
    allow_config_change: bool = False   # resume with other EXPERIMENT settings than the checkpoint's (applied, logged)
    # networks: what each one starts from (toy: files shipped in assets/; wan: Wan2.1 / distilled checkpoints)
    model_size: str = "toy"             # toy | 1.3b | 14b  (student and critic)
    teacher_size: str = "toy"
    teacher_path: str = "assets/toy_teacher.safetensors"    # ode, dmd: the frozen teacher (teacher stage: random init)
    critic_path: str = "assets/toy_teacher.safetensors"     # dmd: the critic's init (the teacher's weights, §1.1)
    student_path: str = "assets/toy_ode_init.safetensors"   # dmd: the ODE-initialised student (wan: ode_init.pt);
    #                                   ode: the student's init, usually the teacher's file; empty: random init
    text_path: str = "assets/toy_text_encoder.safetensors"  # wan: models_t5_umt5-xxl-enc-bf16.pth or text_encoder/
    tokenizer_dir: str = ""             # wan: google/umt5-xxl tokenizer folder
    vae_path: str = ""                  # wan: Wan2.1_VAE.pth
    reward_base_dir: str = ""           # wan: Qwen2-VL-2B-Instruct folder
    reward_release_dir: str = ""        # wan: VideoReward release folder
    prompt_file: str = ""               # wan: one prompt per line
    negative_prompt: str = ""           # "" for the toy (zero context); Wan's default for real runs
    teacher_chunk_frames: int = 1       # k: teacher and critic block-causal over chunks of k frames (toy: 1, so the
    #                                   teacher learns the arrow of time, README); 0: bidirectional (Wan, required)
    # geometry (latent frames; pixels for height/width)
    num_frames: int = toy.TOY_FRAMES
    rollout_frames: int = 0             # > num_frames: long tuning, a window of num_frames supervised (0: = num_frames)
    chunk_frames: int = toy.TOY_CHUNK
    window_frames: int = toy.TOY_WINDOW   # 0: a global cache (no eviction)
    sink_frames: int = toy.TOY_SINK
    ema_alpha: float = toy.TOY_EMA_ALPHA  # 0: a plain sink, never fused (no EMA)
    height: int = toy.TOY_SIZE
    width: int = toy.TOY_SIZE
    # schedule (REFERENCE §1.4-1.6)
    steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
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
    betas: tuple[float, ...] = (0.0, 0.999)
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
    parallel: str = "ddp"               # ddp (DistributedDataParallel) | fsdp (FSDP2 fully_shard)
    bf16: bool = False                  # bf16 autocast and bf16 frozen networks, on every device; false: fp32
    grad_checkpointing: bool = False
    max_bad_steps: int = 3              # consecutive skipped updates of one network (non-finite loss or gradient)

    def cache_options(self) -> dict:
        """The KV cache geometry as WanModel.new_cache takes it (0 means None: no window, no EMA)."""
        return dict(window_frames=self.window_frames or None, sink_frames=self.sink_frames,
                    ema_alpha=self.ema_alpha or None)


FIELDS = {f.name: f.type for f in dataclasses.fields(Config)}
# A resume may change these freely; every other field changes the experiment and needs allow_config_change.
BOOKKEEPING = ("out_dir", "max_steps", "ckpt_every", "sample_every", "evaluate", "allow_config_change",
               "grad_checkpointing", "max_bad_steps")
EXPERIMENT = tuple(name for name in FIELDS if name not in BOOKKEEPING)
CHOICES = {"stage": ("teacher", "ode", "dmd"), "weighting": ("none", "re_dmd", "stream_r1"), "world": ("toy", "wan"),
           "parallel": ("ddp", "fsdp"), "model_size": tuple(SIZES), "teacher_size": tuple(SIZES)}
AT_LEAST = {"batch_size": 1, "grad_accum": 1, "gen_every": 1, "ckpt_every": 1, "max_steps": 1, "max_bad_steps": 1,
            "sample_every": 0, "ema_start": 0, "ode_pairs": 1, "ode_steps": 1, "num_frames": 1, "chunk_frames": 1,
            "height": 1, "width": 1, "teacher_chunk_frames": 0}


# --------------------------------------------------------------------------------------------- parsing
def parse_flags(argv: list[str]) -> dict[str, str]:
    """`--key=value` and `--key value` -> {key: value text}; a later flag wins."""
    flags, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise SystemExit(f"unexpected argument {arg!r}: flags are --key=value or --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not args:
                raise SystemExit(f"--{key} needs a value")
            value = args.pop(0)
        flags[key] = value
    return flags


def typed(key: str, value, kind: type):
    """`value` (YAML's type, or command-line text) as the field type `kind`: bool, int, float, str or tuple of floats.
    YAML reads `1e-4` as text, which becomes the float here; "false" is False; anything else is a SystemExit naming
    the key, the value and the type."""
    try:
        if kind is bool:
            if str(value).lower() in ("true", "false", "1", "0"):
                return str(value).lower() in ("true", "1")
        elif kind is int:
            if not isinstance(value, (bool, float)):
                return int(value)
        elif kind is float:
            if not isinstance(value, bool):
                return float(value)
        elif kind is str:
            if isinstance(value, str):
                return value
        else:  # tuple[float, ...]: a YAML list or "1000,750,500"
            items = value if isinstance(value, (list, tuple)) else str(value).strip("()[] ").split(",")
            return tuple(typed(key, v, float) for v in items)
    except (TypeError, ValueError):
        pass
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, "numbers a,b")
    raise SystemExit(f"{key}={value!r}: expected {expected}")


def load_config(argv: list[str] | dict[str, str], sampling: bool = False) -> Config:
    """Defaults <- `--config file.yaml` <- the other flags (argv, or parse_flags' dict), every value parsed by its
    field's type, then checked; `sampling` checks only the files sample.py reads."""
    flags, values = parse_flags(argv) if isinstance(argv, list) else dict(argv), {}
    if "config" in flags:
        path = Path(flags.pop("config"))
        if not path.is_file():
            raise SystemExit(f"config={path}: file not found")
        values = yaml.safe_load(path.read_text()) or {}
    values.update(flags)
    for key in values:
        if key not in FIELDS:
            raise SystemExit(f"unknown config key {key!r}; known: {', '.join(FIELDS)}")
    cfg = Config(**{key: typed(key, value, FIELDS[key]) for key, value in values.items()})
    validate_config(cfg, sampling)
    return cfg


def validate_config(cfg: Config, sampling: bool = False) -> None:
    """Clear errors before any work: choices, ranges, geometry, the cache the model would refuse, every file read."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"{key}={getattr(cfg, key)!r}: expected one of {allowed}")
    for key, low in AT_LEAST.items():
        if getattr(cfg, key) < low:
            raise SystemExit(f"{key}={getattr(cfg, key)}: expected >= {low}")
    if not cfg.steps or not all(0 < s <= dmd.NUM_TRAIN_TIMESTEPS for s in cfg.steps):
        raise SystemExit(f"steps={cfg.steps}: expected times in (0, {dmd.NUM_TRAIN_TIMESTEPS}]")
    keep = inspect.signature(dmd.teacher_trajectory).parameters["keep"].default  # the states ODE pairs hold
    if cfg.stage == "ode" and (cfg.ode_steps < max(keep) or len(cfg.steps) != len(keep) - 1):
        raise SystemExit(f"ode_steps={cfg.ode_steps}, steps={cfg.steps}: ODE pairs keep states {keep} of the teacher's "
                         f"trajectory; expected ode_steps >= {max(keep)} and {len(keep) - 1} steps")
    if cfg.stage == "teacher" and cfg.world != "toy":
        raise SystemExit(f"stage=teacher, world={cfg.world!r}: expected world='toy' (real runs load the Wan2.1 teacher)")
    if cfg.num_frames % cfg.chunk_frames:
        raise SystemExit(f"num_frames={cfg.num_frames}: expected a multiple of chunk_frames={cfg.chunk_frames}")
    if cfg.teacher_chunk_frames and (cfg.world != "toy" or cfg.num_frames % cfg.teacher_chunk_frames):
        raise SystemExit(f"teacher_chunk_frames={cfg.teacher_chunk_frames}: expected 0 with world={cfg.world!r} (the "
                         f"pretrained Wan teacher is bidirectional), else a divisor of num_frames={cfg.num_frames}")
    if cfg.rollout_frames and (cfg.rollout_frames < cfg.num_frames or cfg.rollout_frames % cfg.chunk_frames):
        raise SystemExit(f"rollout_frames={cfg.rollout_frames}: expected 0 or a multiple of chunk_frames="
                         f"{cfg.chunk_frames} that is at least num_frames={cfg.num_frames}")
    wan_vae_factor = 2 ** (len(inspect.signature(vae.WanVAE).parameters["dim_mult"].default) - 1)  # 8 (REFERENCE §5.1)
    factor = (toy.ToyVAE.spatial_factor if cfg.world == "toy" else wan_vae_factor) * SIZES[cfg.model_size]().patch_size[1]
    if cfg.height % factor or cfg.width % factor:
        raise SystemExit(f"height={cfg.height}, width={cfg.width}: expected multiples of {factor} (VAE x patch)")
    try:  # the cache the student would build, without building the student
        KVCache(num_layers=1, batch_size=1, chunk_frames=cfg.chunk_frames, rope="relative", **cfg.cache_options())
    except ValueError as err:
        raise SystemExit(f"window_frames={cfg.window_frames}, sink_frames={cfg.sink_frames}, ema_alpha={cfg.ema_alpha}"
                         f", chunk_frames={cfg.chunk_frames}: {err}") from None
    rewarded = cfg.stage == "dmd" and cfg.weighting != "none" and not sampling
    needed = {"teacher_path": cfg.stage != "teacher" and not sampling,
              "student_path": not sampling and (cfg.stage == "dmd" or cfg.stage == "ode" and bool(cfg.student_path)),
              "critic_path": cfg.stage == "dmd" and not sampling,
              "text_path": cfg.world == "wan" or cfg.stage != "teacher" or bool(cfg.text_path)}
    if cfg.world == "wan":
        needed.update(tokenizer_dir=True, vae_path=True, prompt_file=True, reward_base_dir=rewarded,
                      reward_release_dir=rewarded)
    for key, need in needed.items():
        path = getattr(cfg, key)
        if need and not (path and Path(path).exists()):
            raise SystemExit(f"{key}={path!r}: expected an existing file or folder (the {cfg.stage} stage reads it)")
    if cfg.prompt_file and not any(line.strip() for line in Path(cfg.prompt_file).read_text().splitlines()):
        raise SystemExit(f"prompt_file={cfg.prompt_file!r}: holds no prompt, expected one per line")


def config_changes(cfg: Config, saved: dict) -> dict:
    """EXPERIMENT fields that differ from a checkpoint's saved config: {key: [saved, now]}."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return {key: [saved[key], now[key]] for key in EXPERIMENT if key in saved and saved[key] != now[key]}


# --------------------------------------------------------------------------------------------- components
class Components:
    """What the loop needs that differs between the toy world and real Wan runs (cfg.world): VAE, text encoder,
    reward model (only where the weighting uses one), prompts."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        rewarded = cfg.stage == "dmd" and cfg.weighting != "none"
        frozen = torch.bfloat16 if cfg.bf16 else torch.float32  # the dtype frozen networks are stored in
        if cfg.world == "toy":
            self.vae = toy.ToyVAE().to(device)
            encoder = toy.toy_text_encoder(cfg.text_path or None)  # empty: a fresh one (teacher stage only)
            self.text = text.TextEncoder(encoder.to(device, frozen), toy.toy_tokenizer(), text_len=toy.TOY_TEXT_LEN)
            self.reward = toy.ToyReward() if rewarded else None
            self.prompts = toy.toy_prompts()
        else:
            self.vae = vae.WanVAE().eval()
            vae.load_vae_weights(self.vae, cfg.vae_path)
            self.vae.to(device, frozen)
            # umT5-XXL (5.7 B parameters, 11.4 GB in bf16) is sharded with FSDP2 under parallel=fsdp: 1.4 GB per GPU
            # on 8, at GPU speed. Not kept on the CPU (a 100-token prompt is ~1 TFLOP: ~10 s on the one thread torchrun
            # gives each rank, ~10 prompts per optimizer step), nor encoded up front (~0.8 MB per prompt: tens of GB
            # for a file of tens of thousands). Every rank encodes one batch per micro-step, so the sharded forwards
            # line up; it keeps no per-rank cache of prompts (a hit on one rank only would hang the others).
            fsdp = sharded(cfg)
            self.text = text.load_text_encoder(cfg.text_path, cfg.tokenizer_dir, dtype=frozen, device=device,
                                               cache_size=0 if fsdp else 1024,
                                               shard=(lambda m: shard(m, cfg, m.encoder.block, True)) if fsdp else None)
            self.reward = reward.VideoReward.from_pretrained(
                cfg.reward_base_dir, cfg.reward_release_dir, dtype=frozen, device=device,
                gradient_checkpointing=cfg.grad_checkpointing) if rewarded else None
            self.prompts = [p.strip() for p in Path(cfg.prompt_file).read_text().splitlines() if p.strip()]
        self.vae.requires_grad_(False)
        # Wan's negative prompt for real runs, encoded once (REFERENCE §4.3); the toy world's is all zeros (padding)
        self.negative = self.context([cfg.negative_prompt]) if cfg.negative_prompt else \
            torch.zeros(1, self.text.text_len, self.text.dim, device=device)

    def sample_prompts(self, n: int) -> list[str]:
        idx = torch.randint(len(self.prompts), (n,)).tolist()
        return [self.prompts[i] for i in idx]

    def context(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, L, text_dim] of the prompts."""
        return self.text.encode(prompts).to(self.device)

    def negative_context(self, n: int) -> torch.Tensor:
        """The unconditional context [n, L, text_dim] (Wan's negative prompt, or zeros for the toy world)."""
        return self.negative.expand(n, -1, -1)

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(F, C, H, W) of one clip's latents."""
        s = self.vae.spatial_factor
        return self.cfg.num_frames, self.vae.z_dim, self.cfg.height // s, self.cfg.width // s


def teacher_mask(cfg: Config) -> dict:
    """build_net's causal / chunk_frames for the teacher and the critic (which starts from it): bidirectional, or
    block-causal over chunks of cfg.teacher_chunk_frames."""
    return dict(causal=True, chunk_frames=cfg.teacher_chunk_frames) if cfg.teacher_chunk_frames else {}


def build_net(size: str, path: str | dict, device: torch.device, causal: bool = False, chunk_frames: int = 3,
              cfg: Config | None = None, frozen: bool = False) -> WanModel:
    """A Wan DiT of one of SIZES, loaded from `path` (a file, folder or state dict load_wan_weights reads) or, with an
    empty path, randomly initialised as on rank 0. With a run's cfg: stored in bf16 if `frozen` and cfg.bf16 (FSDP2's
    bf16 compute copies then cost nothing; a trained network keeps fp32 master weights), and sharded (parallel=fsdp
    under torchrun) while still on the meta device, so that each rank allocates and reads only its own rows of every
    tensor (checkpoint.load_shards); a trained network checkpoints its blocks' activations if cfg.grad_checkpointing."""
    def make():
        return WanModel(SIZES[size](), causal=True, chunk_frames=chunk_frames) if causal else WanModel(SIZES[size]())

    if path:
        with torch.device("meta"):
            net = make()
    else:
        net = make().to(device)
        broadcast_from_rank0(net)  # inits (seed + rank) differ per rank
    if frozen:
        net.requires_grad_(False).eval()
        if cfg is not None and cfg.bf16:
            net.to(torch.bfloat16)
    elif cfg is not None:
        net.gradient_checkpointing = cfg.grad_checkpointing
    if cfg is not None and sharded(cfg):
        shard(net, cfg, () if causal else net.blocks, frozen)
    if path:
        load_wan_weights(net.to_empty(device=device), path)
    return net


# --------------------------------------------------------------------------------------------- distributed
def setup_distributed(timeout: timedelta = timedelta(hours=1)) -> tuple[int, int, torch.device]:
    """torchrun's environment -> (rank, world_size, device), process group nccl on CUDA (bound to this rank's GPU),
    gloo on CPU; plain `python train.py` is rank 0 of 1 without a process group. timeout: how long a collective waits
    for the slowest rank before the run is killed (NCCL's default, 10 min, is less than rank 0 takes to write a Wan
    checkpoint alone: student, critic, EMA and two AdamW states, about 40 GB)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def everywhere(flag: bool) -> bool:
    """True iff `flag` holds on every rank: one decision for all (a rank that skips a step or a teacher forward while
    the others run collectives would hang them)."""
    if not dist.is_initialized():
        return flag
    ok = torch.tensor(float(flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def broadcast_from_rank0(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (a random init differs per rank)."""
    if dist.is_initialized():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


class DDP(DistributedDataParallel):
    """DistributedDataParallel whose module's attributes (chunk_frames, new_cache) read through, for dmd.py."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def replicate(net: torch.nn.Module | None, cfg: Config, world_size: int) -> torch.nn.Module | None:
    """What the loop calls to train `net`: DDP across processes (parallel=ddp), else `net` itself (one process, or
    FSDP2 which reduces on its own). EMA, checkpoints and evaluation use `net`. A rollout's several grad-enabled
    forwards (one per chunk) before one backward reduce as one: every parameter takes part in each."""
    if net is None or cfg.parallel != "ddp" or world_size == 1:
        return net
    return DDP(net, broadcast_buffers=False)


def sharded(cfg: Config) -> bool:
    """Networks are sharded with FSDP2: parallel=fsdp under a process group (torchrun)."""
    return cfg.parallel == "fsdp" and dist.is_initialized()


def shard(module: torch.nn.Module, cfg: Config, blocks, frozen: bool) -> torch.nn.Module:
    """FSDP2: each of `blocks` then the root, with model.mixed_precision_policy() under bf16 (bf16 compute copies,
    fp32 gradient reduction, inputs as given: the fp32 islands need fp32 t and residual stream). The cache-using
    student is sharded at the root only (no blocks): its streaming path computes the prompt's cross-attention K/V
    outside the blocks' forward, where a per-block shard would not be gathered (1.3B in bf16: 2.6 GB).
    FSDP2 keeps the root gathered after a forward, for the backward that reshards it; `frozen` modules (teacher, EMA,
    text encoder) have no backward, so they reshard after every forward (else the 14B teacher would stay whole on
    every GPU and the EMA would be updated as a gathered copy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = mixed_precision_policy() if cfg.bf16 else MixedPrecisionPolicy()
    reshard = True if frozen else None  # None: FSDP2's default (blocks reshard, the root waits for the backward)
    for block in blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(module, mp_policy=mp, reshard_after_forward=reshard)
    return module


def autocast(cfg: Config, device: torch.device):
    """The compute precision of every forward: bf16 autocast on any device with cfg.bf16 (REFERENCE §2.6's official
    mode, model.py keeps its fp32 islands), plain fp32 without."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
