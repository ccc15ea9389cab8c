"""
Tiny random reward models, written in the format of their real checkpoints (save_pretrained
folders, or torch.save files in the ORIGINAL open_clip / BLIP key layouts), for offline tests of
rewards.py (test_rewards_real.py) and of eval.py (test_eval_images.py).

    assets = build_reward_assets(folder)   # every slot of rewards.DEFAULT_SOURCES, tiny
    assets["sources"]                      # slot -> path or config object (MultiReward(sources=))
    assets["paths"]                        # slot -> path only (configs saved as folders)
    cli_args(assets["paths"])              # ["--reward-paths", "clip_l=...,..."] for eval.py / train.py
"""
import os
import sys

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import BertTokenizer, BlipConfig, CLIPConfig, CLIPModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import rewards as R  # noqa: E402


# --- tiny assets ---------------------------------------------------------------------------------

def clip_tokenizer():
    """A byte-level CLIP vocabulary (2 specials + 256 bytes + 256 end-of-word bytes), no merges,
    built in memory: no tokenizer file, no network."""
    chars = ByteLevel.alphabet()
    vocab = ["<|startoftext|>", "<|endoftext|>"] + sorted(chars) + [c + "</w>" for c in sorted(chars)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=16)


def clip_config(vocab, image_size=224):
    """Tiny CLIP; patch 32 keeps the real 224-px preprocessing but only 49 image tokens."""
    return CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                       bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu"),
                      vision_config=dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=image_size, patch_size=32,
                                         hidden_act="gelu"),  # gelu, as open_clip ViT-H-14
                      projection_dim=16)


def blip_config(vocab):
    return BlipConfig(vision_config=dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=224, patch_size=32,
                                         layer_norm_eps=1e-6),
                      text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                                       bos_token_id=vocab - 2, sep_token_id=3, pad_token_id=0))


def seeded(make, seed):
    torch.manual_seed(seed)
    return make().eval()


# Inverse mappings (HF -> original layouts), written independently of rewards.py's forward ones.

def hf_to_openclip(sd):
    top = {v: k for k, v in R._OC_TOP.items()}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t()
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t()
        else:
            tower, _, _, i, rest = k.split(".", 4)  # e.g. text_model.encoder.layers.0.mlp.fc1.weight
            pre = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
            if rest.startswith("self_attn.q_proj"):  # fuse q, k, v back into in_proj_*
                kind = rest.rsplit(".", 1)[1]
                parts = [sd[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[pre + "attn.in_proj_" + kind] = torch.cat(parts, 0)
            elif rest.startswith(("self_attn.k_proj", "self_attn.v_proj")):
                continue
            else:
                for oc, hf in R._OC_BLOCK.items():
                    if rest.startswith(hf + "."):
                        out[pre + oc + rest[len(hf):]] = v
                        break
                else:
                    raise KeyError(k)
    out["attn_mask"] = torch.zeros(16, 16)  # buffers the original files may carry
    return out


def hf_to_blip(sd):
    top = {v: k for k, v in R._BLIP_TOP.items()}
    out = {}
    for k, v in sd.items():
        if k in top:
            out["blip." + top[k]] = v
        elif k.startswith("vision.encoder.layers."):
            _, _, _, i, rest = k.split(".", 4)
            name, kind = rest.rsplit(".", 1)
            orig = {hf: oc for oc, hf in R._BLIP_BLOCK.items()}[name]
            out[f"blip.visual_encoder.blocks.{i}.{orig}.{kind}"] = v
        elif k.startswith("text."):
            out["blip.text_encoder." + k[5:]] = v
        elif k.startswith("head."):
            out["mlp." + k[5:]] = v
        else:
            raise KeyError(k)
    # what the original file also holds: BLIP's unused contrastive heads and a BERT buffer
    out["blip.vision_proj.weight"], out["blip.vision_proj.bias"] = torch.zeros(8, 48), torch.zeros(8)
    out["blip.text_proj.weight"], out["blip.text_proj.bias"] = torch.zeros(8, 32), torch.zeros(8)
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    return out


def build_reward_assets(d):
    """Write every tiny reward model into the folder `d` (a pathlib.Path)."""
    d.mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer()
    n = len(tok)
    # CLIP-L stand-in and PickScore stand-in: save_pretrained folders (model + tokenizer)
    for name, seed in (("clip_l", 0), ("pickscore", 1)):
        seeded(lambda: CLIPModel(clip_config(n)), seed).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    tok.save_pretrained(d / "clip_tok")
    # LAION aesthetic head: a plain state dict with keys layers.{0,2,4,6,7}
    torch.save(seeded(lambda: R.MLPHead(16), 2).state_dict(), d / "sac+logos+ava1-l14-linearMSE.pth")
    # HPSv2.1: a CLIP in open_clip's layout, fp16 and wrapped in {"state_dict": ...} like the file
    hps = seeded(lambda: CLIPModel(clip_config(n)), 3)
    oc = {k: v.half() for k, v in hf_to_openclip(hps.state_dict()).items()}
    (d / "hps").mkdir()
    torch.save({"state_dict": oc, "epoch": 1}, d / "hps" / "HPS_v2.1_compressed.pt")
    # ImageReward: a tiny BERT vocab file (the loader adds [DEC], [ENC]) and a BLIP-layout file
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
    words += ["photo", "of", "red", "dog", "cats", "on", "sofa", "two"]
    (d / "bert").mkdir()
    (d / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(d / "bert" / "vocab.txt")).save_pretrained(d / "bert")
    ir_cfg = blip_config(len(words) + 2)
    ir = seeded(lambda: R.BlipReward(ir_cfg), 4)
    torch.save(hf_to_blip(ir.state_dict()), d / "ImageReward.pt")
    sources = {"clip_l": str(d / "clip_l"), "pickscore": str(d / "pickscore"),
               "pickscore_tokenizer": str(d / "clip_tok"),
               "aesthetic_head": str(d / "sac+logos+ava1-l14-linearMSE.pth"),
               "hpsv2": str(d / "hps"), "hpsv2_tokenizer": str(d / "clip_tok"),
               "hpsv2_config": clip_config(n),
               "imagereward": str(d / "ImageReward.pt"), "imagereward_tokenizer": str(d / "bert"),
               "imagereward_config": ir_cfg}
    # the two configs also as folders, for command lines (--reward-paths hpsv2_config=..., ...)
    clip_config(n).save_pretrained(d / "hps_config")
    ir_cfg.save_pretrained(d / "ir_config")
    paths = dict(sources, hpsv2_config=str(d / "hps_config"), imagereward_config=str(d / "ir_config"))
    return dict(dir=d, sources=sources, paths=paths, hps=hps, ir=ir, ir_cfg=ir_cfg, tok=tok)


def cli_args(paths):
    """The --reward-paths option for every slot of `paths` (what train.py's and eval.py's CLIs take)."""
    return ["--reward-paths", ",".join(f"{slot}={p}" for slot, p in paths.items())]


