"""
HPSv3 in rewards.py: the key mapping against the released checkpoint's layout, the forward
against the hpsv3 package's recipe, the prompt template reader, and the whole scorer on a tiny random Qwen2-VL.

The released file was written by the hpsv3 package (hpsv3/model/qwen2vl_trainer.py:
Qwen2VLRewardModelBT, a subclass of transformers' Qwen2VLForConditionalGeneration plus `rm_head`,
saved with the older transformers layout "visual.*", "model.*", "lm_head.*"). Here that layout is
produced from transformers' own Qwen2VLForConditionalGeneration and renamed by a writer that is
independent of rewards.hpsv3_to_hf.
"""
import os
import sys
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen2VLImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import rewards as R  # noqa: E402
from paper_reward_assets import TEMPLATE, released_layout, tiny_config, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    cfg = tiny_config(tok)
    sd, model = released_layout(cfg)
    return dict(tok=tok, cfg=cfg, sd=sd, model=model)


def test_hpsv3_to_hf_round_trip(tiny):
    sd, cfg = tiny["sd"], tiny["cfg"]
    d, v = cfg.text_config.hidden_size, cfg.text_config.vocab_size
    # the released layout, as the hpsv3 package's model code defines it
    assert sd["model.embed_tokens.weight"].shape == (v, d) and sd["lm_head.weight"].shape == (v, d)
    assert sd["rm_head.0.weight"].shape == (1024, d) and sd["rm_head.5.weight"].shape == (2, 16)
    assert "visual.patch_embed.proj.weight" in sd and "visual.merger.mlp.2.weight" in sd
    assert not any(k.startswith(("model.visual.", "model.language_model.")) for k in sd)
    mapped = R.hpsv3_to_hf(sd)
    net = R.HPSv3Net(cfg)
    missing, unexpected = net.load_state_dict(mapped, strict=False)
    assert not missing and not unexpected, (missing[:4], unexpected[:4])
    # back again: every released tensor but the unused lm_head is reproduced exactly
    back = {}
    for k, t in net.state_dict().items():
        k = k.replace("backbone.visual.", "visual.").replace("backbone.language_model.", "model.")
        back[k] = t
    assert set(back) == set(sd) - {"lm_head.weight"}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    # the newer layout (model.visual.*, model.language_model.*) maps to the same network
    newer = {k: t for k, t in tiny["model"].state_dict().items()}
    newer.update({k: t for k, t in sd.items() if k.startswith("rm_head.")})
    assert R.hpsv3_to_hf(newer).keys() == mapped.keys()
    with pytest.raises(ValueError, match="unknown keys"):
        R.hpsv3_to_hf({**sd, "score.weight": torch.zeros(1)})


def test_hpsv3_net_matches_the_package_forward(tiny):
    """HPSv3Net (explicit sequential positions) == the package's recipe run on transformers'
    Qwen2VLForConditionalGeneration: embed, scatter the image features, call the multimodal
    model with inputs_embeds only, head on the hidden state at <|Reward|>."""
    cfg, model, tok = tiny["cfg"], tiny["model"], tiny["tok"]
    net = R.HPSv3Net(cfg).eval()
    net.load_state_dict(R.hpsv3_to_hf(tiny["sd"]))
    reward_id = len(tok)  # the added <|Reward|> token
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(2)]
    x = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)(images=images, return_tensors="pt")
    px, grid = x.pixel_values, x.image_grid_thw
    n_img = 4  # 56 / 14 = 4 patches per side, merged 2 x 2
    ids = torch.tensor([[5] + [cfg.image_token_id] * n_img + [7, 8, reward_id, 9, 1],
                        [6] + [cfg.image_token_id] * n_img + [9, reward_id, 3, 1, 1]])
    mask = torch.ones_like(ids)
    mask[1, -1] = 0  # right padding
    with torch.no_grad():
        ours = net(ids, mask, px, grid, reward_id)
        emb = model.model.language_model.embed_tokens(ids)
        img = model.model.visual(px, grid_thw=grid).pooler_output
        emb = emb.masked_scatter((ids == cfg.image_token_id)[..., None], img)
        h = model.model(input_ids=None, inputs_embeds=emb, attention_mask=mask).last_hidden_state
        w = {k: v for k, v in tiny["sd"].items() if k.startswith("rm_head.")}
        z = h[ids == reward_id]  # the ranknet head, applied by hand from the file's tensors
        z = torch.relu(z @ w["rm_head.0.weight"].T + w["rm_head.0.bias"])
        z = torch.relu(z @ w["rm_head.3.weight"].T + w["rm_head.3.bias"])
        ref = z @ w["rm_head.5.weight"].T + w["rm_head.5.bias"]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_hpsv3_template_reads_without_import(tmp_path):
    f = tmp_path / "data_collator_qwen.py"
    f.write_text(TEMPLATE)
    instruction, closing = R.hpsv3_template(str(f))
    assert "{text_prompt}" in instruction and "<|Reward|>" in closing
    whl = tmp_path / "hpsv3-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("hpsv3/dataset/data_collator_qwen.py", TEMPLATE)
    assert R.hpsv3_template(str(whl)) == (instruction, closing)
    with pytest.raises(FileNotFoundError, match="pip download hpsv3"):
        R.hpsv3_template(str(tmp_path / "nowhere"))


def test_hpsv3_scorer_tiny_model(tiny, tmp_path):
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in tiny["sd"].items()}, str(tmp_path / "ckpt" / "HPSv3.safetensors"))
    tiny["tok"].save_pretrained(tmp_path / "base")
    (tmp_path / "data_collator_qwen.py").write_text(TEMPLATE)
    sources = {"hpsv3": str(tmp_path / "ckpt"), "hpsv3_base": str(tmp_path / "base"),
               "hpsv3_config": tiny_config(tiny["tok"]), "hpsv3_template": str(tmp_path / "data_collator_qwen.py")}
    mr = R.MultiReward({"hpsv3": 1.0}, sources, quantize=True)
    torch.manual_seed(2)
    images = torch.rand(2, 3, 64, 64)
    prompts = ["a red apple", "a lighthouse in a storm"]
    s = mr(images, prompts)["hpsv3"]
    assert s.shape == (2,) and torch.isfinite(s).all()
    scorer = mr.scorers["hpsv3"]
    ids, mask, px, grid = scorer.inputs(R.quantize_uint8(images), prompts)
    assert grid.tolist() == [[1, 32, 32]] * 2, "a square image is resized to 448 x 448"
    assert ((ids == tiny["cfg"].image_token_id).sum(1) == 256).all(), "256 merged image tokens"
    assert ((ids == scorer.reward_id).sum(1) == 1).all()
    assert s[0] != s[1], "different images and prompts, different scores"
    with pytest.raises(FileNotFoundError, match="MizzenAI/HPSv3"):
        R.preflight(R.MultiReward({"hpsv3": 1.0}, dict(sources, hpsv3=str(tmp_path / "nowhere"))), "cpu")
