"""sample.py as researchers use it, on the toy world with the shipped student (assets/): prompt switching with the
re-cache, continuing a given clip or image, batch generation for evaluation (VBench names, seeds, resume, ranks,
reward scores), the Stream-R1 weight maps train.py renders, and bad flags failing before any network is built."""
import dataclasses
import json
import re
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from functorch.compile import make_boxed_func
from safetensors.torch import load_file
from torch._dynamo.backends.common import aot_autograd

import config
import dmd
import sample
import toy
import train
import weighting

CPU = torch.device("cpu")
RED, BLUE = "a red circle moving left", "a blue square moving up"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy config as sample.py reads it, its Components and the shipped student; read-only for tests."""
    cfg, _ = sample.parse([f"--out_dir={tmp_path_factory.mktemp('no_run')}"])
    parts = config.Components(cfg, CPU)
    student = config.build_net(cfg.model_size, cfg.student_path, CPU, causal=True, chunk_frames=cfg.chunk_frames,
                               cfg=cfg, frozen=True)
    return SimpleNamespace(cfg=cfg, parts=parts, student=student, steps=dmd.warped_steps(cfg.steps, cfg.shift))


def colours(videos: np.ndarray | torch.Tensor) -> list[int]:
    """Index into toy.COLORS of the object in each frame of one video (uint8 [T, H, W, 3] or [1, T, 3, H, W] in
    [-1, 1]); -1 where there is none."""
    if isinstance(videos, np.ndarray):
        videos = torch.tensor(videos).permute(0, 3, 1, 2)[None].float() / 127.5 - 1
    return [toy._track_object(videos[:, [t, t]])["color"].item() for t in range(videos.shape[1])]


def longest_run(values: list[int], value: int) -> int:
    return max((len(m.group()) for m in re.finditer(f"{re.escape(chr(65 + value))}+",
                                                      "".join(chr(65 + v) for v in values))), default=0)


def write_mp4(path: Path, video: torch.Tensor) -> np.ndarray:
    """video [T, 3, H, W] in [-1, 1] to an mp4 as sample.py writes them; returns the frames as read back."""
    with sample.mp4_writer(path) as writer:
        for frame in sample.to_uint8(video, 1):
            writer.append_data(frame)
    return iio.imread(path)


def chunks_of(world, prompt: str | torch.Tensor, n: int, cache, generator: torch.Generator) -> list[torch.Tensor]:
    """n chunks of clean latents streamed with dmd.generate_chunk (the loop sample.py ran before issue 17); a prompt's
    context without its padding rows as sample.stream passes it, or the given context."""
    k, (_, C, h, w) = world.cfg.chunk_frames, world.parts.latent_shape()
    ctx = prompt if isinstance(prompt, torch.Tensor) else sample.real_rows(world.parts.context([prompt]))
    return [dmd.generate_chunk(world.student, torch.randn(1, k, C, h, w, generator=generator), ctx, cache, world.steps,
                               generator=[generator]) for _ in range(n)]


# --------------------------------------------------------------------------------------------- prompt switching
def test_prompt_switch_streams_red_then_blue_and_never_loses_the_object(tmp_path, capsys):
    """The issue's toy test through the command line: red before the switch, blue from it on (per frame, from the
    mp4), the object never gone for more than a chunk; 0.75 s is frame 12, a chunk boundary."""
    out = tmp_path / "switch.mp4"
    sample.main(["--prompt", RED, "--prompt", BLUE, "--switch_at", "0.75", "--frames", "24", "--upscale", "1",
                 "--out", str(out), "--out_dir", str(tmp_path)])
    assert "from 0.75 s (chunk 4): 'a blue square moving up'" in capsys.readouterr().out
    got = colours(iio.imread(out))
    red, blue = list(toy.COLORS).index("red"), list(toy.COLORS).index("blue")
    assert set(got[:12]) <= {red, -1} and set(got[12:]) <= {blue, -1}, f"colour per frame (0 red, 2 blue): {got}"
    assert got.count(red) >= 9 and got.count(blue) >= 9, f"colour per frame: {got}"
    assert longest_run(got, -1) <= 3, f"the object vanishes for more than a chunk: {got}"


def test_compile_flag_streams_through_one_compiled_graph_per_cache_fill_and_the_same_video(tmp_path, monkeypatch):
    """--compile=true compiles WanModel.core whole (fullgraph, static shapes) and streams the same frames as eager.
    Every input a graph writes (the chunk's slot in the cache's K/V buffers) is a static input of the graph, as CUDA
    graphs require of a written input (else they refuse the graph). torch.compile is given AOTAutograd without
    inductor here (inductor's C++ build takes minutes on 2 cores; the capture, the guards, the graphs and the static
    inputs are dynamo's and AOTAutograd's either way)."""
    calls, written, unmarked, real_compile = [], [], [], torch.compile

    def inputs_it_writes(gm, example_inputs):  # aot_eager's compiler, recording the graph's written inputs
        meta = torch._guards.TracingContext.try_get().fw_metadata
        mutated = {i for i, info in enumerate(meta.input_info) if info.mutates_data}
        written.append(len(mutated))
        unmarked.append(sorted(mutated - set(meta.static_input_indices)))
        return make_boxed_func(gm)

    def compile_with_aot_eager(fn, **options):
        calls.append((fn.__name__, options))
        return real_compile(fn, **options, backend=aot_autograd(fw_compiler=inputs_it_writes))

    args = [f"--prompt={RED}", "--frames=15", "--upscale=1", f"--out_dir={tmp_path}"]
    sample.main(args + [f"--out={tmp_path / 'eager.mp4'}"])
    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # cumulative over the process otherwise
    sample.main(args + [f"--out={tmp_path / 'compiled.mp4'}", "--compile=true"])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert calls == [("core", {"fullgraph": True, "dynamic": False, "mode": "default"})], f"torch.compile calls {calls}"
    assert sum(written) and not any(unmarked), f"inputs written per graph {written}, not static {unmarked}"
    assert graphs == 6, f"{graphs} graphs for 5 chunks: want 2 per cache fill (pasts of 0, 3, 6 frames), then none"
    assert np.array_equal(iio.imread(tmp_path / "eager.mp4"), iio.imread(tmp_path / "compiled.mp4")), \
        "the compiled stream's frames differ from eager's"


def test_compiled_prompt_switch_to_another_length_compiles_nothing_new(tmp_path, monkeypatch):
    """--compile with a switch from a 6-row to a 4-row prompt: the rows are rounded up to COMPILED_ROWS (the toy's 8,
    all of them) so the second prompt runs the same 6 graphs (else 2 more per length: with fullgraph, past dynamo's
    recompile limit a stream dies), and the video equals eager's."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, **options, backend="aot_eager"))
    args = [f"--prompt={RED}", "--prompt=a blue circle", "--switch_at=0.6", "--frames=24", "--upscale=1",
            f"--out_dir={tmp_path}"]
    sample.main(args + [f"--out={tmp_path / 'eager.mp4'}"])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    sample.main(args + [f"--out={tmp_path / 'compiled.mp4'}", "--compile=true"])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs == 6, f"{graphs} graphs: want the 6 of one cache fill, none for the switch's prompt"
    assert np.abs(iio.imread(tmp_path / "eager.mp4").astype(int) - iio.imread(tmp_path / "compiled.mp4")).max() <= 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_on_cuda_replays_cuda_graphs_and_streams_the_eager_video():
    """--compile on CUDA (sample.compile_core): inductor with CUDA graphs, none skipped, recorded once the shapes
    repeat; 8 chunks (the window full from the 3rd) equal eager's to float rounding carried by the re-noising, in a
    first stream and in a second one (a new cache: the graphs replay or record again for its buffers). The config as
    sample.parse builds it, without parse and main: the GPU machine has no ffmpeg for the mp4."""
    cuda, cfg = torch.device("cuda"), config.load_config({"stage": "dmd", "weighting": "none"}, sampling=True)
    student = config.build_net(cfg.model_size, cfg.student_path, cuda, causal=True, chunk_frames=cfg.chunk_frames,
                               cfg=cfg, frozen=True)
    parts = config.Components(cfg, cuda)
    ctx = parts.context([RED])

    def video():
        with torch.no_grad():
            return torch.cat(list(sample.stream(student, parts, cfg, [ctx], [], 8,
                                                [torch.Generator(cuda).manual_seed(5)], rows_multiple=64)), 1)

    want = video()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    sample.compile_core(student, cuda)
    got = [video(), video()]
    inductor = dict(torch._dynamo.utils.counters["inductor"])
    torch._dynamo.reset()
    assert inductor.get("cudagraph_skips", 0) == 0 and inductor.get("cudagraph_recorded_non_static_inputs", 0) > 0, \
        f"CUDA graphs skipped or never recorded: {inductor}"
    for i, video_i in enumerate(got):
        err = (video_i - want).abs().max()
        assert err <= 1e-2, f"stream {i}: compiled vs eager on CUDA: max |diff| {err:.2e}"


