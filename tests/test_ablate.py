"""The ablation studies (experiments/ablate.py) end to end on the tiny random model: each writes its
results, table and plot; a rerun skips the points it has measured. Greedy Medusa points must decode
exactly vanilla's output. The experiment scripts are loaded from their files (they are scripts, not
part of the package)."""

import importlib.util
import json
import os

import pytest

from medusa_jax import benchmark
from medusa_jax import tree as tree_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str):
  """experiments/NAME.py as a module, without putting experiments/ on sys.path."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ablate = _script("ablate")

SMALL = ["--config", os.path.join(REPO, "configs/smollm2_medusa1.py:tiny"), "--num_prompts", "2",
         "--max_new_tokens", "6", "--sizes", "1,2,4", "--batches", "1,2", "--epsilons", "0.09,0.25"]


@pytest.fixture(scope="module")
def tree_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tree") / "tree.json")
  grown = [[0], [0, 0], [1], [0, 0, 0]]
  tree_lib.save_choices(path, grown[:2], {"grown_choices": grown})
  return path


@pytest.mark.parametrize("study", ablate.STUDIES)
def test_study_writes_its_three_files(study, tmp_path, tree_file):
  ablate.main(["--study", study, *SMALL, "--tree", tree_file, "--out", str(tmp_path)])
  out = tmp_path / study
  assert sorted(os.listdir(out)) == sorted(["results.json", "table.md", f"{study}.png"])
  with open(out / "results.json") as f:
    res = json.load(f)
  assert res["meta"]["hardware"]["cpu"] and res["points"]
  assert (out / "table.md").read_text().startswith(f"# {study}")
  if study == "stack":
    assert set(res["points"]) >= {"vanilla", "heads, no tree (top-1 chain)", "release's 64-node tree",
                                  "calibrated tree"}
  if study in ("stack", "tree-size", "batch"):  # greedy points, compared with vanilla's output
    for key, p in res["points"].items():
      if p["nodes"] == 1:
        assert p["identical"] is None, key  # vanilla itself: the reference, nothing is compared
      else:
        assert p["identical"] == 1.0, key  # greedy Medusa == greedy on every prompt


def test_a_rerun_skips_measured_points(tmp_path, tree_file, monkeypatch):
  args = ["--study", "batch", *SMALL, "--tree", tree_file, "--out", str(tmp_path)]
  ablate.main(args)
  calls = []
  real = benchmark.measure
  monkeypatch.setattr(benchmark, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
  ablate.main(args)
  assert calls == []
  ablate.main([*args[:-4], "--batches", "1,2,4", "--tree", tree_file, "--out", str(tmp_path)])
  assert len(calls) == 1  # only the new point
  # The table's throughput is the batch's own (benchmark.summarize counts every sequence already).
  with open(tmp_path / "batch" / "results.json") as f:
    points = json.load(f)["points"]
  with open(tmp_path / "batch" / "table.md") as f:
    lines = [line for line in f if line.startswith("| 4 |")]
  assert float(lines[0].strip(" |\n").split("|")[-1]) == pytest.approx(points["batch 4"]["vanilla_tok_per_s"], rel=5e-3)


def test_accelerator_check_runs_on_the_cpu(capsys):
  """The accelerator check's own code path, on the tiny model and the CPU: one table."""
  rows = _script("accelerator_check").main(["--config", os.path.join(REPO, "configs/smollm2_medusa1.py:tiny"),
                                 "--num_prompts", "2", "--max_new_tokens", "6", "--batches", "1,2"])
  assert [r["batch"] for r in rows[:2]] == [1, 2] and all(r["identical"] == 1.0 for r in rows[:2])
  assert rows[-1]["what"].startswith("train step") and rows[-1]["loss finite"]
  assert "| what |" in capsys.readouterr().out


