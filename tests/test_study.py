"""Seeds, paired intervals, orderings in words, the learning-rate sweep, presets and the
official code's settings (hybridnorm-train --seeds, --lr-sweep, --preset, ...)."""

import json
import math
import subprocess
import sys
import zlib

import pytest
import torch
from test_train import SMALL, rows

from megatron_hybridnorm.train import cli
from megatron_hybridnorm.train.runs import RunKey
from megatron_hybridnorm.train.stats import (paired_interval, seeds_needed, spread, t_cdf,
                                             t_quantile)
from megatron_hybridnorm.train.summary import (orderings, refresh, summarize, sweep_table, table,
                                               time_line, time_shares)
from megatron_hybridnorm.train import summary as summary_module


# ---- statistics -------------------------------------------------------------------------------

# two-sided 95% critical values of Student's t, from a printed table
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 29: 2.045}


@pytest.mark.parametrize("df,value", T_TABLE.items())
def test_t_quantile_matches_the_printed_table(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-value, abs=5e-4)
    assert t_cdf(value, df) == pytest.approx(0.975, abs=1e-4)


def test_t_distribution_matches_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy is an independent reference")
    for df in (1, 2, 3, 7, 8, 30, 61):
        for t in (-12.0, -2.0, -0.3, 0.0, 0.7, 2.5, 40.0):
            assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10)


def test_paired_interval_against_a_hand_computation():
    # differences -0.07, -0.04, -0.09, -0.05: mean -0.0625; squared deviations 5.625e-5,
    # 5.0625e-4, 7.5625e-4, 1.5625e-4 sum to 1.475e-3; sd = sqrt(1.475e-3 / 3) = 0.0221736;
    # se = sd / 2 = 0.0110868; t(0.975, 3) = 3.182446; half width 0.0352831
    iv = paired_interval([1.30, 1.32, 1.29, 1.31], [1.37, 1.36, 1.38, 1.36])
    assert iv.n == 4
    assert iv.mean == pytest.approx(-0.0625, abs=1e-12)
    assert iv.std == pytest.approx(0.0221736, abs=1e-7)
    assert iv.low == pytest.approx(-0.0977831, abs=1e-7)
    assert iv.high == pytest.approx(-0.0272169, abs=1e-7)
    assert iv.excludes_zero


def test_seeds_needed_against_a_hand_computation():
    # the least n with t(0.975, n-1) * sd / sqrt(n) < |gap|, with t from a printed table:
    # gap 0.02, sd 0.05 (ratio 0.4): n = 26: 2.0595 / 5.0990 = 0.4039, too wide;
    #                                n = 27: 2.0555 / 5.1962 = 0.3956, enough
    assert seeds_needed(0.02, 0.05) == 27
    assert seeds_needed(-0.02, 0.05) == 27  # the sign does not matter
    # the held-out prose corpus's HybridNorm* - Pre-Norm: -0.0200 with 95% interval
    # [-0.0738, +0.0337] at 4 seeds, so sd = 0.05375 * 2 / 3.1824 = 0.03378 (ratio 0.592):
    # n = 13: 2.1788 / 3.6056 = 0.6043, too wide; n = 14: 2.1604 / 3.7417 = 0.5774, enough
    assert seeds_needed(-0.0200, 0.05375 * 2 / 3.1824) == 14
    # a gap as large as the spread: n = 7: 2.4469 / 2.6458 = 0.925 < 1; n = 6: 2.5706 / 2.4495
    assert seeds_needed(0.01, 0.01) == 7
    assert seeds_needed(0.01, 0.0) == 2  # no spread: the fewest an interval needs
    assert seeds_needed(0.0, 0.01) is None and seeds_needed(None, 0.01) is None
    assert seeds_needed(0.01, None) is None
    assert seeds_needed(1e-4, 0.05) is None  # more than 1000 seeds
    # and the interval at the n it names does exclude 0 (a check of the search, not the table)
    for gap, sd in ((0.02, 0.05), (0.003, 0.01), (0.05, 0.02)):
        n = seeds_needed(gap, sd)
        assert t_quantile(0.975, n - 1) * sd / math.sqrt(n) < gap
        assert t_quantile(0.975, n - 2) * sd / math.sqrt(n - 1) >= gap or n == 2