def test_stream_attends_the_real_text_rows_and_one_merged_padding_row_as_all_rows(world):
    """stream() drops the context's trailing zero rows ("a red circle moving left" + </s>: 6 of the toy's 8), so the
    student merges the padding into one row; its video equals generation with the full zero-padded context (to float
    rounding, compounded over 5 chunks of 4 steps: 2e-5 here)."""
    ctx = world.parts.context([RED])
    assert sample.real_rows(ctx).shape[1] == 6 and torch.equal(sample.real_rows(ctx), ctx[:, :6])
    assert not ctx[:, 6:].any()
    cache = world.student.new_cache(1, **world.cfg.cache_options())
    want = world.parts.vae.decode(torch.cat(chunks_of(world, ctx, 5, cache, torch.Generator().manual_seed(3)), 1))
    got = torch.cat(list(sample.stream(world.student, world.parts, world.cfg, [ctx], [], 5,
                                       [torch.Generator().manual_seed(3)])), 1)
    assert (got - want).abs().max() <= 1e-4, f"merged vs all rows: max |diff| {(got - want).abs().max():.2e}"


def test_recache_computes_the_past_under_the_new_prompt_at_its_positions(world):
    """Global cache, no sink: after the re-cache, the next chunk reads exactly what a full block-causal forward over
    the clean past (t = 0) and the chunk under the NEW prompt gives: every cached frame re-run, new cross K/V, the
    frames at their original positions."""
    cfg = dataclasses.replace(world.cfg, window_frames=0, sink_frames=0, ema_alpha=0.0)
    cache, g = world.student.new_cache(1, **cfg.cache_options()), torch.Generator().manual_seed(0)
    with torch.no_grad():
        held = torch.cat(chunks_of(world, RED, 3, cache, g), dim=1)
        new = world.parts.context([BLUE])
        sample.recache(world.student, cache, held, new)
        x = torch.randn(1, cfg.chunk_frames, *held.shape[2:], generator=g)
        t = torch.full((1, cfg.chunk_frames), 1000.0)
        got = world.student(x, t, new, cache=cache)
        want = world.student(torch.cat([held, x], 1), torch.cat([torch.zeros(1, held.shape[1]), t], 1), new)
    err = ((got - want[:, -cfg.chunk_frames:]).norm() / want.norm()).item()
    assert err < 1e-5, f"next chunk after the re-cache vs the full forward under the new prompt: rel err {err:.2e}"
    assert cache.frames_written == held.shape[1] and cache.past_frames == held.shape[1]


