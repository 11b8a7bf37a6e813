"""report.json, report.md, report.png (metric against latency and size) and the same numbers in
TensorBoard (`export/<variant>/...` scalars, the table as text, the plot as an image).

Every file is written to a temp name and renamed: a reader never sees half a report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.runs import RunLayout, read_record, replacing, write_atomically


def write_report(directory: Path, report: dict[str, Any]) -> None:
    layout = RunLayout(directory)
    write_atomically(layout.report, json.dumps(report, indent=2, default=str) + "\n")
    write_atomically(layout.report_markdown, markdown(report) + run_sections(directory))
    figure = plot(report)
    try:
        with replacing(layout.report_plot) as temp:
            figure.savefig(temp, dpi=110, format="png")
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


PRIMARY = ("acc", "f1", "r2", "mae")  # shown beside the monitor when the module logs them


RULES = {
    "upper_bound": "the upper end of its bootstrap 95% interval",
    "point": "its measured drop",
    "auto": "the upper end of its bootstrap 95% interval (its measured drop where it has none)",
}
OBJECTIVES = {
    "latency": "the candidate shown faster than the fp32 graph (the lower end of its speed-up's 95% "
    "interval above 1 at batch {batch}, and measured slower at no batch size), else fp32",
    "size": "the smallest file",
}


def markdown(report: dict[str, Any]) -> str:
    gate = report.get("gate") or report["monitor"]
    metric = gate["metric"]
    base = report["baseline"]
    primary = [name for name in PRIMARY if f"val/{name}" in base["val_metrics"] and f"val/{name}" != metric]
    test_metric = "test/" + metric.split("/", 1)[-1]
    columns = [metric, *(f"val/{n}" for n in primary), test_metric, *(f"test/{n}" for n in primary)]
    timings = report.get("timings_s") or {}
    lines = [
        *_introduction(report, gate),
        *_variant_table(report, columns),
        *_checks_and_notes(report),
        "",
        _how_measured(report),
        "",
        *([time_line(timings), ""] if timings else []),
        f"![trade-off]({RunLayout.REPORT_PLOT})",
        "",
    ]
    return "\n".join(lines)


def _introduction(report: dict[str, Any], gate: dict[str, Any]) -> list[str]:
    """The recipe, the budget and how it was judged, what shipped and why."""
    metric = gate["metric"]
    unit = report.get("metric_unit", "points")
    decision = report.get("decision", "point")
    objective = report.get("objective", "latency")
    batch = report.get("deciding_batch", "256")
    budget = f"{report['max_metric_drop']:g}" + (" points" if unit == "points" else "%")
    rows = next((v.get("val_rows") for v in report["variants"] if v.get("val_rows")), None)
    return [
        f"# Compression and export report: {Path(report['run']).name}",
        "",
        f"Recipe `{report['recipe']}`; a variant may lose at most {budget} of validation `{metric}` "
        f"(mode {gate['mode']}, {unit}{f', {rows} rows' if rows else ''}), judged by {RULES.get(decision, decision)} "
        f"(`compress.decision={decision}`)"
        + (
            f"; among those, auto ships {OBJECTIVES[objective].format(batch=batch)} "
            f"(`compress.objective={objective}`)"
            if report["recipe"] == "auto" and objective in OBJECTIVES
            else ""
        )
        + f". Shipped: **{report['shipped'] or 'nothing'}**"
        + (f" as `{report['model']}`" if report["shipped"] else "")
        + f": {report['reason']}.",
        "",
        "Only the validation split decides; the test split is measured once, for this report, and "
        "never chooses a variant, so the shipped model's test figures are an unbiased estimate.",
        "",
    ]


def _variant_table(report: dict[str, Any], columns: list[str]) -> list[str]:
    """One row for the torch baseline, one for each variant."""
    unit = report.get("metric_unit", "points")
    batch = report.get("deciding_batch", "256")
    base = report["baseline"]
    lines = [
        "| variant | precision | "
        + " | ".join(columns)
        + f" | val drop ({'points' if unit == 'points' else '%'}) | drop 95% CI | size (KB) | parameters | "
        f"latency b1 (us) [min, max] (runs) | latency b{batch} (us) [min, max] (runs) | "
        f"speed-up over fp32 graph b{batch} [95% CI] (rounds) | check |",
        "|---|---|" + "---|" * len(columns) + "---|---|---|---|---|---|---|---|",
        f"| {base['name']} (baseline) | fp32 | "
        + " | ".join(_cell(base, c) for c in columns)
        + f" | 0.00 | - | {base['size_bytes'] / 1024:.1f} | {base['params']} | "
        f"{_latency(base, '1')} | {_latency(base, batch)} | - | - |",
    ]
    for v in report["variants"]:
        interval = v.get("drop_ci95")
        lines.append(
            f"| {v['name']}{' (shipped)' if v['name'] == report['shipped'] else ''} | {v['precision']} | "
            + " | ".join(_cell(v, c) for c in columns)
            + f" | {v['val_drop']:.2f} | "
            + (f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "n/a")
            + f" | {v['size_bytes'] / 1024:.1f} | {v['params']} | {_latency(v, '1')} | "
            f"{_latency(v, batch)} | {_speedup(v, batch)} | {'passed' if v['passed'] else 'FAILED: ' + v['reason']} |"
        )
    return lines


def _checks_and_notes(report: dict[str, Any]) -> list[str]:
    """Why each variant did or did not ship, then every check and note, then int8's attempts."""
    from kiln.compression import int8_search

    lines = []
    verdicts = report.get("verdicts") or {}
    if verdicts:
        lines += ["", "Why each variant did or did not ship:", ""]
        lines += [f"- {sentence}" for sentence in verdicts.values()]
    lines += ["", "Checks and notes:", ""]
    for a in report.get("abandoned", []):  # given up on while compressing: never exported
        lines.append(f"- {a['name']}: abandoned: {a['abandoned']}")
    for v in report["variants"]:
        for note in [v["check"], *v["notes"]]:
            lines.append(f"- {v['name']}: {note}")
        if v.get("drop_ci95_reason"):
            lines.append(f"- {v['name']}: no bootstrap interval: {v['drop_ci95_reason']}")
        if v.get("exporter_fallback"):
            lines.append(f"- {v['name']}: exported by dynamo: {v['exporter_fallback']}")
    return lines + int8_search.report_lines(report)  # the CPU, and static int8's attempts, one row each


