"""LoRA files of other layouts (models.read_lora): the released RTDMD checkpoints are two flat
state dicts in the official key layout, merged in order (official code: rtdmd/inference.py,
_merge_lora_into_base_transformer), and models.stack_loras writes them as one exact LoRA of the
summed rank. Checked on the tiny SD3 twin against a merge written out by hand."""
import contextlib
import io
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tiny import load_tiny, tiny_dir  # noqa: F401  (pytest fixtures)
import eval as E
import models
import sample

RANK = 4


def official_state_dicts(net, seed=0):
    """Two random LoRAs on the SD3 targets, as the official trainer saves them: the first with
    DDP / peft wrapper prefixes and peft's adapter name (a flat .pt, scale = the fallback 64 / 32),
    the second as a peft folder's keys (its adapter_config.json says r 4, alpha 4: scale 1)."""
    g = torch.Generator().manual_seed(seed)
    names = models.lora_targets(net, "sd3")
    first, second = {}, {}
    for i, n in enumerate(names):
        lin = net.get_submodule(n)
        for sd, pre, mid in ((first, "module.base_model.model.", ".default"),
                             (second, "_fsdp_wrapped_module.base_model.model.", "")):
            if sd is second and i % 3 == 0:
                continue  # a module only the first LoRA has
            sd[f"{pre}{n}.lora_A{mid}.weight"] = 0.3 * torch.randn(RANK, lin.in_features, generator=g)
            sd[f"{pre}{n}.lora_B{mid}.weight"] = 0.3 * torch.randn(lin.out_features, RANK, generator=g)
    return names, first, second


@pytest.fixture(scope="module")
def files(load_tiny, tmp_path_factory):  # noqa: F811
    bb = load_tiny("tiny-sd3")
    names, first, second = official_state_dicts(bb.generator_base)
    d = tmp_path_factory.mktemp("released")
    torch.save(first, d / "stage1_generator_ema.pt")
    (d / "stage2").mkdir()
    save_file(second, str(d / "stage2" / "adapter_model.safetensors"))
    with open(d / "stage2" / "adapter_config.json", "w") as f:
        json.dump({"r": RANK, "lora_alpha": RANK, "target_modules": names}, f)
    return bb, names, first, second, str(d / "stage1_generator_ema.pt"), str(d / "stage2")


def hand_merge(base, n, first, second):
    """W + 2 B1 A1 (+ 1 B2 A2 where the second LoRA has the module), written out directly."""
    W = base.get_submodule(n).weight.float()
    A1, B1 = first[f"module.base_model.model.{n}.lora_A.default.weight"], \
        first[f"module.base_model.model.{n}.lora_B.default.weight"]
    W = W + 2.0 * B1 @ A1
    key = f"_fsdp_wrapped_module.base_model.model.{n}.lora_A.weight"
    if key in second:
        W = W + 1.0 * second[key.replace("lora_A", "lora_B")] @ second[key]
    return W


def test_read_lora_official_layouts(files):
    bb, names, first, second, pt, folder = files
    sd1, alpha1 = models.read_lora(pt)
    sd2, alpha2 = models.read_lora(folder)
    assert set(sd1) == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert len(sd2) == len(second) and alpha1 == 2 * RANK and alpha2 == RANK  # scales 2 and 1


def test_merged_generator_equals_the_hand_merge(files):
    bb, names, first, second, pt, folder = files
    net = models.merged_generator(bb, [pt, folder])
    err = max((net.get_submodule(n).weight - hand_merge(bb.generator_base, n, first, second)).abs().max().item()
              for n in names)
    assert err < 1e-5, err
    assert not models.lora_layers(net)  # plain Linears again; the base keeps its own weights
    assert (bb.generator_base.get_submodule(names[0]).weight - net.get_submodule(names[0]).weight).abs().max() > 0.1


def test_stack_loras_rank_64_file_reproduces_the_two_step_merge(files, tmp_path):
    bb, names, first, second, pt, folder = files
    path = models.export_stacked_lora([pt, folder], str(tmp_path / "stacked.safetensors"))
    sd, alpha = models.read_lora(path)
    assert sd[names[0] + ".lora_A.weight"].shape[0] == 2 * RANK and alpha == 4 * RANK  # scale 2 kept
    two_step = models.merged_generator(bb, [pt, folder])
    one_step = models.merged_generator(bb, [path])
    err = max((one_step.get_submodule(n).weight - two_step.get_submodule(n).weight).abs().max().item()
              for n in names)
    assert err < 1e-6, err


def test_stacked_lora_loads_in_a_stock_pipeline(files, tmp_path):
    """With peft installed, pipe.load_lora_weights applies the stacked file and gives the two-step
    merge's velocity. Skipped without peft."""
    pytest.importorskip("peft")
    bb, names, first, second, pt, folder = files
    path = models.export_stacked_lora([pt, folder], str(tmp_path / "stacked.safetensors"))
    pipe = type(bb.pipe).from_pretrained(bb.pipe.config._name_or_path)
    pipe.load_lora_weights(path)
    x = bb.noise(2, torch.Generator().manual_seed(0))
    sigma, cond = torch.tensor([0.9, 0.4]), bb.encode(["a red cube", "a dog"])
    v = bb.velocity(models.merged_generator(bb, [pt, folder]), x, sigma, cond)
    assert torch.allclose(bb.velocity(pipe.transformer, x, sigma, cond), v, atol=1e-4)


