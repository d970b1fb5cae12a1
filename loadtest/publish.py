"""Turn a comparison into docs/results/loadtest-<trace>.md, its JSON and its plots."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from slimserve.loadtest.compare import series_for
from slimserve.loadtest.peers import PeerPolicy
from slimserve.models.schema import TABLE_FILE, read_table

TARGET_ATTAINMENT = 0.99


def _m(entry: dict[str, Any], metric: str) -> float:
    return float(entry[metric]["median"]) if entry.get(metric) else float("nan")


def _cell(entry: dict[str, Any], metric: str, scale: float = 100.0, digits: int = 1) -> str:
    value = entry.get(metric)
    if not value:
        return "-"
    return f"{scale * value['median']:.{digits}f} [{scale * value['min']:.{digits}f}-{scale * value['max']:.{digits}f}]"


def _machine(result: dict[str, Any]) -> str:
    """``2 cores`` (results recorded before the machine was ran on the 2-core one), and a GPU if inference ran on one."""
    machine = result.get("machine", {"cores": 2, "device": "cpu"})
    device = "" if machine["device"] == "cpu" else f", inference on {machine['device']}"
    return f"{machine['cores']} cores{device}"


def _generator(result: dict[str, Any]) -> str:
    """Where the generator ran and whether it kept its schedule (every report says so)."""
    config, machine = result["config"], result.get("machine", {})
    server, client = config.get("server_cpus"), config.get("client_cpus")
    if not client and config.get("generator") == "asyncio" and machine:
        own = machine["generator_process_cores"]
        client = own if len(own) < machine["cores"] else None

    def cores(chosen: list[int] | tuple[int, ...] | None) -> str:
        return ",".join(map(str, chosen)) if chosen else "all"

    pinning = (
        f"Servers pinned to cores {cores(server)}, the generator to {cores(client)}."
        if server or client
        else "Servers and generator not pinned (both on all cores)."
    )
    lags = [
        e["send_lag_p99_ms"]
        for by_rate in result["medians"].values()
        for e in by_rate.values()
        if "send_lag_p99_ms" in e
    ]
    behind = sum(e["generator_behind"] for by_rate in result["medians"].values() for e in by_rate.values())
    lag = f" Generator send lag p99: at most {max(lags):.1f} ms over all runs" if lags else ""
    flagged = (
        f"; {behind} (policy, rate) points had a run that fell behind (flagged below)."
        if behind
        else "; no run fell behind."
    )
    generator = (
        "Generator: a plain asyncio sender, a new connection per request. "
        if config.get("generator") == "asyncio"
        else "Generator: Locust (pooled keep-alive connections). "
    )
    return generator + pinning + (lag + flagged if lags else "")


def _resumed(result: dict[str, Any]) -> str:
    """Said when some runs came from an earlier start: they shared its moment of the machine, not this one's."""
    resumed = result.get("resumed_runs", 0)
    return f" ({resumed} of its runs made by an earlier start and resumed)" if resumed else ""


def _margin(result: dict[str, Any]) -> str:
    """The servers' safety margin and, when set, their number of HTTP front ends."""
    frontends = result["config"].get("frontends")
    return _margin_ms(result) + (f"; {frontends} HTTP front-end processes per slimserve server" if frontends else "")


def _oracle_column(result: dict[str, Any]) -> str:
    column = result.get("latency_column")
    return f"table latency ({column})" if column else "table latency (primary column)"


def _margin_ms(result: dict[str, Any]) -> str:
    if result["config"].get("safety_margin_ms") is not None:
        return f"{result['config']['safety_margin_ms']:g} ms"
    default = result.get("servers_safety_margin_ms")
    return "the server default" if default is None else f"the server default ({default:g} ms)"


def statics(policies: list[str]) -> list[str]:
    return [p for p in policies if p.startswith("static:") and "+" not in p]  # not a variant of one


def peers(policies: list[str]) -> list[str]:
    return [p for p in policies if PeerPolicy.parse(p) is not None]


