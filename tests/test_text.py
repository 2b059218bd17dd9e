"""text.py: Wan's prompt cleaning, padding/trimming and umT5 loading, on a tiny random UMT5EncoderModel and a word-level
tokenizer built here (pad 0, eos 1, unk 2, as umT5's); nothing is downloaded. fp32 on the CPU."""
import hashlib
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from text import NEGATIVE_PROMPT, TextEncoder, clean_prompt, load_text_encoder

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "ball", "rolls", "on", "the", "grass", "&", "blue", "cube"]
TINY = dict(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
            layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
TEXT_LEN = 8


def hf_to_wan_name(key: str) -> str:
    """transformers UMT5EncoderModel key -> Wan T5Encoder key (REFERENCE.md §4.2, read backwards)."""
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    i, rest = re.match(r"encoder\.block\.(\d+)\.layer\.(.*)", key).groups()
    return f"blocks.{i}." + {
        "0.layer_norm.weight": "norm1.weight", "1.layer_norm.weight": "norm2.weight",
        "0.SelfAttention.q.weight": "attn.q.weight", "0.SelfAttention.k.weight": "attn.k.weight",
        "0.SelfAttention.v.weight": "attn.v.weight", "0.SelfAttention.o.weight": "attn.o.weight",
        "0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight", "1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "1.DenseReluDense.wo.weight": "ffn.fc2.weight"}[rest]


def make_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model() -> UMT5EncoderModel:
    torch.manual_seed(0)
    return UMT5EncoderModel(UMT5Config(**TINY)).eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(path)
    return path


def test_clean_prompt_unescapes_twice_and_collapses_whitespace():
    assert clean_prompt("  a &amp;amp; b\n\t c  ") == "a & b c"
    assert clean_prompt("x &lt;y&gt;") == "x <y>"


def test_negative_prompt_is_wans():
    # sha256 of Wan's shared_config.sample_neg_prompt (REFERENCE.md §4.4), 137 characters, no whitespace
    assert len(NEGATIVE_PROMPT) == 137 and clean_prompt(NEGATIVE_PROMPT) == NEGATIVE_PROMPT
    assert NEGATIVE_PROMPT.startswith("色调艳丽，过曝") and NEGATIVE_PROMPT.endswith("背景人很多，倒着走")
    assert hashlib.sha256(NEGATIVE_PROMPT.encode()).hexdigest() == (
        "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e")


@torch.no_grad()
def test_context_is_masked_encoding_trimmed_after_eos_and_zero_padded(model):
    enc = TextEncoder(model, make_tokenizer(), text_len=TEXT_LEN)
    ctx = enc.encode(["a red ball", "blue  cube &amp; grass rolls"])
    assert ctx.shape == (2, TEXT_LEN, TINY["d_model"]) and ctx.dtype == torch.float32
    # real lengths include EOS: 3 + 1 and 5 + 1 tokens
    for row, ids in zip(ctx, ([3, 4, 5, 1], [11, 12, 10, 9, 6, 1])):
        n = len(ids)
        alone = model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # no padding at all
        err = (row[:n] - alone).abs().max().item()
        assert err <= 1e-5, f"padded+masked rows differ from the unpadded encoding by {err:.2e}"
        assert row[:n].abs().amax(dim=1).min() > 0 and torch.equal(row[n:], torch.zeros_like(row[n:])), \
            f"rows {n}.. must be exactly zero and rows ..{n} not"


@torch.no_grad()
def test_truncation_keeps_eos_in_the_last_row(model):
    enc = TextEncoder(model, make_tokenizer(), text_len=TEXT_LEN)
    ctx = enc.encode(["a red ball rolls on the grass a red ball"])[0]
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 1]])  # 7 words, then EOS
    ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    assert (ctx - ref).abs().max() <= 1e-6, "truncated prompt must end in EOS within text_len"