def test_a_switched_stream_goes_on_as_if_its_past_were_under_the_new_prompt(world):
    """Global cache, no sink: sample.stream switching red -> blue at chunk 2 == red for 2 chunks, then a cache written
    afresh with those chunks under the blue prompt, blue from there (the same noise)."""
    cfg = dataclasses.replace(world.cfg, window_frames=0, sink_frames=0, ema_alpha=0.0)
    red, blue = (sample.real_rows(world.parts.context([p])) for p in (RED, BLUE))
    got = torch.cat(list(sample.stream(world.student, world.parts, cfg, [red, blue], [2], 4,
                                       [torch.Generator().manual_seed(7)])), 1)
    g, cache, fresh = torch.Generator().manual_seed(7), *(world.student.new_cache(1, **cfg.cache_options()) for _ in "ab")
    with torch.no_grad():
        past = chunks_of(world, RED, 2, cache, g)
        for x in past:
            world.student(x, torch.zeros(x.shape[:2]), blue, cache=fresh, write_cache=True)
        want = world.parts.vae.decode(torch.cat(past + chunks_of(world, BLUE, 2, fresh, g), 1))
    err = (got - want).abs().max().item()
    assert err < 1e-5, f"switched stream vs the past re-written under the new prompt: max abs diff {err:.2e}"


