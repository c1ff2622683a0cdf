"""Seeded benchmark tables: variants of the method and its baselines, over seeds.

Every variant is the same config with a few overrides, run through the same
pipeline and report; a table cell is the mean +- std over seeds of numbers read from
each run's report.json. Within one seed all variants share the teachers (they are
trained once and their checkpoints copied), so variants differ only downstream.
"""
import dataclasses
import json
import shutil
import time
from pathlib import Path

import ml_collections
import numpy as np

from kamal_jax import pipeline, report

__all__ = ["aggregate", "COLUMNS", "comparison", "configure", "markdown", "merged",
           "per_seed", "plot", "run", "Variant", "VARIANTS", "write"]


@dataclasses.dataclass(frozen=True)
class Variant:
  overrides: dict
  note: str = ""


VARIANTS = {
    "least-entropy": Variant({}, "the method as configured"),
    "paper": Variant({"stage1.rest": "none", "stage1.atypicality_weight": 0.0,
                      "stage2.logit_loss": "mse"},
                     "the paper's method: least ambiguity alone, no rest logit, MSE heads"),
    "no-typicality": Variant({"stage1.rest": "mean", "stage1.atypicality_weight": 0.0},
                             "least ambiguity alone, the group's agreed rest"),
    "rest-mean": Variant({"stage1.rest": "mean"},
                         "components learn their group's agreed rest logit"),
    "rest-own": Variant({"stage1.rest": "own"},
                        "components learn the selected teacher's rest logit"),
    "stage2-mse-400": Variant({"stage2.logit_loss": "mse", "stage2.steps": 400},
                              "the student's heads learn by MSE, a quarter of the steps"),
    "stage2-kd-400": Variant({"stage2.steps": 400}, "a quarter of the student's steps"),
    "joint-kl": Variant({"stage2.joint_weight": 1.0},
                        "the student also learns the components' joint distribution"),
    "least-margin": Variant({"stage1.ambiguity": "margin"}),
    "least-max-prob": Variant({"stage1.ambiguity": "max_prob"}),
    "none": Variant({"stage1.selection": "none"}, "every teacher, equal weights"),
    "random": Variant({"stage1.selection": "random"}, "one random teacher per sample"),
    "soft": Variant({"stage1.selection": "soft"}, "weights softmax(-entropy / T)"),
    "oracle": Variant({"stage1.selection": "oracle"}, "upper bound: uses labels"),
    "single-stage": Variant({"pipeline": "single_stage"}, "no components"),
    "kd-logits": Variant({"pipeline": "single_stage", "stage1.selection": "none",
                          "stage1.feature_weight": 0.0, "stage1.logit_loss": "kd"},
                         "multi-teacher KD of logits, no bridges"),
    "cfl": Variant({"pipeline": "cfl"}, "Common Feature Learning (Luo et al. 2019)"),
    "ensemble": Variant({"pipeline": "ensemble"}, "the teachers themselves, K forwards"),
    "supervised": Variant({"pipeline": "supervised"}, "upper bound: uses labels"),
}

def _selection(key: str):
  """A selection statistic on the parts' test images, where the pipeline selects."""
  def read(r):
    if r["pipeline"] not in ("two_stage", "single_stage"):
      return None
    return float(np.mean([c["test_selection"][key] for c in r["components"]]))
  return read


def _components(r):
  values = [c["accuracy"] for c in r["components"]]
  return None if any(v is None for v in values) else float(np.mean(values))


COLUMNS = {  # column -> how to read it from a report (None: not applicable)
    "teachers": lambda r: np.mean([t["accuracy"] for t in r["teachers"] if t["accuracy"] is not None]),
    "components": _components,
    "student per part": lambda r: np.mean(list(r["student"]["accuracy_per_part"].values())),
    "student joint": lambda r: r["student"]["accuracy_joint"],
    "components joint": lambda r: r.get("components_joint"),
    "target accuracy": _selection("target_accuracy"),
    "own-domain weight": _selection("selected_own_domain"),
    "params": lambda r: r["student"]["params"],
    "seconds": lambda r: sum(v for k, v in r["timings"].items() if k != "teachers"),
}


def configure(base: ml_collections.ConfigDict, variant: str, seed: int):
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}: use some of {list(VARIANTS)}.")
  config = ml_collections.ConfigDict(base.to_dict())
  config.seed = seed
  for path, value in VARIANTS[variant].overrides.items():
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def run(base: ml_collections.ConfigDict, variants, seeds, workdir: Path) -> dict:
  """Runs every (variant, seed) once (finished runs are reused) and returns
  {variant: {seed: report}}."""
  reports = {v: {} for v in variants}
  for seed in seeds:
    first = None  # the seed's first run: its trained teachers serve the others
    for variant in variants:
      directory = workdir / f"seed{seed}" / variant
      for trained in sorted((first / "checkpoints").glob("teachers*")) if first else ():
        if not (directory / "checkpoints" / trained.name).exists():
          shutil.copytree(trained, directory / "checkpoints" / trained.name)
      start = time.perf_counter()
      reports[variant][seed] = pipeline.train_and_evaluate(
          configure(base, variant, seed), str(directory))
      print(f"seed {seed} {variant}: joint {reports[variant][seed]['student']['accuracy_joint']:.4f} "
            f"({time.perf_counter() - start:.0f} s)", flush=True)
      first = first or directory
  return reports


