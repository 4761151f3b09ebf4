"""``pipeline audit``'s comparison and report: each run's trail against the
reference's (pipeline.record.diff.first_divergence, as ``pipeline diff`` does), the
cause named by the machine's kind, and the verdict: reproducible across what,
what pinning (``pipeline exec``) fixes, what needs exact mode.

Exit codes (docs/how-to/audit.md): 0 every run tried agrees;
1 a divergence (a run that differs, or fails only on some machine); 3 the
script could not be audited (its reference run crashed, hung, or never
stepped an optimizer).
"""

from __future__ import annotations

import shlex
from typing import Any

from ..record.diff import first_divergence

__all__ = ["same", "compare", "report", "text"]


def compare(ref: Any, o: Any) -> dict[str, Any]:
    """{"status": "same" | "differs" | "failed" | "skipped", ...} of ``o`` against ``ref``."""
    if o.problem:
        return {"status": "skipped" if o.skipped else "failed", "problem": o.problem,
                "stderr_tail": [] if o.skipped else o.stderr_tail}
    a, b = ref.record, o.record
    assert a is not None and b is not None  # no problem: both recorded
    if a["names"] != b["names"]:
        return {"status": "differs", "where": "other parameters (names or count differ)"}
    for ra, rb in zip(a["rows"], b["rows"]):
        if ra == rb:
            continue
        if ra[:2] != rb[:2]:
            return {"status": "differs", "step": ra[0],
                    "where": f"another optimizer steps at step {ra[0]}"}
        k = ra[1]
        step, name = first_divergence(a["names"][k], a["digest_bytes"], bytes.fromhex(ra[2]),
                                      bytes.fromhex(rb[2])) or (1, "?")
        return {"status": "differs", "step": ra[0], "parameter": name, "optimizer": k,
                "where": _where(ra[0], name, a["names"][k], len(a["names"]) > 1, k)}
    if len(a["rows"]) != len(b["rows"]):
        return {"status": "differs", "where": f"steps agree, then one run stops "
                                              f"({a['steps']} vs {b['steps']} steps)"}
    if a["weights_sha256"] != b["weights_sha256"]:
        return {"status": "differs", "where": "every step agrees; buffers differ at the end"}
    return {"status": "same"}


def _where(step: int, name: str, names: list[str], many: bool, k: int) -> str:
    when = "step 0 (the initial weights, before the first update)" if step == 0 \
        else f"step {step}"
    opt = f" of optimizer {k}" if many else ""
    return f"differs at {when}, parameter {name}{opt} (first of {len(names)} in name order)"


def same(ref: Any, o: Any) -> bool:
    return compare(ref, o)["status"] == "same"


def _rows(outcomes: list[Any], ref: Any | None) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        m = o.plan.machine
        row: dict[str, Any] = {"run": o.plan.label, "kind": m.kind, "what": m.what,
                               "pinned": o.plan.pinned, "seconds": o.seconds}
        if o is ref and not o.problem:
            row["status"] = "reference"
            row["weights_sha256"] = (o.record or {}).get("weights_sha256")
            row["steps"] = (o.record or {}).get("steps")
            row["observed"] = (o.record or {}).get("observed")
        elif ref is None or ref.problem:
            row.update(status="failed" if o.problem and not o.skipped else "not compared",
                       problem=o.problem, stderr_tail=o.stderr_tail)
        else:
            row.update(compare(ref, o))
        rows.append(row)
    return rows


def report(cmd: list[str], stock: list[Any], pinned: list[Any], profile: Any,
           steps: int, seconds: float) -> dict[str, Any]:
    """The audit's JSON report."""
    ref = stock[0]
    rows = _rows(stock, ref)
    prow = _rows(pinned, pinned[0] if pinned else None)
    return {"command": cmd, "steps_requested": steps, "profile": profile.name,
            "seconds": round(seconds, 1), "stock": rows, "pinned": prow,
            "verdict": _verdict(rows, prow, ref), "exit_code": _code(ref, rows)}


def _code(ref: Any, rows: list[dict[str, Any]]) -> int:
    if ref.problem:
        return 3
    return 1 if any(r["status"] in ("differs", "failed") for r in rows) else 0