def test_throughput_counts_every_sequence_of_a_batch():
  """A batch of 2 decoded in 1 s, 10 and 6 tokens (the first of each from prefill): 14 decoded tokens
  per second, the batch's throughput; the batch study's table prints it as is."""
  rows = [{"question_id": i, "tokens": list(range(n)), "steps": 9, "decode_seconds": 0.5, "prefill_seconds": 0.1}
          for i, n in enumerate((10, 6))]
  assert benchmark.summarize(rows)["tok_per_s"] == pytest.approx(14.0)


def test_data_curve_two_stage_arm_runs_its_first_stage_first_and_adds_its_costs(tmp_path, monkeypatch):
  dc = _script("data_curve")
  calls = []

  def fake_run_point(arm, budget, out, overrides=(), first_point=None):
    calls.append((arm, budget, None if first_point is None else first_point["arm"]))
    steps = {"soft+prefix": 10, "mix+prefix": 7}[arm]
    data_s = {"soft+prefix": 100.0, "mix+prefix": 50.0}[arm]
    row = {"arm": arm, "budget": budget, "steps": steps, "train_and_cache_s": 2.0 * steps, "data_s": data_s}
    return dc.with_first_stage(row, first_point), None, None

  monkeypatch.setattr(dc, "run_point", fake_run_point)
  monkeypatch.setattr(dc, "generations_for", lambda *a: ([], []))
  monkeypatch.setattr(dc, "acceptance", lambda loaded, *g: {"head_top1": [0.5] * 4,
                                                            "tokens_per_step": {"8": 1.5, "16": 1.6, "64": 1.7}})
  monkeypatch.setattr(dc, "write_outputs", lambda *a: None)
  dc.main(["--arms", "mix+prefix", "--budgets", "1M", "--out", str(tmp_path)])
  # mix@1M = soft+prefix@0.5M, then 0.5M tokens of the self-distilled replies
  assert calls == [("soft+prefix", 500_000, None), ("mix+prefix", 1_000_000, "soft+prefix")]
  assert dc.stage_budgets("mix+prefix", 1_000_000) == ("soft+prefix", 500_000, 500_000)
  with open(tmp_path / "results.json") as f:
    pts = json.load(f)["points"]
  assert pts["mix+prefix@1M"]["steps"] == 17 and pts["mix+prefix@1M"]["data_s"] == 150.0
  assert pts["mix+prefix@1M"]["train_and_cache_s"] == 34.0
  # A rerun measures nothing again; an unknown data cost stays unknown in the sum.
  calls.clear()
  dc.main(["--arms", "mix+prefix", "--budgets", "1M", "--out", str(tmp_path)])
  assert calls == []
  assert dc.with_first_stage({"steps": 1, "train_and_cache_s": 1.0, "data_s": None},
                             {"steps": 2, "train_and_cache_s": 2.0, "data_s": 5.0})["data_s"] is None
  # A first stage measured elsewhere (its point seeded, no export here) is trained again first.
  seeded = tmp_path / "seeded"
  seeded.mkdir()
  with open(seeded / "results.json", "w") as f:
    json.dump({"meta": {}, "points": {"soft+prefix@0.5M": pts["soft+prefix@0.5M"]}}, f)
  dc.main(["--arms", "mix+prefix", "--budgets", "1M", "--out", str(seeded)])
  assert calls == [("soft+prefix", 500_000, None), ("mix+prefix", 1_000_000, "soft+prefix")]


def test_data_curve_labels_a_budget_its_data_fell_short_of():
  dc = _script("data_curve")
  assert dc.parse_budget("4.1M") == 4_100_000 and dc.parse_budget("500K") == 500_000
  assert dc.tokens_label({"budget": 1_000_000, "tokens": 990_000}) == "1M"
  assert dc.tokens_label({"budget": 1_000_000, "tokens": 927_000}) == "1M (0.93M)"
  assert dc.tokens_label({"budget": 500_000}) == "0.5M"  # a point from before rows recorded it
