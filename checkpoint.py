"""Reading and writing training state: step checkpoints, the run's newest intact one, the log, the exported network.

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
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)


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
    """Networks, optimizers, this rank's RNG and balancer restored in place from the checkpoint `meta` names (every
    rank reads it). The optimizers' hyperparameters (lr, betas, weight decay) and the balancer's settings stay those
    they were built with from the config. The per-rank states need the process count the checkpoint was written
    with."""
    if len(meta["balancers"]) != world_size:
        raise SystemExit(f"{out / meta['file']} was written by {len(meta['balancers'])} process(es), this run has "
                         f"{world_size}: resume with the same number of processes (each keeps its own RNG stream)")
    tensors = load_file(str(out / meta["file"]))
    full = StateDictOptions(full_state_dict=True)
    for name, net in nets.items():
        if net is not None:
            set_model_state_dict(net, network_weights(tensors, name), options=full)
    for name, opt in opts.items():
        configured = [{k: group[k] for k in ("lr", "betas", "weight_decay")} for group in opt.param_groups]
        state = {}
        for key, v in tensors.items():
            if key.startswith(f"opt.{name}."):
                param, k = key[len(f"opt.{name}."):].rsplit(".", 1)
                state.setdefault(param, {})[k] = v.reshape(()) if k == "step" else v
        set_optimizer_state_dict(nets[name], opt, {"state": state, "param_groups": meta["opt_groups"][name]},
                                 options=full)
        for group, settings in zip(opt.param_groups, configured):
            group.update(settings)
    torch.set_rng_state(tensors[f"rng.{rank}.cpu"])
    if f"rng.{rank}.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.{rank}.cuda"])
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
