"""report.json (read by other tools), report.md with its plots, and the summary."""
import json
from pathlib import Path

from kamal_jax import files

__all__ = ["markdown", "plot", "summary", "table", "write"]


def _cell(value) -> str:
  if value is None:
    return "-"
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def summary(result: dict) -> str:
  """Per part: its teachers, its component and the student's head, side by side."""
  teachers = {t["name"]: t for t in result["teachers"]}
  student = result["student"]
  rows = []
  for c in result["components"]:
    scores = ", ".join(f"{t} {teachers[t]['accuracy_per_part'][c['name']]:.4f}"
                       for t in c["teachers"])
    rows.append([c["name"], " ".join(c["classes"]), scores, c["accuracy"],
                 student["accuracy_per_part"][c["name"]]])
  pipeline = result.get("pipeline", "two_stage")
  student_name = "ensemble" if pipeline == "ensemble" else "student"
  joint = "parts not exclusive: no joint accuracy"  # e.g. one head per attribute
  if student["accuracy_joint"] is not None:
    joint = f"joint accuracy {student['accuracy_joint']:.4f}"
    if result.get("components_joint") is not None:
      joint += f" (components together: {result['components_joint']:.4f})"
  lines = [table(["part", "classes", "teachers", "component", student_name], rows), "",
           f"{pipeline}: {student_name} {joint}; {student['params']:,} params, "
           f"{student['inference_forwards']} forward(s) per image"]
  params = [c["params"] for c in result["components"] if c["params"]]
  if params:
    lines[-1] += f"; components {sum(params):,} params"
  lines[-1] += f"; wall time {sum(result['timings'].values()):.1f} s"
  return "\n".join(lines)


def _selection_rows(result: dict) -> list[list]:
  rows = []
  for c in result["components"]:
    rows.append([c["name"], ", ".join(c["teachers"]),
                 ", ".join(f"{t} {f:.3f}" for t, f in c["selected_fraction"].items()),
                 c["selected_own_domain"], c["test_selection"]["selected_own_domain"],
                 c["test_selection"]["target_accuracy"], c["accuracy"], c["params"]])
  return rows


def markdown(result: dict, plots: list[str]) -> str:
  teachers = table(
      ["teacher", "classes", "accuracy on its parts", "params"],
      [[t["name"], " ".join(t["classes"]), t["accuracy"], t["params"]]
       for t in result["teachers"]])
  components = table(
      ["part", "teachers", "selected fraction (pool)", "own-domain weight (pool)",
       "own-domain weight (test)", "target accuracy (test)", "component accuracy",
       "params"], _selection_rows(result))
  timings = table(["stage", "seconds"],
                  [[k, f"{v:.1f}"] for k, v in result["timings"].items()])
  return "\n\n".join([
      "# kamal_jax report", "## Summary", summary(result),
      "Accuracies are on the held-out test split; each network is scored on the test "
      "images of a part by argmax over that part's classes. The joint accuracy scores "
      "the joint rule on every test image of the target: the argmax over all the "
      "student's heads side by side (for the components, each head first normalised "
      "over its classes and its rest logit).",
      "## Teachers", teachers,
      "## What each part learns from",
      "The selection rule's mean weight per teacher on the part's stage-1 pool; the "
      "weight on teachers of each image's own domain; and the accuracy of the "
      "weighted teachers' logits (the regression target) on the part's test images.",
      components, *[f"![{Path(p).stem}]({p})" for p in plots],
      "## Timings", timings]) + "\n"


def _records(path: Path) -> dict[str, list[dict]]:
  """metrics.jsonl by stage, one record per step (a resumed run's repeat wins)."""
  stages: dict[str, dict[int, dict]] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      record = json.loads(line)
      stages.setdefault(record["stage"], {})[record["step"]] = record
  return {stage: [steps[s] for s in sorted(steps)] for stage, steps in stages.items()}


def plot(result: dict, workdir: Path) -> list[str]:
  """PNG plots beside report.md: loss curves, selection fractions over training,
  accuracies per part. Returns their file names."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  stages = _records(workdir / "metrics.jsonl")  # empty where nothing was trained here
  names = []
  if stages:
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage, records in stages.items():
      ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=stage)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="Training loss per stage")
    ax.legend()
    names.append(_save(fig, workdir, "loss.png"))

  selection = [(stage, key, records) for stage, records in stages.items()
               for key in records[-1] if key.endswith("selected_fraction")
               and len(records[-1][key]) > 1]
  if selection:
    fig, axes = plt.subplots(1, len(selection), figsize=(4 * len(selection), 3.5),
                             squeeze=False)
    for ax, (stage, key, records) in zip(axes[0], selection):
      for teacher in records[-1][key]:
        ax.plot([r["step"] for r in records], [r[key][teacher] for r in records],
                label=teacher)
      ax.set(xlabel="step", ylabel="selected fraction", ylim=(0, 1), title=stage)
      ax.legend()
    names.append(_save(fig, workdir, "selection.png"))

  parts = [c["name"] for c in result["components"]]
  teachers = {t["name"]: t for t in result["teachers"]}
  series: dict[str, list] = {}  # bar label -> value per part (None: absent)
  for i, c in enumerate(result["components"]):
    values = [(f"teacher {k + 1}", teachers[t]["accuracy_per_part"][c["name"]])
              for k, t in enumerate(c["teachers"])]
    values += [("component", c["accuracy"]),
               ("student", result["student"]["accuracy_per_part"][c["name"]])]
    for label, value in values:
      series.setdefault(label, [None] * len(parts))[i] = value
  series = {k: v for k, v in series.items() if any(x is not None for x in v)}
  lowest = min(x for v in series.values() for x in v if x is not None)
  fig, ax = plt.subplots(figsize=(6, 4))
  width = 0.8 / len(series)
  for j, (label, values) in enumerate(series.items()):
    shown = [(i, v) for i, v in enumerate(values) if v is not None]
    ax.bar([i + (j - (len(series) - 1) / 2) * width for i, _ in shown],
           [v for _, v in shown], width, label=label)
  ax.set(xticks=range(len(parts)), xticklabels=parts, ylabel="test accuracy",
         ylim=(max(0.0, lowest - 0.05), 1.0), title="Accuracy per part")
  ax.legend(fontsize="small")
  names.append(_save(fig, workdir, "accuracy.png"))
  return names


def _save(fig, workdir: Path, name: str) -> str:
  fig.tight_layout()
  fig.savefig(workdir / name, dpi=100)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return name


def write(result: dict, workdir: Path):
  files.write_atomic(workdir / "report.json", json.dumps(result, indent=2) + "\n")
  files.write_atomic(workdir / "report.md", markdown(result, plot(result, workdir)))
