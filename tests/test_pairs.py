"""Online DPO, IPO, SLiC learn from preference labels (--pair-labels): the pairs a prompt's samples make, which
label a pair gets (the annotator's preference, or the reward ranking), and that a pair without a preference (a
tie, an annotator whose two orders disagree, an invalid judgment) is left out of the loss and of its divisor,
on one rank and across DDP ranks."""
import gc
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import baselines as B
import config
import infra
import judge
import loop
import rollout
from conftest import TINY, read_metrics, train

T = torch.tensor


# ---------------------------------------------------------------------------------------------------
# Pairs and their labels
# ---------------------------------------------------------------------------------------------------
def test_disjoint_pairs_stay_within_a_prompt_and_use_every_sample_once():
    first, second = B.disjoint_pairs(8, 4)                       # 2 prompts x K 4: rows 0-3, 4-7
    assert first.tolist() == [0, 2, 4, 6] and second.tolist() == [1, 3, 5, 7]
    assert sorted(torch.cat([first, second]).tolist()) == list(range(8))
    assert (first // 4 == second // 4).all()


def test_label_pairs_follows_p_and_drops_ties_and_invalid():
    first, second = T([0, 2, 4, 6]), T([1, 3, 5, 7])
    p = T([1.0, 0.0, 0.5, math.nan], dtype=torch.float64)       # first wins, second wins, tie, invalid
    chosen, rejected, used = B.label_pairs(first, second, p)
    assert chosen[:2].tolist() == [0, 3] and rejected[:2].tolist() == [1, 2]
    assert used.tolist() == [True, True, False, False]


def unit_losses(c, used):
    """loss_fn for minibatch_updates on a 1-parameter model w: unit i's loss is c_i * w (gradient c_i), 0 where
    not used, as pair_step masks a pair without a preference."""
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    run = SimpleNamespace(trained=[model], opt=opt, sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))

    def loss_fn(mb):
        w = model(torch.ones(1, 1)).squeeze()
        return (torch.where(used[mb], c[mb], 0.0) * w).sum(), {}
    return model, run, loss_fn


@pytest.mark.parametrize("micro_units", [1, 2, 4])   # gradient accumulation over 4, 2 and 1 micro-batches
def test_a_pair_without_preference_adds_nothing_to_the_loss_nor_its_divisor(micro_units):
    cfg, ctx = SimpleNamespace(max_grad_norm=0), infra.Dist()
    c, used = T([1.0, 2.0, 3.0, 100.0]), T([True, True, False, True])
    model, run, loss_fn = unit_losses(c, used)
    upd = loop.minibatch_updates(cfg, ctx, run, 4, 1, micro_units, loss_fn, epochs=1, used=used)
    # the loss at w = 1 and one SGD step of lr 1: the mean over the used units, the tie not counted
    assert upd["loss"] == pytest.approx((1 + 2 + 100) / 3)
    assert model.weight.item() == pytest.approx(1 - (1 + 2 + 100) / 3)
    # the same as a minibatch of the used units alone
    kept = T([0, 1, 3])
    alone, run2, loss2 = unit_losses(c[kept], used[kept])
    loop.minibatch_updates(cfg, ctx, run2, 3, 1, micro_units, loss2, epochs=1)
    assert model.weight.item() == pytest.approx(alone.weight.item())
    # a minibatch with nothing used: no update at all
    model, run, loss_fn = unit_losses(c, torch.zeros(4, dtype=torch.bool))
    loop.minibatch_updates(cfg, ctx, run, 4, 1, micro_units, loss_fn, epochs=1, used=torch.zeros(4, dtype=torch.bool))
    assert model.weight.item() == 1.0


