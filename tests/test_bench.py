"""tools/bench.py takes its objectives from redi.py's table: an entry added to the table is benchmarked like the
paper's objectives, at its own defaults, with no change to the benchmark."""
import json
import math

from conftest import run_script

# Added at run time through BENCH_OBJECTIVES, which the benchmark runs in its parent and in every worker. With
# alpha 1.0 and nll 0.25 its loss is -(1 + 0.25) lp_w/|y_w| + 1.0 lp_l/|y_l| = 1.25 x REDI's at alpha 0.8, so
# from the same weights on the same pair the two first losses must stand in that ratio: it holds only if the
# worker ran this entry's function with this entry's defaults.
ANCHOR = '''
import redi


def redi_anchor_loss(p, alpha, nll):
    """REDI plus an NLL term on the correct trace."""
    return redi.redi_loss(p, alpha) - nll * p.chosen_logps / p.chosen_lens


redi.OBJECTIVES["redi_anchor"] = redi.Objective(redi_anchor_loss, redi.normalised_margin,
                                                {"alpha": 1.0, "nll": 0.25}, lr=1e-6)
'''
TINY = ["--no-trl", "--no-eval", "--reps", "1", "--steps", "1", "--hidden", "64", "--layers", "1",
        "--seq-len", "128", "--min-len", "64", "--max-len", "128"]


def test_an_objective_added_to_the_table_is_benchmarked(tmp_path, monkeypatch):
    # not in the table: not a case
    monkeypatch.delenv("BENCH_OBJECTIVES", raising=False)
    proc = run_script("tools/bench.py", "--cases", "redi_anchor_i", *TINY, "--out", tmp_path / "none", check=False)
    assert proc.returncode == 2 and "--cases takes sft_i, sft_ii, sft_paper, redi_i" in proc.stdout
    assert "redi_anchor_i" not in proc.stdout.split("; got")[0]

    (tmp_path / "anchor.py").write_text(ANCHOR)
    monkeypatch.setenv("BENCH_OBJECTIVES", str(tmp_path / "anchor.py"))
    proc = run_script("tools/bench.py", "--cases", "redi_i,redi_anchor_i", *TINY, "--out", tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert summary["settings"]["objectives"]["redi_anchor"]["hparams"] == {"alpha": 1.0, "nll": 0.25}

    rows = [r for r in summary["rows"] if r["case"].startswith("REDI_ANCHOR (i)")]
    assert [r["metric"] for r in rows] == ["tokens/s", "peak GB"]
    for r in rows:
        assert "project only (TRL has none)" in r["case"] and r["case"] in proc.stdout
        assert math.isfinite(r["project"]) and r["project"] > 0 and r["trl"] is None and not r["errors"]

    anchor, redi = (summary["results"][f"project:{name}:i"][0] for name in ("redi_anchor", "redi"))
    assert len(anchor["losses"]) == len(redi["losses"]) == 2 and all(map(math.isfinite, anchor["losses"]))
    assert math.isclose(anchor["losses"][0], 1.25 * redi["losses"][0], rel_tol=1e-5)
    assert not math.isclose(redi["losses"][0], 0, abs_tol=0.1)  # the ratio is not 0 = 1.25 x 0
