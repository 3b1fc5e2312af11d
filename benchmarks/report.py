"""Summarise the latest full benchmark results (benchmarks/results/*.json,
not the quick ones) as a Markdown table, for the README."""

import json
import os
import sys

from common import RESULTS


def _load(kind):
    path = os.path.join(RESULTS, f"{kind}-py{sys.version_info.major}.{sys.version_info.minor}.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _methods(methods):
    if not methods:
        return ""
    return f"; {methods.get('one call', 0)} of {sum(methods.values())} commits in one call"


def _ci(r) -> str:
    return f"{r['median']} (95% CI {r['ci95'][0]} to {r['ci95'][1]})"


def _agent_rows(agent):
    ins = agent["idle_http_instructions"]
    if "skipped" not in ins:
        d, aa, med = ins["agent_minus_none"], ins["aa_control"], ins["instructions_per_request_median"]
        yield ("idle agent, instructions per HTTP request (callgrind, every thread of the service)",
               f"{med['none']:,} without, {med['agent']:,} with: {d['instructions_median']:+,} ({d['percent']:+.2f}%, "
               f"95% CI {d['percent_ci95'][0]:+.2f}% to {d['percent_ci95'][1]:+.2f}%); A/A control "
               f"{aa['instructions_median']:+,} ({aa['percent']:+.2f}%); median of {ins['batches']} batches of "
               f"{ins['requests_per_batch']} requests", "agent.py")
    h, c, rounds = agent["idle_http"], agent["idle_cpu"], agent["params"]["rounds"]
    yield (f"idle agent, HTTP demo, paired ({rounds} rounds of {h['seconds_per_round']:g} s, three services loaded at once)",
           f"throughput with/without {_ci(h['throughput_ratio']['agent_over_none'])}, A/A "
           f"{_ci(h['throughput_ratio']['aa_control'])}; service CPU time per request with/without "
           f"{_ci(h['cpu_per_request_ratio']['agent_over_none'])}, A/A {_ci(h['cpu_per_request_ratio']['aa_control'])}",
           "agent.py")
    yield (f"idle agent, CPU-bound program, paired ({rounds} rounds of {c['seconds_per_round']:g} s, three at once)",
           f"iterations with/without {_ci(c['ratio']['agent_over_none'])}, A/A {_ci(c['ratio']['aa_control'])}; CPU time "
           f"per iteration with/without {_ci(c['cpu_per_iteration_ratio']['agent_over_none'])}, A/A "
           f"{_ci(c['cpu_per_iteration_ratio']['aa_control'])}", "agent.py")
    e = agent["end_to_end"]
    yield ("`livepatch apply` on a live service, inside the agent",
           f"agent side p50 {e['apply_in_agent_ms']['p50']:.1f} ms (verify, check, commit), commit pause "
           f"{e['apply_pause_us']['p50']:.0f} µs; the command end to end: `startup.py` rows", "agent.py")


def rows():
    out = []
    pause_rows = [(kind, r) for kind in ("pause", "pause-floor", "pause-10k") for r in (_load(kind) or {"rows": []})["rows"]]
    if pause_rows:
        for kind, r in pause_rows:
            if (r["threads"], r["functions"]) in ((1, 1), (1, 100), (16, 100), (16, 1000), (64, 100), (16, 10000)):
                commits = sum(r["commit_methods"].values()) if "commit_methods" in r else None
                out.append((f"commit pause, {r['threads']} busy threads, {r['functions']} functions"
                            + (f", {commits} commits" if kind == "pause-floor" and commits else ""),
                            f"GIL hold p50 {r['commit_hold_ns']['p50'] / 1000:.0f} µs, p99 {r['commit_hold_ns']['p99'] / 1000:.0f} µs"
                            + (f" (final check + stores p50 {r['check_and_stores_ns']['p50'] / 1000:.0f} µs, "
                               f"p99 {r['check_and_stores_ns']['p99'] / 1000:.0f} µs)" if "check_and_stores_ns" in r else "")
                            + "; "
                            f"extra gap in workers p50 {r['extra_gap_vs_noop_median_ns']['p50'] / 1000:.0f} µs, "
                            f"p99 {r['extra_gap_vs_noop_median_ns']['p99'] / 1000:.0f} µs "
                            f"(each commit's gap minus the no-op handoff's median gap, {r['gap_noop_handoff_ns']['p50'] / 1000:.0f} µs)"
                            + _methods(r.get("commit_methods")), "pause.py"))
    memory = _load("memory")
    if memory:
        ret = memory["retained"]
        out.append((f"memory, {ret['functions']:,} patched functions",
                    f"{ret['retained_bytes_per_function']:,.0f} B per function retained (tracemalloc), USS growth on apply "
                    f"{ret['uss_growth_on_apply_per_function']:,.0f} B per function", "memory.py"))
        cyc = memory["cycles"]
        out.append((f"memory over {cyc['cycles']:,} apply/rollback cycles",
                    f"RSS {cyc['samples'][0]['rss'] / 2**20:.1f} -> {cyc['samples'][-1]['rss'] / 2**20:.1f} MiB "
                    f"(growth after warm-up {cyc['rss_growth_after_warmup_bytes'] / 1024:.0f} KiB)", "memory.py"))
    sp = _load("safepoint")
    if sp:
        deep = max(sp["activeness"], key=lambda r: (r["threads"], r["depth"]))
        out.append((f"activeness check, {deep['threads']} threads x depth {deep['depth']}",
                    f"full walk before the pause p50 {deep['check_ns']['p50'] / 1000:.0f} µs ({deep['per_frame_ns']} ns per frame)"
                    + (f"; inside the pause p50 {deep['inside_pause_ns']['p50'] / 1000:.0f} µs" if "inside_pause_ns" in deep else ""),
                    "safepoint.py"))
        big = max(sp["suspended"], key=lambda r: r["heap_objects"])
        out.append((f"suspended-coroutine scan, {big['heap_objects']:,} heap objects",
                    f"{big['heap_scan_ns_outside_pause']['p50'] / 1e6:.0f} ms outside the pause, "
                    f"{big['young_check_ns_inside_pause']['p50'] / 1000:.0f} µs inside", "safepoint.py"))
    agent = _load("agent")
    if agent:
        out.extend(_agent_rows(agent))
    alt = _load("alternatives")
    if alt:
        rs, hp = alt["restart_vs_hotpatch"]["restart"], alt["restart_vs_hotpatch"]["hotpatch"]
        out.append(("restart vs hotpatch of the HTTP demo under load",
                    f"restart: {rs['window_ms']:.0f} ms outage, {rs['failed']} failed requests; hotpatch: "
                    f"{hp['failed']} failed, pause {hp['pause_us']:.0f} µs "
                    f"({alt['restart_vs_hotpatch']['ratio_restart_outage_over_hotpatch_pause']}x)", "alternatives.py"))
        rl = alt["reload"]
        out.append((f"importlib.reload, {rl['functions']:,} functions",
                    f"{rl['reload_ms']['p50']:.0f} ms, {rl['references_on_old_code_after_reload']:,} held references left on old code "
                    f"(livepatch: {rl['livepatch_apply_ms']['p50']:.0f} ms, {rl['references_on_old_code_after_livepatch']})", "alternatives.py"))
        j = alt["jurigged"]
        if "skipped" not in j:
            t = j["torn_under_threads"]
            out.append((f"jurigged, {j['functions']:,} functions",
                        f"update {j['jurigged_update_ms']:.0f} ms (livepatch build+apply {j['livepatch_build_and_apply_ms']:.0f} ms); "
                        f"torn calls under threads: jurigged {t['jurigged'].get('torn', '?'):,} of {t['jurigged'].get('calls', 0):,}, "
                        f"livepatch {t['livepatch'].get('torn_calls', '?')} of {t['livepatch'].get('calls', 0):,}", "alternatives.py"))
    return out


def main():
    print("| measurement | result | script |")
    print("|---|---|---|")
    for what, result, script in rows():
        print(f"| {what} | {result} | `{script}` |")


if __name__ == "__main__":
    main()
