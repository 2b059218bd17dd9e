"""checkpoint.py reads weights in place: under FSDP2 (two gloo processes on CPU, fp32) each rank allocates and reads
only its own rows of every network, at load (config.build_net from a sharded safetensors index folder and from a
Self-Forcing-style .pt trainer dict, text.load_text_encoder from Wan's umT5 .pth) and at resume (restore_checkpoint:
each network of a step checkpoint with its optimizer states). Oracles: the files read whole (load_file / torch.load),
rows split as FSDP2's Shard(0) splits them, and the unsharded networks' outputs. Every tensor a rank materialises and
every byte it reads is counted (Materialised)."""
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import UMT5Config, UMT5EncoderModel

import checkpoint
import config
import text
import train
import weighting
from test_text import TINY, hf_to_wan_name, make_tokenizer
from test_train import free_port

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TEACHER = ROOT / "assets" / "toy_teacher.safetensors"
SET_STORAGE = (torch.ops.aten.set_.source_Storage, torch.ops.aten.set_.source_Storage_storage_offset)


def mapped_files() -> list[tuple[int, int]]:
    """Address ranges of the weight files this process has mapped (safe_open, torch.load(mmap=True)): their bytes are
    read from disk only where an operator touches them."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith((".safetensors", ".pt", ".pth")):
            ranges.append(tuple(int(a, 16) for a in fields[0].split("-")))
    return ranges


class Materialised(TorchDispatchMode):
    """What this process materialises while active. `read`: the bytes of mapped weight files that operators read (a
    view reads nothing), plus the bytes of files read into memory (storages handed to `set_` that are not mapped
    files: torch.load without mmap, older safetensors). `peak`: the most bytes at once of the storages created (an
    allocation or such a read), each counted while it lives."""

    def __init__(self):
        super().__init__()
        self.files, self.live, self.now, self.peak, self.read = mapped_files(), {}, 0, 0, 0

    def in_file(self, storage: torch.UntypedStorage) -> bool:
        ptr = storage.data_ptr()
        if not any(lo <= ptr < hi for lo, hi in self.files):
            self.files = mapped_files()  # a file mapped since
        return any(lo <= ptr < hi for lo, hi in self.files)

    def track(self, storage: torch.UntypedStorage):
        key, size = storage.data_ptr(), storage.nbytes()
        if size and key not in self.live and not self.in_file(storage):
            self.live[key] = size
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self.free, key)

    def free(self, key: int):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SET_STORAGE:
            storage = args[1]
            if storage.nbytes() and storage.data_ptr() not in self.live and not self.in_file(storage):
                self.read += storage.nbytes()  # a file's bytes read into memory
                self.track(storage)
        elif not func.is_view:  # a view reads nothing and allocates nothing
            self.read += sum(t.numel() * t.element_size() for t in local((args, kwargs))
                             if t.numel() and self.in_file(t.untyped_storage()))
            if not func._schema.is_mutable:  # an in-place op writes into storage that exists already
                for t in local(out):
                    self.track(t.untyped_storage())
        return out


def local(tree) -> list[torch.Tensor]:
    """The real tensors in a pytree, a DTensor as its local shard."""
    return [t._local_tensor if isinstance(t, DTensor) else t for t in tree_leaves(tree)
            if isinstance(t, torch.Tensor) and not t.is_meta]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rows_of(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """What rank `rank` holds under FSDP2's Shard(0): torch.chunk's split of dim 0 (a rank past the chunks: none)."""
    chunks = torch.chunk(tensor, WORLD)
    return chunks[rank] if rank < len(chunks) else tensor[:0]


def assert_shards(module: torch.nn.Module, whole: dict, rank: int, what: str):
    for key, v in module.state_dict().items():
        assert isinstance(v, DTensor), f"{what}: {key} is not sharded"
        want = rows_of(whole[key], rank).to(v.dtype)
        assert torch.equal(v.to_local(), want), f"{what}: rank {rank}'s rows of {key} differ from the file's"


def measured(record: dict, what: str, whole_bytes: int, run):
    """run() under Materialised; records its peak and read bytes against the whole and asserts about 1 / WORLD."""
    with Materialised() as acc:
        out = run()
    record[what] = {"whole": whole_bytes, "peak": acc.peak, "read": acc.read}
    assert acc.read <= 0.55 * whole_bytes and acc.peak <= 0.6 * whole_bytes, \
        f"{what}: a rank read {acc.read} and held at most {acc.peak} bytes of a {whole_bytes}-byte whole"
    return out


def toy_inputs():
    gen = torch.Generator().manual_seed(0)
    cfg = config.SIZES["toy"]()
    return (torch.randn(1, 3, cfg.in_dim, 4, 4, generator=gen), torch.tensor([700.0]),
            torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen))


def _worker(rank: int, folder: str, port: int):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    folder, cpu, record = Path(folder), torch.device("cpu"), {}
    cfg = config.Config(parallel="fsdp")
    whole, x, t, ctx = load_file(TEACHER), *toy_inputs()

    # load: the frozen bf16 teacher (sharded per block) from an index folder, the causal student (root) from a .pt
    for name, src, causal, bf16 in (("index folder, frozen bf16", folder / "sharded", False, True),
                                    (".pt trainer dict", folder / "sf.pt", True, False)):
        run = config.Config(parallel="fsdp", bf16=bf16)
        net = measured(record, f"load from {name}", nbytes(whole.values()), lambda: config.build_net(
            "toy", str(src), cpu, causal=causal, chunk_frames=3, cfg=run, frozen=bf16))
        assert_shards(net, whole, rank, name)
        ref = config.build_net("toy", str(TEACHER), cpu, causal=causal, chunk_frames=3, cfg=config.Config(bf16=bf16),
                               frozen=bf16)  # parallel=ddp: whole
        with torch.no_grad(), config.autocast(run, cpu):
            assert torch.equal(net(x, t, ctx), ref(x, t, ctx)), f"{name}: the sharded network computes otherwise"

    # a checkpoint that does not fit: the clear error comes from the headers, before any tensor is read
    with Materialised() as acc, pytest.raises(ValueError, match=r"1 missing, e.g. \['head.modulation'\].*1 shape"):
        config.build_net("toy", str(folder / "bad.safetensors"), cpu, cfg=cfg)
    assert acc.read == 0, f"{acc.read} bytes read before refusing a checkpoint that does not fit"

    # load: umT5 from Wan's .pth, sharded per block as config.Components shards it
    t5_whole = torch.load(folder / "t5.pth")
    encoder = measured(record, "load umT5 .pth", nbytes(t5_whole.values()), lambda: text.load_text_encoder(
        folder / "t5.pth", folder / "tokenizer", text_len=8, config=TINY, cache_size=0,
        shard=lambda m: config.shard(m, cfg, m.encoder.block, True)))
    hf = {k: t5_whole[hf_to_wan_name(k if k != "encoder.embed_tokens.weight" else "shared.weight")]
          for k in encoder.model.state_dict()}
    assert_shards(encoder.model, hf, rank, "umT5")
    plain = text.load_text_encoder(folder / "t5.pth", folder / "tokenizer", text_len=8, config=TINY)
    prompts = ["a red ball rolls", "the blue cube"]
    assert torch.equal(encoder.encode(prompts), plain.encode(prompts)), "the sharded umT5 encodes otherwise"

    # resume: a step checkpoint of the student, critic (one AdamW step each) and EMA, read back network by network
    def networks():
        net = config.build_net("toy", str(folder / "sharded"), cpu, causal=True, chunk_frames=3, cfg=cfg)
        critic = config.build_net("toy", str(folder / "sharded"), cpu, cfg=cfg)
        return {"net": net, "critic": critic}, {k: train.make_optimizer(m, 1e-3, cfg) for k, m in
                                                 {"net": net, "critic": critic}.items()}

    nets, opts = networks()
    for name, net in nets.items():
        net(x, t, ctx).square().mean().backward()
        opts[name].step()
    nets["ema"] = train.new_ema(nets["net"], cfg, cpu)
    balancer = weighting.RewardBalancer(cfg.balance_window, cfg.balance_warmup, cfg.balance_lambda)
    checkpoint.save_checkpoint(folder / "run", 1, nets, opts, {"has_ema": True}, balancer, rank)
    dist.barrier()
    meta = checkpoint.latest_checkpoint(folder / "run")
    saved = load_file(folder / "run" / meta["file"])
    nets, opts = networks()
    nets["ema"] = train.new_ema(nets["net"], cfg, cpu)
    for name, net in nets.items():
        group = {k: v for k, v in saved.items() if k.startswith((f"{name}.", f"opt.{name}."))}
        measured(record, f"resume {name}", nbytes(group.values()), lambda: checkpoint.restore_checkpoint(
            folder / "run", meta, {name: net}, {name: opts[name]} if name in opts else {}, balancer, rank, WORLD))
        assert_shards(net, checkpoint.network_weights(saved, name), rank, f"resumed {name}")
        for param_name, p in net.named_parameters() if name in opts else ():
            state, prefix = opts[name].state[p], f"opt.{name}.{param_name}."
            assert torch.equal(state["step"], saved[prefix + "step"].reshape(())), f"{prefix}step"
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[k].to_local(), rows_of(saved[prefix + k], rank)), f"{prefix}{k}"
    (folder / f"bytes_rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.destroy_process_group()


def test_no_rank_reads_or_holds_a_whole_sharded_network_at_load_or_resume(tmp_path):
    """Per rank, per network (and its optimizer states at resume): bytes read from files <= 0.55 and bytes held at
    once <= 0.6 of the whole (its half plus one tensor's transients); each rank's shards are its rows of the file,
    the sharded networks compute what the unsharded ones do; a checkpoint that does not fit is refused unread."""
    whole = load_file(TEACHER)
    keys = sorted(whole)
    (tmp_path / "sharded").mkdir()
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00003.safetensors": keys[i::3] for i in range(3)}
    for name, names in shards.items():
        save_file({k: whole[k] for k in names}, tmp_path / "sharded" / name)
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    torch.save({name: {"model." + k: v + shift for k, v in whole.items()}  # the EMA entry is read, by default
                for name, shift in (("generator", 1.0), ("generator_ema", 0.0), ("critic", 2.0))}, tmp_path / "sf.pt")
    bad = {k: v for k, v in whole.items() if k != "head.modulation"}
    bad["blocks.0.ffn.0.weight"] = bad["blocks.0.ffn.0.weight"][1:]
    save_file(bad, tmp_path / "bad.safetensors")
    torch.manual_seed(0)
    t5 = UMT5EncoderModel(UMT5Config(**TINY))
    torch.save({hf_to_wan_name(k): v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
               tmp_path / "t5.pth")
    make_tokenizer().save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "run").mkdir()
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path), free_port()), nprocs=WORLD)
    for rank in range(WORLD):
        print(f"rank {rank}:", json.loads((tmp_path / f"bytes_rank{rank}.json").read_text()))