@pytest.mark.parametrize("window, sink, alpha", [(9, 3, 0.99), (10, 3, 0.0)])
def test_recache_keeps_the_sink_and_rewrites_the_window(world, window, sink, alpha):
    """The toy's EMA-sink geometry, and a plain sink whose window is not whole chunks (the re-run starts a frame
    early): the sink's K/V stay bit for bit, every frame after it is recomputed, the geometry is unchanged."""
    cfg = dataclasses.replace(world.cfg, window_frames=window, sink_frames=sink, ema_alpha=alpha)
    cache, g = world.student.new_cache(1, **cfg.cache_options()), torch.Generator().manual_seed(1)
    with torch.no_grad():
        held = torch.cat(chunks_of(world, RED, 5, cache, g), dim=1)[:, -window:]
        before = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
        written, cached = cache.frames_written, cache.past_frames
        sample.recache(world.student, cache, held, world.parts.context([BLUE]))
    assert (cache.frames_written, cache.past_frames) == (written, cached), "the re-cache changed the geometry"
    for i, ((k0, v0), k1, v1) in enumerate(zip(before, cache.k, cache.v)):
        assert torch.equal(k1[:, :sink], k0[:, :sink]) and torch.equal(v1[:, :sink], v0[:, :sink]), \
            f"layer {i}: the sink changed"
        # layer 0's K/V see only their own frame (the same clean latents at t = 0), the later layers the prompt too
        assert torch.allclose(k1[:, sink:], k0[:, sink:], atol=1e-5) == (i == 0), f"layer {i}: window K after re-cache"


def test_switch_times_round_up_to_chunk_boundaries():
    """A switch lands on the first chunk starting at or after its frame (LongLive), in the output video's time."""
    own = {"frames": None, "seconds": 6.0, "switch_at": (0.75, 2.0, 2.07)}
    cfg = config.Config()
    assert sample.schedule(cfg, own, 1, 0) == (32, [4, 11, 12])          # frames 12, 32 -> 33, 34 -> 36
    assert sample.schedule(cfg, {**own, "switch_at": (2.0,)}, 4, 0) == (9, [3])   # Wan: latent 9 = frame 33
    assert sample.schedule(cfg, {**own, "switch_at": (1.0,)}, 1, 12) == (32, [2])  # after a 12-frame clip: frame 18


# --------------------------------------------------------------------------------------------- continuing a clip
def test_init_clip_opens_the_video_and_the_continuation_keeps_its_colour(tmp_path):
    """The issue's toy test through the command line: an mp4 clip, the output's first frames are the clip's (the toy
    VAE is lossless; both pass through the mp4 codec), then the continuation of the red object stays red."""
    clip = toy.render_video(RED, 12, generator=torch.Generator().manual_seed(3))
    given = write_mp4(tmp_path / "clip.mp4", clip)
    out = tmp_path / "out.mp4"
    sample.main([f"--init={tmp_path / 'clip.mp4'}", f"--prompt={RED}", "--frames=12", "--upscale=1", f"--out={out}",
                 f"--out_dir={tmp_path}"])
    video = iio.imread(out)
    assert video.shape[0] == 24, f"{video.shape[0]} frames, expected the 12 given and 12 generated"
    diff = np.abs(video[:12].astype(float) - given).mean()
    assert diff < 2, f"the output's first 12 frames differ from the clip's by {diff:.2f} levels on average"
    assert colours(video[12:]).count(list(toy.COLORS).index("red")) >= 10, colours(video[12:])