def test_a_minibatch_with_nothing_used_takes_no_step_even_with_momentum():
    """SGD with momentum (as Adam's moments) would move w on a zero gradient: such a minibatch must not step."""
    cfg, ctx = SimpleNamespace(max_grad_norm=0), infra.Dist()
    c, used = T([1.0, 2.0]), T([True, True])
    model, run, loss_fn = unit_losses(c, used)
    run.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda s: 1.0)
    loop.minibatch_updates(cfg, ctx, run, 2, 1, 2, loss_fn, epochs=1, used=used)
    w, steps = model.weight.item(), run.sched.last_epoch
    assert w != 1.0 and steps == 1
    none = torch.zeros(2, dtype=torch.bool)
    upd = loop.minibatch_updates(cfg, ctx, run, 2, 1, 2, lambda mb: (0.0 * model.weight.sum(), {}), epochs=1, used=none)
    assert model.weight.item() == w and run.sched.last_epoch == steps and upd["loss"] == 0.0


DDP_UNITS = {0: ([1.0, 2.0], [True, False]), 1: ([4.0, 8.0], [True, True])}   # rank: (c, used)


def ddp_worker(rank, world, init_file, out_dir):
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        c, used = (T(x) for x in DDP_UNITS[rank])
        model, run, _ = unit_losses(c, used)
        ddp = DistributedDataParallel(model)
        run.trained = [ddp]

        def loss_fn(mb):
            return (torch.where(used[mb], c[mb], 0.0) * ddp(torch.ones(1, 1)).squeeze()).sum(), {}
        loop.minibatch_updates(SimpleNamespace(max_grad_norm=0), infra.Dist(rank=rank, world=world), run, 2, 1, 1,
                               loss_fn, epochs=1, used=used)
        torch.save(model.weight.detach().clone(), os.path.join(out_dir, f"w{rank}.pt"))
    finally:  # DDP's reducer goes before the group, as infra.end_distributed does (a hang at exit otherwise)
        ddp = run = None
        gc.collect()
        tdist.destroy_process_group()


@pytest.mark.slow
def test_the_divisor_counts_used_pairs_over_all_ranks(tmp_path):
    """Rank 0 has one used pair and a tie, rank 1 two used pairs: DDP's averaged gradient is the mean over the
    three used pairs of both ranks (not over 4, and not the mean of the two ranks' means)."""
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    w = [torch.load(tmp_path / f"w{r}.pt").item() for r in (0, 1)]
    assert w[0] == w[1] == pytest.approx(1 - (1.0 + 4.0 + 8.0) / 3)


# ---------------------------------------------------------------------------------------------------
# pair_step with a judge whose preferences disagree with its rewards
# ---------------------------------------------------------------------------------------------------
class ContraryJudge:
    """Rewards favour the longer response; preferences the shorter one. About a quarter of the pairs (by their
    characters' codes) get no valid answer (with invalid_all: every pair), another quarter a tie, as do equal
    lengths."""
    top = None

    def __init__(self, invalid_all=False):
        self.invalid_all, self.asked = invalid_all, 0

    def __call__(self, prompts, responses, ended):
        return judge.Judgment([float(len(r)) for r in responses], 0)

    def p(self, a, b):
        kind = sum(map(ord, a + b)) % 4
        if self.invalid_all or kind == 0:
            return math.nan
        return 0.5 if len(a) == len(b) or kind == 1 else float(len(a) < len(b))

    def prefer(self, prompts, responses_a, responses_b):
        self.asked += len(responses_a)
        return [self.p(a, b) for a, b in zip(responses_a, responses_b)]


def run_pairs(toy_cache, out, monkeypatch, stub, *flags):
    """One online batch of --algo online_dpo with `stub` as the judge: (metrics, [(chosen texts, rejected texts,
    per-pair losses)] per loss_fn call)."""
    cfg = config.parse_config(TINY + ["--algo", "online_dpo", "--steps", "1", "--cache-dir", toy_cache,
                                      "--out-dir", str(out), "--print-every", "1000", *flags])
    config.check_config(cfg, 1)
    seen, real_logps, real_loss = [], rollout.token_logps, B.PAIR_LOSSES["online_dpo"]

    def logps(model, batch):  # the trained forward pass of loss_fn: rows y_w then y_l (scoring runs without grad)
        if torch.is_grad_enabled():
            n = len(batch) // 2
            seen.append([batch.responses[:n], batch.responses[n:]])
        return real_logps(model, batch)

    def loss(*a):
        out = real_loss(*a)
        seen[-1].append(out.detach().clone())
        return out

    monkeypatch.setattr(loop, "make_judge", lambda *a, **k: stub)
    monkeypatch.setattr(rollout, "token_logps", logps)
    monkeypatch.setitem(B.PAIR_LOSSES, "online_dpo", loss)
    train(cfg)
    return read_metrics(out)[0], seen


