"""Reading and writing weights and training state: weights read in place (every rank reads only its own FSDP2 shards),
step checkpoints, the run's newest intact one, the log, the exported network.

out_dir holds step_N.safetensors (networks under original Wan names as `net.` / `critic.` / `ema.`, optimizer
states as `opt.<network>.<param>.<key>`, every rank's RNG as `rng.<rank>.<device>`) and step_N.json (the state the
loop passes, the optimizers' param groups, every rank's reward balancer, the safetensors file's name), the last two
kept; log.jsonl; model.safetensors (the exported network). Every file is written to a temporary name, fsync'ed and
renamed, so a kill leaves the old file or the new one; a damaged checkpoint is skipped on resume with a warning.
"""
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor, Shard


# --------------------------------------------------------------------------------------------- weights read in place
class LazyTensor:
    """A tensor of a safetensors file, not read yet: `shape` from the file's header; `lazy[a:b]` is rows a..b-1 alone
    (safe_open's get_slice: read from disk, or since safetensors 0.8 a view of the mapped file, read where touched, as
    an mmap'd torch.load tensor)."""

    def __init__(self, handle, key: str):
        self.slice = handle.get_slice(key)  # keeps the file open
        self.shape = torch.Size(self.slice.get_shape())

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.slice[rows]


def open_safetensors(path: Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file as a LazyTensor (the header is read, no data)."""
    handle = safe_open(str(path), "pt")
    return {key: LazyTensor(handle, key) for key in handle.keys()}


def open_weights(path: Path) -> tuple[dict, str]:
    """The tensors of a weights file or folder, none read yet, and a description of the format: a safetensors file, a
    sharded *.safetensors.index.json, a folder holding one of these (Wan 14B, diffusers and transformers layouts;
    LazyTensors), or a .pt / .pth / .ckpt file (torch.load weights_only with mmap: its pages are read when touched)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        index, files = sorted(path.glob("*.safetensors.index.json")), sorted(path.glob("*.safetensors"))
        if len(index) != 1 and len(files) != 1:
            raise FileNotFoundError(f"{path}: expected one *.safetensors or one *.safetensors.index.json, found "
                                    f"{[f.name for f in index + files]}")
        path = index[0] if index else files[0]
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(open_safetensors(path.parent / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise KeyError(f"{path}: keys listed in the index but absent from the shards: {missing[:5]}")
        return tensors, f"sharded {path.name} ({len(set(weight_map.values()))} shards)"
    if path.suffix == ".safetensors":
        return open_safetensors(path), f"safetensors file {path.name}"
    if path.suffix in (".pt", ".pth", ".ckpt"):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), f"{path.suffix} file"
    raise ValueError(f"{path}: unknown checkpoint type (want .safetensors, .index.json, .pt/.pth or a folder)")


def shard_of(like: torch.Tensor, source) -> torch.Tensor:
    """What this rank holds of `source` ([N, ...]: a LazyTensor or a tensor, possibly mmap'd) where `like` is the
    parameter or optimizer state it goes into: a copy (never a view of the file) in like's dtype on its device. An
    FSDP2-sharded DTensor holds rows [r c, (r + 1) c) of dim 0 on rank r of W, c = ceil(N / W) (Shard(0),
    torch.chunk's split): only those are read, into a DTensor; anything else gets the whole tensor."""
    if not isinstance(like, DTensor):
        return source[:].to(like.device, like.dtype, copy=True)
    if like.placements != (Shard(0),):
        raise ValueError(f"expected FSDP2's Shard(0) on a 1-D mesh, got {like.placements}")
    mesh, n = like.device_mesh, like.shape[0]
    rows = -(-n // mesh.size())
    start = min(mesh.get_local_rank() * rows, n)
    local = source[start:min(start + rows, n)].to(like.device, like.dtype, copy=True)
    return DTensor.from_local(local, mesh, like.placements, shape=like.shape, stride=like.stride())


@torch.no_grad()
def load_shards(module: torch.nn.Module, source: dict) -> None:
    """Every parameter and buffer of module.state_dict() copied from `source` as this rank holds it (shard_of), one
    tensor at a time, a tied one (umT5's embedding, under two names) once. `source` maps each key to a tensor of its
    shape (the callers check keys and shapes first, from the headers). A module on the meta device is materialised
    on the CPU first."""
    if any(t.is_meta for t in module.state_dict().values()):
        module.to_empty(device="cpu")
    done = set()
    for key, target in module.state_dict(keep_vars=True).items():
        if id(target) not in done:
            done.add(id(target))
            target.copy_(shard_of(target, source[key]))


def atomic_write(path: Path, write) -> None:
    """write(temporary path), fsync, rename over `path`, fsync the folder: after a kill or a crash `path` is the
    old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def gather_from_ranks(obj) -> list:
    """`obj` of every rank, in rank order; [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def save_checkpoint(out: Path, step: int, nets: dict, opts: dict, state: dict, balancer, rank: int,
                    keep: int = 2) -> None:
    """step_N.safetensors, then step_N.json (`state` plus the above), then the checkpoints before the last `keep`
    removed. `opts[name]` is the optimizer of `nets[name]`. Called on every rank: gathering FSDP2 shards and the
    per-rank RNG / balancer states are collectives; rank 0 writes."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    models = {name: get_model_state_dict(net, options=full) for name, net in nets.items() if net is not None}
    optims = {name: get_optimizer_state_dict(nets[name], opt, options=full) for name, opt in opts.items()}
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    rngs, balancers = gather_from_ranks(rng), gather_from_ranks(balancer.state_dict())  # each rank has its own
    if rank != 0:
        return
    tensors = {f"{name}.{k}": v.contiguous() for name, sd in models.items() for k, v in sd.items()}
    for name, sd in optims.items():
        for param, st in sd["state"].items():
            tensors.update({f"opt.{name}.{param}.{k}": v.reshape(1) if v.dim() == 0 else v.contiguous() for k, v in st.items()})
    tensors.update({f"rng.{r}.{k}": v for r, st in enumerate(rngs) for k, v in st.items()})
    stem = out / f"step_{step:06d}"
    atomic_write(stem.with_suffix(".safetensors"), lambda p: save_file(tensors, p))
    meta = dict(state, step=step, opt_groups={name: sd["param_groups"] for name, sd in optims.items()},
                balancers=balancers, file=stem.with_suffix(".safetensors").name)
    atomic_write(stem.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    for old in sorted(out.glob("step_*.json"))[:-keep]:
        old.unlink()
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def latest_checkpoint(out: Path) -> dict | None:
    """The JSON state of the newest intact checkpoint in `out`, or None when it holds none (a fresh run). A damaged
    one (unreadable JSON; safetensors file missing, truncated or unreadable) is skipped with a warning naming it;
    if every checkpoint is damaged, a SystemExit (never a silent fresh start)."""
    skipped = []
    for path in sorted(out.glob("step_*.json"), reverse=True):
        try:
            meta = json.loads(path.read_text())
            with safe_open(str(out / meta["file"]), "pt"):  # parses the header, checks the data covers the file
                pass
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            skipped.append(f"{path.name} ({type(err).__name__}: {err})")
            continue
        if skipped:
            warnings.warn(f"{out}: skipped damaged checkpoint(s) {'; '.join(skipped)}; using {path.name}")
        return meta
    if skipped:
        raise SystemExit(f"{out}: no intact checkpoint, {'; '.join(skipped)}; delete them to start afresh")
    return None


def network_weights(tensors: dict, name: str) -> dict:
    """One network's state dict (Wan key names) out of a checkpoint's tensors, where it is stored as `name.<key>`."""
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}


def restore_checkpoint(out: Path, meta: dict, nets: dict, opts: dict, balancer, rank: int, world_size: int) -> None:
    """Networks, optimizers, this rank's RNG and balancer restored in place from the checkpoint `meta` names. Each rank
    reads only what it holds (shard_of): under FSDP2 its rows of every network and optimizer state, replicated the
    whole networks; its own RNG. The optimizers' hyperparameters (lr, betas, weight decay) and the balancer's settings
    stay those they were built with from the config. The per-rank states need the process count the checkpoint was
    written with."""
    if len(meta["balancers"]) != world_size:
        raise SystemExit(f"{out / meta['file']} was written by {len(meta['balancers'])} process(es), this run has "
                         f"{world_size}: resume with the same number of processes (each keeps its own RNG stream)")
    tensors = open_safetensors(out / meta["file"])
    for name, net in nets.items():
        if net is not None:
            load_shards(net, network_weights(tensors, name))
    for name, opt in opts.items():
        configured = [{k: group[k] for k in ("lr", "betas", "weight_decay")} for group in opt.param_groups]
        params, saved = dict(nets[name].named_parameters()), {}
        for key, v in tensors.items():
            if key.startswith(f"opt.{name}."):
                param, k = key[len(f"opt.{name}."):].rsplit(".", 1)
                saved.setdefault(param, {})[k] = v[:].reshape(()).clone() if k == "step" else shard_of(params[param], v)
        # the saved groups name the parameters in the optimizer's order; the read states become its states (no copy)
        groups = meta["opt_groups"][name]
        index = {param: i for i, param in enumerate(param for group in groups for param in group["params"])}
        opt.load_state_dict({"state": {index[param]: st for param, st in saved.items()},
                             "param_groups": [dict(group, params=[index[p] for p in group["params"]])
                                              for group in groups]})
        for group, settings in zip(opt.param_groups, configured):
            group.update(settings)
    torch.set_rng_state(tensors[f"rng.{rank}.cpu"][:])
    if f"rng.{rank}.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.{rank}.cuda"][:])
    balancer.load_state_dict(dict(meta["balancers"][rank], window=balancer.window, warmup=balancer.warmup,
                                  lam=balancer.lam))


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


def export_weights(net: torch.nn.Module, path: Path, rank: int) -> None:
    """The network alone under original Wan names: what assets/ ships and --student_path reads (a collective under
    FSDP2; rank 0 writes)."""
    weights = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in weights.items()}, p))


def ode_pairs(out: Path, rank: int, settings: dict, make) -> dict:
    """Teacher ODE pairs cached in the run folder: make() -> (trajectories, prompts) once, reused on resume only with
    the `settings` that made them; every rank reuses its file or all make new ones (a sharded teacher's forward is a
    collective). Returns {"traj": [N, K, F, C, H, W], "prompts": N prompts}."""
    path, names = out / f"ode_pairs_rank{rank}.safetensors", out / f"ode_prompts_rank{rank}.json"
    if all(gather_from_ranks(path.exists() and names.exists())):
        saved = json.loads(names.read_text())
        if saved["settings"] != settings:
            raise SystemExit(f"{path} holds ODE pairs made with {saved['settings']}; this run asks for {settings}: "
                             f"use another out_dir, or delete the ode_* files to make new ones")
        return {"traj": load_file(str(path))["traj"], "prompts": saved["prompts"]}
    traj, prompts = make()
    atomic_write(names, lambda p: Path(p).write_text(json.dumps({"settings": settings, "prompts": prompts})))
    atomic_write(path, lambda p: save_file({"traj": traj.contiguous()}, p))
    return {"traj": traj, "prompts": prompts}
