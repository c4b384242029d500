"""Measure 5: the load one gateway receives from N nodes, measured for one node (and a few) and extrapolated.

One node = one real ``GatewayPool`` (the daemon's code) against a real aiohttp fake gateway holding K kernels, behind
a proxy counting the bytes on the wire. Per (K, g) — g the node's own GPU kernels — the first ``observe`` is
discovery (the kernels are new: one per-kernel GET each, 404 = not here; no listing), the later ones are steady state.
One full listing per K is measured on its own, for the "every node lists every cycle" alternative. A run with several pools at once checks that
node loads add up; then the per-node figures are extrapolated analytically to 1,000 nodes × 5,000 kernels, next to
the alternative "every node lists every cycle".
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

from bench.common import (
    INFO,
    MeasureResult,
    Row,
    fmt_bytes,
    kernel_ids,
    linear_fit,
    md_table,
    stage,
    verdict,
)
from bench.fake_gateways import TOKEN, TOKEN_ENV, RunningGateway, start_gateway

DECIDE_INTERVAL = 15.0
KERNEL_LIFETIME = 3600.0  # assumed mean life of a GPU kernel, for the discovery rate
DISCOVERY_TARGET = 2048  # bytes per kernel new to a node, whatever K (issue 13 item 6)


def _pool(gw: RunningGateway) -> Any:
    from reclaimer.core.config import GatewaySettings
    from reclaimer.observe.gateway import GatewayClient, GatewayPool

    return GatewayPool([GatewayClient(GatewaySettings(name="gw", url=gw.url, token_env=TOKEN_ENV))])


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


async def _cycles(gw: RunningGateway, own: Sequence[str], cycles: int) -> tuple[list[dict[str, int]], int]:
    """Per-cycle gateway deltas for one node observing ``own``; and how many answers were usable (last cycle)."""
    pool = _pool(gw)
    per_cycle = []
    usable = 0
    try:
        for _ in range(cycles):
            before = gw.stats.snapshot()
            out = await pool.observe(own)
            per_cycle.append(_delta(before, gw.stats.snapshot()))
            usable = sum(1 for a in out.values() if a.error is None)
    finally:
        await pool.close()
    return per_cycle, usable


def _spread(ids: Sequence[str], g: int) -> list[str]:
    step = max(1, len(ids) // max(1, g))
    return list(ids[::step][:g])


async def _listing_bytes(gw: RunningGateway) -> int:
    """Bytes on the wire (both ways) of one full ``GET /api/kernels``: what "list every cycle" would cost."""
    pool = _pool(gw)
    try:
        before = gw.stats.snapshot()
        await pool.clients[0].listing()
        delta = _delta(before, gw.stats.snapshot())
    finally:
        await pool.close()
    return delta["bytes_in"] + delta["bytes_out"]


async def _measure(ks: Sequence[int], gs: Sequence[int], cycles: int, nodes: int) -> dict[str, Any]:
    cases = []
    listing_bytes: dict[int, float] = {}
    multi: dict[str, Any] = {}
    for k in ks:
        ids = kernel_ids(k, seed=1000 + k)
        gw = await start_gateway(ids)
        try:
            listing_bytes[k] = await _listing_bytes(gw)
            for g in gs:
                if g > k:
                    continue
                per_cycle, usable = await _cycles(gw, _spread(ids, g), cycles)
                steady = per_cycle[1:]
                first = per_cycle[0]
                cases.append({
                    "k": k, "g": g, "discovery": first, "steady": steady, "usable": usable,
                    "steady_requests": [c["listings"] + c["kernel_gets"] for c in steady],
                    "steady_bytes": [c["bytes_in"] + c["bytes_out"] for c in steady],
                })
            # A GPU kernel no configured gateway knows (a local kernel, a typo'd gateway): what does it cost?
            foreign = kernel_ids(1, seed=999_999)
            per_cycle, _ = await _cycles(gw, [*_spread(ids, gs[0]), *foreign], cycles)
            cases.append({"k": k, "g": gs[0], "foreign": 1, "discovery": per_cycle[0], "steady": per_cycle[1:],
                          "steady_requests": [c["listings"] + c["kernel_gets"] for c in per_cycle[1:]],
                          "steady_bytes": [c["bytes_in"] + c["bytes_out"] for c in per_cycle[1:]],
                          "usable": None})
            if k == max(ks):
                multi = await _multi_node(gw, ids, nodes, gs)
        finally:
            await gw.close()
    return {"cases": cases, "listing_bytes": listing_bytes, "multi": multi}


async def _multi_node(gw: RunningGateway, ids: Sequence[str], nodes: int, gs: Sequence[int]) -> dict[str, Any]:
    """``nodes`` pools at once, node i owning a distinct slice of g_i kernels: gateway requests per steady cycle
    must equal the sum of the g_i."""
    owns, start = [], 0
    for i in range(nodes):
        g = gs[i % len(gs)]
        owns.append(list(ids[start:start + g]))
        start += g
    pools = [_pool(gw) for _ in owns]
    try:
        await asyncio.gather(*(p.observe(o) for p, o in zip(pools, owns)))  # discovery
        before = gw.stats.snapshot()
        await asyncio.gather(*(p.observe(o) for p, o in zip(pools, owns)))
        steady = _delta(before, gw.stats.snapshot())
    finally:
        await asyncio.gather(*(p.close() for p in pools))
    return {"nodes": nodes, "own_total": sum(len(o) for o in owns), "steady": steady}


def run(ks: tuple[int, ...], gs: tuple[int, ...], cycles: int, nodes: int,
        extrapolate: tuple[tuple[int, int], ...]) -> MeasureResult:
    """Measure one node (and ``nodes`` at once) at each (K, g); extrapolate to the (N, K) pairs analytically."""
    result = MeasureResult("gateway", "5. Gateway load: per-kernel GETs vs full listings")
    os.environ.setdefault(TOKEN_ENV, TOKEN)
    with stage("gateway load", ks=list(ks), gs=list(gs)):
        data = asyncio.run(_measure(ks, gs, max(2, cycles), nodes))
    result.data = data
    normal = [c for c in data["cases"] if not c.get("foreign")]
    foreign = [c for c in data["cases"] if c.get("foreign")]
    proportional = all(r == c["g"] for c in normal for r in c["steady_requests"])
    no_listing = all(s["listings"] == 0 for c in normal for s in c["steady"])
    per_get = [b / c["g"] for c in normal for b in c["steady_bytes"]]
    b_get = sum(per_get) / len(per_get)
    flat = max(per_get) / min(per_get) if per_get else float("inf")
    ok_all = sum(c["usable"] for c in normal) == sum(c["g"] for c in normal)
    per_new_all = [(c["discovery"]["bytes_in"] + c["discovery"]["bytes_out"]) / c["g"] for c in normal]
    per_new: dict[int, float] = {}  # the worst per-new-kernel cost at each K
    for c, b in zip(normal, per_new_all):
        per_new[c["k"]] = max(per_new.get(c["k"], 0.0), b)
    worst_new = max(per_new_all)
    disc_no_listing = all(c["discovery"]["listings"] == 0 for c in data["cases"])
    result.rows.append(Row("gateway", "discovery bytes per new GPU kernel, K = " + "/".join(f"{k:,}" for k in
                                                                                          sorted(per_new)),
                           " / ".join(fmt_bytes(per_new[k]) for k in sorted(per_new)), "< 2 kB whatever K",
                           verdict(worst_new < DISCOVERY_TARGET and disc_no_listing),
                           f"worst {fmt_bytes(worst_new)}; {'no listing' if disc_no_listing else 'LISTED'}"))
    multi = data["multi"]
    multi_ok = multi["steady"]["kernel_gets"] == multi["own_total"] and multi["steady"]["listings"] == 0
    result.rows.append(Row("gateway", "steady requests/cycle = own GPU kernels, for every K",
                           "yes" if proportional and no_listing else "no", "∝ own GPU kernels",
                           verdict(proportional and no_listing and ok_all),
                           f"{fmt_bytes(b_get)} per GET (req+resp), max/min across K {flat:.2f}"))
    result.rows.append(Row("gateway", f"{multi['nodes']} real pools at once",
                           f"{multi['steady']['kernel_gets']} GETs, {multi['steady']['listings']} listings "
                           f"for {multi['own_total']} own kernels", "sum of own kernels", verdict(multi_ok)))
    relists = [c for c in foreign if any(s["listings"] for s in c["steady"])]
    if foreign:
        worst = max(foreign, key=lambda c: c["k"])
        per = [s["listings"] for s in worst["steady"]]
        result.rows.append(Row(
            "gateway", f"+1 GPU kernel unknown to every gateway (K={worst['k']})",
            f"{sum(per) / len(per):.0f} listing/cycle, {fmt_bytes(sum(worst['steady_bytes']) / len(per))}/cycle",
            "∝ own GPU kernels", verdict(not relists),
            "re-lists every cycle: traffic ∝ K" if relists else "no re-listing"))
    xs = sorted(data["listing_bytes"])
    fit = linear_fit(xs, [data["listing_bytes"][k] for k in xs]) if len(xs) >= 2 else None

    def listing(k: int) -> float:
        return data["listing_bytes"].get(k) or (fit.intercept + fit.slope * k if fit else float("nan"))

    b_new = sum(per_new_all) / len(per_new_all)
    ext_rows = []
    for n, k in extrapolate:
        g = k / n
        ours_rps, ours_bps = n * g / DECIDE_INTERVAL, n * g * b_get / DECIDE_INTERVAL
        full_rps, full_bps = n / DECIDE_INTERVAL, n * listing(k) / DECIDE_INTERVAL
        disc_bps = k / KERNEL_LIFETIME * b_new
        ext_rows.append((n, k, f"{g:g}", f"{ours_rps:,.1f}", fmt_bytes(ours_bps) + "/s", fmt_bytes(disc_bps) + "/s",
                         f"{full_rps:,.1f}", fmt_bytes(full_bps) + "/s", f"{full_bps / ours_bps:,.0f}×"))
        if (n, k) == extrapolate[-1]:
            result.rows.append(Row("gateway", f"extrapolated {n:,} nodes × {k:,} kernels",
                                   f"{ours_rps:,.0f} req/s, {fmt_bytes(ours_bps)}/s",
                                   "", INFO, f"full listings would be {fmt_bytes(full_bps)}/s"))
    measured = [
        (c["k"], c["g"], "+1 unknown" if c.get("foreign") else "",
         f"{c['discovery']['listings']} list + {c['discovery']['kernel_gets']} GET",
         fmt_bytes(c["discovery"]["bytes_in"] + c["discovery"]["bytes_out"]),
         ", ".join(f"{s['listings']}L+{s['kernel_gets']}G" for s in c["steady"]),
         fmt_bytes(sum(c["steady_bytes"]) / len(c["steady_bytes"])),
         "n/a" if c["usable"] is None else f"{c['usable']}/{c['g']}")
        for c in data["cases"]
    ]
    result.markdown = (
        "Measured: one node (a real `GatewayPool`) against a real aiohttp gateway with K kernels; bytes are HTTP "
        "bytes on the wire both ways (request + response, counted by a TCP proxy). Discovery = first cycle "
        "(kernels new to the node: one `GET /api/kernels/{id}` per new kernel and gateway, never a listing); steady = "
        "the later cycles (L = listings, G = per-kernel GETs).\n\n"
        + md_table(["K (gateway)", "g (node's GPU kernels)", "extra", "discovery requests", "discovery bytes",
                    "steady requests per cycle", "steady bytes/cycle", "usable answers"], measured)
        + "\nOne full listing (measured alone, for comparison): "
        + ", ".join(f"{fmt_bytes(listing_bytes_k)} at K = {k:,}" for k, listing_bytes_k in sorted(
            data["listing_bytes"].items()))
        + f". Discovery costs {fmt_bytes(b_new)} per new GPU kernel and gateway on average, whatever K.\n"
        + f"\nSeveral nodes at once: {multi['nodes']} pools owning {multi['own_total']} kernels in all made "
        f"{multi['steady']['kernel_gets']} GETs and {multi['steady']['listings']} listings in one steady cycle.\n\n"
        f"Extrapolated (analytic, not measured): decide interval {DECIDE_INTERVAL:g} s, every gateway kernel holds "
        f"a GPU on some node (g = K/N, the worst case for per-kernel GETs), {fmt_bytes(b_get)} per GET, listing "
        f"bytes measured at K = {', '.join(f'{k:,}' for k in xs)} (linear in K otherwise). Discovery: one "
        f"per-kernel GET ({fmt_bytes(b_new)}) per new GPU kernel and configured gateway (one gateway here), mean "
        f"GPU-kernel life {KERNEL_LIFETIME / 3600:g} h.\n\n"
        + md_table(["nodes N", "kernels K", "g per node", "ours req/s", "ours bytes/s", "discovery bytes/s",
                    "full-listing req/s", "full-listing bytes/s", "full / ours"], ext_rows)
    )
    return result
