"""bench.py plan against measured allocation, and bench.py gpu's CPU-checkable parts.

The plan runs the project's training step (bench.training_step: train.dmd_step on a Wan-world preset, FSDP2, bf16)
and sample.py's stream (bench.sample_stream) under FakeTensorMode and counts op outputs (bench.FakeRun). The
measurement runs the SAME two programs with real tensors on the CPU, with a real gloo process group (one process,
or two spawned ones), and counts what torch's profiler reports from the c10 CPU allocator (every allocation and
free, kernel scratch included). The two runs share the program and nothing else: they disagree if a meta kernel
allocates, aliases or saves for backward differently from the real kernel, if FSDP2's gathers and frees (storage
resize_) or DTensor shards are miscounted, if views or tied weights are double-counted, or if a kernel's hidden
scratch matters. Shapes are tiny (a 2-layer DiT, a narrow Wan VAE, 1-layer umT5 and Qwen2-VL stand-ins), so the
runs take seconds; one thread, so the CPU kernels' per-thread scratch is fixed.
"""
import contextlib
import dataclasses
import functools
import gc
import json
import pathlib
import re
import tempfile
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile, record_function

import bench
import config
from model import WanConfig, WanModel

TINY_DIT = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)  # text_len 512 = the text encoder's
TINY_PARTS = dict(
    vae_kwargs=dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    text_config=dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", pad_token_id=0, eos_token_id=1),
    qwen_config=dict(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2),
        text_config=dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192, bos_token_id=0,
                         eos_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                          "mrope_section": [2, 3, 3]})),
    reward_kwargs=dict(min_pixels=56 * 84, max_pixels=56 * 84))  # 2-fps frames of 56x84 px: 12 patches each
TOLERANCE = 0.10  # the bound on planned vs measured


def tiny_parts(cfg, device):
    return bench.wan_components(cfg, device, **TINY_PARTS)


def tiny_config(**changes) -> config.Config:
    """configs/wan1.3b_stream_r1.yaml (FSDP2, bf16, EMA-sink window, Stream-R1 with saliency) at tiny shapes:
    two 3-frame chunks of 16x16 latents, grad_accum 2 (the step holds earlier micro-steps' gradients)."""
    config.SIZES["tiny"] = lambda: WanConfig(**TINY_DIT)
    cfg = bench.plan_config(str(bench.ROOT / "configs" / "wan1.3b_stream_r1.yaml"))
    return dataclasses.replace(cfg, model_size="tiny", teacher_size="tiny", height=128, width=128, num_frames=6,
                               grad_accum=2, **changes)


class ProfiledMarks(bench.Marks):
    """The step's start and its phases as profiler ranges: their times come from the profiler's own clock, the one
    its allocation events carry (a wall clock read next to them can land on the wrong side of an allocation)."""

    def reset_peaks(self):
        with record_function("start"):
            pass

    @contextlib.contextmanager
    def phase(self, name: str):
        with record_function(f"phase {name}"):
            yield