def aggregate(values: dict) -> dict:
  """The per-seed numbers (`per_seed`) -> {variant: {column: (mean, std) or None}}."""
  table = {}
  for variant, by_seed in values.items():
    table[variant] = {}
    for column in COLUMNS:
      column_values = [numbers[column] for numbers in by_seed.values()]
      table[variant][column] = None if any(v is None for v in column_values) else (
          float(np.mean(column_values)), float(np.std(column_values)))
  return table


def markdown(table: dict, seeds) -> str:
  def cell(stat, column):
    if stat is None:
      return "-"
    mean, std = stat
    if column == "params":
      return f"{mean:,.0f}"
    if column == "seconds":
      return f"{mean:.0f} +- {std:.0f}"
    return f"{mean:.4f} +- {std:.4f}"
  header = ["variant", *COLUMNS, "note"]
  rows = [[v, *[cell(stats[c], c) for c in COLUMNS], VARIANTS[v].note]
          for v, stats in table.items()]
  return (f"Mean +- std over {len(seeds)} seeds {list(seeds)}; accuracies on the "
          "held-out test split.\n\n" + report.table(header, rows) + "\n\n"
          + comparison(table))


def comparison(table: dict, method: str = "least-entropy") -> str:
  """The method against none, random and the oracle, on components and joint accuracy:
  the differences in units of the larger std, and the share of the none -> oracle gap
  the method closes."""
  if not {method, "none", "random", "oracle"} <= table.keys():
    return ""
  lines = []
  for column in ("components", "student joint"):
    if table[method][column] is None:
      continue
    (m, s), (o, _) = table[method][column], table["oracle"][column]
    parts = []
    for baseline in ("none", "random"):
      b, bs = table[baseline][column]
      parts.append(f"{m - b:+.4f} over {baseline} ({(m - b) / max(s, bs, 1e-12):.1f} std)")
    gap = o - table["none"][column][0]
    closed = f"{(m - table['none'][column][0]) / gap:.0%}" if gap > 0 else "n/a (no gap)"
    lines.append(f"- {column}: {method} {', '.join(parts)}; closes {closed} of the "
                 "none -> oracle gap.")
  return "\n".join(lines)


def plot(table: dict, path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  columns = ("components", "student per part", "student joint")
  variants = list(table)
  fig, ax = plt.subplots(figsize=(max(6, len(variants) * 0.9), 4))
  width = 0.8 / len(columns)
  for j, column in enumerate(columns):
    shown = [(i, table[v][column]) for i, v in enumerate(variants) if table[v][column]]
    ax.bar([i + (j - 1) * width for i, _ in shown], [s[0] for _, s in shown], width,
           yerr=[s[1] for _, s in shown], capsize=3, label=column)
  lowest = min(table[v][c][0] for v in variants for c in columns if table[v][c])
  ax.set(xticks=range(len(variants)), ylabel="test accuracy",
         ylim=(max(0.0, lowest - 0.05), 1.0), title="Accuracy per variant (mean, std over seeds)")
  ax.set_xticklabels(variants, rotation=30, ha="right")
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def per_seed(reports: dict) -> dict:
  """The numbers behind every cell: {variant: {seed (str): {column: value}}}, from
  {variant: {seed: report}}; what a table's JSON holds."""
  return {v: {str(s): {c: COLUMNS[c](r) for c in COLUMNS} for s, r in by_seed.items()}
          for v, by_seed in reports.items()}


def merged(old: dict, new: dict) -> dict:
  """A table's per-seed numbers with some variants' rows replaced or added by a newer
  run's, in the order of VARIANTS."""
  rows = {**old, **new}
  return {v: rows[v] for v in VARIANTS if v in rows}


def write(values: dict, seeds, out: Path, header: str):
  """The table of per-seed numbers (`per_seed`) as <out> (markdown), its plot and
  its JSON."""
  table = aggregate(values)
  plot(table, out.with_suffix(".png"))
  out.with_suffix(".json").write_text(json.dumps(values, indent=1, default=float) + "\n")
  out.write_text(f"{header}\n\n{markdown(table, seeds)}\n\n![accuracy per variant]"
                 f"({out.with_suffix('.png').name})\n")