def test_sample_and_eval_cli_take_lora(files, tiny_dir, tmp_path):  # noqa: F811
    bb, names, first, second, pt, folder = files
    out = sample.main(["--model", "tiny-sd3", "--pretrained", os.path.join(tiny_dir, "tiny-sd3"),
                       "--lora", pt, folder, "--n", "1", "--prompt", "a dog", "--out", str(tmp_path / "s")])
    assert os.path.isfile(os.path.join(out, "000000.png"))
    stacked = sample.main(["--lora", pt, folder, "--export-lora", str(tmp_path / "one.safetensors")])
    assert models.read_lora(stacked)[1] == 4 * RANK
    args = E.get_args(["--model", "tiny-sd3", "--cache-dir", tiny_dir, "--lora", pt, folder])
    args.resolution, args.overrides = 32, {}
    _, net, stage = E.load_generator(args, "cpu", torch.float32)
    ref = models.merged_generator(bb, [pt, folder])
    assert stage == "lora" and torch.equal(net.get_submodule(names[1]).weight, ref.get_submodule(names[1]).weight)
    from reward_assets import build_reward_assets, cli_args
    assets = build_reward_assets(tmp_path / "rewards")
    with contextlib.redirect_stdout(io.StringIO()):
        out = E.main(["--model", "tiny-sd3", "--cache-dir", tiny_dir, "--lora", pt, folder, "--rewards", "clipscore",
                      "--max-prompts", "2", "--batch-size", "2", "--out", str(tmp_path / "e")] + cli_args(assets["paths"]))
    assert out["lora"] == [pt, folder] and out["stage"] == "lora" and len(out["per_image"]) == 2


def test_bad_lora_is_one_clear_error(files, tmp_path):
    bb = files[0]
    torch.save({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, tmp_path / "full.pt")
    with pytest.raises(ValueError, match="lora_A"):
        models.read_lora(str(tmp_path / "full.pt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        models.read_lora(str(tmp_path / "missing.pt"))
    torch.save({"no_such_block.lora_A.weight": torch.zeros(1, 2), "no_such_block.lora_B.weight": torch.zeros(2, 1)},
               tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another model"):
        models.merged_generator(bb, [str(tmp_path / "other.pt")])


# --- the master dtype (train.py --lora-dtype) ---------------------------------------------------


@pytest.mark.parametrize("dtype, moves", [(torch.float32, True), (torch.bfloat16, False)])
def test_lora_dtype_bf16_master_loses_an_update_below_half_a_bf16_step(tiny_dir, dtype, moves):  # noqa: F811
    """B = 1, one AdamW step of lr 1e-3 (Adam's first step is lr x sign(grad)): an fp32 master moves
    by 1e-3, a bf16 master rounds 1 - 1e-3 back to 1 (its step at 1 is 2^-7 = 0.0078, so anything
    below 0.0039 is lost), as in the official code's bf16 LoRA (models.LoRALinear)."""
    bb = models.load("tiny-sd3", cache_dir=tiny_dir, lora_dtype=dtype)
    g = bb.make_student("generator")
    layers = models.lora_layers(g).values()
    with torch.no_grad():
        for m in layers:
            m.lora_B.weight.fill_(1.0)
    params = [p for p in g.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {dtype}
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    x = bb.noise(1, torch.Generator().manual_seed(0))
    bb.velocity(g, x, torch.tensor([0.7]), bb.encode(["a dog"])).square().mean().backward()
    opt.step()
    change = max((m.lora_B.weight.float() - 1.0).abs().max().item() for m in layers)
    assert (abs(change - 1e-3) < 1e-5) if moves else change == 0.0, change


def test_full_finetune_masters_follow_lora_dtype(tiny_dir):  # noqa: F811
    """--lora-rank 0 with bf16 frozen weights: the trainable copy is float32 under --lora-dtype fp32."""
    for want in (torch.float32, torch.bfloat16):
        bb = models.load("tiny-sd3", cache_dir=tiny_dir, dtype=torch.bfloat16, lora_rank=0, lora_dtype=want)
        assert {p.dtype for p in bb.make_student("generator").parameters()} == {want}
        assert bb.teacher.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16


def test_lora_dtype_defaults():
    import train
    for model, cuda, want in (("sd3.5-medium", True, "bf16"), ("sd3.5-medium", False, "fp32"), ("toy", True, "fp32")):
        args = train.resolve_defaults(train.get_args(["--stage", "1", "--model", model]), cuda)
        assert args.lora_dtype == want
    assert train.get_args(["--stage", "1", "--lora-dtype", "fp32"]).lora_dtype == "fp32"