def _verdict(rows: list[dict[str, Any]], prow: list[dict[str, Any]],
             ref: Any) -> dict[str, Any]:
    """Run labels grouped: reproducible as is, made reproducible by pinning,
    not (with why: the profile cannot run there, or it still differs)."""
    if ref.problem:
        return {"reproducible": [], "pinning_fixes": [], "not_reproducible": [],
                "not_audited": [f"{ref.plan.label}: {ref.problem}"]}
    pinned = {r["run"]: r for r in prow}
    ref_ok = pinned.get("run-1", {}).get("status") == "reference"
    ok = [r["run"] for r in rows[1:] if r["status"] == "same"]
    fixed, broken, why = [], [], {}
    for r in rows[1:]:
        if r["status"] not in ("differs", "failed"):
            continue
        p = pinned.get(r["run"], {})
        if ref_ok and p.get("status") == "same":
            fixed.append(r["run"])
            continue
        broken.append(r["run"])
        if p.get("status") == "skipped":
            why[r["run"]] = "the pinned profile cannot run there"
        elif p.get("status") == "differs":
            why[r["run"]] = f"pinned too: {p['where'].removeprefix('differs at ')}"
        elif not ref_ok:
            why[r["run"]] = "the pinned profile could not run here"
    return {"reproducible": ok, "pinning_fixes": fixed, "not_reproducible": broken,
            "why": why, "skipped": [r["run"] for r in rows if r["status"] == "skipped"]}


def _label(rows: list[dict[str, Any]], names: list[str], why: dict[str, str] | None = None) -> str:
    """``ISA (isa-default, isa-avx2), threads (threads-1)``: runs grouped by kind."""
    kinds: dict[str, list[str]] = {}
    for r in rows:
        if r["run"] in names:
            note = (why or {}).get(r["run"])
            kinds.setdefault(r["kind"], []).append(r["run"] + (f": {note}" if note else ""))
    return ", ".join(f"{k} ({', '.join(v)})" if v != ["run-2"] else k
                     for k, v in kinds.items())


def text(rep: dict[str, Any]) -> str:
    """The terminal report."""
    cmd = shlex.join(rep["command"])
    lines = [f"pipeline audit: {cmd}"]
    ref = rep["stock"][0]
    if ref["status"] == "reference":
        names = ref.get("observed") or {}
        lines.append(f"reference: run-1 on this machine as it is ({names.get('cpu_capability')}"
                     f", {names.get('threads')} threads): {ref['steps']} optimizer steps "
                     f"compared, weights sha256:{(ref['weights_sha256'] or '')[:16]}...")
    lines += ["", "stock (the script as it runs today):"]
    lines += [_line(r) for r in rep["stock"]]
    if rep["pinned"]:
        lines += ["", f"pinned (pipeline exec, profile {rep['profile']}):"]
        lines += [_line(r) for r in rep["pinned"]]
    v, rows = rep["verdict"], rep["stock"]
    lines += ["", "verdict:"]
    if v.get("not_audited"):
        lines.append(f"  could not audit the script: {v['not_audited'][0]} (its output above)")
        lines.append(f"audit took {rep['seconds']} s; exit {rep['exit_code']}")
        return "\n".join(lines)
    if v["reproducible"]:
        lines.append(f"  reproducible across: {_label(rows, v['reproducible'])}")
    if v["pinning_fixes"]:
        lines.append(f"  pinning makes it reproducible across: {_label(rows, v['pinning_fixes'])}"
                     f" (use `pipeline exec -- {cmd}`)")
    if v["not_reproducible"]:
        broken = _label(rows, v["not_reproducible"], v["why"])
        lines.append(f"  not reproducible across: {broken} (use exact mode / the factory API: "
                     f"`pipeline train`, mode = \"exact\")")
    if not v["pinning_fixes"] and not v["not_reproducible"]:
        lines.append("  the same weights on every machine tried")
    lines.append(f"audit took {rep['seconds']} s; exit {rep['exit_code']}")
    return "\n".join(lines)


def _line(r: dict[str, Any]) -> str:
    head = f"  {r['run']:<19} {r['kind']:<11} "
    if r["status"] == "reference":
        body = "reference"
    elif r["status"] == "same":
        body = "same as reference"
    elif r["status"] == "differs":
        body = r["where"]
    else:
        body = r.get("problem", r["status"])
    out = head + body + (f"  [{r['what']}]" if r["status"] == "differs" else "")
    tail = r.get("stderr_tail") or []
    return out + "".join(f"\n      | {t}" for t in tail[-6:])
