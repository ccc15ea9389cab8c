"""train.py --grad-accum and --cache-text-embeddings. --grad-accum: 1 rank with 2 micro-batches takes the same stage-1 updates as 2 gloo
ranks with 1 each (the same global batch, the same samples: train.micro_batch_streams), on the
toy and on a tiny twin. Only the order of the float sums differs (DDP's all-reduce mean against
the accumulated halves), so the trained tensors agree to float tolerance."""
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from tiny import PROMPT_FILE, tiny_dir  # noqa: F401  (pytest fixture)
from test_train import free_port, run_dir, toy_base  # noqa: F401  (pytest fixture)
from test_train_real import new_run
import models
import train
from checks import assert_checkpoints_equal

TOY = ["--steps", "4", "--batch-size", "64", "--fake-update-ratio", "2", "--lr-gen", "1e-3", "--lr-fake", "1e-3"]
TWIN = ["--model", "tiny-sd3", "--prompts", PROMPT_FILE, "--steps", "4", "--batch-size", "2",
        "--fake-update-ratio", "2", "--resolution", "32", "--grad-ckpt", "0", "--bf16", "0",
        "--lr-gen", "1e-3", "--lr-fake", "1e-3", "--ema-decay", "0.5"]


def _worker(rank, world, port, argv, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    nets = train.main(argv)
    if rank == 0:
        torch.save(states(nets), result)


def states(nets):
    return {k: {n: t.detach().clone() for n, t in train.raw(v).state_dict().items()} for k, v in nets.items()}


def max_difference(two_ranks, one_rank):
    worst = 0.0
    for key in ("generator", "fake", "ema"):
        a, b = two_ranks[key], one_rank[key]
        assert a and a.keys() == b.keys()
        worst = max(worst, max((a[n] - b[n]).abs().max().item() for n in a))
    return worst


def compare(tmp_path, make_folder, argv):
    mp.spawn(_worker, args=(2, free_port(), ["--out", make_folder("ranks")] + argv, str(tmp_path / "r.pt")),
             nprocs=2, join=True)
    nets = train.main(["--out", make_folder("accum"), "--grad-accum", "2"] + argv)
    one, two = states(nets), torch.load(tmp_path / "r.pt")
    # trained: the generator ran ahead of its EMA
    moved = max((v - one["ema"][k]).abs().max().item() for k, v in one["generator"].items())
    return max_difference(two, one), moved


def test_grad_accum_matches_two_ranks_toy(tmp_path, toy_base):
    diff, moved = compare(tmp_path, lambda n: run_dir(tmp_path, n, toy_base), ["--stage", "1"] + TOY)
    print(f"toy: max |2 ranks - 1 rank x grad-accum 2| = {diff:.2e}")
    assert moved > 1e-4 and diff < 1e-6


@pytest.mark.slow
def test_grad_accum_matches_two_ranks_tiny_twin(tmp_path, tiny_dir):
    diff, moved = compare(tmp_path, lambda n: new_run(tiny_dir, str(tmp_path), n, "tiny-sd3"), ["--stage", "1"] + TWIN)
    print(f"tiny-sd3: max |2 ranks - 1 rank x grad-accum 2| = {diff:.2e}")
    assert moved > 1e-4 and diff < 1e-6


@pytest.mark.slow
def test_cache_text_embeddings_equal_live_and_same_run(tmp_path, tiny_dir):
    # the cached rows are the live encoding (padded to a fixed length; only the float rounding of
    # another batch composition differs)
    bb = models.load("tiny-sd3", cache_dir=tiny_dir, prompts=["a cat", "two dogs", "a red apple"])
    live = bb.encode(["two dogs", "", "a cat"])
    bb.cache_text_embeddings(batch=2)
    assert all(next(m.parameters()).device.type == "cpu" for n, m in bb.pipe.components.items()
               if n.startswith("text_encoder"))
    cached = bb.encode(["two dogs", "", "a cat"])
    assert all(torch.allclose(live[k], cached[k], rtol=0, atol=1e-5) for k in live)
    assert bb.encode(["not cached"])["prompt_embeds"].shape == live["prompt_embeds"][:1].shape  # live, on the CPU
    # a training run with the cache writes the same checkpoint as one without
    argv = ["--stage", "1"] + TWIN + ["--steps", "2"]
    a = new_run(tiny_dir, str(tmp_path), "live", "tiny-sd3")
    b = new_run(tiny_dir, str(tmp_path), "cached", "tiny-sd3")
    one, two = states(train.main(["--out", a] + argv)), states(train.main(["--out", b, "--cache-text-embeddings"] + argv))
    diff = max_difference(one, two)
    print(f"tiny-sd3: max |live - cached text embeddings| after 2 iterations = {diff:.2e}")
    assert diff < 1e-5


def test_grad_accum_resume_is_exact(tmp_path, toy_base):
    # the micro-batch streams travel in the checkpoint: 10 + 10 iterations equal 20 bitwise
    argv = ["--stage", "1", "--grad-accum", "2", "--batch-size", "64", "--save-every", "100"]
    a, b = run_dir(tmp_path, "a", toy_base), run_dir(tmp_path, "b", toy_base)
    train.main(["--out", a, "--steps", "20"] + argv)
    train.main(["--out", b, "--steps", "10"] + argv)
    train.main(["--out", b, "--steps", "20", "--resume"] + argv)
    assert_checkpoints_equal(os.path.join(a, "stage1.pt"), os.path.join(b, "stage1.pt"))


def test_stage2_grad_accum_splits_the_sub_batches_into_the_same_update(tmp_path):
    """Stage 2 with --grad-accum 2 runs each generator sub-batch as 2 micro-batches weighted by
    their share: the same epoch update as --grad-accum 1, up to the order of the float sums. The
    DM term draws its renoise levels and noise per micro-batch (the same law, other numbers), so
    the exact comparison runs the PPO and back-prop terms (--w-dm 0), which draw nothing."""
    torch.set_num_threads(1)
    s1 = str(tmp_path / "s1")
    train.main(["--stage", "1", "--out", s1, "--steps", "10", "--batch-size", "32", "--toy-width", "32"])
    argv = ["--stage", "2", "--steps", "2", "--batch-size", "16", "--group-size", "8", "--num-batches-per-epoch", "2",
            "--toy-width", "32", "--lr-gen", "1e-3", "--w-dm", "0"]
    out = {}
    for accum in (1, 2):
        d = str(tmp_path / f"a{accum}")
        shutil.copytree(s1, d)
        out[accum] = states(train.main(["--out", d, "--grad-accum", str(accum)] + argv))
    moved = max((v - out[1]["ema"][k]).abs().max().item() for k, v in out[1]["generator"].items())
    diff = max_difference(out[1], out[2])
    print(f"toy stage 2: max |grad-accum 1 - grad-accum 2| = {diff:.2e}, moved {moved:.2e}")
    assert moved > 1e-5 and diff < 1e-6