def test_an_image_is_the_first_frame_exactly(world, tmp_path):
    """A png read, resized (here: already the size), encoded and decoded: the stream's first frame is the image."""
    image = sample.to_uint8(toy.render_video(BLUE, 1, generator=torch.Generator().manual_seed(4))[0], 1)
    imageio.imwrite(tmp_path / "frame.png", image)
    pixels = sample.read_init(str(tmp_path / "frame.png"), world.cfg, 1)
    assert pixels.shape == (1, 1, 3, world.cfg.height, world.cfg.width)
    latents = world.parts.vae.encode(pixels)
    first = next(sample.stream(world.student, world.parts, world.cfg, [world.parts.context([BLUE])], [], 1,
                               [torch.Generator()], latents))
    assert np.array_equal(sample.to_uint8(first[0], 1), image[None]), "the first frame is not the image"


def test_init_chunks_are_written_as_the_stream_wrote_them(world):
    """Continuing a stream's own first 4 chunks (12 frames: evictions and EMA fusions during the write) with the
    stream's later noise gives the stream's next 2 chunks: the prefix enters the cache as the refresh writes it."""
    cache, g = world.student.new_cache(1, **world.cfg.cache_options()), torch.Generator().manual_seed(5)
    with torch.no_grad():
        first = torch.cat(chunks_of(world, RED, 4, cache, g), dim=1)
        later = torch.Generator()
        later.set_state(g.get_state())
        want = world.parts.vae.decode(torch.cat(chunks_of(world, RED, 2, cache, g), dim=1))
        got = list(sample.stream(world.student, world.parts, world.cfg, [world.parts.context([RED])], [], 2, [later],
                                 first))
    assert torch.equal(got[0], world.parts.vae.decode(first)), "the output does not begin with the given frames"
    err = (torch.cat(got[1:], 1) - want).abs().max().item()
    assert err < 1e-5, f"continuation of the stream's own prefix vs the stream: max abs diff {err:.2e}"


def test_a_partial_prefix_is_completed_with_its_first_frame(world):
    """4 given frames with chunks of 3 continue as if the prefix were [f0, f0, f0, f1, f2, f3]; only the 4 are shown."""
    clip = world.parts.vae.encode(toy.render_video(RED, 4, generator=torch.Generator().manual_seed(6))[None])
    padded = torch.cat([clip[:, :1], clip[:, :1], clip], dim=1)
    ctx = [world.parts.context([RED])]
    got, want = (list(sample.stream(world.student, world.parts, world.cfg, ctx, [], 2, [torch.Generator()], init))
                 for init in (clip, padded))
    assert got[0].shape[1] == 4, f"the output begins with {got[0].shape[1]} frames, expected the 4 given"
    err = (torch.cat(got[1:], 1) - torch.cat(want[1:], 1)).abs().max().item()
    assert err < 1e-5, f"continuation of 4 frames vs of their first frame twice + them: max abs diff {err:.2e}"


