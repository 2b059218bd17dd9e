"""reward.py: Qwen2-VL patch order against transformers' processor; VideoReward on a tiny random Qwen2-VL (fp32, CPU,
SDPA): prompt causality, one-forward saliency, checkpointing; loading a fake VideoAlign release in the transformers 4.45
PEFT layout. No downloads."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

import reward
from bench import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS  # the Qwen2-VL stand-in bench.py plans with
from reward import VideoReward, qwen_patchify, qwen_unpatchify

PROMPTS = ["a red cat jumps over a blue fence", "a green dog sleeps under a yellow tree"]
H, W, FPS = 56, 84, 16.0  # 9 frames at 16 fps -> 4 frames at 2 fps -> grid (2, 4, 6) -> 12 video tokens
PIX = dict(min_pixels=H * W, max_pixels=H * W)


def make_tokenizer(with_reward_tokens: bool = True) -> PreTrainedTokenizerFast:
    """Line-level tokenizer: every line of the rendered prompt (split around special tokens) is one token, so the exact
    VideoAlign template costs ~80 tokens."""
    corpus = "system\nYou are a helpful assistant.\nuser\nassistant\n" + "".join(map(reward.build_prompt, PROMPTS))
    pieces = {p for p in re.split(r"(<\|\w+\|>|\n)", corpus) if p and not re.fullmatch(r"<\|\w+\|>", p)}
    vocab = {w: i for i, w in enumerate([*QWEN_SPECIALS, "[UNK]", *sorted(pieces)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>")
    tok.add_tokens(list(QWEN_SPECIALS), special_tokens=True)
    if with_reward_tokens:
        tok.add_tokens(list(reward.REWARD_TOKENS.values()), special_tokens=True)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def make_config(tok) -> Qwen2VLConfig:
    ids = tok.convert_tokens_to_ids
    return Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def make_reward(seed: int = 0, **kw) -> VideoReward:
    torch.manual_seed(seed)
    tok = make_tokenizer()
    rm = VideoReward(Qwen2VLForConditionalGeneration(make_config(tok)), tok, **PIX, **kw)
    torch.nn.init.normal_(rm.rm_head.weight, std=1.0)
    return rm


@pytest.fixture(scope="module")
def rm() -> VideoReward:
    return make_reward()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 9, 3, H, W) * 2 - 1


# -------------------------------------------------------------------------------- preprocessing

def test_patchify_still_video_equals_qwen2vl_image_processor():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    ref = Qwen2VLImageProcessorPil(do_resize=False)(images=[img], return_tensors="pt")
    video = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(4, 1, 1, 1).float() / 255  # still video, 4 frames
    pv, grid = qwen_patchify(video)
    expect = ref["pixel_values"].repeat(2, 1)  # the processor repeats an image over the temporal patch; t = 2 here
    assert grid.tolist() == [[2, H // 14, W // 14]] and ref["image_grid_thw"].tolist() == [[1, H // 14, W // 14]]
    err = (pv - expect).abs().max().item()
    assert err < 1e-5, f"qwen_patchify differs from Qwen2VLImageProcessorPil by {err}"


def position_video(T: int = 4) -> torch.Tensor:
    """Frames whose channels code (frame, row, column) of every pixel: c0 = t/8, c1 = y/64, c2 = x/128 (all < 1)."""
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([t / 8, y / 64, x / 128], dim=1).float()


def decode_positions(pv: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates [N, 3, 2, 14, 14, (t, y, x)] held by each patch row, undoing the CLIP normalisation."""
    x = pv.view(-1, 3, 2, 14, 14) * torch.tensor(reward.CLIP_STD).view(1, 3, 1, 1, 1) + \
        torch.tensor(reward.CLIP_MEAN).view(1, 3, 1, 1, 1)
    return torch.stack([x[:, 0] * 8, x[:, 1] * 64, x[:, 2] * 128], -1).round().long()


