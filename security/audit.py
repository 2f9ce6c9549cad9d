"""Dependency audit of the locked set (requirements.lock) against a vendored advisory snapshot, offline.

Why offline: pip-audit's default service (PyPI's JSON API, /pypi/<name>/<version>/json) answers 404 for every
pinned version from this project's build machines, so `pip-audit -r requirements.lock` reports each package as
"not found on PyPI" and *no known vulnerabilities* — a silent pass. OSV (api.osv.dev) is unreachable there too.
So CI checks the lock against `security/advisories.json`: the PyPA advisory database (github.com/pypa/
advisory-database, OSV format; what pip-audit's PyPI service serves) filtered to the packages of the lock, at
the commit recorded in the file. `--online` additionally runs pip-audit when it is installed and says whether
it could actually audit anything.

    python security/audit.py                      # audit requirements.lock, exit 1 on an unjustified finding
    python security/audit.py --refresh DB_GIT_DIR # rebuild advisories.json from a pypa/advisory-database clone
    python security/audit.py --online             # and pip-audit online (PyPI JSON API) when it can answer
    python security/audit.py --installed          # and the running venv's set (reports drift from the lock)

Findings are fixed by a version bump (in pyproject.toml / the lock) or justified in security/audit_ignore.json
({"<advisory id>": "why it does not apply"}); docs/operations.md "Dependency audit" lists them.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.version import InvalidVersion, Version

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCK = ROOT / "requirements.lock"
SNAPSHOT = HERE / "advisories.json"
IGNORE = HERE / "audit_ignore.json"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", line)
        if not m:
            raise ValueError(f"{path}: not an exact pin: {line!r}")
        pins[canonical(m.group(1))] = m.group(3)
    return pins


def installed() -> dict[str, str]:
    """The distributions of the running interpreter's environment (CI runs this with the project's venv)."""
    from importlib.metadata import distributions

    return {canonical(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}


def _version(v: str) -> Version | None:
    try:
        return Version(v)
    except InvalidVersion:
        return None


def affects(advisory: dict, package: str, version: str) -> bool:
    """OSV semantics: the version is listed, or lies in an ECOSYSTEM range [introduced, fixed) / [.., last_affected]."""
    v = _version(version)
    local_free = _version(version.split("+", 1)[0])  # torch 2.13.0+cpu is 2.13.0 for advisories
    for aff in advisory.get("affected", []):
        if canonical(aff.get("package", {}).get("name", "")) != package:
            continue
        if version in aff.get("versions", []) or (local_free and str(local_free) in aff.get("versions", [])):
            return True
        if v is None:
            continue
        for rng in aff.get("ranges", []):
            if rng.get("type") != "ECOSYSTEM":
                continue
            hit = False
            for ev in rng.get("events", []):
                if "introduced" in ev:
                    hit = ev["introduced"] == "0" or (_version(ev["introduced"]) or v) <= local_free
                elif "fixed" in ev and hit and (_version(ev["fixed"]) or v) <= local_free:
                    hit = False
                elif "last_affected" in ev and hit and (_version(ev["last_affected"]) or v) < local_free:
                    hit = False
            if hit:
                return True
    return False


def fixed_in(advisory: dict, package: str) -> list[str]:
    return sorted({ev["fixed"] for aff in advisory.get("affected", [])
                   if canonical(aff.get("package", {}).get("name", "")) == package
                   for rng in aff.get("ranges", []) for ev in rng.get("events", []) if "fixed" in ev})


def audit(pins: dict[str, str], snapshot: dict) -> list[dict]:
    """Every (package, version, advisory) of the lock the snapshot knows."""
    found = []
    for adv in snapshot["advisories"]:
        for pkg in {canonical(a.get("package", {}).get("name", "")) for a in adv.get("affected", [])}:
            if pkg in pins and affects(adv, pkg, pins[pkg]):
                found.append({"package": pkg, "version": pins[pkg], "id": adv["id"],
                              "aliases": adv.get("aliases", []), "fixed_in": fixed_in(adv, pkg),
                              "summary": " ".join((adv.get("summary") or adv.get("details") or "").split())[:160]})
    return sorted(found, key=lambda f: (f["package"], f["id"]))


def refresh(db: Path, pins: dict[str, str]) -> dict:
    """advisories.json from a pypa/advisory-database bare git dir or checkout: the lock's packages only."""
    import yaml

    bare = (db / "HEAD").exists() and not (db / ".git").exists()
    git = ["git", f"--git-dir={db}"] if bare else ["git", "-C", str(db)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    date = subprocess.run([*git, "log", "-1", "--format=%cI", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    files = subprocess.run([*git, "ls-tree", "-r", "--name-only", "HEAD", "vulns"], capture_output=True, text=True,
                           check=True).stdout.split()
    advisories = []
    for f in files:
        parts = f.split("/")
        if len(parts) != 3 or canonical(parts[1]) not in pins or not f.endswith(".yaml"):
            continue
        doc = yaml.load(subprocess.run([*git, "show", f"HEAD:{f}"], capture_output=True, text=True,
                                            check=True).stdout, Loader=yaml.BaseLoader)  # strings: "2.10" stays 2.10
        if doc.get("withdrawn"):
            continue
        advisories.append({k: doc[k] for k in ("id", "aliases", "summary", "details", "affected", "modified")
                           if k in doc})
        for a in advisories[-1]["affected"]:
            a.pop("versions", None) if len(a.get("versions", [])) > 200 else None
        advisories[-1]["details"] = (advisories[-1].get("details") or "")[:300]
    return {"source": "https://github.com/pypa/advisory-database", "commit": commit, "date": date,
            "packages": sorted(pins), "advisories": sorted(advisories, key=lambda a: a["id"])}


def online(lock: Path) -> tuple[str, list[dict] | None]:
    """pip-audit against PyPI's JSON API, if installed: (what happened, findings) — findings None when it could
    not audit (not installed, network down, or every pin "not found" as on a mirror without per-version JSON)."""
    exe = ROOT / ".rentalml" / "tools" / "pip-audit" / "bin" / "pip-audit"
    cmd = [str(exe) if exe.exists() else "pip-audit", "-r", str(lock), "--no-deps", "--disable-pip",
           "--progress-spinner", "off", "-f", "json", "--timeout", "20"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pip-audit unavailable: {exc}", None
    try:
        deps = json.loads(p.stdout)["dependencies"]
    except (ValueError, KeyError):
        return f"pip-audit could not run (rc {p.returncode}): {p.stderr.strip()[-300:]}", None
    skipped = sum(1 for d in deps if d.get("skip_reason"))
    found = [{"package": canonical(d["name"]), "version": d.get("version", "?"), "id": v["id"],
              "aliases": v.get("aliases", []), "fixed_in": v.get("fix_versions", []),
              "summary": (v.get("description") or "")[:160]} for d in deps for v in d.get("vulns", [])]
    what = f"pip-audit (PyPI JSON API): {len(deps) - skipped}/{len(deps)} pins audited online, {skipped} skipped"
    if skipped == len(deps):
        return what + " (the index answers no per-version JSON: no online result)", None
    return what, found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", type=Path, default=LOCK)
    ap.add_argument("--snapshot", type=Path, default=SNAPSHOT)
    ap.add_argument("--refresh", type=Path, metavar="DB_GIT_DIR")
    ap.add_argument("--online", action="store_true")
    ap.add_argument("--installed", action="store_true", help="also audit this interpreter's installed set")
    args = ap.parse_args(argv)
    pins = read_lock(args.lock)
    if args.refresh:
        snap = refresh(args.refresh, pins)
        args.snapshot.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
        print(f"{args.snapshot}: {len(snap['advisories'])} advisories for {len(pins)} packages at {snap['commit']}")
    snap = json.loads(args.snapshot.read_text())
    ignore = json.loads(IGNORE.read_text()) if IGNORE.exists() else {}
    findings = audit(pins, snap)
    if args.installed:  # what CI actually runs with: drift from the lock is reported, and audited too
        have = {k: v for k, v in installed().items() if k != "rentalml"}
        drift = {k: (pins.get(k), v) for k, v in have.items() if pins.get(k) != v}
        for k, (locked, inst) in sorted(drift.items()):
            print(f"WARNING: lock drift: {k} locked {locked or '-'}, installed {inst} (regenerate {args.lock.name})")
        seen = {(f["package"], f["id"]) for f in findings}
        findings += [f for f in audit({k: v for k, (_, v) in drift.items()}, snap)
                     if (f["package"], f["id"]) not in seen]
    if args.online:
        what, more = online(args.lock)
        print(what if more is not None else f"WARNING: {what}; the vendored snapshot alone decides")
        known = {f["id"] for f in findings} | {a for f in findings for a in f["aliases"]}
        findings += [f for f in more or () if f["id"] not in known and not set(f["aliases"]) & known]
    open_ = [f for f in findings if f["id"] not in ignore and not set(f["aliases"]) & set(ignore)]
    print(f"dependency audit: {len(pins)} pins of {args.lock.name} against {len(snap['advisories'])} advisories "
          f"(pypa/advisory-database {snap['commit'][:12]}, {snap['date'][:10]}): {len(findings)} finding(s), "
          f"{len(findings) - len(open_)} justified in {IGNORE.name}")
    for f in findings:
        mark = "OPEN" if f in open_ else "justified"
        print(f"  [{mark}] {f['package']}=={f['version']} {f['id']} ({', '.join(f['aliases'])}) "
              f"fixed in {', '.join(f['fixed_in']) or '-'}: {f['summary']}")
    return 1 if open_ else 0


if __name__ == "__main__":
    sys.exit(main())