# --------------------------------------------------------------------------------------------- batch generation
def test_prompt_file_writes_vbench_names_resumably_with_seeds_and_scores(world, tmp_path, capsys):
    """2 prompts x 2 samples in batches of 3: VBench names, each video its prompt's colour, the two samples of a
    prompt differ, index.json with each video's seed, scores.jsonl = the toy reward of each video (raw and z) and
    their means printed (rows checked against each video remade alone from its seed); then a rerun in batches of 1
    after one video is lost remakes exactly that one, the same."""
    (tmp_path / "prompts.txt").write_text(f"{RED}\n\n{BLUE}\n{RED}\n")
    videos = tmp_path / "videos"
    args = ["--prompt_file", str(tmp_path / "prompts.txt"), "--samples_per_prompt", "2", "--video_dir", str(videos),
            "--frames", "6", "--upscale", "1", f"--out_dir={tmp_path}", "--score=true"]
    sample.main(args + ["--batch_size", "3"])
    names = {f"{p}-{i}.mp4": p for p in (RED, BLUE) for i in range(2)}
    assert sorted(p.name for p in videos.iterdir()) == sorted([*names, "index.json", "scores.jsonl"])
    frames = {name: iio.imread(videos / name) for name in names}
    clips = torch.stack([torch.tensor(v).permute(0, 3, 1, 2).float() / 127.5 - 1 for v in frames.values()])
    assert toy.evaluate_videos(clips, list(names.values()))["color_accuracy"] == 1.0
    assert not np.array_equal(frames[f"{RED}-0.mp4"], frames[f"{RED}-1.mp4"]), "two samples of a prompt are equal"
    index = json.loads((videos / "index.json").read_text())
    assert index == {n: {"prompt": p, "sample": int(n[-5]), "seed": zlib.crc32(n.encode())} for n, p in names.items()}

    rows = [json.loads(line) for line in (videos / "scores.jsonl").read_text().splitlines()]
    assert sorted(r["video"] for r in rows) == sorted(names)
    raw = torch.tensor([[r[a] for a in toy.REWARD_AXES] for r in rows])
    z = torch.tensor([[r[f"{a}_z"] for a in toy.REWARD_AXES] for r in rows])
    mean, std = (torch.tensor([d[a] for a in toy.REWARD_AXES]) for d in (toy.REWARD_MEAN, toy.REWARD_STD))
    assert torch.allclose(z, (raw - mean) / std, atol=1e-5)
    remade = [torch.cat(list(sample.stream(world.student, world.parts, world.cfg, [world.parts.context([r["prompt"]])],
                                           [], 2, [torch.Generator().manual_seed(r["seed"])])), 1) for r in rows]
    rescored = toy.ToyReward().score_and_saliency(torch.cat(remade), [r["prompt"] for r in rows]).raw
    assert torch.allclose(raw, rescored, atol=1e-4), f"scores.jsonl {raw} vs the toy reward of each video {rescored}"
    printed = capsys.readouterr().out
    assert f"mean over 4 of 4 videos: VQ {np.mean([r['VQ'] for r in rows]):.4f}" in printed, printed

    lost = videos / f"{BLUE}-1.mp4"
    lost.unlink()
    kept = {n: (videos / n).stat().st_mtime_ns for n in names if n != lost.name}
    sample.main([*args[:-1], "--batch_size=1"])
    assert {n: (videos / n).stat().st_mtime_ns for n in kept} == kept, "a finished video was made again"
    again = iio.imread(lost)
    diff = np.abs(again.astype(float) - frames[lost.name]).mean()
    assert diff < 0.5, f"the remade video (alone in its batch) differs from the first (batch of 3) by {diff:.2f}"
    assert not (videos / ".partial").exists()


def test_ranks_share_the_prompts_and_invalid_names_are_made_valid(world, tmp_path):
    """sample_batch as rank 0 and rank 1 of 2: each makes the videos of every other prompt, together all of them; a
    prompt with '/' is renamed, listed in index.json with its prompt and seed."""
    prompts = [RED, "a red circle moving left/right", BLUE]
    own = {"prompt": prompts, "samples_per_prompt": 1, "video_dir": str(tmp_path), "upscale": 1, "score": False,
           "rows_multiple": 1}
    for rank in (0, 1):
        before = {p.name for p in tmp_path.glob("*.mp4")}
        sample.sample_batch(world.cfg, own, world.parts, world.student, 1, rank, 2)
        made = {p.name for p in tmp_path.glob("*.mp4")} - before
        assert made == {sample.video_name(p, 0) for p in prompts[rank::2]}, f"rank {rank} of 2 made {made}"
    index = json.loads((tmp_path / "index.json").read_text())
    renamed = sample.video_name(prompts[1], 0)
    assert "/" not in renamed and renamed.endswith("-0.mp4") and (tmp_path / renamed).exists()
    assert index[renamed] == {"prompt": prompts[1], "sample": 0,
                              "seed": world.cfg.seed + zlib.crc32(renamed.encode())}
    assert {p.name for p in tmp_path.glob("*.mp4")} == {sample.video_name(p, 0) for p in prompts}


