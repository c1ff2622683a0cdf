"""report.json (read by other tools), report.md and the one-screen summary."""
import json
from pathlib import Path


def _table(header: list[str], rows: list[list]) -> str:
  cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
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
  table = _table(["part", "classes", "teachers", "component", "student"], rows)
  params = sum(c["params"] for c in result["components"])
  return (f"{table}\n\nstudent joint accuracy {student['accuracy_joint']:.4f} "
          f"(least-ambiguous head: {student['accuracy_joint_least_ambiguous_head']:.4f}); "
          f"student {student['params']:,} params vs components {params:,}; "
          f"wall time {sum(result['timings'].values()):.1f} s")


def markdown(result: dict) -> str:
  teachers = _table(
      ["teacher", "classes", "accuracy on its parts", "params"],
      [[t["name"], " ".join(t["classes"]), t["accuracy"], t["params"]]
       for t in result["teachers"]])
  components = _table(
      ["component", "classes", "teachers", "selected fraction", "selected-teacher accuracy",
       "accuracy", "params"],
      [[c["name"], " ".join(c["classes"]), ", ".join(c["teachers"]),
        ", ".join(f"{t} {f:.3f}" for t, f in c["selected_fraction"].items()),
        c["selected_teacher_accuracy"], c["accuracy"], c["params"]]
       for c in result["components"]])
  timings = _table(["stage", "seconds"],
                   [[k, f"{v:.1f}"] for k, v in result["timings"].items()])
  return "\n\n".join([
      "# kamal_jax report", "## Summary", summary(result),
      "Accuracies are on the held-out test split; each network is scored on the test "
      "images of a part by argmax over that part's classes. The joint accuracy takes "
      "the argmax over all the student's heads on every test image of the target.",
      "## Teachers", teachers, "## Components (stage 1)", components,
      "## Timings", timings]) + "\n"


def write(result: dict, workdir: Path):
  (workdir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
  (workdir / "report.md").write_text(markdown(result))
