"""train.py --memory-plan: the planned saved-tensor bytes (meta device) against the bytes autograd
really saves in a CPU forward of a tiny twin, and the paper recipes' plans."""
import os

import torch

import train
from tiny import load_tiny, tiny_dir  # noqa: F401


def real_saved_bytes(bb, net, n):
    """The same hooks on real tensors: one velocity forward with grad, real text conditioning."""
    cond = bb.encode(bb.prompts[:n])
    count = train.SavedBytes(net)
    with count:
        bb.velocity(net, bb.noise(n), torch.full((n,), 0.5), cond)
    return count.outside


def test_plan_matches_a_real_cpu_forward(load_tiny):
    for name in ("tiny-sd35", "tiny-flux2"):
        bb = load_tiny(name)
        arch = {name: dict(bb.teacher.config) | {"class": type(bb.teacher).__name__},
                "vae-" + bb.family: dict(bb.pipe.vae.config) | {"class": type(bb.pipe.vae).__name__}}
        arch = {k: {a: b for a, b in v.items() if not a.startswith("_")} for k, v in arch.items()}
        meta = train.meta_backbone(name, arch, bb.resolution, torch.float32, bb.lora_rank)
        net = bb.make_student("generator")
        real = real_saved_bytes(bb, net, 4)
        cond = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in bb.encode(bb.prompts[:4]).items()}
        F = torch.nn.functional
        sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, train.plan_sdpa
        try:
            planned = train.velocity_bytes(meta, meta.make_student("generator"), 4, False, cond)
        finally:
            F.scaled_dot_product_attention = sdpa
        assert abs(planned / real - 1) < 0.10, (name, planned, real)
        print(name, "planned", planned, "measured", real, "ratio", planned / real)


def test_paper_recipes_plan_under_80_gib_as_the_readme_table_says():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    rows = {"sd3-medium": "SD3-M, 1024 px", "sd3.5-medium": "SD3.5-M, 512 px", "flux2-klein-4b": "FLUX.2-klein-4B, 512 px"}
    for model, label in rows.items():
        cells = next(line for line in readme.splitlines() if line.startswith(f"| {label} |")).split("|")
        for stage, cell in ((1, cells[2]), (2, cells[4])):
            args = train.get_args(["--stage", str(stage), "--model", model, "--memory-plan"])
            args.gpus = train.PAPER_GPUS[model] if stage == 2 else 8
            assert train.memory_plan(args) == 0 and 10 < args.planned_gib < 80, (model, stage)
            stated = float(cell.split()[0])
            assert abs(args.planned_gib - stated) < 0.06, f"README says {stated} GiB for {model} stage {stage}, " \
                f"the plan {args.planned_gib:.2f}"