def _how_measured(report: dict[str, Any]) -> str:
    """The baseline, the drop, its interval, the latency rounds and the speed-up, in words."""
    unit = report.get("metric_unit", "points")
    return (
        f"Baseline: {report['baseline']['note']}. Drop: how much worse than the baseline on the validation split, in "
        f"{'points (hundredths) of a bounded score' if unit == 'points' else 'percent of the metric (a relative change)'}; "
        "its 95% interval comes from a paired bootstrap over the validation rows. Latency: "
        "onnxruntime, warm, median of the runs counted in the table, with the quickest and slowest run. "
        "Each candidate ran alternately with the fp32 graph (paired rounds, up to "
        f"{report['latency_repeats']} per batch size, at least 8, 6 of calls over 20 ms; no more once the "
        "speed-up's interval lies above or below 1, or 1 s has passed; a round of calls under 20 ms alternates "
        "them 3 times and keeps each one's quickest, so a call the scheduler interrupted does not count), "
        "and its speed-up is the median over the rounds of fp32's time / its time, with the 95% "
        "sign-test interval of that median; the runs column counts rounds, and fp32's latency pools "
        "its rounds of every pairing. torch eager (the baseline) was timed alone "
        "(up to the same number of runs, fewer once their middle half is within 10% or 0.3 s has passed). "
        "Size: the .onnx file. Exporter of each net: "
        f"{_exporters(report['variants'])}."
    )


def time_line(timings: dict[str, Any]) -> str:
    """Wall seconds of compression and export, and beside the training's fit when it is known."""
    compress, export = float(timings.get("compress_total", 0)), float(timings.get("export_total", 0))
    line = f"Time (wall): compression {compress:.1f} s, export {export:.1f} s"
    train = timings.get("train")
    if train:
        line += f", together {(compress + export) / train:.2f}x the training's fit ({train:.1f} s)"
    return line + f" (each part in {RunLayout.REPORT}, `timings_s`)."


def _exporters(variants: list[dict[str, Any]]) -> str:
    used = sorted({str(v.get("exporter")) for v in variants if v.get("exporter")})
    return ", ".join(used) or "not recorded"


def _cell(entry: dict[str, Any], column: str) -> str:
    metrics = entry["val_metrics"] if column.startswith("val/") else entry["test_metrics"]
    value = metrics.get(column)
    return "n/a" if value is None else f"{value:.4f}"


def _latency(entry: dict[str, Any], batch: str = "256") -> str:
    spread = (entry.get("latency_spread_us") or {}).get(batch)
    runs = (entry.get("latency_runs") or {}).get(batch)
    median = entry["latency_us"][batch]
    text = f"{median:.0f} [{spread[0]:.0f}, {spread[2]:.0f}]" if spread else f"{median:.0f}"
    return f"{text} ({runs})" if runs else text


