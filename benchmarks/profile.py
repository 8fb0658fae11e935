"""Where the time of a step goes: torch.profiler's per-kernel breakdown (per-op self time on the CPU)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .timing import synchronize

NAME_CHARS = 160  # C++ template kernel names run to kilobytes


def breakdown(step: Callable[[], object], device: torch.device | str, iters: int = 3, top: int = 20) -> dict:
    """Profile `iters` calls of an already warmed-up `step` and rank what ran by time.

    On a GPU the entries are CUDA kernels (and memcpy/memset) by GPU time; on the CPU, operators by self time.
    Returns {"kind", "iters", "total_ms_per_iter", "entries": [{"name", "calls_per_iter", "ms_per_iter", "pct"}]},
    the `top` entries first, then one "(other N)" entry for the rest.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        synchronize(device)
    # The raw events: prof.events() would build Python objects and a call tree for every op, which takes
    # seconds per step of the pure-PyTorch impls.
    events = prof.profiler.kineto_results.events()
    if cuda:
        # GPU-side user annotations span many kernels: counting them would count those kernels twice.
        durations = [(e.name(), e.duration_ns() / 1e3) for e in events
                     if e.device_type() == DeviceType.CUDA and not e.is_user_annotation()]
    else:
        durations = self_times([e for e in events if e.device_type() == DeviceType.CPU])
    kind = "CUDA kernels, GPU time" if cuda else "CPU operators, self time"
    return {"kind": kind, "iters": iters, **rank(durations, iters, top)}


def self_times(events: list) -> list[tuple[str, float]]:
    """(name, self time in us) of CPU events: each one's duration less that of the events nested in it.

    Events of one thread nest as intervals (an op encloses the ops it calls), so one sweep in start order with
    a stack of open events finds every event's direct parent.
    """
    by_thread = defaultdict(list)
    for e in events:
        by_thread[e.start_thread_id()].append(e)
    out = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e.start_ns(), -e.end_ns()))
        self_ns = [e.duration_ns() for e in thread_events]
        stack: list[int] = []
        for i, e in enumerate(thread_events):
            while stack and thread_events[stack[-1]].end_ns() <= e.start_ns():
                stack.pop()
            if stack:
                self_ns[stack[-1]] -= e.duration_ns()
            stack.append(i)
        out += [(e.name(), ns / 1e3) for e, ns in zip(thread_events, self_ns)]
    return out


def rank(durations: list[tuple[str, float]], iters: int, top: int) -> dict:
    """Sum (name, us) pairs per name: {"total_ms_per_iter", "entries"}, largest first, the tail as "(other N)"."""
    time_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for name, us in durations:
        time_us[name] += us
        calls[name] += 1
    total = sum(time_us.values())

    def entry(name: str, us: float, n: int) -> dict:
        return {"name": name[:NAME_CHARS], "calls_per_iter": n / iters, "ms_per_iter": us / iters / 1e3,
                "pct": 100.0 * us / total if total else 0.0}

    ranked = sorted(time_us, key=time_us.get, reverse=True)
    entries = [entry(name, time_us[name], calls[name]) for name in ranked[:top]]
    rest = ranked[top:]
    if rest:
        entries.append(entry(f"(other {len(rest)})", sum(time_us[n] for n in rest), sum(calls[n] for n in rest)))
    return {"total_ms_per_iter": total / iters / 1e3, "entries": entries}


def markdown(profiles: list[dict]) -> str:
    """One section per profiled (op, impl, dtype): its ranked entries as a table."""
    parts = []
    for p in profiles:
        head = f"## {p['op']} / {p['impl']} / {p['dtype']} ({p['device']}, {p['shape']})\n\n"
        if "error" in p:
            parts.append(head + f"Not profiled: {p['error']}\n")
            continue
        lines = [f"{p['kind']}: {p['total_ms_per_iter']:.3f} ms per step, mean of {p['iters']} steps.\n",
                 "| # | name | calls/step | ms/step | % |", "|---|---|---|---|---|"]
        for i, e in enumerate(p["entries"], 1):
            name = e["name"].replace("|", "/")
            lines.append(f"| {i} | `{name}` | {e['calls_per_iter']:.4g} | {e['ms_per_iter']:.4g} | {e['pct']:.1f} |")
        parts.append(head + "\n".join(lines) + "\n")
    return "\n".join(parts)
