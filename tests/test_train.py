"""train.py stage 1: end to end on the toy, resume equivalence, DDP with 2 gloo ranks, bad input."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import models
import train
from checks import assert_checkpoints_equal, assert_states_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch-size", "64", "--log-every", "5"]


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    """A quickly pretrained toy base model, copied into each run folder (the cache train.py uses)."""
    d = tmp_path_factory.mktemp("base")
    models.ToyBackbone(cache_dir=str(d), pretrain_steps=100, angles=8)  # the toy's default input features
    return os.path.join(d, "toy_base_w128_a8.pt")


def run_dir(tmp_path, name, toy_base):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(toy_base, d)
    return str(d)


def flat(state):
    return torch.cat([v.flatten().float() for v in state.values()])


def test_train_stage1_runs_and_logs(tmp_path, toy_base):
    out = run_dir(tmp_path, "run", toy_base)
    nets = train.main(["--stage", "1", "--out", out, "--steps", "10"] + SMALL)
    ck = models.load_checkpoint(os.path.join(out, "stage1.pt"))
    assert ck["step"] == 10
    base = {k: v for k, v in torch.load(toy_base)["state_dict"].items() if k in ck["generator"]}
    # the generator and the fake score both moved away from the base model, the EMA lags behind
    assert (flat(ck["generator"]) - flat(base)).abs().max() > 1e-4
    assert (flat(ck["fake"]) - flat(base)).abs().max() > 1e-4
    d_ema = (flat(ck["ema"]) - flat(base)).norm()
    assert 0 < d_ema < (flat(ck["generator"]) - flat(base)).norm()
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert recs[-1]["step"] == 10
    for key in ("fake_loss", "fake_ac", "fake_cons", "fake_grad_norm", "gen_loss", "gen_grad_norm",
                "dmd_dir_norm"):
        assert key in recs[-1] and torch.isfinite(torch.tensor(recs[-1][key]))
    assert os.path.exists(os.path.join(out, "samples_stage1.png"))
    assert set(nets) == {"generator", "fake", "ema"}


def test_train_stage1_resume_is_exact(tmp_path, toy_base):
    a = run_dir(tmp_path, "a", toy_base)
    b = run_dir(tmp_path, "b", toy_base)
    args = SMALL + ["--save-every", "100"]
    train.main(["--stage", "1", "--out", a, "--steps", "20"] + args)
    train.main(["--stage", "1", "--out", b, "--steps", "10"] + args)
    train.main(["--stage", "1", "--out", b, "--steps", "20", "--resume"] + args)
    assert_checkpoints_equal(os.path.join(a, "stage1.pt"), os.path.join(b, "stage1.pt"))


def _ddp_worker(rank, world, port, out, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    nets = train.main(["--stage", "1", "--out", out, "--steps", "10"] + SMALL)
    torch.save({k: v.state_dict() for k, v in nets.items()}, os.path.join(result_dir, f"rank{rank}.pt"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_stage1_ddp_two_ranks_identical(tmp_path, toy_base):
    out = run_dir(tmp_path, "ddp", toy_base)
    mp.spawn(_ddp_worker, args=(2, free_port(), out, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    base = torch.load(toy_base)["state_dict"]
    base = {k: v for k, v in base.items() if k in r0["generator"]}
    assert_states_equal(r0, r1)
    assert (flat(r0["generator"]) - flat(base)).abs().max() > 1e-4  # and they did train


def run_cli(args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args, capture_output=True,
                          text=True, cwd=ROOT, env=env or os.environ.copy())


def test_main_bad_input_gives_clear_errors(tmp_path, toy_base):
    r = run_cli(["--stage", "1", "--model", "sd9", "--out", str(tmp_path / "x")])
    assert r.returncode != 0 and "unknown --model 'sd9'" in r.stderr
    r = run_cli(["--stage", "1", "--out", str(tmp_path / "w"), "--last-stop-weight", "0"])
    assert r.returncode != 0 and "--last-stop-weight 0.0 must be positive" in r.stderr
    r = run_cli(["--stage", "2", "--out", str(tmp_path / "q"), "--quality"])
    assert r.returncode != 0 and "--quality is the toy's stage-1 recipe" in r.stderr
    out = run_dir(tmp_path, "s2", toy_base)
    r = run_cli(["--stage", "2", "--out", out])
    assert r.returncode != 0 and "run `torchrun train.py --stage 1" in r.stderr
    # a run folder of another model is refused, and its files are untouched
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model": "tiny-sd3"}))
    r = run_cli(["--stage", "1", "--out", str(other)])
    assert r.returncode != 0 and "holds a run of --model tiny-sd3" in r.stderr
    assert json.loads((other / "config.json").read_text()) == {"model": "tiny-sd3"}


def test_check_run_folder_never_overwrites_a_checkpoint(tmp_path, toy_base):
    out = run_dir(tmp_path, "keep", toy_base)
    train.main(["--stage", "1", "--out", out, "--steps", "5"] + SMALL)
    before = open(os.path.join(out, "stage1.pt"), "rb").read()
    r = run_cli(["--stage", "1", "--out", out, "--steps", "5"] + SMALL)
    assert r.returncode != 0 and "pass --resume" in r.stderr
    assert open(os.path.join(out, "stage1.pt"), "rb").read() == before


def test_setup_refuses_batch_not_divisible_across_ranks(tmp_path, toy_base):
    out = run_dir(tmp_path, "div", toy_base)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train.py"), "--stage", "1", "--out", out, "--batch-size", "63"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert "--batch-size 63 does not divide across 2 ranks" in r.stdout + r.stderr


def test_ema_update_moves_trainable_tensors_only():
    # theta_ema <- d theta_ema + (1 - d) theta on the trainable tensors; a frozen tensor (a LoRA
    # student's base weight, shared with the teacher) is left alone.
    net = torch.nn.Linear(3, 2)
    net.bias.requires_grad_(False)
    ema = train.ema_copy(net)
    with torch.no_grad():
        net.weight.add_(1.0)
        net.bias.add_(1.0)
    w_ema0 = ema.weight.clone()
    train.ema_update(ema, net, 0.9)
    assert torch.allclose(ema.weight, 0.9 * w_ema0 + 0.1 * net.weight), "the EMA is not the lerp d*ema + (1-d)*theta"
    assert not torch.equal(ema.weight, net.weight), "the trainable tensor was copied, not averaged"
    assert ema.bias is net.bias, "frozen tensors should be shared with the network, not copied"


def test_stage1_prompts_is_a_shuffled_epoch_per_rank_with_drop_last():
    """torch's DistributedSampler(shuffle, seed) + DataLoader(drop_last), as the official loader:
    10 prompts, 2 ranks, 2 per rank: 2 batches an epoch, each epoch's 8 draws are distinct, rank
    r's batches are its sampler shard in order, and the next epoch is a new permutation."""
    from torch.utils.data import DistributedSampler
    n, world, B, seed = 10, 2, 2, 3
    for rank in range(world):
        s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        for epoch in range(2):
            s.set_epoch(epoch)
            shard = list(s)
            got = [train.stage1_prompts(n, B, world, rank, epoch * 2 + k, seed).tolist() for k in range(2)]
            assert got == [shard[0:2], shard[2:4]]
    one_epoch = [i for k in range(2) for r in range(world) for i in train.stage1_prompts(n, B, world, r, k, seed).tolist()]
    assert len(set(one_epoch)) == 8
    assert train.stage1_prompts(3, 4, 1, 0, 0, 0).shape == (4,)  # toy: fewer prompts than a batch


def test_quality_is_the_readme_recipe_and_leaves_the_demo_alone():
    """--quality resolves to exactly the flags the README spells out for it (and nothing else changes);
    without it the demo keeps the paper's uniform stop and normalised DMD direction."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        said = re.search(r"`--quality` is `([^`]+)`", f.read()).group(1).split()
    resolve = lambda argv: vars(train.resolve_defaults(train.get_args(["--stage", "1"] + argv), False))  # noqa: E731
    quality, spelled = resolve(["--quality"]), resolve(said)
    assert quality.pop("quality") and not spelled.pop("quality")
    assert quality == spelled
    assert (quality["steps"], quality["last_stop_weight"], quality["grad_norm"]) == (36000, 9.0, False)
    demo = resolve([])
    assert (demo["steps"], demo["last_stop_weight"], demo["grad_norm"], demo["lr_cosine"]) == (9000, 1.0, True, False)
    # a flag given beside --quality still wins
    assert resolve(["--quality", "--steps", "100"])["steps"] == 100