def measure(program, cfg, gpus: int, **kwargs) -> dict:
    """program(cfg, cpu, run=marks, **kwargs) with real tensors in the current process group, counted by torch's
    profiler (c10 CPU allocator events): bytes alive when the step starts, the peak after, and the peak while each
    phase ran (nested phases included), as bench.planned reports them.

    Counted: what this thread allocates outside collectives. Gloo's own buffers are not: its reduce-scatter copies
    its input, and a worker thread may hold that copy until the next collective arrives (a race; NCCL copies
    nothing and keeps its buffers outside the caching allocator, so no GPU plan has them). Address and size pair
    each such buffer with its free: a worker thread's free can carry a time stamp just after the allocation that
    reuses its address."""
    gc.collect()
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        program(cfg, torch.device("cpu"), run=ProfiledMarks(), **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        trace = json.loads(pathlib.Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    thread = threading.get_native_id()
    ranges = [e for e in trace if e.get("ph") == "X" and e["tid"] == thread]
    start = max(e["ts"] for e in ranges if e["name"] == "start")
    spans = [(e["name"].removeprefix("phase "), e["ts"], e["ts"] + e["dur"]) for e in ranges
             if e["name"].startswith("phase ")]
    collectives = [(e["ts"], e["ts"] + e["dur"]) for e in ranges if e["name"].startswith("c10d::")]
    events = sorted((e for e in trace if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    live = resident = peak = 0
    phases, gloo = {}, set()
    for e in events:
        address, nbytes, t = e["args"]["Addr"], e["args"]["Bytes"], e["ts"]
        if nbytes > 0 and (e["tid"] != thread or any(b <= t <= end for b, end in collectives)):
            gloo.add((address, nbytes))
            continue
        if nbytes < 0 and (address, -nbytes) in gloo:
            gloo.discard((address, -nbytes))
            continue
        live += nbytes
        if t < start:
            resident = live
            continue
        peak = max(peak, live)
        for name, begin, end in spans:
            if begin <= t < end:
                phases[name] = max(phases.get(name, 0), live)
    return dict(resident=resident, peak=peak, phases=phases)


@contextlib.contextmanager
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_agree(plan: dict, measured: dict, what: str):
    resident = sum(plan["resident"].values())
    lines = [f"{'resident':32s} planned {resident:>11,d} measured {measured['resident']:>11,d}",
             f"{'step peak':32s} planned {plan['peak']:>11,d} measured {measured['peak']:>11,d}"]
    lines += [f"{p:32s} planned {plan['phases'].get(p, 0):>11,d} measured {m:>11,d}"
              for p, m in measured["phases"].items()]
    report = f"{what}, planned vs measured bytes:\n" + "\n".join(lines)
    assert set(measured["phases"]) == set(plan["phases"]) - {"step"}, report
    assert abs(resident / measured["resident"] - 1) < 0.01, report
    for p, m in [("step peak", measured["peak"]), *measured["phases"].items()]:
        planned = plan["peak"] if p == "step peak" else plan["phases"][p]
        assert abs(planned / m - 1) < TOLERANCE, f"{p} off by {planned / m - 1:+.1%}\n{report}"


def planned(program, cfg, gpus, **kwargs) -> dict:
    return bench.planned(program, cfg, gpus, parts_fn=tiny_parts, **kwargs)


@pytest.fixture(scope="module")
def plans() -> dict:
    """The tiny preset planned on one GPU with checkpointing on (its setting) and off, and its sampling."""
    return {ckpt: planned(functools.partial(bench.training_step, gpus=1), tiny_config(grad_checkpointing=ckpt), 1)
            for ckpt in (True, False)} | {"sampling": planned(bench.sample_stream, tiny_config(), None)}


# --------------------------------------------------------------------------------------------- plan vs measured
@pytest.mark.parametrize("checkpointing", [True, False])
def test_planned_training_step_matches_measured_allocation(plans, checkpointing):
    with one_process_group():
        measured = measure(functools.partial(bench.training_step, gpus=1), tiny_config(
            grad_checkpointing=checkpointing), 1, parts_fn=tiny_parts)
    assert_agree(plans[checkpointing], measured, f"training step, one process, checkpointing {checkpointing}")


def test_checkpointing_lowers_the_planned_rollout_and_backward(plans):
    for phase in ("generator rollout", "generator backward", "critic backward"):
        on, off = plans[True]["phases"][phase], plans[False]["phases"][phase]
        assert on < off, f"{phase}: {on:,d} bytes with activation checkpointing, {off:,d} without"


def test_planned_sampling_matches_measured_allocation(plans):
    measured = measure(bench.sample_stream, tiny_config(), None, parts_fn=tiny_parts)
    assert_agree(plans["sampling"], measured, "sampling")


def test_planned_sampling_holds_no_reward_model(plans):
    """sample.py samples with weighting none (sample.py's config): no VideoReward, registered or not, in the plan."""
    qwen = sum(p.numel() * p.element_size() for p in tiny_parts(tiny_config(), torch.device("cpu")).reward.parameters())
    resident = plans["sampling"]["resident"]
    assert set(resident) <= {"student: parameters", "VAE: parameters", "text encoder: parameters", "resident"} and \
        resident.get("resident", 0) < qwen, f"sampling holds {resident}; VideoReward's parameters are {qwen:,d} bytes"


def measure_rank(rank: int, store: str, out: str):
    """Child of the two-process test: rank `rank` of a gloo group measures the step; rank 0 writes the result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        measured = measure(functools.partial(bench.training_step, gpus=2), tiny_config(), 2, parts_fn=tiny_parts)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(measured, f)


def test_planned_rank0_of_two_matches_measured_rank0_of_two_processes(tmp_path):
    """FSDP2 across two ranks (each holds half of every sharded network, gathers for compute, reduce-scatters
    gradients): the plan of rank 0 (fake process group) against rank 0 of two real processes."""
    mp.start_processes(measure_rank, args=(str(tmp_path / "store"), str(tmp_path / "rank0.json")), nprocs=2,
                       start_method="fork")
    measured = json.loads((tmp_path / "rank0.json").read_text())
    plan = planned(functools.partial(bench.training_step, gpus=2), tiny_config(), 2)
    assert_agree(plan, measured, "training step, rank 0 of 2")


# --------------------------------------------------------------------------------------------- the planner itself
def test_every_exit_step_allocates_alike():
    """The planner fixes the exit step to 0: every k runs one grad-enabled forward per chunk (the same graph), and
    the no-graph steps before it allocate about as much as the refresh after it, so the last exit step (the most
    forwards) peaks the same, measured. Since the refresh stops after the last block's K/V (kv_only), a later no-graph
    step peaks one chunk of latents higher (its input beside the previous x0): 1.2% at this tiny shape, a few MB next
    to GBs at Wan's, hence 2%."""
    cfg = tiny_config()
    with one_process_group():
        first, last = (measure(functools.partial(bench.training_step, gpus=1, exit_step=k), cfg, 1,
                               parts_fn=tiny_parts) for k in (0, len(cfg.steps) - 1))
    for phase, peak in first["phases"].items():
        assert abs(last["phases"][phase] / peak - 1) < 0.02, \
            f"{phase}: exit step 0 peaks at {peak:,d} bytes, the last exit step at {last['phases'][phase]:,d}"


def test_the_last_micro_step_alone_allocates_as_every_micro_step():
    """The planner runs only the last of grad_accum micro-steps, with zero gradients standing for the earlier ones':
    measured, the peaks are train.update's with every micro-step run, to within what a micro-step leaves to the next
    beyond its gradients (its loss tensor; FSDP2 keeps gradients as views of one buffer): 1.5 % here."""
    cfg = tiny_config()
    with one_process_group():
        last, every = (measure(functools.partial(bench.training_step, gpus=1, every_micro_step=e), cfg, 1,
                               parts_fn=tiny_parts) for e in (False, True))
    for phase, peak in every["phases"].items():
        assert abs(last["phases"][phase] / peak - 1) < 0.02, \
            f"{phase}: every micro-step peaks at {peak:,d} bytes, the last alone at {last['phases'][phase]:,d}"


def test_resident_bytes_are_parameters_times_their_dtype_over_the_gpus(plans):
    """Explicit accounting of what the plan counts before the step (the tiny preset on one GPU, bf16): trained
    networks fp32 with two fp32 AdamW states, frozen ones bf16; and the same bytes under each name at the peak."""
    cfg = tiny_config()
    parts = tiny_parts(cfg, torch.device("cpu"))
    dit = sum(p.numel() for p in bench.WanModel(WanConfig(**TINY_DIT)).parameters())
    qwen = sum(p.numel() for p in parts.reward.parameters())  # tied embeddings counted once
    expect = {"student: parameters": 4 * dit, "student: optimizer states": 8 * dit, "critic: parameters": 4 * dit,
              "critic: optimizer states": 8 * dit, "student EMA: parameters": 4 * dit, "teacher: parameters": 2 * dit,
              "VAE: parameters": 2 * sum(p.numel() for p in parts.vae.parameters()),
              "text encoder: parameters": 2 * sum(p.numel() for p in parts.text.model.parameters()),
              "VideoReward: parameters": 2 * qwen}
    resident, at_peak = plans[True]["resident"], plans[True]["at_peak"]
    for k, v in expect.items():
        assert abs(resident[k] - v) <= 8 * 64, f"{k}: planned {resident[k]:,d} bytes, expected {v:,d}"
        assert at_peak[k] == resident[k], f"{k}: {at_peak[k]:,d} bytes at the step's peak, {resident[k]:,d} before " \
                                          f"(views and gathered copies are the step's own)"


def test_fake_run_counts_what_torch_mem_tracker_counts():
    """FakeRun is MemTracker's counting without its per-module bookkeeping: on a DiT's forward, backward and AdamW
    step under FakeTensorMode both see the same peak (MemTracker refuses a root module called twice in an iteration,
    and its module tracking breaks on the rollout's no-graph forwards, so the check is a bidirectional step).
    Not on DTensors: under FakeTensorMode DTensor's shape propagation runs in the active fake mode on global-shape
    stand-ins, which MemTracker counts and FakeRun mutes (the measured FSDP2 tests above show no real run allocates
    them)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    with bench.fake_world(None) as run:
        net = bench.WanModel(WanConfig(**TINY_DIT))
        opt = torch.optim.AdamW(net.parameters())
        bench.warm_optimizer(opt)
        run.register([*net.parameters(), *(v for st in opt.state.values() for v in st.values())], "resident")
        run.reset_peaks()
        tracker = MemTracker()
        tracker.track_external(net, opt)
        with tracker:
            x, t, ctx = torch.randn(1, 3, 16, 8, 8), torch.full((1,), 500.0), torch.randn(1, 8, TINY_DIT["text_dim"])
            net(x, t, ctx).square().mean().backward()
            opt.step()
    theirs = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert run.peak == theirs, f"FakeRun peak {run.peak:,d} bytes, MemTracker {theirs:,d}"


def test_a_no_graph_forward_peaks_alike_at_every_depth():
    """Planned, a no-graph forward (the teacher's and critic's in dmd_gradient, every denoising step) peaks at the
    same bytes above its parameters and inputs with 2 and 8 blocks: nothing a block makes outlives the blocks after
    it (a forward that kept each block's K/V held 50 GiB per GPU of the 14B teacher's)."""
    above = {}
    for layers in (2, 8):
        with bench.fake_world(None) as run, torch.no_grad():
            net = bench.WanModel(WanConfig(**dict(TINY_DIT, num_layers=layers)))
            x, t, ctx = torch.randn(1, 6, 16, 16, 16), torch.full((1,), 500.0), torch.randn(1, 8, TINY_DIT["text_dim"])
            run.reset_peaks()
            net(x, t, ctx)
        above[layers] = run.peak - sum(run.resident.values())
    assert abs(above[8] / above[2] - 1) < 0.01, f"peak above parameters and inputs: {above[2]:,d} bytes with 2 " \
                                                f"blocks, {above[8]:,d} with 8"


def test_cache_bytes_counts_every_tensor_the_kv_cache_holds():
    """bench.cache_bytes (the plan's KV-cache figures) against every tensor a KVCache's attributes hold, after a bf16
    stream long enough for the EMA-sink to fuse, so the fp32 accumulator behind the bf16 V sink (sink32) exists; the
    prompt's context (cross_context, the caller's tensor kept for the same-prompt test) is not the cache's."""
    net = bench.WanModel(WanConfig(**TINY_DIT), causal=True, chunk_frames=3)
    cache = net.new_cache(1, **bench.REWARD_FORCING_CACHE)
    ctx = torch.randn(1, 8, TINY_DIT["text_dim"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(4):
            net(torch.randn(1, 3, 16, 8, 8), torch.zeros(1, 3), ctx, cache=cache, write_cache=True)
    held, todo = {}, [v for k, v in vars(cache).items() if k != "cross_context"]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            held[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()
        elif isinstance(x, (list, tuple)):
            todo += x
        elif isinstance(x, dict):
            todo += x.values()
    assert cache.sink32, "no fp32 EMA-sink accumulator after 4 bf16 chunks: the test does not cover it"
    assert bench.cache_bytes(cache) == sum(held.values()), \
        f"cache_bytes {bench.cache_bytes(cache):,d}, the cache holds {sum(held.values()):,d} bytes"


def test_plan_prints_every_phase_and_ends_with_the_peak_line(plans, capsys):
    cfg = tiny_config()
    bench.print_plan(cfg, "tiny", 1, {True: plans[True], False: plans[False]}, plans["sampling"], 0.0)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"peak {plans[True]['peak'] / bench.GIB:.1f} GiB per GPU", out[-1]
    for phase, row in bench.PLAN_ROWS.items():
        assert any(line.startswith(f"| {row} |") for line in out), f"no row for {phase}"


# --------------------------------------------------------------------------------------------- bench.py gpu
def test_gpu_check_uses_the_preset_real_shapes():
    setup = bench.gpu_setup(bench.plan_config(str(bench.ROOT / bench.GPU_PRESET)))
    assert setup == dict(tokens_per_frame=1560, latent=[1, 21, 16, 60, 104], pixels=[1, 81, 3, 480, 832],
                         reward_frames=10, reward_size=[336, 588], video_tokens=1260), setup  # REFERENCE §1.2, §7.4


def test_gpu_check_without_a_device_skips_every_part_and_touches_no_cuda(capsys, monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CUDA call without a device")

    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench.bench_gpu(parts="fps,precision,fp8")
    out = capsys.readouterr().out
    assert "1560 tokens per latent frame" in out and "1260 video tokens" in out, out
    for name, title in bench.GPU_PART_TITLES.items():
        assert (f"{title}: skipped, no CUDA device" in out) == (name != "step"), f"{name}: {out}"
    with pytest.raises(SystemExit, match="unknown parts"):
        bench.bench_gpu(parts="fps,speed")


def test_gpu_check_reports_a_failed_part_and_runs_the_next(capsys, monkeypatch):
    ran = []

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (made up)")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a made-up GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(bench, "gpu_fps", crash)
    monkeypatch.setattr(bench, "gpu_precision", lambda device, *a, **k: ran.append((device, k.get("fp8", False))))
    bench.bench_gpu(parts="fps,precision,fp8")
    out = capsys.readouterr().out
    assert out.count("FAILED**: RuntimeError: CUDA out of memory (made up)") == 2, out  # (a), and (d)'s FPS
    cuda0 = torch.device("cuda", 0)  # with its index, as init_process_group's device_id (part b) needs it
    assert ran == [(cuda0, False), (cuda0, True)], ran


def test_float8_linear_is_the_dequantized_product_and_near_the_linear():
    """Float8Linear against its formula computed from the stored e4m3 values in fp32, and against the Linear it
    replaces (e4m3 has a 3-bit mantissa: a few % relative error, not 0) on rows 1e6 apart in scale, beyond e4m3's
    range under one scale: each row needs its own."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    fp8 = bench.Float8Linear(linear)
    x = torch.randn(2, 5, 64)
    x8, sx = bench.Float8Linear.quantize(x.flatten(0, 1))
    expected = (x8.float() * sx) @ (fp8.weight.float() * fp8.weight_scale.t()).t() + linear.bias
    y = fp8(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32 and fp8(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16):  # as nn.Linear: autocast's dtype, whatever x's
        assert fp8(x).dtype == torch.bfloat16
    exact = (y.float().flatten(0, 1) - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert (exact < 4e-3).all(), f"vs the formula (bf16 output rounding only): {exact}"
    product = torch.nn.Linear(64, 48, bias=False)
    wide = torch.randn(5, 64) * torch.logspace(-3, 3, 5)[:, None]
    with torch.no_grad():
        err = (bench.Float8Linear(product)(wide) - product(wide)).norm(dim=-1) / product(wide).norm(dim=-1)
    assert (err > 1e-3).all() and (err < 0.1).all(), f"vs the fp32 Linear: {err}"
    net = bench.float8(WanModel(WanConfig(**TINY_DIT)))
    kinds = {type(m).__name__ for b in net.blocks for m in b.modules() if isinstance(m, (torch.nn.Linear,
                                                                                      bench.Float8Linear))}
    assert kinds == {"Float8Linear"} and not isinstance(net.head.head, bench.Float8Linear), kinds


def test_compiled_when_full_compiles_only_the_full_window_calls(monkeypatch):
    """(a)'s compiled rows: the compiled core runs exactly the calls with a full window (4 steps + the refresh of
    every chunk from the third on, window 9 = 6 cached frames + the chunk), the earlier ones run eager."""
    cfg = tiny_config()
    pasts = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda *a: pasts.append(a[5][0][2]) or fn(*a))
    torch.manual_seed(0)
    net = WanModel(WanConfig(**TINY_DIT), causal=True, chunk_frames=cfg.chunk_frames).eval()
    net.core = bench.compiled_when_full(net.core, cfg, "default")
    cache, ctx = net.new_cache(1, **cfg.cache_options()), torch.randn(1, 7, TINY_DIT["text_dim"])
    steps = bench.dmd.warped_steps(cfg.steps, cfg.shift)
    with torch.no_grad():
        for _ in range(5):
            bench.dmd.generate_chunk(net, torch.randn(1, cfg.chunk_frames, 16, 16, 16), ctx, cache, steps)
    assert pasts == [cfg.window_frames - cfg.chunk_frames] * (3 * (len(steps) + 1)), pasts  # cached frames


def test_gpu_parts_run_on_the_cpu_at_tiny_shapes(plans, capsys, monkeypatch):
    """The GPU parts' own code, at tiny shapes on the CPU (no compile, no CUDA memory counters): what a GPU session
    would otherwise find broken."""
    converted, float8 = [], bench.float8
    monkeypatch.setattr(bench, "float8", lambda net: converted.append(net) or float8(net))
    rows, real_rows = [], bench.sample.real_rows  # the prompt's rows as sample.py passes them
    monkeypatch.setattr(bench.sample, "real_rows", lambda c: rows.append(real_rows(c).shape[1]) or real_rows(c))
    cfg = tiny_config()
    bench.gpu_fps(torch.device("cpu"), cfg, chunks=3, warmup=1, compile_=False, parts_fn=tiny_parts)
    bench.gpu_precision(torch.device("cpu"), cfg, chunks=3)
    bench.gpu_fps(torch.device("cpu"), cfg, chunks=3, warmup=1, compile_=False, parts_fn=tiny_parts, fp8=True)
    bench.gpu_precision(torch.device("cpu"), cfg, chunks=3, fp8=True)
    measured = bench.gpu_step(torch.device("cpu"), cfg, marks=bench.Marks(), parts_fn=tiny_parts)
    assert measured["kv_cache"] == plans[True]["kv_cache"]
    bench.print_step_comparison(dict(measured, seconds=1.0, peak=plans[True]["peak"], resident=1,
                                     phases=plans[True]["phases"]), {"training": {"on": plans[True]}}, "CPU")
    out = capsys.readouterr().out
    assert re.search(r"\| eager \| included \| \*\*[\d.]+\*\* \|", out), out
    kernels = re.findall(r"\| eager, SDPA (\w+) \| excluded \| \*\*[\d.]+\*\* \|", out)
    assert kernels == ["flash_attention", "cudnn_attention", "efficient_attention"], out
    assert re.search(r"\| FP8 Linears, eager \| included \| \*\*[\d.]+\*\* \|", out), out
    assert "FP8 Linears, eager, SDPA" not in out and len(converted) == 2, out  # (d)'s FPS and its error
    assert rows and all(0 < r < 512 for r in rows), rows  # text_len 512: padding merged
    for pair in ("bf16 vs fp32", "FP8 vs bf16"):
        errors = [float(e) for e in re.search(rf"\| rel\. error of x0, {pair} \| (.*) \|", out)[1].split(" | ")]
        assert len(errors) == 3 and all(1e-4 < e < 0.2 for e in errors), f"{pair} relative errors {errors}"
    assert "| **step peak** |" in out and "| 1.00 |" in out, out