def test_each_prompt_is_encoded_once(model):
    calls = []
    hook = model.register_forward_hook(lambda m, args, kwargs_out: calls.append(1))
    try:
        enc = TextEncoder(model, make_tokenizer(), text_len=TEXT_LEN, cache_size=2)
        first = enc.encode(["a red ball"])
        again = enc.encode(["a  red ball", "a red ball &amp;"])  # the same cleaned text, and one new prompt
        assert len(calls) == 2, f"expected 2 encoder calls (one per batch with new prompts), got {len(calls)}"
        assert torch.equal(again[0], first[0])
        enc.encode(["blue cube"])  # cache_size 2: evicts the least recently used ("a red ball")
        assert list(enc.cache) == ["a red ball &", "blue cube"]
    finally:
        hook.remove()


def test_context_feeds_autograd_without_training_the_encoder(model):
    ctx = TextEncoder(model, make_tokenizer(), text_len=TEXT_LEN).encode(["a red ball"])
    w = torch.randn(TINY["d_model"], 3, requires_grad=True)
    (ctx @ w).sum().backward()  # an inference-mode tensor would refuse to be saved for backward
    assert w.grad is not None and not ctx.requires_grad
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_bad_prompts_and_tokenizers_raise(model):
    enc = TextEncoder(model, make_tokenizer(), text_len=TEXT_LEN)
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        enc.encode(["a ball", " \n\t "])
    with pytest.raises(TypeError, match="list of prompts"):
        enc.encode("a ball")
    with pytest.raises(ValueError, match="does not append EOS"):
        TextEncoder(model, make_tokenizer(eos=False))


def test_wan_pth_loads_into_transformers_encoder(model, tokenizer_dir, tmp_path):
    wan = {hf_to_wan_name(k): v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    torch.save(wan, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    loaded = load_text_encoder(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", tokenizer_dir, text_len=TEXT_LEN,
                               config=TINY)
    ref_sd = model.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in loaded.model.state_dict().items())
    prompts = ["a red ball rolls", "the blue cube"]
    ref = TextEncoder(model, make_tokenizer(), text_len=TEXT_LEN).encode(prompts)
    assert torch.equal(loaded.encode(prompts), ref)


def test_transformers_folder_loads_in_bf16(model, tokenizer_dir, tmp_path):
    model.save_pretrained(tmp_path / "text_encoder")
    ref = TextEncoder(model, make_tokenizer(), text_len=TEXT_LEN).encode(["a red ball"])
    fp32 = load_text_encoder(tmp_path / "text_encoder", tokenizer_dir, text_len=TEXT_LEN)
    assert torch.equal(fp32.encode(["a red ball"]), ref)
    bf16 = load_text_encoder(tmp_path / "text_encoder", tokenizer_dir, text_len=TEXT_LEN, dtype=torch.bfloat16)
    out = bf16.encode(["a red ball"])
    assert bf16.model.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max(), "bf16 encoder far from fp32"


def test_wrong_files_raise(model, tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="text encoder weights not found"):
        load_text_encoder(tmp_path / "missing.pth", tokenizer_dir)
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_text_encoder(tokenizer_dir, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_text_encoder(tmp_path / "empty", tokenizer_dir)
    torch.save({"patch_embedding.weight": torch.zeros(2), "blocks.0.self_attn.q.weight": torch.zeros(2)},
               tmp_path / "dit.pth")
    with pytest.raises(ValueError, match=r"2 unexpected keys \['patch_embedding.weight'"):
        load_text_encoder(tmp_path / "dit.pth", tokenizer_dir, config=TINY)
    wan = {hf_to_wan_name(k): v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    torch.save({k: v for k, v in wan.items() if k != "blocks.1.ffn.fc1.weight"}, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"1 missing transformers keys \['encoder.block.1.layer.1.DenseReluDense.wi_1"):
        load_text_encoder(tmp_path / "cut.pth", tokenizer_dir, config=TINY)
    torch.save(wan, tmp_path / "full.pth")
    with pytest.raises(ValueError, match=r"shared.weight has shape \(32, 16\), the config"):
        load_text_encoder(tmp_path / "full.pth", tokenizer_dir, config={**TINY, "vocab_size": 64})