@pytest.mark.slow
def test_online_dpo_trains_on_the_annotators_preferences_without_ties(toy_cache, tmp_path, monkeypatch):
    stub = ContraryJudge()
    m, seen = run_pairs(toy_cache, tmp_path / "pref", monkeypatch, stub)   # --pair-labels preference: the default
    assert stub.asked == 16                                      # 32 samples, K 2: 16 pairs, asked once each
    assert m["pairs/used"] + m["pairs/ties"] + m["pairs/invalid"] == 16
    assert m["pairs/used"] > 0 and m["pairs/ties"] > 0 and m["pairs/invalid"] > 0, m   # the test sees each kind
    minibatch_means = []
    for call in range(0, len(seen), 2):                          # 2 updates of 8 pairs, 2 micro-batches of 4 each
        p, losses = [], []
        for chosen, rejected, loss in seen[call:call + 2]:
            p += [stub.p(w, l) for w, l in zip(chosen, rejected)]
            losses += loss.tolist()
        assert all(x in (1.0, 0.5) or math.isnan(x) for x in p)   # y_w is never the response the judge rejected
        used = [x == 1.0 for x in p]
        n = sum(used)
        minibatch_means.append(sum(x for x, u in zip(losses, used) if u) / n if n else 0.0)
    assert len(minibatch_means) == 2
    # the logged loss is the mean over the used pairs of each minibatch: a tie or invalid pair dilutes nothing
    assert m["train/loss"] == pytest.approx(sum(minibatch_means) / 2, rel=1e-5)
    decided = [(w, l) for chosen, rejected, _ in seen for w, l in zip(chosen, rejected) if stub.p(w, l) == 1.0]
    assert decided and all(len(w) < len(l) for w, l in decided)   # the preference's choice, not the reward's

    stub = ContraryJudge()
    m, seen = run_pairs(toy_cache, tmp_path / "rew", monkeypatch, stub, "--pair-labels", "reward")
    assert stub.asked == 0 and "pairs/used" in m
    decided = [(w, l) for chosen, rejected, _ in seen for w, l in zip(chosen, rejected) if len(w) != len(l)]
    assert decided and all(len(w) > len(l) for w, l in decided)   # ranked by reward: the longer one


@pytest.mark.slow
def test_mostly_invalid_preferences_stop_the_run(toy_cache, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="100% of its preference judgments are invalid, above --max-invalid-frac"):
        run_pairs(toy_cache, tmp_path / "bad", monkeypatch, ContraryJudge(invalid_all=True))
    assert not os.path.exists(tmp_path / "bad" / "final")


@pytest.mark.parametrize("args, message", [
    (["--pair-labels", "votes"], "--pair-labels must be preference or reward, got 'votes'"),
    (["--algo", "ipo", "--k", "3", "--online-batch", "48", "--minibatch", "12"],
     "--k must be even with --pair-labels preference"),
    (["--algo", "slic", "--k", "4", "--online-batch", "48", "--minibatch", "3"],
     "--minibatch 3 must split evenly into 1 ranks in whole groups of 2 responses"),
])
def test_bad_pair_settings_are_a_clear_error(args, message):
    with pytest.raises(SystemExit) as e:   # the checks alone: a setting they let through must not start a run
        config.check_config(config.parse_config(args), world=1)
    assert message in str(e.value)
