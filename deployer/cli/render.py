"""Tables for the terminal (rich): estimates, plans and per-GPU fill.

Every value that comes from the input (model ids, node and GPU names, reasons quoting them) goes
into the tables as plain `Text` with control characters escaped: never read as Rich markup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from deployer.config.cluster import Cluster
from deployer.config.units import GIB, MIB
from deployer.errors import printable
from deployer.planning.drift import Drift
from deployer.planning.estimate import MemoryEstimate
from deployer.planning.model_load import ModelLoad
from deployer.planning.placement import DeviceFill, Plan
from deployer.planning.plan_diff import DISRUPTIVE, ModelChange
from deployer.planning.serve_config import APP_NAME

if TYPE_CHECKING:
    from deployer.serving.launch import ModelStatus


def _text(value: str | None) -> Text:
    """A table cell holding input data: plain text, control characters escaped."""
    return Text("-" if value is None else printable(value))


def _utc(seconds: float) -> str:
    """A Unix time as the event log writes its times: ISO 8601, UTC, whole seconds."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def estimates_table(estimates: Sequence[MemoryEstimate]) -> Table:
    """One row per model: weights, KV cache and overhead per GPU, and the total."""
    table = Table(title="Memory per GPU (GiB)", title_justify="left")
    for column in ("model", "tp", "weights", "KV/token", "KV tokens", "KV", "overhead", "total"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_column("weights from")
    for e in estimates:
        per_token = e.kv_cache_bytes_per_token_per_gpu
        table.add_row(
            _text(e.model_id),
            str(e.tensor_parallel_size),
            _gib(e.weights_bytes_per_gpu),
            "-" if per_token is None else f"{per_token / 1024:.1f} KiB",
            "-" if e.kv_cache_tokens is None else f"{e.kv_cache_tokens:,}",
            _gib(e.kv_cache_bytes_per_gpu),
            _gib(e.overhead_bytes_per_gpu),
            _gib(e.total_bytes_per_gpu),
            _text(e.weights_from),
        )
    return table


def cluster_table(cluster: Cluster) -> Table:
    """One row per GPU (or CPU node): what the probe found."""
    table = Table(title="Cluster", title_justify="left")
    for column in ("node", "ip", "GPU", "name", "total GiB", "free GiB", "driver"):
        table.add_column(column, justify="right" if "GiB" in column else "left")
    for node in cluster.nodes:
        if node.is_cpu_node:
            memory = (node.cpu_memory_mib or 0) * MIB
            table.add_row(_text(node.name), _text(node.ip), "-", "CPU", "-", _gib(memory), "-")
        for gpu in node.gpus:
            table.add_row(
                _text(node.name),
                _text(node.ip),
                str(gpu.index),
                _text(gpu.name),
                _gib(gpu.memory_total_mib * MIB),
                _gib(gpu.memory_free_mib * MIB),
                _text(node.driver_version),
            )
    return table


def plan_table(plan: Plan) -> Table:
    """One row per placement, in launch order."""
    table = Table(title="Plan (launch order)", title_justify="left")
    table.add_column("model")
    table.add_column("node")
    if plan.device == "gpu":
        for column in ("GPUs", "GiB/GPU", "fraction", "gpu_mem_util", "extra KV GiB"):
            table.add_column(column, justify="right")
    else:
        for column in ("GiB", "KV cache MiB"):
            table.add_column(column, justify="right")
    for p in plan.placements:
        if plan.device == "gpu":
            table.add_row(
                _text(p.model_id),
                _text(p.node),
                ",".join(map(str, p.gpus)),
                _gib(p.gpu_memory_bytes),
                f"{p.gpu_fraction:.4f}" if p.gpu_fraction is not None else "-",
                f"{p.gpu_memory_utilization:.4f}" if p.gpu_memory_utilization is not None else "-",
                _gib(p.extra_kv_bytes),
            )
        else:
            table.add_row(
                _text(p.model_id),
                _text(p.node),
                _gib(p.gpu_memory_bytes),
                _gib(p.kv_cache_memory_bytes),
            )
    return table


def fill_table(plan: Plan) -> Table:
    """How full each device is; unused devices are summed in the caption."""
    unit = "GPU" if plan.device == "gpu" else "CPU node"
    table = Table(title=f"{unit} fill", title_justify="left")
    for column in ("node", unit, "booked GiB", "usable GiB", "fill", "models"):
        table.add_column(column, justify="right" if "GiB" in column or column == "fill" else "left")
    idle = 0
    for fill in plan.fills:
        if not fill.tenants:
            idle += 1
            continue
        share = fill.booked_bytes / fill.usable_bytes if fill.usable_bytes else 0.0
        table.add_row(
            _text(fill.node),
            "-" if fill.index is None else str(fill.index),
            _gib(fill.booked_bytes),
            _gib(fill.usable_bytes),
            f"{share:.0%}",
            _text(", ".join(fill.tenants)),
        )
    table.caption = (
        f"{plan.gpus_used} {unit}(s) used on {plan.nodes_used} node(s); {idle} left free"
        + ("; optimal (proven)" if plan.proven_optimal else "")
    )
    return table


FULL_TABLE_ROWS = 48
"""Above this many placements, `print_plan` shows one line per node unless asked for full tables."""


def node_summary_lines(plan: Plan) -> list[str]:
    """One plain line per node in use: devices used, models, booked and usable memory.

    Plain text, not a Rich table: at rack scale (thousands of rows) Rich's layout takes seconds.
    """
    per_node: dict[str, list[DeviceFill]] = {}
    for fill in plan.fills:
        per_node.setdefault(fill.node, []).append(fill)
    unit = "GPUs" if plan.device == "gpu" else "CPU"
    rows = [("node", f"{unit} used", "models", "booked GiB", "usable GiB", "fill")]
    for node, fills in per_node.items():
        used = [f for f in fills if f.tenants]
        if not used:
            continue
        booked = sum(f.booked_bytes for f in used)
        usable = sum(f.usable_bytes for f in fills)
        models = len({t for f in used for t in f.tenants})
        rows.append(
            (
                printable(node),
                f"{len(used)}/{len(fills)}",
                str(models),
                f"{booked / GIB:.1f}",
                f"{usable / GIB:.1f}",
                f"{booked / usable:.0%}" if usable else "-",
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(width) if k == 0 else cell.rjust(width)
            for k, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]


def print_plan(console: Console, plan: Plan, full: bool = False) -> None:
    """The plan, the fill summary and the models left out.

    Above FULL_TABLE_ROWS placements, one line per node instead of the two tables, unless `full`.
    """
    if full or len(plan.placements) <= FULL_TABLE_ROWS:
        console.print(plan_table(plan))
        console.print(fill_table(plan))
    else:
        console.print(
            f"Plan by node ({len(plan.placements)} placements; --full lists each model and GPU)",
            markup=False,
            highlight=False,
        )
        console.file.write("\n".join(node_summary_lines(plan)) + "\n")
        unit = "GPU" if plan.device == "gpu" else "CPU node"
        console.print(
            f"{plan.gpus_used} {unit}(s) used on {plan.nodes_used} node(s)"
            + ("; optimal (proven)" if plan.proven_optimal else ""),
            markup=False,
            highlight=False,
        )
    for u in plan.unplaced:
        console.print(
            Text.assemble(
                ("not placed", "bold red"), f" {printable(u.model_id)}: {printable(u.reason)}"
            ),
            soft_wrap=True,
        )


ACTION_STYLES = {"keep": "green", "start": "cyan", "unplaced": "yellow"}


def diff_table(changes: Sequence[ModelChange]) -> Table:
    """`deploy --diff`: per model what the deploy does to it, from where to where, and why."""
    table = Table(title="What this deploy does", title_justify="left")
    for column in ("model", "action", "from", "to", "why"):
        table.add_column(column)
    for c in changes:
        style = "bold red" if c.action in DISRUPTIVE else ACTION_STYLES.get(c.action, "")
        table.add_row(
            _text(c.model_id),
            Text(c.action, style=style),
            _text(c.before or "-"),
            _text(c.after or "-"),
            _text(c.why),
        )
    return table


def memory_cells(drifts: Sequence[Drift]) -> tuple[str, str, Text]:
    """One model's memory over its devices: booked and used GiB, and the drift check's flag.

    Used is "-" unless every device was measured; the flag is "over booking" when any device is
    over, else "wasted" when any is far under, "ok" when all are within, else "-".
    """
    if not drifts:
        return "-", "-", Text("-")
    used = [d.used_bytes for d in drifts if d.used_bytes is not None]
    verdicts = {d.verdict for d in drifts}
    if "over" in verdicts:
        flag = Text("over booking", style="bold red")
    elif "under" in verdicts:
        flag = Text("wasted", style="yellow")
    else:
        flag = Text("ok" if verdicts == {"ok"} else "-")
    return (
        _gib(sum(d.booked_bytes for d in drifts)),
        _gib(sum(used)) if len(used) == len(drifts) else "-",
        flag,
    )


def status_table(statuses: Sequence[ModelStatus], drifts: Sequence[Drift] = ()) -> Table:
    """`rackserve status`: one row per deployed model, with its memory booked and used (GiB)."""
    table = Table(title=f"Application {APP_NAME!r} (memory in GiB)", title_justify="left")
    columns = ("model", "node", "GPUs", "state", "healthy", "since", "restarts")
    for column in (*columns, "booked", "used", "memory", "message"):
        figure = column in ("restarts", "booked", "used")
        table.add_column(column, justify="right" if figure else "left")
    for s in statuses:
        table.add_row(
            _text(s.model_id),
            _text(s.node),
            ",".join(map(str, s.gpus)) or "-",
            s.state,
            "yes" if s.healthy else Text("no", style="bold red"),
            "-" if s.since is None else _utc(s.since),
            str(s.restarts),
            *memory_cells([d for d in drifts if d.model_id == s.model_id]),
            _text(s.message),
        )
    return table


def events_table(events: Sequence[Mapping[str, Any]]) -> Table:
    """The state directory's last events, oldest first: when, what, and its details."""
    table = Table(title="Last events", title_justify="left")
    for column in ("at", "event", "details"):
        table.add_column(column)
    for event in events:
        details = ", ".join(
            f"{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}"
            for key, value in event.items()
            if key not in ("at", "event") and value not in ([], None, "")
        )
        table.add_row(
            _text(str(event.get("at", "?"))),
            _text(str(event.get("event", "?"))),
            _text(details or "-"),
        )
    return table


def plain_lines(console: Console) -> Callable[[str], None]:
    """Print each line as plain text: ids and messages in it are never read as markup."""
    return lambda line: console.print(Text(printable(line)))


def _figure(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def top_rows(
    statuses: Sequence[ModelStatus], loads: Mapping[str, ModelLoad]
) -> list[dict[str, Any]]:
    """`rackserve top`: per deployed model, where and how it runs, and its load.

    A model whose engine reports no figures has None for each.
    """
    figures = [f.name for f in dataclasses.fields(ModelLoad) if f.name != "model_id"]
    rows = []
    for status in statuses:
        load = loads.get(status.model_id)
        row: dict[str, Any] = {
            "model_id": status.model_id,
            "node": status.node,
            "state": status.state,
            "healthy": status.healthy,
        }
        row.update({name: getattr(load, name) if load else None for name in figures})
        rows.append(row)
    return rows


def top_table(rows: Sequence[Mapping[str, Any]], seconds: float) -> Table:
    """`rackserve top`'s table: rates over the last `seconds`."""
    table = Table(
        title=f"rackserve top: rates over {seconds:.0f} s, TTFT of the requests in it",
        title_justify="left",
    )
    columns = ("model", "node", "state", "requests", "req/s", "tokens/s", "TTFT p50 ms",
               "TTFT p95 ms", "running", "waiting", "KV %")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:3] else "right")
    for row in rows:
        table.add_row(
            _text(row["model_id"]),
            _text(row["node"]),
            row["state"] if row["healthy"] else Text(row["state"], style="bold red"),
            _figure(row["requests"], 0),
            _figure(row["requests_per_s"], 2),
            _figure(row["tokens_per_s"], 1),
            _figure(row["ttft_p50_s"], 0, 1000.0),
            _figure(row["ttft_p95_s"], 0, 1000.0),
            _figure(row["running"], 0),
            _figure(row["waiting"], 0),
            _figure(row["kv_cache_percent"], 1),
        )
    return table