def test_patchify_position_coded_video_lands_in_merge_window_patches():
    pv, grid = qwen_patchify(position_video())
    t, gh, gw = grid[0].tolist()
    pos = decode_positions(pv)  # [N, 2, 14, 14, 3]
    r = torch.arange(pv.shape[0])
    # REFERENCE §7.4: row = (t, h/2, w/2, mh, mw); in-row (C, tp, y, x)
    ti, rest = r // (gh * gw), r % (gh * gw)
    bh, rest = rest // ((gw // 2) * 4), rest % ((gw // 2) * 4)
    bw, m = rest // 4, rest % 4
    py, px = (2 * bh + m // 2) * 14, (2 * bw + m % 2) * 14
    tp, yy, xx = torch.meshgrid(torch.arange(2), torch.arange(14), torch.arange(14), indexing="ij")
    expect = torch.stack([(2 * ti).view(-1, 1, 1, 1) + tp, py.view(-1, 1, 1, 1) + yy, px.view(-1, 1, 1, 1) + xx], -1)
    bad = (pos != expect).any(-1).sum().item()
    assert bad == 0, f"{bad} of {pos[..., 0].numel()} pixels landed in the wrong patch slot"


def test_unpatchify_restores_positions_and_published_view_scrambles():
    pv, grid = qwen_patchify(position_video())
    t, gh, gw = grid[0].tolist()
    corner = decode_positions(pv)[:, 0, 0, 0]  # [N, 3] top-left pixel (t, y, x) of each patch
    expect = torch.stack(torch.meshgrid(torch.arange(t) * 2, torch.arange(gh) * 14, torch.arange(gw) * 14,
                                        indexing="ij"), -1)
    ours = qwen_unpatchify(corner, grid)
    assert torch.equal(ours, expect), f"qwen_unpatchify misplaces {(ours != expect).any(-1).sum().item()} patches"
    published = corner.view(t, gh, gw, 3)  # SR1 compute_pixel_spatial_saliency (REFERENCE §10.7)
    scrambled = (published != expect).any(-1).float().mean().item()
    assert scrambled > 0.5, f"the published view(t, h, w) should scramble most patches, only {scrambled:.0%} moved"
    rows = qwen_unpatchify(torch.arange(pv.shape[0]), grid)
    assert torch.equal(rows.flatten().sort().values, torch.arange(pv.shape[0])), "every row must appear exactly once"
    frames = torch.rand(4, 3, H, W, requires_grad=True)
    pv, grid = qwen_patchify(frames)
    back = rearrange(qwen_unpatchify(pv, grid), "t gh gw (c tp ph pw) -> (t tp) c (gh ph) (gw pw)", c=3, tp=2, ph=14)
    back = back * torch.tensor(reward.CLIP_STD).view(1, 3, 1, 1) + torch.tensor(reward.CLIP_MEAN).view(1, 3, 1, 1)
    assert (back - frames).abs().max() < 1e-6, "unpatchify(patchify(frames)) must rebuild the frames"
    back.sum().backward()
    assert torch.allclose(frames.grad, torch.ones_like(frames)), "gradients must flow through patchify / unpatchify"


def test_frame_selection_at_2fps_and_published_all_frames():
    assert reward.frame_indices(81, 16.0).tolist() == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]  # REFERENCE §7.4
    assert reward.frame_indices(81, 16.0, all_frames=True).tolist() == list(range(80))  # SR1: drop the odd last frame
    assert reward.frame_indices(9, 16.0).tolist() == [0, 3, 5, 8]  # short clips: at least 4 frames
    with pytest.raises(ValueError, match="cannot sample"):
        reward.frame_indices(1, 16.0)


@pytest.mark.parametrize("hw", [(480, 832), (720, 1280), (100, 150), (60, 104), (28, 5000)])
def test_smart_resize_equals_transformers(hw):
    ours = reward.smart_resize(*hw)
    ref = hf_smart_resize(*hw, factor=28, min_pixels=reward.VIDEO_MIN_PIXELS, max_pixels=reward.VIDEO_MAX_PIXELS)
    assert ours == tuple(ref), f"smart_resize{hw}: ours {ours}, transformers {ref}"
    assert reward.smart_resize(480, 832) == (336, 588)