def fixed(policies: list[str]) -> list[str]:
    """Every policy that serves one subnet whatever the load: slimserve's statics and the peers."""
    return statics(policies) + peers(policies)


def capacity_of(medians: dict[str, Any], policy: str, rates: list[float], key: dict[float, str]) -> float:
    """The highest rate run up to which ``policy`` kept >= 99% attainment at every rate run (0 if
    none). A point where the generator fell behind its schedule is no evidence: it sent less."""
    capacity = 0.0
    for rate in rates:
        entry = medians[policy][key[rate]]
        if _m(entry, "slo_attainment") < TARGET_ATTAINMENT or entry.get("generator_behind", False):
            break
        capacity = rate
    return capacity


def rates_run(result: dict[str, Any]) -> list[str]:
    """The rate keys of a comparison (every policy ran the same ones), lowest first."""
    return sorted(result["medians"][result["policies"][0]], key=float)


@dataclass(frozen=True)
class Verdict:
    """One of the issue's targets checked on a comparison's medians: the data, not the sentence.

    ``status`` is "met", "missed", "not evaluable" or "reported" (a figure with no pass/fail);
    ``figures`` holds what :func:`render` needs, so tests can check the numbers themselves.
    """

    target: str  # "no adaptive", "light load", "never dominated", "margin", "capacity ratio", "efficiency"
    status: str
    figures: dict[str, Any] = field(default_factory=dict)


def efficiency(result: dict[str, Any]) -> list[Verdict]:
    """Each peer against slimserve serving the same row statically: 99% capacity among the rates
    run, and client-measured p50 at the lightest rate (no higher is met)."""
    medians = result["medians"]
    key = {float(k): k for k in rates_run(result)}
    rates = sorted(key)
    verdicts = []
    for policy in peers(result["policies"]):
        peer = PeerPolicy.parse(policy)
        assert peer is not None
        ours = f"static:{peer.subnet}"
        if ours not in medians:
            verdicts.append(Verdict("efficiency", "not evaluable", {"peer": policy, "ours": ours}))
            continue
        figures: dict[str, Any] = {
            "peer": policy,
            "ours": ours,
            "rate": rates[0],
            "peer_capacity": capacity_of(medians, policy, rates, key),
            "our_capacity": capacity_of(medians, ours, rates, key),
            "peer_p50": _m(medians[policy][key[rates[0]]], "p50_ms"),
            "our_p50": _m(medians[ours][key[rates[0]]], "p50_ms"),
        }
        if not figures["our_capacity"] and not figures["peer_capacity"]:
            # Neither kept 99% at any rate run: capacity is not compared, only the p50 is.
            status = "capacity not evaluable"
        else:
            status = "met" if figures["our_capacity"] >= figures["peer_capacity"] else "missed"
        if figures["our_p50"] > figures["peer_p50"]:
            status = "missed"
        verdicts.append(Verdict("efficiency", status, figures))
    return verdicts


