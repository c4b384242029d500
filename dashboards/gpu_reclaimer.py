"""The Grafana dashboard, as code (grafana-foundation-sdk). `python3 scripts/generate_monitoring.py` writes
dashboards/gpu-reclaimer.json from it; tests/test_dashboard.py fails when the two differ, and tests/test_prometheus.py
evaluates every query against a real Prometheus.

Conventions (dcgm-exporter's dashboard): a `${datasource}` variable, the GPU node in the label `Hostname` (the scrape
configs copy the pod's node name into it, as dcgm-exporter names it) and `gpu` for the GPU index; variables for node, namespace,
gateway and user; a $/GPU-hour variable for cost. Allocation held idle (a GPU nobody else can be scheduled on) and
memory held idle (an idle kernel's VRAM; the pod may keep the allocation) are shown apart.
"""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders import bargauge, common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as model

UID = "gpu-reclaimer"
DS = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
DEFAULT_COST_PER_GPU_HOUR = "2.50"

# Filters every query carries: the node everywhere, the kernel's labels where kernels are joined.
NODE = 'Hostname=~"$node"'
KERNEL = 'Hostname=~"$node", namespace=~"$namespace", gateway=~"$gateway", user=~"$user"'
NS = 'Hostname=~"$node", namespace=~"$namespace"'


def query(expr: str, legend: str, ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)
    return q.instant() if instant else q.range()


def last_value() -> common.ReduceDataOptions:
    return common.ReduceDataOptions().calcs(["lastNotNull"]).values(False).fields("")


def grid(x: int, y: int, w: int, h: int) -> model.GridPos:
    return model.GridPos(x=x, y=y, w=w, h=h)


def held_by(label: str) -> str:
    """GPU-hours the selected kernels held idle, by a kernel_info label, over the selected range."""
    return (f"sort_desc(sum by ({label}) (sum_over_time((reclaimer_kernel_gpus_held_idle * on(instance, kernel_id) "
            f"group_left({label}) reclaimer_kernel_info{{{KERNEL}}})[$__range:$__interval])) * $__interval_ms / 3600000)")


def bars(title: str, description: str, *queries: prometheus.Dataquery, unit: str = "h",
         pos: model.GridPos) -> bargauge.Panel:
    p = (bargauge.Panel().title(title).description(description).datasource(DS).unit(unit).grid_pos(pos)
         .orientation(common_model.VizOrientation.HORIZONTAL)
         .display_mode(common_model.BarGaugeDisplayMode.GRADIENT).show_unfilled(True)
         .reduce_options(last_value()))
    for q in queries:
        p = p.with_target(q)
    return p


def series(title: str, description: str, *queries: prometheus.Dataquery, unit: str,
           pos: model.GridPos) -> timeseries.Panel:
    p = timeseries.Panel().title(title).description(description).datasource(DS).unit(unit).grid_pos(pos)
    for q in queries:
        p = p.with_target(q)
    return p


def single(title: str, description: str, q: prometheus.Dataquery, unit: str, pos: model.GridPos,
           decimals: float | None = None) -> stat.Panel:
    p = (stat.Panel().title(title).description(description).datasource(DS).unit(unit).grid_pos(pos).with_target(q)
         .reduce_options(last_value()))
    return p.decimals(decimals) if decimals is not None else p


def variable(name: str, label: str, metric: str, label_name: str) -> dashboard.QueryVariable:
    text = f"label_values({metric}, {label_name})"
    return (dashboard.QueryVariable(name).label(label).datasource(DS)
            .query({"query": text, "refId": name, "qryType": 1})
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(model.VariableOption(text="All", value="$__all", selected=True)))