def _speedup(entry: dict[str, Any], batch: str) -> str:
    speedup = (entry.get("speedup") or {}).get(batch)
    if not speedup:
        return "reference" if entry["name"] == "fp32" else "-"
    interval = speedup.get("ci95")
    bounds = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else " (no interval)"
    return f"{speedup['median']:.2f}x{bounds} ({speedup['rounds']} rounds)"


def run_sections(directory: Path) -> str:
    """What training recorded beside the test metrics (run.json): feature importance and metrics
    per group, as markdown sections after the compression table."""
    record = read_record(directory) if RunLayout(directory).record.is_file() else {}
    lines: list[str] = []
    importance = record.get("feature_importance") or []
    if importance:
        lines += [
            f"## Feature importance ({record.get('feature_importance_measure', '')} when a column is shuffled)",
            "",
            "| column | mean | std |",
            "|---|---|---|",
            *(f"| {row['feature']} | {row['mean']:.4f} | {row['std']:.4f} |" for row in importance),
            "",
        ]
    groups = record.get("group_metrics")
    if groups:
        names = list(groups["spread"])
        lines += [
            f"## Test metrics by {groups['column']}",
            "",
            f"| {groups['column']} | rows | " + " | ".join(names) + " |",
            "|" + "---|" * (len(names) + 2),
        ]
        for group, entry in groups["groups"].items():
            cells = [
                "n/a" if entry["metrics"].get(n) is None else f"{entry['metrics'][n]:.4f}" for n in names
            ]
            lines.append(f"| {group} | {entry['rows']} | " + " | ".join(cells) + " |")
        lines.append("| spread | | " + " | ".join(f"{groups['spread'][n]:.4f}" for n in names) + " |")
        flagged = groups.get("flagged") or []
        lines += [
            "",
            f"Spread above report.group_gap={groups['gap_threshold']}: {', '.join(flagged)}"
            if flagged
            else f"No metric differs across {groups['column']} by more than report.group_gap={groups['gap_threshold']}.",
            "",
        ]
    return "\n".join(lines)


def plot(report: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metric = (report.get("gate") or report["monitor"])["metric"]
    test_metric = "test/" + metric.split("/", 1)[-1]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    points = [(report["baseline"], "torch fp32 (baseline)")] + [(v, v["name"]) for v in report["variants"]]
    colors = plt.get_cmap("tab10")
    for index, (entry, label) in enumerate(points):
        color = colors(index % 10)
        value = entry["test_metrics"].get(test_metric)
        if value is None:
            continue
        marker = "*" if label == report["shipped"] else "o"
        size = 160 if label == report["shipped"] else 50
        left.scatter(entry["latency_us"]["256"], value, marker=marker, s=size, color=color)
        left.annotate(
            label, (entry["latency_us"]["256"], value), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
        if entry is not report["baseline"]:
            right.scatter(entry["size_bytes"] / 1024, value, marker=marker, s=size, color=color)
            right.annotate(
                label,
                (entry["size_bytes"] / 1024, value),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
    left.set_xscale("log")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("latency at batch 256 (us, log scale)")
    right.set_xlabel("ONNX file size (KB)")
    for axes in (left, right):
        axes.set_ylabel(test_metric)
        axes.grid(alpha=0.3)
    figure.suptitle(f"variants: {test_metric} against speed and size (star: shipped)")
    figure.tight_layout()
    return figure


def log_tensorboard(directory: Path, report: dict[str, Any]) -> None:
    """The report's numbers as scalars, its table as text and its plot as an image, in <run>/tensorboard."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(RunLayout(directory).tensorboard))
    try:
        entries = [("baseline_torch_fp32", report["baseline"])] + [(v["name"], v) for v in report["variants"]]
        for name, entry in entries:
            for key, value in {**entry["test_metrics"], **entry["val_metrics"]}.items():
                writer.add_scalar(f"export/{name}/{key}", value, 0)
            writer.add_scalar(f"export/{name}/size_kb", entry["size_bytes"] / 1024, 0)
            writer.add_scalar(f"export/{name}/parameters", entry["params"], 0)
            for batch, micros in entry["latency_us"].items():
                writer.add_scalar(f"export/{name}/latency_us_batch_{batch}", micros, 0)
        writer.add_text(
            "export/report", markdown(report).replace(f"![trade-off]({RunLayout.REPORT_PLOT})", ""), 0
        )
        writer.add_figure("export/trade_off", plot(report), 0)
    finally:
        writer.close()