def evaluate(result: dict[str, Any], accuracies: Sequence[float]) -> list[Verdict]:
    """The targets, checked on the medians; ``accuracies`` are the table's, row by row."""
    medians = result["medians"]
    if "adaptive" not in medians:
        return [Verdict("no adaptive", "not evaluable"), *efficiency(result)]
    key = {float(k): k for k in rates_run(result)}
    rates = sorted(key)
    spread = max(accuracies) - min(accuracies)
    static_policies = statics(result["policies"])
    fixed_policies = fixed(result["policies"])
    verdicts = []
    light = medians["adaptive"][key[rates[0]]]
    gap = 100 * (_m(light, "oracle_expected_accuracy") - _m(light, "expected_effective_accuracy"))
    attain = _m(light, "slo_attainment")
    verdicts.append(
        Verdict(
            "light load",
            "met" if gap <= 0.5 and attain >= TARGET_ATTAINMENT else "missed",
            {"rate": rates[0], "gap_points": gap, "attainment": attain},
        )
    )
    smallest = static_policies[0] if static_policies else None
    if smallest:
        capacity = [r for r in rates if _m(medians[smallest][key[r]], "slo_attainment") >= TARGET_ATTAINMENT]

        def dominated(metric: str) -> list[str]:
            found = []
            for rate in capacity:
                adaptive = medians["adaptive"][key[rate]]
                if _m(adaptive, "slo_attainment") < TARGET_ATTAINMENT:
                    found.append(f"{rate:g} req/s (attainment {100 * _m(adaptive, 'slo_attainment'):.1f}%)")
                    continue
                for policy in fixed_policies:
                    other = medians[policy][key[rate]]
                    if _m(other, "slo_attainment") >= TARGET_ATTAINMENT and _m(other, metric) > _m(adaptive, metric):
                        found.append(f"{rate:g} req/s by {policy}")
            return found

        if not capacity:
            verdicts.append(Verdict("never dominated", "not evaluable", {"smallest": smallest}))
        else:
            effective, expected = dominated("effective_accuracy"), dominated("expected_effective_accuracy")
            verdicts.append(
                Verdict(
                    "never dominated",
                    "missed" if effective or expected else "met",
                    {"smallest": smallest, "capacity": max(capacity), "effective": effective, "expected": expected},
                )
            )
    for rate in rates if fixed_policies else []:  # adaptive and its variants alone: nothing to beat
        margins = {}
        for metric in ("effective_accuracy", "expected_effective_accuracy"):
            best_static = max((_m(medians[p][key[rate]], metric), p) for p in fixed_policies)
            margins[metric] = (100 * (_m(medians["adaptive"][key[rate]], metric) - best_static[0]), best_static[1])
        verdicts.append(Verdict("margin", "reported", {"rate": rate, "margins": margins, "spread": spread}))
    largest = static_policies[-1] if static_policies else None
    if largest:
        adaptive_capacity = capacity_of(medians, "adaptive", rates, key)
        largest_capacity = capacity_of(medians, largest, rates, key)
        figures = {"largest": largest, "adaptive_capacity": adaptive_capacity, "largest_capacity": largest_capacity}
        if not largest_capacity:
            # Static-largest met 99% at no rate run: the ratio is unbounded from these rates, not measured.
            verdicts.append(Verdict("capacity ratio", "not evaluable", figures))
        else:
            ratio = adaptive_capacity / largest_capacity
            verdicts.append(Verdict("capacity ratio", "met" if ratio >= 3 else "missed", {**figures, "ratio": ratio}))
    return verdicts + efficiency(result)