def build() -> dashboard.Dashboard:
    cost = "$cost_per_gpu_hour"
    d = (dashboard.Dashboard("GPU reclaimer").uid(UID)
         .description("Jupyter kernels holding idle GPUs: the waste (GPU allocations and GPU memory held idle, and "
                      "what it costs), what the reclaimer would do or did, and its own health.")
         .tags(["gpu", "jupyter", "gpu-reclaimer"]).timezone("browser").editable()
         .tooltip(model.DashboardCursorSync.CROSSHAIR).refresh("1m").time("now-24h", "now")
         .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
         .with_variable(variable("node", "Node", "reclaimer_build_info", "Hostname"))
         .with_variable(variable("namespace", "Namespace", "reclaimer_kernel_info", "namespace"))
         .with_variable(variable("gateway", "Gateway", "reclaimer_kernel_info", "gateway"))
         .with_variable(variable("user", "User", "reclaimer_kernel_info", "user"))
         .with_variable(dashboard.TextBoxVariable("cost_per_gpu_hour").label("$ per GPU-hour")
                        .description("What one GPU-hour costs you (cloud price or amortised hardware), for the cost "
                                     "panels.").default_value(DEFAULT_COST_PER_GPU_HOUR)
                        .current(model.VariableOption(text=DEFAULT_COST_PER_GPU_HOUR, value=DEFAULT_COST_PER_GPU_HOUR,
                                                      selected=True))))

    # ------------------------------------------------------------------ waste
    alloc_hours = (f"sum by (namespace) (increase(reclaimer_gpu_allocation_held_idle_seconds_total{{{NS}}}[$__range]))"
                   " / 3600")
    memory_hours = f"sum by (namespace) (increase(reclaimer_gpu_held_idle_seconds_total{{{NS}}}[$__range])) / 3600"
    d = d.with_row(dashboard.Row("Waste: GPU-hours held idle (selected time range)").grid_pos(grid(0, 0, 24, 1)))
    d = d.with_panel(bars(
        "GPU-hours held idle by namespace",
        "'allocation': GPU-hours a pod held a GPU's nvidia.com/gpu allocation while idle - a GPU nobody else can be "
        "scheduled on; only stop-server, stop-notebook, evict-pod or ending a kernel pod gives it back "
        "(reclaimer_gpu_allocation_held_idle_seconds_total). 'memory': GPU-hours idle kernels held GPU memory "
        "(reclaimer_gpu_held_idle_seconds_total; namespace \"-\": kernels outside Kubernetes); shutting the kernel "
        "down frees it, the pod may keep the allocation.",
        query(f"sort_desc({memory_hours})", "{{namespace}} memory", "A", instant=True),
        query(f"sort_desc({alloc_hours})", "{{namespace}} allocation", "B", instant=True),
        pos=grid(0, 1, 6, 9)))
    d = d.with_panel(bars("GPU-hours held idle by user", "GPUs held by idle kernels, by the kernel's user.",
                          query(held_by("user"), "{{user}}", instant=True), pos=grid(6, 1, 6, 9)))
    d = d.with_panel(bars("GPU-hours held idle by gateway", "GPUs held by idle kernels, by the gateway that runs "
                          "them (empty: a pod holding a GPU without a kernel).",
                          query(held_by("gateway"), "{{gateway}}", instant=True), pos=grid(12, 1, 6, 9)))
    d = d.with_panel(bars(
        "GPU-hours held idle by GPU model", "GPUs held idle (every holder idle), by model.",
        query(f"sort_desc(sum by (model) (sum_over_time((reclaimer_gpu_held_idle{{{NODE}}} * on(instance, uuid) "
              "group_left(model) reclaimer_gpu_info)[$__range:$__interval])) * $__interval_ms / 3600000)",
              "{{model}}", instant=True), pos=grid(18, 1, 6, 9)))
    d = d.with_panel(single("Idle GPUs now", "GPUs held by kernels or pods that are all idle right now.",
                            query(f"sum(reclaimer_gpu_held_idle{{{NODE}}})", "held idle", instant=True), "short",
                            grid(0, 10, 4, 8)))
    d = d.with_panel(bars(
        "Cost of GPUs held idle by namespace",
        f"GPU-hours held idle times the $ per GPU-hour variable. 'allocation' is what the cluster could have "
        "scheduled elsewhere; 'memory' what idle kernels kept (often inside the same allocation).",
        query(f"sort_desc({alloc_hours} * {cost})", "{{namespace}} allocation", "A", instant=True),
        query(f"sort_desc({memory_hours} * {cost})", "{{namespace}} memory", "B", instant=True),
        unit="currencyUSD", pos=grid(4, 10, 6, 8)))
    d = d.with_panel(series(
        "GPUs held idle over time by namespace", "GPUs held idle at each moment (rate of the waste counters).",
        query(f"sum by (namespace) (rate(reclaimer_gpu_held_idle_seconds_total{{{NS}}}[$__rate_interval]))",
              "{{namespace}} memory", "A"),
        query(f"sum by (namespace) (rate(reclaimer_gpu_allocation_held_idle_seconds_total{{{NS}}}"
              "[$__rate_interval]))", "{{namespace}} allocation", "B"),
        unit="short", pos=grid(10, 10, 14, 8)))

    # ------------------------------------------------------------------ reclaim
    d = d.with_row(dashboard.Row("Reclaim").grid_pos(grid(0, 18, 24, 1)))
    d = d.with_panel(series(
        "Reclaim actions by result", "Actions taken (enforce) or recorded (dry-run), by action and result.",
        query(f"sum by (action, result, mode) (increase(reclaimer_actions_total{{{NODE}}}[$__rate_interval]))",
              "{{action}} {{result}} ({{mode}})"), unit="short", pos=grid(0, 19, 12, 8)))
    d = d.with_panel(
        table.Panel().title("Upcoming reclaims").description(
            "Kernels inside their warning window: seconds until the policy's action (0 = this cycle). On dry-run "
            "nodes this is what enforce would do.").datasource(DS).unit("s").grid_pos(grid(12, 19, 12, 8))
        .with_target(query(f"sort(reclaimer_kernel_reclaim_eta_seconds * on(instance, kernel_id) group_left(namespace, "
                           f"pod, user, gateway) reclaimer_kernel_info{{{KERNEL}}})", "__auto", instant=True)))
    would = ("(reclaimer_kernel_gpus_held_idle * on(instance, kernel_id) group_left() "
             f"reclaimer_kernel_verdict{{verdict=\"reclaim\", {NODE}}}) and on(instance) "
             "(reclaimer_mode{mode=\"dry-run\"} == 1)")
    d = d.with_panel(bars(
        "What enforce would have reclaimed (dry-run nodes)",
        "GPU-hours held by kernels whose verdict was 'reclaim' on nodes running dry-run: what enforce would have "
        "given back over the selected range, by node.",
        query(f"sort_desc(sum by (Hostname) (sum_over_time(({would})[$__range:$__interval])) * $__interval_ms / 3600000)",
              "{{Hostname}}", instant=True), pos=grid(0, 27, 8, 8)))
    d = d.with_panel(series(
        "Kernels by verdict", "Kernels and GPU pods by this cycle's verdict.",
        query(f"sum by (verdict) (reclaimer_kernels{{{NODE}}})", "{{verdict}}"), unit="short",
        pos=grid(8, 27, 8, 8)))
    d = d.with_panel(series(
        "GPU memory reclaimed", "GPU memory verified released by actions.",
        query(f"sum(increase(reclaimer_reclaimed_gpu_memory_bytes_total{{{NODE}}}[$__rate_interval]))", "reclaimed"),
        unit="bytes", pos=grid(16, 27, 8, 8)))
    d = d.with_panel(series(
        "GPU allocations released", "GPU allocations verified released after an action (the pod gone, or "
        "pod-resources no longer listing the GPU for it).",
        query(f"sum(increase(reclaimer_released_gpus_total{{{NODE}}}[$__rate_interval]))", "released"),
        unit="short", pos=grid(0, 35, 8, 8)))
    d = d.with_panel(single(
        "Circuit breaker tripped", "Nodes whose breaker holds reclaims back now (more than max_fraction_per_cycle "
        "would be reclaimed at once); see breaker.reason in /report.",
        query(f"sum(reclaimer_breaker_tripped{{{NODE}}})", "tripped", instant=True), "short", grid(8, 35, 4, 8)))
    d = d.with_panel(series(
        "Breaker trips by cause", "Times a breaker tripped, by what started it.",
        query(f"sum by (cause) (increase(reclaimer_breaker_trips_total{{{NODE}}}[$__rate_interval]))", "{{cause}}"),
        unit="short", pos=grid(12, 35, 12, 8)))

    # ------------------------------------------------------------------ GPUs and health
    d = d.with_row(dashboard.Row("GPUs and reclaimer health").grid_pos(grid(0, 43, 24, 1)))
    d = d.with_panel(series(
        "GPU utilization", "Per GPU, as dcgm-exporter's GPU utilization panel (ratio; absent when unknown).",
        query(f"reclaimer_gpu_utilization_ratio{{{NODE}}}", "{{Hostname}} GPU {{gpu}}"), unit="percentunit",
        pos=grid(0, 44, 12, 8)))
    d = d.with_panel(series(
        "GPU memory used", "Per GPU, as dcgm-exporter's framebuffer panel.",
        query(f"reclaimer_gpu_memory_used_bytes{{{NODE}}}", "{{Hostname}} GPU {{gpu}}"), unit="bytes",
        pos=grid(12, 44, 12, 8)))
    d = d.with_panel(single("Gateway up", "1: the gateway answered the last observation.",
                            query(f"min by (gateway) (reclaimer_gateway_up{{{NODE}}})", "{{gateway}}", instant=True),
                            "short", grid(0, 52, 6, 8)))
    d = d.with_panel(series(
        "NVML errors", "Failed NVML calls per second (NOT_SUPPORTED is permanent on MIG and some models).",
        query(f"sum by (function, code) (rate(reclaimer_nvml_errors_total{{{NODE}}}[$__rate_interval]))",
              "{{function}} {{code}}"), unit="ops", pos=grid(6, 52, 9, 8)))
    d = d.with_panel(series(
        "Sample duration p99", "One NVML sampling pass, one decide cycle.",
        query("histogram_quantile(0.99, sum by (le) (rate(reclaimer_sample_duration_seconds_bucket"
              f"{{{NODE}}}[$__rate_interval])))", "sample p99", "A"),
        query("histogram_quantile(0.99, sum by (le) (rate(reclaimer_decide_duration_seconds_bucket"
              f"{{{NODE}}}[$__rate_interval])))", "decide p99", "B"), unit="s", pos=grid(15, 52, 9, 8)))
    d = d.with_panel(series(
        "Gateway request duration p99", "Gateway REST round trips.",
        query("histogram_quantile(0.99, sum by (gateway, le) (rate(reclaimer_gateway_request_duration_seconds_bucket"
              f"{{{NODE}}}[$__rate_interval])))", "{{gateway}}"), unit="s", pos=grid(0, 60, 12, 8)))
    d = d.with_panel(series(
        "Seconds since last GPU sample", "A growing line: a wedged NVML call or a stopped sampler.",
        query(f"max by (Hostname) (time() - reclaimer_last_sample_timestamp_seconds{{{NODE}}})", "{{Hostname}}"),
        unit="s", pos=grid(12, 60, 12, 8)))
    d = d.with_panel(series(
        "Stalled calls", "1 while a blocking call of the stage (NVML sampling, /proc reads, pod list, pod-resources) "
        "runs past its timeout: what it feeds is unknown, so nothing it feeds is reclaimed (alert ReclaimerCallStalled).",
        query(f"max by (Hostname, stage) (reclaimer_stalled{{{NODE}}})", "{{Hostname}} {{stage}}"), unit="short",
        pos=grid(0, 68, 12, 8)))
    d = d.with_panel(series(
        "Calls that outlived their timeout", "Blocking calls that did not return in time, by stage.",
        query(f"sum by (stage) (increase(reclaimer_stalled_calls_total{{{NODE}}}[$__rate_interval]))", "{{stage}}"),
        unit="short", pos=grid(12, 68, 12, 8)))
    return d


def render() -> str:
    """The dashboard JSON as committed (sorted keys, two-space indent, trailing newline); panels numbered in order."""
    board = json.loads(json.dumps(build().build(), cls=JSONEncoder))
    for number, panel in enumerate(board["panels"], start=1):
        panel["id"] = number
    return json.dumps(board, indent=2, sort_keys=True) + "\n"