def test_time_shares_add_up_and_say_where_the_minutes_went():
    outcomes = [{"wall_s": 100.0, "phase_s": {"step": 80.0, "eval": 10.0, "build": 2.0}},
                {"wall_s": 50.0, "phase_s": {"step": 40.0, "eval": 5.0, "data": 0.5}},
                {"wall_s": 30.0}]  # a run from before phases were recorded: left out
    t = time_shares(outcomes)
    assert t["runs"] == 2 and t["wall_s"] == 150.0
    assert t["seconds"]["step"] == 120.0 and t["seconds"]["eval"] == 15.0
    assert t["seconds"]["other"] == pytest.approx(150 - 120 - 15 - 2 - 0.5)
    assert sum(t["share"].values()) == pytest.approx(1.0)
    line = time_line(t)
    assert line.startswith("where the time went (2 runs, 2.5 min): training steps 80.0%, "
                           "evaluation 10.0%, other 8.3%, model build 1.3%, data loading 0.3%")
    assert time_shares([{"wall_s": 30.0}]) is None


def test_one_pair_has_no_interval_and_spread_of_one_has_no_std():
    iv = paired_interval([1.0], [2.0])
    assert (iv.mean, iv.low, iv.high, iv.excludes_zero) == (-1.0, None, None, False)
    assert spread([3.0]).std is None and spread([]).mean is None
    with pytest.raises(ValueError, match="equal lengths"):
        paired_interval([1.0, 2.0], [1.0])


def _records(finals: dict) -> dict:
    """records[(scheme, seed)] with the given final losses (None: diverged)."""
    return {(s, seed): dict(final_val_loss=v, best_val_loss=v, diverged=v is None,
                            diverged_step=5 if v is None else None, tokens_per_s=100.0)
            for s, values in finals.items() for seed, v in enumerate(values)}


def test_orderings_say_what_the_seeds_support_and_what_not():
    r = _records({"prenorm": [1.40, 1.42, 1.39], "hybridnorm": [1.35, 1.38, 1.36],
                  "hybridnorm_star": [1.36, 1.38, 1.35]})
    o = orderings(r, ["prenorm", "hybridnorm", "hybridnorm_star"], [0, 1, 2])
    assert any(line.startswith("hybridnorm < prenorm: hybridnorm - prenorm = -0.0400")
               for line in o["supported"]), o
    assert any(line.startswith("hybridnorm_star < prenorm") for line in o["supported"])
    [open_] = o["not_supported"]
    assert open_.startswith("hybridnorm vs hybridnorm_star: not resolved") and "includes 0" in open_
    # differences 0.01, 0, -0.01 (hybridnorm - hybridnorm_star): mean 0, no gap to resolve
    assert open_.endswith("3 seeds); no gap at all"), open_
    pair = {(p["a"], p["b"]): p["a_minus_b"] for p in o["pairs"]}
    assert pair["prenorm", "hybridnorm"]["mean"] == pytest.approx(0.04)
    assert pair["prenorm", "hybridnorm"]["excludes_zero"]
    assert pair["prenorm", "hybridnorm"]["seeds_needed"] == seeds_needed(
        pair["prenorm", "hybridnorm"]["mean"], pair["prenorm", "hybridnorm"]["std"])
    r = _records({"prenorm": [1.40, 1.42, 1.39], "hybridnorm": [1.41, 1.38, 1.37]})
    [open_] = orderings(r, ["prenorm", "hybridnorm"], [0, 1, 2])["not_supported"]
    # differences -0.01, +0.04, +0.02: mean 0.01667, sd 0.02517 (ratio 0.662): n = 12:
    # 2.2010 / 3.4641 = 0.635 < 0.662; n = 11: 2.2281 / 3.3166 = 0.672, too wide
    assert open_.endswith("a 95% interval would exclude 0 from 12 seeds"), open_
    assert o["paper"] == ("the paper's ordering hybridnorm_star < hybridnorm < prenorm is not "
                          "contradicted, but not resolved for: hybridnorm_star < hybridnorm")

    r = _records({"prenorm": [1.30, 1.31, 1.30], "hybridnorm_star": [1.40, 1.42, 1.41]})
    o = orderings(r, ["prenorm", "hybridnorm_star"], [0, 1, 2])
    assert o["paper"] == ("the paper's ordering hybridnorm_star < prenorm is contradicted: "
                          "prenorm < hybridnorm_star")