def render(verdict: Verdict) -> str:
    """A verdict as the report's bullet line."""
    f, status = verdict.figures, verdict.status
    if verdict.target == "no adaptive":
        return "- The targets compare adaptive with the other policies; this run did not include it."
    if verdict.target == "efficiency":
        if status == "not evaluable":
            return f"- {f['peer']} against {f['ours']}: **not evaluable: {f['ours']} was not in this comparison**."

        def rate(value: float) -> str:
            return f"{value:g} req/s" if value else "none of the rates run"

        return (f"- Efficiency, {f['ours']} vs {f['peer']} (same row): 99% capacity {rate(f['our_capacity'])} vs "
                f"{rate(f['peer_capacity'])}; p50 at {f['rate']:g} req/s {f['our_p50']:.2f} vs {f['peer_p50']:.2f} ms "
                f"(target: capacity no lower, p50 no higher): **{status}**"
                + (" (neither kept 99% at a rate run; p50 no higher)." if status == "capacity not evaluable" else "."))  # fmt: skip
    if verdict.target == "light load":
        return (f"- Light load ({f['rate']:g} req/s): adaptive is {f['gap_points']:.2f} points below the oracle bound (target <= 0.5) "
                f"with {100 * f['attainment']:.1f}% attainment (target >= 99%): **{status}**.")  # fmt: skip
    if verdict.target == "never dominated":
        if status == "not evaluable":
            return (f"- Up to static-smallest's ({f['smallest']}) 99% capacity, adaptive is never dominated: "
                    "**not evaluable: static-smallest kept >= 99% at none of the rates run**.")  # fmt: skip

        def found(places: list[str]) -> str:
            return "met" if not places else "missed at " + "; ".join(places)

        return (f"- Up to static-smallest's ({f['smallest']}) 99% capacity ({f['capacity']:g} req/s among the rates run), adaptive "
                f"keeps >= 99% and is never out-accurate by a static policy that does: **{found(f['effective'])}**; "
                "on expected effective accuracy (the table accuracy of the subnet that served each in-budget request, free of "
                f"which test images happened to be classified right): **{found(f['expected'])}**.")  # fmt: skip
    if verdict.target == "margin":
        parts = [
            f"{label} accuracy {margin:+.2f} points vs the best static ({policy}), "
            f"= {margin / (100 * f['spread']):.0%} of the table's accuracy spread"
            for label, (margin, policy) in zip(("effective", "expected effective"), f["margins"].values(), strict=True)
        ]
        return f"- {f['rate']:g} req/s: adaptive {parts[0]}; {parts[1]} ({100 * f['spread']:.2f} points)."
    if status == "not evaluable" or "ratio" not in f:
        verdict_text = (
            "not evaluable: run a rate at which static-largest keeps >= 99%"
            if not f["adaptive_capacity"]
            else (
                f"adaptive held >= 99% up to {f['adaptive_capacity']:g} req/s where static-largest held it at no rate run; "
                "run lower rates for a ratio"
            )
        )
        return (f"- Highest rate run with >= 99% attainment: adaptive {f['adaptive_capacity']:g} req/s, "
                f"static-largest ({f['largest']}) none (target ratio >= 3x): **{verdict_text}**.")  # fmt: skip
    return (f"- Highest rate run with >= 99% attainment: adaptive {f['adaptive_capacity']:g} req/s, static-largest "
            f"({f['largest']}) {f['largest_capacity']:g} req/s: ratio {f['ratio']:.1f}x (target >= 3x): **{status}**.")  # fmt: skip


def targets(result: dict[str, Any], accuracies: Sequence[float]) -> list[str]:
    """The report's target lines: :func:`evaluate`, rendered."""
    return [render(verdict) for verdict in evaluate(result, accuracies)]


def markdown(result: dict[str, Any], accuracies: Sequence[float], command: str, name: str) -> str:
    config = result["config"]
    lines = [
        f"# Load test: {config['trace']} arrivals on {Path(config['bundle']).name}",
        "",
        f"Made by `{command}` in {result['minutes']:.0f} minutes{_resumed(result)}. Open-loop load from the server's own machine ({_machine(result)}); "
        f"{config['duration']:.0f} s per run, {config['repeats']} interleaved repeats per point (median [min-max]); "
        f"budget mix {result['budget_mix']} (percent:ms); measured server overhead {result['server_overhead_ms']:.2f} ms; "
        f"servers' safety margin {_margin(result)}. {_generator(result)}",
        "Percentages: SLO attainment, effective accuracy (correct and in budget / sent), expected effective accuracy "
        "(table accuracy of the subnet used, when in budget / sent; compare it with the oracle), served accuracy. "
        f"Oracle: per request the most accurate row whose {_oracle_column(result)} batch-1 p50 plus the measured "
        "overhead fits its budget, at no load.",
        "",
        "## Targets",
        "",
        *targets(result, accuracies),
        "",
        f"![attainment vs effective accuracy]({name}-tradeoff.png)",
        f"![rate sweep]({name}-sweep.png)",
        f"![time series]({name}-timeseries.png)",
        "",
    ]
    for rate in rates_run(result):
        lines += [
            f"## {float(rate):g} req/s",
            "",
            "| policy | attainment % | effective acc % | expected eff. acc % | oracle % | served acc % | p50 ms | p99 ms | goodput/s | shed % | mean width | client CPU % |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for policy in result["policies"]:
            entry = result["medians"][policy][rate]
            flag = " (generator behind)" if entry["generator_behind"] else ""
            p99 = entry["p99_ms"]
            lines.append(
                f"| {policy}{flag} | {_cell(entry, 'slo_attainment')} | {_cell(entry, 'effective_accuracy', digits=2)} | "
                f"{_cell(entry, 'expected_effective_accuracy', digits=2)} | {_cell(entry, 'oracle_expected_accuracy', digits=2)} | "
                f"{_cell(entry, 'served_accuracy', digits=2)} | {entry['p50_ms']['median']:.1f} | {p99['median']:.1f} | "
                f"{_cell(entry, 'goodput_per_s', 1.0)} | {_cell(entry, 'shed_rate')} | {_cell(entry, 'mean_width', 1.0, 3)} | "
                f"{_cell(entry, 'client_cpu_percent', 1.0, 0)} |"
                if p99
                else f"| {policy}{flag} | - | - | - | - | - | - | - | - | - | - | - |"
            )
        lines += ["", *paired_table(result, rate), *late_table(result, rate)]
    return "\n".join(lines)


@dataclass(frozen=True)
class Paired:
    """One policy minus another over the repeats of one rate, repeat by repeat, in points."""

    median: float
    low: float
    high: float
    ahead: int  # repeats in which the first policy was ahead
    count: int


def paired(ours: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]], metric: str) -> Paired:
    """``ours`` minus ``theirs`` on ``metric``, repeat k against repeat k. A repeat's runs had the same
    arrivals and budgets (the workload's seed is the comparison's plus the repeat) and ran back to
    back, so each difference is freer of the machine's drift and the trace's luck than a difference
    of two medians, each over its own repeats."""
    differences = [100 * (a[metric] - b[metric]) for a, b in zip(ours, theirs, strict=True)]
    return Paired(
        statistics.median(differences), min(differences), max(differences), sum(d > 0 for d in differences),
        len(differences),
    )  # fmt: skip