def test_videoreward_scores_of_the_kept_frames_equal_those_of_the_whole_video():
    """sample_batch keeps only the frames VideoReward reads (bounded memory at any length): handed over at the
    reward model's own fps they score as the whole video at FPS does (a tiny random VideoReward, tests/test_reward)."""
    import test_reward
    rm = test_reward.make_reward()
    video = torch.rand(2, 41, 3, test_reward.H, test_reward.W, generator=torch.Generator().manual_seed(8)) * 2 - 1
    picked, fps = sample.reward_frames(rm, video.shape[1])
    whole = rm.score_and_saliency(video, test_reward.PROMPTS, fps=sample.FPS)
    kept = rm.score_and_saliency(video[:, picked], test_reward.PROMPTS, fps=fps)
    assert len(picked) < video.shape[1] and torch.equal(kept.raw, whole.raw), f"{kept.raw} vs {whole.raw}"


def test_video_names_are_vbench_names_or_valid_and_distinct():
    assert sample.video_name("a cat playing piano", 3) == "a cat playing piano-3.mp4"
    names = [sample.video_name(p, 0) for p in ("AC/DC on stage", "AC_DC on stage", "x" * 300, "é" * 200)]
    assert len(set(names)) == 4 and names[1] == "AC_DC on stage-0.mp4"
    assert all("/" not in n and len(n.encode()) <= 255 and n.endswith("-0.mp4") for n in names), names


# --------------------------------------------------------------------------------------------- flags
def test_both_flag_forms_read_the_same(tmp_path):
    (tmp_path / "p.txt").write_text(f"{RED}\n")
    (tmp_path / "c.png").write_bytes(b"")
    for spaced, joined in [(["--prompt_file", str(tmp_path / "p.txt"), "--samples_per_prompt", "2"],
                            [f"--prompt_file={tmp_path / 'p.txt'}", "--samples_per_prompt=2"]),
                           (["--prompt", RED, "--prompt", BLUE, "--switch_at", "2", "--seconds", "6"],
                            [f"--prompt={RED}", f"--prompt={BLUE}", "--switch_at=2", "--seconds=6"]),
                           (["--init", str(tmp_path / "c.png"), "--prompt", RED], [f"--init={tmp_path / 'c.png'}",
                                                                                   f"--prompt={RED}"])]:
        assert sample.parse(spaced) == sample.parse(joined)
    assert sample.parse(spaced)[1]["prompt"] == [RED]


@pytest.mark.parametrize("args, message", [
    (["--prompt", RED, "--prompt", BLUE], "--switch_at=: 0 times for 2 --prompt; expected 1"),
    (["--prompt", RED, "--switch_at", "1"], "--switch_at=1: 1 times for 1 --prompt; expected 0"),
    (["--prompt", RED, "--prompt", BLUE, "--prompt", RED, "--switch_at", "2,1"], "expected increasing times > 0"),
    (["--prompt", RED, "--prompt", BLUE, "--switch_at", "0"], "expected increasing times > 0"),
    (["--prompt", RED, "--prompt", BLUE, "--switch_at", "7", "--seconds", "6"], "--switch_at 7: after the last chunk"),
    (["--prompt", RED, "--prompt", BLUE, "--prompt", RED, "--switch_at", "1,1.05"], "land on the same chunk"),
    (["--prompt", RED, "--prompt", BLUE, "--switch_at", "0.05", "--init", "{clip}"], "at or before the first generated"),
    (["--prompt", RED, "--prompt", BLUE, "--switch_at", "1", "--sink_frames=2", "--ema_alpha=0"],
     "expected sink_frames a multiple of chunk_frames=3"),
    (["--init", "missing.png"], "--init missing.png: expected an existing .png, .jpg, .jpeg, .mp4 file"),
    (["--init", "{prompts}"], "expected an existing .png"),
    (["--init", "{bad_png}"], "cannot read it"),
    (["--prompt_file", "missing.txt"], "--prompt_file missing.txt: cannot read it"),
    (["--prompt_file", "{prompts}", "--prompt", RED], "--prompt_file with --prompt"),
    (["--prompt_file", "{prompts}", "--init", "{clip}"], "--prompt_file with --init"),
    (["--prompt_file", "{prompts}", "--switch_at", "1"], "--prompt_file with --switch_at"),
    (["--video_dir", "d"], "--video_dir goes with --prompt_file"),
    (["--prompt_file", "{other}", "--score=true"], "--score: the toy reward scores toy prompts only"),
    (["--prompt_file", "{prompts}", "--samples_per_prompt", "0"], "--samples_per_prompt=0: expected a number > 0"),
])
def test_bad_flags_fail_before_any_network(args, message, tmp_path, monkeypatch):
    files = {"clip": tmp_path / "clip.png", "prompts": tmp_path / "p.txt", "other": tmp_path / "o.txt",
             "bad_png": tmp_path / "bad.png"}
    imageio.imwrite(files["clip"], np.zeros((32, 32, 3), np.uint8))
    files["prompts"].write_text(f"{RED}\n")
    files["other"].write_text("a cat playing piano\n")
    files["bad_png"].write_bytes(b"not a png")
    for name in ("Components", "build_net"):
        monkeypatch.setattr(sample, name, lambda *a, **k: pytest.fail("a network was built before the error"))
    with pytest.raises(SystemExit, match=re.escape(message)):
        sample.main([a.format(**files) for a in args] + [f"--out_dir={tmp_path}"])