def test_diverged_seeds_leave_the_pairs_and_one_seed_cannot_rank():
    r = _records({"prenorm": [1.40, 1.42, 1.39], "postnorm": [None, 1.30, None]})
    o = orderings(r, ["prenorm", "postnorm"], [0, 1, 2])
    assert o["not_supported"] == ["prenorm vs postnorm: 1 seed(s) with both runs finished; an "
                                  "interval needs at least 2 (run --seeds 3 or more)"]
    assert o["supported"] == [] and o["paper"] is None


def _rows(key: RunKey, vals: list, train: list, diverge_at=None) -> list[dict]:
    out = [dict(**key.fields(), step=0, train_loss=None, val_loss=vals[0], grad_norm=None,
                tokens_per_s=None, lr=None)]
    for step, loss in enumerate(train, 1):
        out.append(dict(**key.fields(), step=step, train_loss=loss, grad_norm=1.0,
                        tokens_per_s=50.0 + step, lr=1e-3,
                        val_loss=vals[step // 2] if step % 2 == 0 and step != diverge_at else None))
    return out


def test_summary_and_table_hold_every_field():
    keys, rows_, diverged = [], [], {}
    for seed in (1, 2):
        for lr in (1e-3, 1e-1):
            for s, shift in (("prenorm", 0.0), ("hybridnorm", -0.05)):
                k = RunKey(s, seed, lr)
                keys.append(k)
                hot = s == "prenorm" and lr == 1e-1
                rows_ += _rows(k, [5.5, 3.0 + shift + seed / 100, 2.0 + shift + seed / 50],
                               [4.0, 3.0, 2.5, float("nan") if hot else 2.0], 4 if hot else None)
                diverged[k] = 4 if hot else None
    summary = summarize(rows_, keys, diverged, "prenorm")
    assert summary["schemes"] == ["prenorm", "hybridnorm"] and summary["seeds"] == [1, 2]
    assert summary["peak_lrs"] == [1e-3, 1e-1] and summary["baseline"] == "prenorm"
    assert len(summary["runs"]) == 8
    run = next(r for r in summary["runs"] if (r["scheme"], r["seed"], r["peak_lr"])
               == ("hybridnorm", 2, 1e-3))
    assert run == dict(scheme="hybridnorm", seed=2, peak_lr=1e-3, steps=4, initial_val_loss=5.5,
                       final_val_loss=pytest.approx(1.99), best_val_loss=pytest.approx(1.99),
                       diverged=False, diverged_step=None, tokens_per_s=pytest.approx(53.0))
    low, high = summary["comparisons"]
    assert low["peak_lr"] == 1e-3 and low["runs"] == 2
    hn = low["schemes"]["hybridnorm"]
    assert hn["final_val_loss"]["mean"] == pytest.approx(1.98) and hn["final_val_loss"]["n"] == 2
    assert hn["final_val_loss"]["std"] == pytest.approx(0.02 / math.sqrt(2))
    d = hn["minus_baseline"]["final_val_loss"]
    assert d["mean"] == pytest.approx(-0.05) and d["std"] == pytest.approx(0.0, abs=1e-12)
    assert d["n"] == 2 and d["confidence"] == 0.95 and d["excludes_zero"]
    assert set(hn["minus_baseline"]) == {"final_val_loss", "best_val_loss"}
    assert "minus_baseline" not in low["schemes"]["prenorm"]
    assert set(low["orderings"]) == {"supported", "not_supported", "paper", "pairs"}
    assert d["seeds_needed"] == 2  # the gap is the same under both seeds
    assert high["schemes"]["prenorm"]["diverged"] == 2
    assert high["schemes"]["prenorm"]["final_val_loss"]["n"] == 0
    assert high["schemes"]["hybridnorm"]["minus_baseline"]["final_val_loss"]["n"] == 0
    sweep = summary["lr_sweep"]
    assert sweep["prenorm"]["0.1"] == dict(final_val_loss=None, diverged_steps=[4, 4], runs=2)
    assert sweep["hybridnorm"]["0.001"]["final_val_loss"] == pytest.approx(1.98)
    text = table(summary)
    assert "peak learning rate 0.001:" in text and "peak learning rate 0.1:" in text
    assert "div @ 4,4" in sweep_table(summary) and sweep_table(summary) in text
    json.dumps(summary)  # all of it is JSON


def test_a_saved_summary_is_refreshed_from_its_runs(tmp_path, capsys):
    runs = [dict(scheme=s, seed=seed, peak_lr=3e-3, steps=10, initial_val_loss=5.0,
                 final_val_loss=v, best_val_loss=v, diverged=False, diverged_step=None,
                 tokens_per_s=100.0)
            for s, values in (("prenorm", [1.62, 1.64, 1.61]), ("hybridnorm", [1.57, 1.60, 1.58]))
            for seed, v in zip((1, 2, 3), values)]
    old = dict(schemes=["prenorm", "hybridnorm"], seeds=[1, 2, 3], peak_lrs=[3e-3],
               baseline="prenorm", runs=runs, wall_s=12.5,
               comparisons=[{"orderings": {"supported": [], "not_supported": ["stale"]}}])
    new = refresh(old)
    assert new["runs"] == runs and new["wall_s"] == 12.5  # measured values kept
    [c] = new["comparisons"]
    d = c["schemes"]["hybridnorm"]["minus_baseline"]["final_val_loss"]
    assert d["mean"] == pytest.approx(-0.04) and "seeds_needed" in d
    assert [p["a"] for p in c["orderings"]["pairs"]] == ["prenorm"]
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(old))
    assert summary_module.main([str(folder)]) == 0
    assert json.loads((folder / "summary.json").read_text())["comparisons"] == json.loads(
        json.dumps(new["comparisons"]))
    assert "hybridnorm < prenorm" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        summary_module.main([str(tmp_path / "nothing")])
    assert e.value.code == 2 and "summary.json does not exist" in capsys.readouterr().err


# ---- flags ------------------------------------------------------------------------------------


def test_preset_sets_defaults_that_flags_override():
    _, args = cli.parse(["--preset", "paper-small"])
    flags = cli.PRESETS["paper-small"].flags
    assert all(getattr(args, k) == v for k, v in flags.items())
    _, args = cli.parse(["--preset", "paper-small", "--seeds", "2", "--steps", "10"])
    assert (args.seeds, args.steps) == (2, 10)
    assert args.schemes == flags["schemes"]


@pytest.mark.parametrize("flags,message", [
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--baseline", "postnorm", "--schemes", "prenorm,hybridnorm"],
     "--baseline postnorm is not among --schemes prenorm,hybridnorm; add it there"),
    (["--lr-sweep", "1e-3,x"], "--lr-sweep takes comma-separated numbers"),
    (["--lr-sweep", "1e-3,-1"], "--lr-sweep needs positive learning rates"),
    (["--lr-sweep", "1e-3,1e-3"], "--lr-sweep lists a rate twice"),
    (["--lr-sweep", "1e-3,1e-2", "--lr", "1e-3"], "--lr-sweep replaces --lr; pass one of them"),
    (["--init-truncation", "-1"], "--init-truncation must be 0"),
    (["--preset", "nonsense"], "invalid choice: 'nonsense'"),
    (["--steps", "5", "--warmup", "5"], "--warmup 5 must lie in 0..4 (below --steps)"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--corpus", "austen", "--text", "x.txt"], "one of --text, --data-path and --corpus"),
])
def test_bad_study_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*flags, "--runs-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _built(megatron_single_rank_args):
    from megatron_hybridnorm.train.model import build

    ddp, optimizer, _, _ = build(megatron_single_rank_args, "hybridnorm", 256)
    return ddp, optimizer


def _decay_by_name(flags):
    from megatron_hybridnorm.train.model import unwrap

    _, args = cli.parse([*SMALL, *flags])
    cli.resolve(args, 1, torch.cuda.is_available())
    ddp, optimizer = _built(args)
    names = {id(p): n for n, p in unwrap(ddp).named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            out[names[id(p)]] = group["wd_mult"]
    return out


def test_decay_norm_and_bias_decays_the_norm_weights(megatron_single_rank):
    megatron = _decay_by_name([])
    official = _decay_by_name(["--decay-norm-and-bias"])
    norms = [n for n in megatron if "layernorm" in n]
    assert any("v_layernorm" in n for n in norms) and any("final_layernorm" in n for n in norms)
    assert all(megatron[n] == 0.0 for n in norms)  # Megatron: 1-D parameters do not decay
    assert all(megatron[n] == 1.0 for n in megatron if n.endswith("linear_qkv.weight"))
    assert official.keys() == megatron.keys() and set(official.values()) == {1.0}


# ---- end to end -------------------------------------------------------------------------------

# hybridnorm-train in a child process, recording the seed and a checksum of every batch it
# draws and of every model's first QKV weight after the init
RECORDING = """
import json, sys, zlib
from megatron_hybridnorm.train import loop, model, cli
seen = {"batches": [], "inits": []}
draw = loop.get_batch
def get_batch(stream, seed, step, batch, seq):
    tokens, labels = draw(stream, seed, step, batch, seq)
    seen["batches"].append([seed, step, zlib.crc32(tokens.numpy().tobytes())])
    return tokens, labels
loop.get_batch = get_batch
init = model.layout_invariant_init
def recorded_init(m, config, seed):
    init(m, config, seed)
    w = next(p for n, p in m.named_parameters() if n.endswith("linear_qkv.weight"))
    seen["inits"].append([seed, zlib.crc32(w.detach().numpy().tobytes())])
model.layout_invariant_init = recorded_init
code = cli.main(sys.argv[1:])
print("SEEN " + json.dumps(seen))
sys.exit(code)
"""


@pytest.mark.slow
def test_two_seeds_two_schemes(tmp_path):
    from megatron_hybridnorm.train.log import read_jsonl
    from megatron_hybridnorm.train.plots import plot

    out = subprocess.run(
        [sys.executable, "-c", RECORDING, *SMALL, "--schemes", "prenorm,hybridnorm_star",
         "--seeds", "2", "--seed", "7", "--steps", "4", "--runs-dir", str(tmp_path),
         "--name", "s"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.split("SEEN ")[1])
    folder = tmp_path / "s"

    # seeds 7 and 8 change the init and the training batches, the same for both schemes;
    # the validation windows are the same for every run
    inits = {}
    for seed, crc in seen["inits"]:
        inits.setdefault(seed, set()).add(crc)
    assert sorted(inits) == [7, 8] and all(len(v) == 1 for v in inits.values())
    assert inits[7] != inits[8]
    train = {}
    for seed, step, crc in seen["batches"]:
        train.setdefault((seed, step), set()).add(crc)
    assert all(len(v) == 1 for v in train.values())  # both schemes drew the same batch
    val_seeds = {s for s, _ in train} - {7, 8}
    assert len(val_seeds) == 1  # one validation stream for all runs
    assert {train[7, step] != train[8, step] for step in range(4)} == {True}
    assert (tmp_path / "s/checkpoints/prenorm-seed7/latest").is_file()
    assert (tmp_path / "s/checkpoints/hybridnorm_star-seed8/latest").is_file()

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["seeds"] == [7, 8] and summary["baseline"] == "prenorm"
    assert summary["lr_sweep"] is None and summary["wall_s"] > 0
    shares = summary["time_shares"]
    assert shares["runs"] == 4 and shares["wall_s"] == pytest.approx(summary["wall_s"])
    assert shares["seconds"]["step"] > shares["seconds"]["data"] > 0
    assert sum(shares["share"].values()) == pytest.approx(1.0)
    assert "where the time went (4 runs" in out.stdout
    outcomes = json.loads((folder / "outcomes.json").read_text())
    assert all(set(o["phase_s"]) >= {"build", "data", "step", "eval", "save"}
               for o in outcomes.values())
    assert {(r["scheme"], r["seed"]) for r in summary["runs"]} == {
        (s, seed) for s in ("prenorm", "hybridnorm_star") for seed in (7, 8)}
    init_losses = {(r["scheme"], r["seed"]): r["initial_val_loss"] for r in summary["runs"]}
    assert init_losses["prenorm", 7] != init_losses["prenorm", 8]
    [c] = summary["comparisons"]
    star = c["schemes"]["hybridnorm_star"]
    for m in ("final_val_loss", "best_val_loss"):
        assert star[m]["n"] == 2 and star[m]["std"] is not None
        d = star["minus_baseline"][m]
        assert d["n"] == 2 and d["low"] < d["mean"] < d["high"]
        finals = {r["seed"]: r[m] for r in summary["runs"] if r["scheme"] == "hybridnorm_star"}
        bases = {r["seed"]: r[m] for r in summary["runs"] if r["scheme"] == "prenorm"}
        assert d["mean"] == pytest.approx((finals[7] - bases[7] + finals[8] - bases[8]) / 2)
    assert len(c["orderings"]["supported"]) + len(c["orderings"]["not_supported"]) == 1
    assert "paired by seed (95% interval)" in out.stdout and "+/-" not in out.stdout
    assert "One seed cannot rank" not in out.stdout

    panels = plot(folder, summary, rows(folder), read_jsonl(folder / "grad_flow.jsonl"))
    train_panel, val_panel = panels["loss.png"]
    assert train_panel["labels"] == ["prenorm", "hybridnorm_star"]
    assert "mean of 2 seeds" in train_panel["title"]
    assert val_panel["labels"] == ["prenorm (baseline)", "hybridnorm_star"]
    assert val_panel["bands"] == ["hybridnorm_star"] and "range over 2 seeds" in val_panel["title"]
    assert all("geometric mean of 2 seeds" in p["title"] for p in panels["grad_flow.png"])
    assert "lr_sweep.png" not in panels


@pytest.mark.slow
def test_lr_sweep_reports_loss_or_divergence(tmp_path):
    from test_train import run

    from megatron_hybridnorm.train.log import read_jsonl
    from megatron_hybridnorm.train.plots import plot

    out = run([*SMALL, "--schemes", "postnorm,hybridnorm", "--steps", "6", "--warmup", "1",
               "--clip-grad", "0", "--lr-sweep", "1e4,1e-3", "--runs-dir", str(tmp_path),
               "--name", "sw"])
    folder = tmp_path / "sw"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["peak_lrs"] == [1e-3, 1e4]
    sweep = summary["lr_sweep"]
    assert sweep["postnorm"]["10000"]["diverged_steps"]  # far too hot for Post-Norm
    for s in ("postnorm", "hybridnorm"):
        assert sweep[s]["0.001"]["final_val_loss"] is not None
    assert "final validation loss by peak learning rate" in out.stdout and "div @" in out.stdout
    assert (folder / "checkpoints/hybridnorm-lr0.001/latest").is_file()
    lrs = {r["peak_lr"] for r in rows(folder)}
    assert lrs == {1e-3, 1e4}
    # each run ran at its own rate: the logged rate at the end of warm-up is the peak
    assert {r["peak_lr"]: r["lr"] for r in rows(folder) if r["step"] == 1
            and r["scheme"] == "hybridnorm"} == {1e-3: pytest.approx(1e-3), 1e4: pytest.approx(1e4)}
    panels = plot(folder, summary, rows(folder), read_jsonl(folder / "grad_flow.jsonl"))
    [p] = panels["lr_sweep.png"]
    assert "postnorm diverged" in p["labels"] and "hybridnorm" in p["labels"]
    assert len(panels["loss.png"]) == 4  # two panels per rate
    assert (folder / "lr_sweep.png").stat().st_size > 10_000
