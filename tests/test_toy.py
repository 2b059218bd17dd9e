"""toy.py: the world renders what its prompts say, ToyVAE is lossless, the tokenizer/umT5 builder fit text.TextEncoder,
the toy reward ranks clean above corrupted videos with saliency on the corruption, and the held-out evaluation scores
renders ~1 and noise ~chance. CPU, fixed seeds, no downloads."""
import math

import pytest
import torch
import torch.nn.functional as F

import toy
from model import WanModel

T = toy.TOY_FRAMES


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def clean():
    """32 renders, one per prompt."""
    return toy.toy_batch(len(toy.EVAL_PROMPTS), T, gen(0), list(toy.EVAL_PROMPTS))


def blur(videos: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """3x3 box blur per frame with wrap-around (the world is a torus)."""
    flat = videos.flatten(0, 1)
    for _ in range(passes):
        flat = F.avg_pool2d(F.pad(flat, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    return flat.unflatten(0, videos.shape[:2])


# ------------------------------------------------------------------------------------------------ world
def test_prompts_cover_every_combination_and_parse_back():
    prompts = toy.toy_prompts()
    assert len(prompts) == len(set(prompts)) == len(toy.COLORS) * len(toy.SHAPES) * len(toy.DIRECTIONS) == 32
    assert list(toy.EVAL_PROMPTS) == prompts
    assert [toy.parse_prompt(p) for p in prompts] == [(p.split()[1], p.split()[2], p.split()[4]) for p in prompts]
    assert toy.parse_prompt("  A Red  CIRCLE moving left ") == ("red", "circle", "left")


@pytest.mark.parametrize("prompt, word", [("a purple circle moving left", "purple"), ("a red cube moving left", "cube"),
                                          ("a red circle moving sideways", "sideways"), ("red circle moving left", "")])
def test_parse_prompt_names_the_unknown_word(prompt, word):
    with pytest.raises(ValueError, match=word or "must read"):
        toy.parse_prompt(prompt)


def test_render_is_prompt_colour_composited_and_moves_speed_px_per_frame():
    """Two renders from the same generator state differ only in colour, so alpha = (v1 - v2) / (c1 - c2) exactly; the
    alpha map must translate by SPEED * direction per frame (exact on the torus) and cover the object's area."""
    for shape, direction in (("circle", "right"), ("square", "up"), ("circle", "down"), ("square", "left")):
        red = toy.render_video(f"a red {shape} moving {direction}", T, generator=gen(5))
        green = toy.render_video(f"a green {shape} moving {direction}", T, generator=gen(5))
        alpha = (red - green)[:, 0] / (toy.COLORS["red"][0] - toy.COLORS["green"][0])           # [T, H, W]
        alpha_g = (red - green)[:, 1] / (toy.COLORS["red"][1] - toy.COLORS["green"][1])
        assert (alpha - alpha_g).abs().max() < 1e-5 and (red - green)[:, 2].abs().max() < 1e-6, "not an alpha blend"
        dx, dy = (int(s * toy.SPEED) for s in toy.DIRECTIONS[direction])
        moved = alpha[:-1].roll((dy, dx), dims=(-2, -1))
        err = (moved - alpha[1:]).abs().max().item()
        assert err < 1e-5, f"{shape} {direction}: frame t+1 differs from frame t moved by {(dx, dy)} by {err}"
        area = math.pi * toy.OBJECT_RADIUS**2 if shape == "circle" else (2 * toy.OBJECT_RADIUS) ** 2
        assert abs(alpha[0].sum() - area) < 0.05 * area, f"{shape} area {alpha[0].sum():.1f} vs {area:.1f}"
        assert alpha.max() > 0.99 and alpha.min() > -1e-6
        assert red.min() >= -1 and red.max() <= 1


def test_toy_batch_is_reproducible_and_checks_prompts():
    v1, p1 = toy.toy_batch(4, 5, gen(1))
    v2, p2 = toy.toy_batch(4, 5, gen(1))
    assert v1.shape == (4, 5, 3, toy.TOY_SIZE, toy.TOY_SIZE) and p1 == p2 and torch.equal(v1, v2)
    with pytest.raises(ValueError, match="3 prompts for batch 4"):
        toy.toy_batch(4, 5, gen(1), prompts=toy.toy_prompts()[:3])
    with pytest.raises(ValueError, match="num_frames"):
        toy.render_video(toy.toy_prompts()[0], 0)


def test_save_strip_writes_one_row_per_video(tmp_path, clean):
    import imageio.v2 as imageio
    toy.save_strip(clean[0][:3, :4], tmp_path / "s.png", upscale=2)
    img = imageio.imread(tmp_path / "s.png")
    assert img.shape == (3 * toy.TOY_SIZE * 2, 4 * toy.TOY_SIZE * 2, 3)


# ------------------------------------------------------------------------------------------------ VAE
def test_toy_vae_round_trip_is_exact_and_stream_equals_full(clean):
    vae, videos = toy.ToyVAE(), clean[0]
    lat = vae.encode(videos)
    s = vae.spatial_factor
    assert lat.shape == (len(videos), T, vae.z_dim, toy.TOY_SIZE // s, toy.TOY_SIZE // s) and vae.temporal_factor == 1
    err = (vae.decode(lat) - videos).abs().max().item()
    assert err < 1e-6, f"round trip error {err}"
    dec = vae.stream_decoder()
    streamed = torch.cat([dec(lat[:, i:i + toy.TOY_CHUNK]) for i in range(0, T, toy.TOY_CHUNK)], 1)
    assert torch.equal(streamed, vae.decode(lat))
    assert len(vae.state_dict()) == 0 and not list(vae.parameters())


def test_toy_vae_latents_have_unit_scale_on_fresh_videos():
    lat = toy.ToyVAE().encode(toy.toy_batch(64, T, gen(123))[0])
    mean, std = lat.mean().item(), lat.std((0, 1, 3, 4))
    assert abs(mean) < 0.1 and ((std - 1).abs() < 0.1).all(), f"latent mean {mean:.3f}, per-channel std {std}"


def test_toy_vae_rejects_bad_shapes():
    vae = toy.ToyVAE()
    with pytest.raises(ValueError, match="divisible by 4"):
        vae.encode(torch.zeros(1, 2, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        vae.encode(torch.zeros(1, 2, 4, 32, 32))
    with pytest.raises(ValueError, match="48"):
        vae.decode(torch.zeros(1, 2, 16, 8, 8))


# ------------------------------------------------------------------------------------------------ text and DiT
def test_tokenizer_appends_eos_pads_with_zero_and_maps_unknown_to_2():
    tok = toy.toy_tokenizer()
    out = tok(["a red circle moving left", "a Purple square moving up"], padding="max_length",
              max_length=toy.TOY_TEXT_LEN, truncation=True, add_special_tokens=True)
    v = dict(zip(toy.VOCAB, range(len(toy.VOCAB))))
    assert out.input_ids[0] == [v["a"], v["red"], v["circle"], v["moving"], v["left"], 1, 0, 0]
    assert out.input_ids[1][1] == 2 and out.attention_mask[1] == [1] * 6 + [0] * 2
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)


def test_toy_text_encoder_is_deterministic_and_saves_and_loads(tmp_path):
    from safetensors.torch import save_model
    import text
    a, b = toy.toy_text_encoder(), toy.toy_text_encoder()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():
        a.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(2)
    save_model(a, str(tmp_path / "t.safetensors"))
    c = toy.toy_text_encoder(tmp_path / "t.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    enc = text.TextEncoder(c, toy.toy_tokenizer(), text_len=toy.TOY_TEXT_LEN)
    ctx = enc.encode(["a red circle moving left", "a blue square moving up"])
    assert ctx.shape == (2, toy.TOY_TEXT_LEN, toy.toy_text_config().d_model)
    assert ctx[:, 6:].abs().max() == 0 and ctx[:, :6].abs().amin(-1).min() > 0, "rows after EOS must be zero"
    with pytest.raises(FileNotFoundError, match="nope"):
        toy.toy_text_encoder(tmp_path / "nope.safetensors")


def test_toy_dit_maps_toy_latents_and_context_to_velocity():
    cfg = toy.toy_dit_config()
    vae, net = toy.ToyVAE(), WanModel(cfg)
    lat = vae.encode(toy.toy_batch(1, toy.TOY_CHUNK, gen(0))[0])
    ctx = torch.zeros(1, toy.TOY_TEXT_LEN, toy.toy_text_config().d_model)
    with torch.no_grad():
        out = net(lat, torch.tensor([500.0]), ctx)
    assert out.shape == lat.shape and cfg.in_dim == cfg.out_dim == vae.z_dim
    # a toy clip is whole chunks and longer than the window, so its last chunk exercises eviction into the EMA sink
    assert toy.TOY_SINK < toy.TOY_WINDOW < toy.TOY_FRAMES and toy.TOY_FRAMES % toy.TOY_CHUNK == 0


# ------------------------------------------------------------------------------------------------ reward
def raw(videos, prompts, axis):
    return toy.ToyReward().score_and_saliency(videos, prompts, axes=(axis,)).raw[:, 0]


def test_reward_ranks_each_clean_video_above_its_corruption(clean):
    videos, prompts = clean
    noisy = (videos + 0.1 * torch.randn(videos.shape, generator=gen(1))).clamp(-1, 1)
    shuffled = videos[:, torch.randperm(T, generator=gen(2))]
    jump = videos[:, [0] * (T // 2) + [T // 2] * (T - T // 2)]                  # still, a jump, still
    wrong_color = [p.replace(c, list(toy.COLORS)[(list(toy.COLORS).index(c) + 1) % 4])
                   for p, (c, _, _) in zip(prompts, map(toy.parse_prompt, prompts))]
    wrong_dir = [p.replace(d, {"left": "right", "right": "left", "up": "down", "down": "up"}[d])
                 for p, (_, _, d) in zip(prompts, map(toy.parse_prompt, prompts))]
    cases = [("VQ", noisy, prompts, "noise 0.1"), ("VQ", blur(videos), prompts, "blur"),
             ("MQ", shuffled, prompts, "shuffled frames"), ("MQ", jump, prompts, "a jump"),
             ("TA", videos, wrong_color, "wrong colour"), ("TA", videos, wrong_dir, "wrong direction"),
             ("TA", videos[:, :1].expand_as(videos), prompts, "static")]
    good = {axis: raw(videos, prompts, axis) for axis in toy.REWARD_AXES}
    for axis, bad, bad_prompts, what in cases:
        margin = (good[axis] - raw(bad, bad_prompts, axis)).min().item()
        assert margin > 0.05, f"{axis}: clean minus {what} is {margin:.3f} for the worst video (want > 0.05)"


def test_reward_z_is_positive_on_renders_and_negative_on_noise(clean):
    videos, prompts = clean
    z_clean = toy.ToyReward().score_and_saliency(videos, prompts).z.mean(0)
    noise = torch.randn(videos.shape, generator=gen(3)).clamp(-1, 1)
    z_noise = toy.ToyReward().score_and_saliency(noise, prompts).z.mean(0)
    assert (z_clean > 0.3).all() and (z_noise < -0.5).all(), f"mean z clean {z_clean}, noise {z_noise}"


def test_reward_norm_constants_are_what_the_documented_calibration_gives():
    mean, std = toy.calibrate_reward_norm()
    for a in toy.REWARD_AXES:
        assert abs(mean[a] - toy.REWARD_MEAN[a]) < 2e-3, f"{a} mean {mean[a]} vs constant {toy.REWARD_MEAN[a]}"
        assert abs(std[a] - toy.REWARD_STD[a]) < 2e-3, f"{a} std {std[a]} vs constant {toy.REWARD_STD[a]}"


def test_toy_reward_gradient_matches_finite_differences():
    videos, prompts = toy.toy_batch(1, 3, gen(4), size=20)
    videos = (videos + 0.05 * torch.randn(videos.shape, generator=gen(5))).double().requires_grad_()
    parsed = toy.parse_prompt(prompts[0])
    colors = torch.tensor([toy.COLORS[parsed[0]]], dtype=torch.double)
    dirs = torch.tensor([toy.DIRECTIONS[parsed[2]]], dtype=torch.double)
    for axis in toy.REWARD_AXES:
        assert torch.autograd.gradcheck(lambda v: toy.toy_reward_raw(v, colors, dirs)[axis], (videos,),
                                        eps=1e-6, atol=1e-5, fast_mode=True), axis


def test_saliency_shape_batch_independence_and_score_only_agreement(clean):
    videos, prompts = clean[0][:4], clean[1][:4]
    reward = toy.ToyReward()
    res = reward.score_and_saliency(videos, prompts, latent_shape=(T, 8, 8), axes=("TA", "VQ"))
    assert res.axes == ("TA", "VQ") and res.saliency.shape == (4, 2, T, 8, 8) and not res.raw.requires_grad
    assert torch.isfinite(res.saliency).all() and (res.saliency.sum((2, 3, 4)) > 0).all()
    alone = reward.score_and_saliency(videos[1:2], prompts[1:2], latent_shape=(T, 8, 8), axes=("TA", "VQ"))
    assert torch.allclose(alone.saliency[0], res.saliency[1], rtol=1e-4, atol=1e-9), "saliency mixes samples"
    only = reward.score_and_saliency(videos, prompts, axes=("VQ", "TA"))
    assert only.saliency is None and torch.allclose(only.raw, res.raw.flip(1))


def test_saliency_concentrates_on_the_noised_half_of_the_frame(clean):
    """The stress test: noise on the left half of every frame -> every axis' saliency lives there."""
    videos, prompts = clean
    bad = videos.clone()
    half = toy.TOY_SIZE // 2
    bad[..., :half] = (bad[..., :half] + 0.3 * torch.randn(bad[..., :half].shape, generator=gen(6))).clamp(-1, 1)
    s = toy.ToyReward().score_and_saliency(bad, prompts, latent_shape=(T, 8, 8)).saliency
    ratio = s[..., :4].sum((0, 2, 3, 4)) / s[..., 4:].sum((0, 2, 3, 4))
    assert (ratio > 3).all(), f"left/right saliency per axis {ratio} (want > 3)"


def test_vq_saliency_favours_blurred_frames(clean):
    videos, prompts = clean
    bad = torch.cat([videos[:, :T // 2], blur(videos[:, T // 2:])], 1)
    s = toy.ToyReward().score_and_saliency(bad, prompts, latent_shape=(T, 8, 8), axes=("VQ",)).saliency
    ratio = (s[:, 0, T // 2:].sum() / s[:, 0, :T // 2].sum()).item()
    assert ratio > 1.2, f"VQ saliency blurred/sharp frames {ratio:.2f} (want > 1.2)"


def test_reward_rejects_bad_inputs(clean):
    videos, prompts = clean[0][:2], clean[1][:2]
    reward = toy.ToyReward()
    for kwargs, match in [(dict(frames=videos[:, :2]), "T>=3"), (dict(prompts=prompts[:1]), "1 prompts for 2"),
                          (dict(axes=("VQ", "XX")), "subset"), (dict(prompts=["a red blob moving up"] * 2), "blob"),
                          (dict(latent_shape=(T, 64, 8)), "no larger"), (dict(latent_shape=(T, 8)), "no larger")]:
        args = dict(frames=videos, prompts=prompts) | kwargs
        with pytest.raises(ValueError, match=match):
            reward.score_and_saliency(**args)


# ------------------------------------------------------------------------------------------------ evaluation
def test_eval_scores_renders_perfectly_and_noise_near_chance(clean):
    videos, prompts = clean
    perfect = {"color_accuracy": 1.0, "direction_accuracy": 1.0}
    assert toy.evaluate_videos(videos, prompts) == perfect
    assert toy.evaluate_videos(toy.toy_batch(32, 3 * T, gen(7), prompts)[0], prompts) == perfect, "long clips"
    faded = torch.stack([toy.toy_batch(32, T, gen(s), prompts)[0] for s in (11, 12, 13)]).mean(0)
    acc = toy.evaluate_videos(faded, prompts)  # three faint copies on the line of motion (a mean-regressed sample):
    assert acc["color_accuracy"] == 1 and acc["direction_accuracy"] >= 0.9, acc  # copies half a torus apart: no mean
    vae = toy.ToyVAE()
    for name, noise in [("pixel", torch.randn(128, T, 3, toy.TOY_SIZE, toy.TOY_SIZE, generator=gen(8)).clamp(-1, 1)),
                        ("latent", vae.decode(torch.randn(128, T, vae.z_dim, 8, 8, generator=gen(8))))]:
        acc = toy.evaluate_videos(noise, prompts * 4)
        assert all(0.1 < a < 0.4 for a in acc.values()), f"{name} noise accuracies {acc} (chance 0.25)"


def test_eval_catches_wrong_direction_and_static_object(clean):
    videos, prompts = clean
    flipped = videos.flip(1)                                     # played backwards: opposite direction
    assert toy.evaluate_videos(flipped, prompts) == {"color_accuracy": 1.0, "direction_accuracy": 0.0}
    static = videos[:, :1].expand_as(videos)
    assert toy.evaluate_videos(static, prompts)["direction_accuracy"] == 0.0


def test_teacher_distance_is_small_for_renders_and_large_for_noise(clean):
    videos, prompts = clean
    again = toy.toy_batch(32, T, gen(9), prompts)[0]
    noise = torch.randn(videos.shape, generator=gen(10)).clamp(-1, 1)
    assert toy.teacher_distance(videos, videos) == 0.0
    d_render, d_noise = toy.teacher_distance(again, videos), toy.teacher_distance(noise, videos)
    assert d_render < 0.2 and d_noise > 1.0, f"renders {d_render:.3f}, noise {d_noise:.3f}"
    with pytest.raises(ValueError, match="same prompts"):
        toy.teacher_distance(videos[:2], videos)


def test_drift_measures_moving_frozen_and_stopping_streams():
    """Per-window drift on synthetic streams: a render moves at SPEED in its direction in every window; a stream
    that repeats its first frames is frozen; one that moves for a window and then stops is frozen from then on."""
    prompts = list(toy.EVAL_PROMPTS)
    moving = toy.toy_batch(32, 48, gen(3), prompts)[0]
    rows = toy.drift(moving, prompts, window=16, sink_frames=3)
    assert [r["start"] for r in rows] == [0, 16, 32]
    for r in rows:
        assert r["color_accuracy"] == r["direction_accuracy"] == 1.0 and r["frozen"] == 0.0, r
        assert abs(r["speed"] - toy.SPEED) < 0.05, f"renders move {toy.SPEED} px/frame, measured {r['speed']:.3f}"
    frozen = moving[:, :3].repeat(1, 16, 1, 1, 1)                 # the first chunk over and over (a copied sink)
    for r in toy.drift(frozen, prompts, window=16, sink_frames=3):
        assert r["frozen"] == 1.0 and r["direction_accuracy"] == 0.0 and r["color_accuracy"] == 1.0, r
    stops = torch.cat([moving[:, :16], moving[:, 15:16].expand(-1, 32, -1, -1, -1)], dim=1)
    assert [r["frozen"] for r in toy.drift(stops, prompts, window=16, sink_frames=3)] == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="window"):
        toy.drift(moving, prompts, window=64, sink_frames=3)