def test_torchrun_batches_wait_days_for_the_longest_share(tmp_path, monkeypatch):
    """Ranks' shares of a prompt file differ (and a rerun skips finished videos): the last barrier must outwait
    NCCL's default 10 minutes."""
    def stop(timeout):
        raise SystemExit(f"timeout {timeout}")

    monkeypatch.setattr(sample, "setup_distributed", stop)
    with pytest.raises(SystemExit, match=re.escape("timeout 7 days, 0:00:00")):
        sample.main([f"--prompt={RED}", f"--out_dir={tmp_path}"])


def test_missing_ffmpeg_fails_before_any_network(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as where imageio-ffmpeg is not installed
    for name in ("Components", "build_net"):
        monkeypatch.setattr(sample, name, lambda *a, **k: pytest.fail("a network was built before the error"))
    with pytest.raises(SystemExit, match="sample.py writes mp4 through imageio-ffmpeg's ffmpeg"):
        sample.main([f"--prompt={RED}", f"--out_dir={tmp_path}"])


# --------------------------------------------------------------------------------------------- weight maps
def test_stream_r1_run_renders_its_weight_map_at_sample_every_and_training_is_unchanged(tmp_path, monkeypatch):
    """--sample_every=1 renders weights_{step}.png after each step (the weight passed is the intra weight of the
    rendered rollout's own saliency), and the run ends with the same weights as one that renders only at the end."""
    rendered = []
    original = weighting.render_weight_map
    monkeypatch.setattr(weighting, "render_weight_map", lambda *a, **k: rendered.append(a) or original(*a, **k))
    fast = ["--max_steps=2", "--batch_size=2", "--ema_start=1", "--gen_every=2", "--evaluate=false"]
    train.main([f"--out_dir={tmp_path / 'a'}", "--sample_every=1", *fast])
    train.main([f"--out_dir={tmp_path / 'b'}", *fast])
    assert [p.name for p in sorted((tmp_path / "a").glob("weights_*.png"))] == ["weights_000001.png",
                                                                              "weights_000002.png"]
    assert [p.name for p in (tmp_path / "b").glob("weights_*.png")] == ["weights_000002.png"]
    a, b = (load_file(str(tmp_path / run / "step_000002.safetensors")) for run in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a), "rendering the weight maps changed the training run"
    frames, weight, saliency, path = rendered[0]
    cfg = config.load_config([])
    res = toy.ToyReward().score_and_saliency(frames[None], toy.toy_prompts()[:1], latent_shape=weight[:, 0].shape)
    assert list(saliency) == list(toy.REWARD_AXES) and torch.allclose(torch.stack(list(saliency.values())),
                                                                       res.saliency[0], atol=1e-6)
    assert torch.allclose(weight, train.intra_weight(cfg, res)[0], atol=1e-6)
    assert iio.imread(path).shape[:2] == ((2 + len(saliency)) * frames.shape[-2], min(8, len(weight)) * frames.shape[-1])