def test_preprocess_matches_pil_processor_resize_and_passes_gradients():
    rng = np.random.default_rng(0)
    img = np.clip(np.cumsum(rng.normal(0, 20, (100, 150, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": H * W, "longest_edge": H * W})
    ref = processor(images=[img], return_tensors="pt")
    frames = (torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)[None].repeat(2, 1, 1, 1).requires_grad_()
    pv, grid = reward.preprocess_video(frames, FPS, all_frames=True, **PIX)
    assert grid.tolist() == ref["image_grid_thw"].tolist()  # two still frames = one temporal patch = one image
    diff = (pv.detach() - ref["pixel_values"]).abs()
    # PIL rounds its bicubic output to uint8; ours stays float: about 1-2 LSB (1/255/0.26 = 0.015) apart
    assert diff.max() < 0.04 and diff.mean() < 0.0075, \
        f"resize differs from PIL: max {diff.max():.4f}, mean {diff.mean():.4f}"
    pv.square().sum().backward()
    g = frames.grad
    assert torch.isfinite(g).all() and (g.abs().sum((1, 2, 3)) > 0).all(), "gradient does not reach every frame"


def test_black_frames_map_to_zero_not_minus_one():
    pv, _ = reward.preprocess_video(-torch.ones(2, 3, H, W), FPS, all_frames=True, **PIX)  # REFERENCE §10.5
    expect = -torch.tensor(reward.CLIP_MEAN) / torch.tensor(reward.CLIP_STD)
    got = pv.view(-1, 3, 2 * 14 * 14)[:, :, 0].mean(0)
    assert torch.allclose(got, expect, atol=1e-5), f"black normalises to {got.tolist()}, expected {expect.tolist()}"


def test_template_is_videoalign_detailed_special():
    text = reward.build_prompt("PROMPT")
    assert sum(line.endswith(" ") for line in text.split("\n")) == 5, "the template's five trailing-space lines changed"
    order = [text.index(s) for s in ("<|VQ_reward|>", "<|MQ_reward|>", "Textual prompt - PROMPT", "<|TA_reward|>")]
    assert order == sorted(order) and text.startswith("\nYou are tasked") and text.endswith("<|TA_reward|>\nEND\n")


def test_bad_inputs_fail_before_work(rm, frames):
    with pytest.raises(ValueError, match="must divide"):
        qwen_patchify(torch.rand(4, 3, 50, 56))
    with pytest.raises(ValueError, match="prompts for a batch"):
        rm.score_and_saliency(frames, PROMPTS[:1])
    with pytest.raises(ValueError, match="B, T, 3, H, W"):
        rm.score_and_saliency(frames[0], PROMPTS)
    with pytest.raises(ValueError, match="axes"):
        rm.score_and_saliency(frames, PROMPTS, axes=("VQ", "XX"))
    with pytest.raises(ValueError, match="latent_shape"):
        rm.score_and_saliency(frames, PROMPTS, latent_shape=(3, 5))


# -------------------------------------------------------------------------------- the reward model

def test_vq_mq_ignore_the_prompt_ta_reads_it(rm, frames):
    a = rm.score_and_saliency(frames[:1].expand(2, -1, -1, -1, -1), PROMPTS)
    vq_mq = (a.raw[0, :2] - a.raw[1, :2]).abs().max().item()
    ta = (a.raw[0, 2] - a.raw[1, 2]).abs().item()
    assert vq_mq < 1e-5, f"VQ/MQ changed by {vq_mq} with the prompt (causal attention: they precede the prompt text)"
    assert ta > 1e-3, f"TA changed by only {ta} with the prompt"
    mean, std = torch.tensor(list(reward.NORM_DEFAULTS.values())).T
    z = (a.raw - mean) / std
    assert torch.allclose(a.z, z, atol=1e-6), "z-scores do not use the REFERENCE §7.5 constants"


@pytest.fixture(scope="module")
def scored(rm, frames):
    """One score_and_saliency call shared by several tests: pixels from a stand-in generator parameter, forwards
    counted."""
    gen = torch.nn.Parameter(frames.atanh())
    calls = {"visual": 0, "language_model": 0}
    hooks = [getattr(rm.qwen.model, n).register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
             for n in calls]
    try:
        res = rm.score_and_saliency(torch.tanh(gen), PROMPTS, latent_shape=(3, 5, 7))
    finally:
        for h in hooks:
            h.remove()
    return res, calls, gen


def test_one_forward_per_score_and_saliency_and_detached_results(rm, scored):
    res, calls, _ = scored
    assert calls == {"visual": 1, "language_model": 1}, f"expected one reward forward, counted {calls}"
    assert res.saliency.shape == (2, 3, 3, 5, 7) and res.raw.shape == res.z.shape == (2, 3) and res.axes == reward.AXES
    per_map = res.saliency.flatten(2).amin(-1)
    assert (per_map > 0).all(), f"some saliency maps are zero somewhere: min per map {per_map.tolist()}"
    assert not any(t.requires_grad for t in (res.raw, res.z, res.saliency)), "results must be detached"
    assert not any(p.requires_grad for p in rm.parameters()), "the reward model must stay frozen"


def test_saliency_is_z_gradient_norm_per_patch_in_position(rm, frames):
    # latent_shape = the patch grid, so the trilinear resize is the identity
    res = rm.score_and_saliency(frames, PROMPTS, latent_shape=(2, 4, 6), axes=("TA", "VQ"))
    pv, grid = zip(*[reward.preprocess_video(v, FPS, **PIX) for v in frames])
    pv, grid = torch.cat(pv).requires_grad_(), torch.cat(grid)
    ids, mask = rm.prompt_ids(PROMPTS, int(grid[0].prod()) // 4)
    raw = rm(pv, grid, ids, mask)
    for k, a in enumerate(("TA", "VQ")):
        col = reward.AXES.index(a)
        g = torch.autograd.grad(raw[:, col].sum(), pv, retain_graph=True)[0].norm(dim=-1) / reward.NORM_DEFAULTS[a][1]
        for b in range(2):
            expect = qwen_unpatchify(g.view(2, -1)[b], grid[0])
            err = (res.saliency[b, k] - expect).abs().max().item() / expect.abs().max().item()
            assert err < 1e-5, f"saliency[{b}, {a}] differs from ||dz/dpatch|| by {err:.2e} (relative)"
        assert torch.allclose(res.raw[:, k], raw[:, col].detach(), atol=1e-6)


def test_saliency_reaches_the_latent_grid_by_trilinear_interpolation():
    """§8.3: per-patch saliency to the latent grid, trilinear with align_corners=False, up (t, h) and down (w). Exact
    on a linear map s = t + 10 h + 100 w: output index i of an axis reads source coordinate
    clamp((i + 0.5) n_in / n_out - 0.5, 0, n_in - 1)."""
    src, dst = (2, 3, 4), (3, 5, 2)
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in src), indexing="ij")
    sal = (t + 10 * h + 100 * w).expand(2, 3, *src)  # [B, A, t, h', w']
    ct, ch, cw = torch.meshgrid(*(((torch.arange(o) + 0.5) * n / o - 0.5).clamp(0, n - 1) for n, o in zip(src, dst)),
                                indexing="ij")
    got = reward.saliency_to_latent_grid(sal, dst)
    assert got.shape == (2, 3, *dst) and torch.allclose(got, (ct + 10 * ch + 100 * cw).expand_as(got), atol=1e-4), \
        f"latent-grid saliency {got[0, 0]}"


def test_batch_saliency_equals_per_sample(rm, frames, scored):
    both = scored[0]
    for b in range(2):
        one = rm.score_and_saliency(frames[b:b + 1], PROMPTS[b:b + 1], latent_shape=(3, 5, 7))
        err = (both.saliency[b] - one.saliency[0]).abs().max().item() / one.saliency.abs().max().item()
        assert err < 1e-5 and torch.allclose(both.raw[b], one.raw[0], atol=1e-5), \
            f"sample {b} scored in a batch differs from alone: saliency rel err {err:.2e}"


def test_weight_carries_no_gradient_to_generator(scored):
    from weighting import fuse_saliency, inter_reliability_weight, intra_perplexity_weights

    res, _, gen = scored  # scored on tanh(gen), the stand-in for the generator's decoded rollout
    w_inter = inter_reliability_weight(res.z.mean(1))[:, None, None, None, None]
    w = w_inter * intra_perplexity_weights(fuse_saliency(res.saliency, res.z))
    x = torch.randn(2, 3, 4, 5, 7, requires_grad=True)
    (w * x).sum().backward()
    assert not w.requires_grad and gen.grad is None, "the reward weight leaks a gradient path to the generator"
    assert torch.equal(x.grad, w.expand_as(x)), "d(w*x)/dx must be exactly w"


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_recomputes_and_matches(rm, frames, scored):
    ck = make_reward(gradient_checkpointing=True)
    ck.load_state_dict(rm.state_dict())
    runs = {"vit block": 0, "llm layer": 0}
    inner = {"vit block": ck.qwen.model.visual.blocks[0].attn,
             "llm layer": ck.qwen.model.language_model.layers[0].self_attn}
    hooks = [m.register_forward_hook(lambda *_, n=n: runs.__setitem__(n, runs[n] + 1)) for n, m in inner.items()]
    try:
        a = ck.score_and_saliency(frames, PROMPTS, latent_shape=(3, 5, 7))
    finally:
        for h in hooks:
            h.remove()
    b = scored[0]
    # non-reentrant checkpointing recomputes a layer in every backward that reaches it: 1 forward + 1 per axis
    assert runs == {"vit block": 4, "llm layer": 4}, f"expected 1 forward + 3 recomputes of each layer, got {runs}"
    err = ((a.saliency - b.saliency).abs().max() / b.saliency.abs().max()).item()
    assert err < 1e-5 and torch.allclose(a.raw, b.raw, atol=1e-6), f"checkpointed saliency differs by {err:.2e}"
    assert not ck.qwen.training, "the reward model must be back in eval mode"


# -------------------------------------------------------------------------------- loading a VideoAlign release

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def to_peft_445(src: VideoReward, r: int, alpha: float) -> dict:
    """Write src as VideoAlign's model.pth: the 4.45 tree under PEFT, LLM linears split as W = base + (alpha/r) B A."""
    g = torch.Generator().manual_seed(3)
    out = {"base_model.model.rm_head.weight": src.rm_head.weight.detach().clone()}
    for k, v in src.qwen.state_dict().items():
        k = re.sub(r"^model\.visual", "visual", re.sub(r"^model\.language_model", "model", k))
        module, leaf = k.rsplit(".", 1)
        if k.startswith("model.layers.") and module.endswith(LORA_TARGETS):
            out[f"base_model.model.{module}.base_layer.{leaf}"] = v.clone()
            if leaf == "weight":
                a, b = 0.05 * torch.randn(r, v.shape[1], generator=g), 0.05 * torch.randn(v.shape[0], r, generator=g)
                out[f"base_model.model.{module}.base_layer.weight"] = v - alpha / r * b @ a
                out[f"base_model.model.{module}.lora_A.default.weight"] = a
                out[f"base_model.model.{module}.lora_B.default.weight"] = b
        else:
            out[f"base_model.model.{k}"] = v.clone()
    return out


def write_release(tmp_path, state: dict, r: int, alpha: float):
    base, release = tmp_path / "base", tmp_path / "release"
    tok = make_tokenizer(with_reward_tokens=False)  # VideoAlign adds the reward tokens to the base tokenizer itself
    tok.save_pretrained(base)
    make_config(make_tokenizer()).save_pretrained(base)
    (release / "checkpoint-7").mkdir(parents=True)
    torch.save(state, release / "checkpoint-7" / "model.pth")
    (release / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 2.0, "max_frame_pixels": H * W, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special"},
        "model_config": {"output_dim": 1, "reward_token": "special"},
        "peft_lora_config": {"lora_r": r, "lora_alpha": alpha, "use_rslora": False},
        "inference_config": {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": 0.5, "MQ_std": 1.5, "TA_mean": -1.0,
                             "TA_std": 4.0}}))
    return base, release


def test_lora_merge_and_key_remap_from_445_peft_release(tmp_path, rm, frames):
    base, release = write_release(tmp_path, to_peft_445(rm, r=4, alpha=16.0), r=4, alpha=16.0)  # scale 4, default 2
    loaded = VideoReward.from_pretrained(base, release, device="cpu")
    loaded.min_pixels = loaded.max_pixels = H * W
    ref = rm.state_dict()
    worst = max(((v - ref[k]).abs().max().item(), k) for k, v in loaded.state_dict().items())
    assert worst[0] < 1e-5, f"loaded weights differ from the source model, worst {worst[1]} by {worst[0]:.2e}"
    assert loaded.reward_token_ids == rm.reward_token_ids, "reward token ids differ from the source tokenizer's"
    a, b = loaded.score_and_saliency(frames, PROMPTS), rm.score_and_saliency(frames, PROMPTS)
    assert torch.allclose(a.raw, b.raw, atol=1e-5), f"scores differ by {(a.raw - b.raw).abs().max():.2e}"
    z = (a.raw - torch.tensor([1.0, 0.5, -1.0])) / torch.tensor([2.0, 1.5, 4.0])
    assert torch.allclose(a.z, z, atol=1e-6), "z-scores must use the release's inference_config"


def test_bf16_release_keeps_fp32_rope_and_follows_fp32_on_cpu(tmp_path, rm, frames):
    """from_pretrained(dtype=bf16), as a run with bf16: true stores it: bf16 parameters, the RoPE frequency buffers
    transformers' fp32 ones (a cast module rounds them, angles off by radians at position 1000); on the CPU, pure bf16
    and under bf16 autocast, scores and saliency follow the fp32 release (the bounds of the CUDA test below)."""
    base, release = write_release(tmp_path, to_peft_445(rm, r=4, alpha=8.0), r=4, alpha=8.0)
    fp32, bf16 = (VideoReward.from_pretrained(base, release, dtype=dtype, device="cpu")
                  for dtype in (torch.float32, torch.bfloat16))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    buffers = dict(fp32.named_buffers())
    assert all(b.dtype == torch.float32 and torch.equal(b, buffers[n]) for n, b in bf16.named_buffers())
    ref = fp32.score_and_saliency(frames, PROMPTS, latent_shape=(3, 5, 7))
    for autocast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            res = bf16.score_and_saliency(frames, PROMPTS, latent_shape=(3, 5, 7))
        raw_err = (res.raw - ref.raw).abs().max().item() / ref.raw.abs().max().item()
        cos = F.cosine_similarity(res.saliency.flatten(2), ref.saliency.flatten(2), dim=-1).min().item()
        assert raw_err < 0.05 and cos > 0.98, f"bf16 (autocast {autocast}) vs fp32: raw rel err {raw_err:.3f}, " \
                                              f"saliency cosine {cos:.4f}"


def test_release_with_unknown_or_missing_keys_names_them(tmp_path, rm):
    state = to_peft_445(rm, r=4, alpha=8.0)
    state["base_model.model.visual.extra.weight"] = torch.zeros(1)
    del state["base_model.model.model.norm.weight"]
    base, release = write_release(tmp_path, state, r=4, alpha=8.0)
    names = r"missing \['model.language_model.norm.weight'\].*unexpected \['model.visual.extra.weight'\]"
    with pytest.raises(KeyError, match=names):
        VideoReward.from_pretrained(base, release, device="cpu")
    with pytest.raises(KeyError, match="PEFT layout"):
        reward.convert_videoalign_state_dict({"visual.x": torch.zeros(1)}, 2.0)
    with pytest.raises(KeyError, match="without a base layer"):
        reward.convert_videoalign_state_dict({"base_model.model.model.q.lora_A.default.weight": torch.zeros(1),
                                              "base_model.model.model.q.lora_B.default.weight": torch.zeros(1)}, 2.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_follows_fp32_and_keeps_fp32_norm_constants(rm, frames, scored):
    cu = make_reward()
    cu.load_state_dict(rm.state_dict())
    cu = cu.to("cuda", torch.bfloat16)  # VideoAlign inference precision (REFERENCE §7.1)
    res, ref = cu.score_and_saliency(frames.cuda(), PROMPTS, latent_shape=(3, 5, 7)), scored[0]
    raw_err = (res.raw.cpu() - ref.raw).abs().max().item() / ref.raw.abs().max().item()
    cos = F.cosine_similarity(res.saliency.cpu().flatten(2), ref.saliency.flatten(2), dim=-1).min().item()
    assert raw_err < 0.05 and cos > 0.98, f"bf16 CUDA vs fp32 CPU: raw rel err {raw_err:.3f}, saliency cosine {cos:.4f}"
    mean, std = torch.tensor(list(reward.NORM_DEFAULTS.values())).T
    assert torch.allclose(res.z.cpu(), (res.raw.cpu() - mean) / std, atol=1e-6), "z must use fp32 constants"