def paired_table(result: dict[str, Any], rate: str) -> list[str]:
    """Adaptive against every other policy at ``rate``, repeat by repeat."""
    runs = result["results"]
    others = [p for p in result["policies"] if p != "adaptive"]
    if "adaptive" not in runs or not others:
        return []
    lines = [
        "Adaptive minus each policy, repeat by repeat (a repeat's runs served the same arrivals back to back): "
        "median [min-max] of the differences in points, and the repeats in which adaptive was ahead.",
        "",
        "| adaptive minus | expected eff. acc | attainment | adaptive ahead (expected eff. acc) |",
        "|---|---|---|---|",
    ]
    for policy in others:
        accuracy = paired(runs["adaptive"][rate], runs[policy][rate], "expected_effective_accuracy")
        attainment = paired(runs["adaptive"][rate], runs[policy][rate], "slo_attainment")
        lines.append(
            f"| {policy} | {accuracy.median:+.2f} [{accuracy.low:+.2f} to {accuracy.high:+.2f}] | "
            f"{attainment.median:+.1f} [{attainment.low:+.1f} to {attainment.high:+.1f}] | "
            f"{accuracy.ahead} of {accuracy.count} |"
        )
    return [*lines, ""]


def _milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def late_table(result: dict[str, Any], rate: str) -> list[str]:
    """Where the late answers' time went, per policy (nothing when no run had a late answer with
    the server's timing: a peer's answers do not carry it)."""
    rows = []
    for policy in result["policies"]:
        entry = result["medians"][policy][rate]
        late = entry.get("late")
        if not late or not late["count"] or late["outside_server_ms"] is None:
            continue
        ms = _milliseconds
        rows.append(
            f"| {policy} | {late['count']} | {ms(late['latency_ms'])} | {ms(late['outside_server_ms'])} "
            f"({ms(entry.get('outside_server_ms_p50'))}) | {ms(late['preprocess_ms'])} | {ms(late['queue_ms'])} | "
            f"{ms(late['inference_ms'])} | {ms(late.get('server_other_ms'))} |"
        )
    if not rows:
        return []
    return [
        "Answers after their budget, where their time went (count over all repeats; each part the median over "
        "the repeats of its own median, so the parts do not add up). Outside the server: end to end minus the "
        "server's own total, i.e. client, network and the wait before the server stamped the request, which no "
        "policy can see (in brackets, the same for every answer). Rest: the server's total less its front end, "
        "queue and inference (a paused batch, the answer's way back).",
        "",
        "| policy | late | end to end ms | outside the server ms | front end ms | queued ms | inference ms | rest ms |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def plots(result: dict[str, Any], out_dir: Path, name: str) -> None:
    medians = result["medians"]
    policies = result["policies"]
    colors: dict[str, Any] = {
        p: plt.get_cmap("viridis")(i / max(1, len(statics(policies)) - 1)) for i, p in enumerate(statics(policies))
    }
    colors.update({"adaptive": "tab:red", "largest-that-fits": "tab:orange"})
    palettes = {"litserve": ["tab:blue", "tab:cyan", "tab:purple"], "ray": ["tab:green", "tab:olive", "tab:brown"]}
    for policy in peers(policies):
        palette = palettes[policy.partition(":")[0]]
        colors[policy] = palette.pop(0) if len(palette) > 1 else palette[0]
    variants = iter(["tab:pink", "tab:gray", "tab:brown", "black"] * len(policies))
    for policy in policies:
        colors.setdefault(policy, next(variants))  # a variant (adaptive+no-pause-batches) and anything new
    rates = rates_run(result)

    figure, axis = plt.subplots(figsize=(7, 5))
    for policy in policies:
        xs = [100 * _m(medians[policy][r], "slo_attainment") for r in rates]
        ys = [100 * _m(medians[policy][r], "effective_accuracy") for r in rates]
        style = "o-" if policy == "adaptive" else "s:" if PeerPolicy.parse(policy) else ".--"
        axis.plot(xs, ys, style, color=colors[policy], label=policy, alpha=0.9)
        for x, y, r in zip(xs, ys, rates, strict=True):
            axis.annotate(f"{float(r):g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel("SLO attainment (%)")
    axis.set_ylabel("effective accuracy (%)")
    axis.set_title("Each point: one policy at one rate (req/s labels)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / f"{name}-tradeoff.png", dpi=120)
    plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy in policies:
        xs = [float(r) for r in rates]
        left.plot(
            xs,
            [100 * _m(medians[policy][r], "slo_attainment") for r in rates],
            "o-",
            color=colors[policy],
            label=policy,
        )
        right.plot(
            xs,
            [100 * _m(medians[policy][r], "effective_accuracy") for r in rates],
            "o-",
            color=colors[policy],
            label=policy,
        )
    for axis, label in ((left, "SLO attainment (%)"), (right, "effective accuracy (%)")):
        axis.set_xscale("log")
        axis.set_xlabel("offered rate (req/s)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3, which="both")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / f"{name}-sweep.png", dpi=120)
    plt.close(figure)

    rate = rates[-1]
    shown = [p for p in ("adaptive", *statics(policies)[:1], *statics(policies)[-1:]) if p in policies]
    shown = list(dict.fromkeys(shown))  # one static policy is both the first and the last
    figure, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    duration = float(result["config"]["duration"])
    for policy in shown:
        series = series_for(result, policy, rate, duration)
        seconds = list(range(len(series["rate"])))
        if policy == shown[0]:
            axes[0].plot(seconds, series["rate"], color="0.3")
        axes[1].plot(seconds, series["p99_ms"], color=colors[policy], label=policy)
        axes[2].plot(seconds, series["mean_width"], color=colors[policy], label=policy)
    axes[0].set_ylabel("offered req/s")
    axes[1].set_ylabel("p99 latency (ms)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("mean width served")
    axes[2].set_xlabel(f"second of the run ({float(rate):g} req/s mean, first repeat)")
    axes[1].legend(fontsize=7)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_dir / f"{name}-timeseries.png", dpi=120)
    plt.close(figure)


def publish(result: dict[str, Any], command: str) -> Path:
    config = result["config"]
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"loadtest-{config['trace']}"
    accuracies = [row.accuracy for row in read_table(Path(config["bundle"]) / TABLE_FILE).subnets]
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plots(result, out_dir, name)
    page = out_dir / f"{name}.md"
    page.write_text(markdown(result, accuracies, command, name))
    return page
