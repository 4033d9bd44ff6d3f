"""Command: incidents (the incident log with MTTR per scenario against the runbook's ETA)."""

from __future__ import annotations

import getpass
import json

import typer

from crypto_agent import incidents
from crypto_agent.cli.app import app
from crypto_agent.settings import load_settings


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f} s"
    return f"{value / 60:.1f} min"


def _person() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "a person"


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:g} h"


@app.command("incidents")
def incidents_command(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    open_only: bool = typer.Option(False, "--open", help="Only the incidents a recovery is still working on."),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000, help="Newest incidents shown."),
    report: int | None = typer.Option(None, "--report", help="Print the post-incident report of this incident."),
    needs_person: bool = typer.Option(
        False, "--needs-person", help="Only the incidents the recoveries could not fix, which wait for a person."),
    resolve: int | None = typer.Option(
        None, "--resolve", help="A person fixed this incident: it no longer needs a person (nor is re-paged)."),
    note: str = typer.Option("", "--note", help="With --resolve: what was done, kept in the incident."),
) -> None:
    """List the incidents (newest first) and the MTTR of each runbook scenario against its ETA (2/15/30/5/60 min)."""
    settings = load_settings()
    path = incidents.incidents_db_path(settings)
    if resolve is not None:
        if not path.exists():
            raise incidents.IncidentError(f"no incident #{resolve}", hint="list them with `crypto-agent incidents`")
        with incidents.open_incident_store(settings) as store:
            done = incidents.clear_needs_person(store, resolve, by=f"{_person()} (crypto-agent incidents)",
                                                note=note)
        print(f"incident #{done.id} ({done.scenario}, {done.resource}) no longer needs a person: "
              "the next detection of it opens a new incident")
        return
    open_only = open_only and not needs_person
    if not path.exists():
        if as_json:
            print(json.dumps({"incident_log": str(path), "incidents": [], "mttr": []}, indent=2))
        else:
            print(f"no incidents recorded (no incident log at {path})")
        if report is not None:
            raise incidents.IncidentError(f"no incident #{report}", hint="list them with `crypto-agent incidents`")
        return
    with incidents.open_incident_store(settings) as store:
        if report is not None:
            inc = incidents.get(store, report)
            print(inc.report_md or incidents.render_report(inc))
            return
        found = incidents.needing_person(store)[-limit:][::-1] if needs_person \
            else incidents.list_incidents(store, open_only=open_only, limit=limit)
        stats = incidents.mttr_by_scenario(store)
    if as_json:
        rows = []
        for inc in found:
            d = inc.to_dict()
            d.pop("report_md", None)
            rows.append(d)
        print(json.dumps({"incident_log": str(path), "incidents": rows, "mttr": [s.to_dict() for s in stats]},
                         indent=2, default=str))
        return
    print(f"# {'open incidents' if open_only else 'incidents'} ({path})")
    if not found:
        print("none")
    else:
        print(f"{'id':>5}  {'scenario':<20} {'status':<10} {'outcome':<10} {'opened (UTC)':<21} "
              f"{'recovery':>9} {'data lost':>9}  {'told':<9} resource")
        for inc in found:
            told = ",".join(inc.levels_told) or "-"
            absorbed = f" (+{inc.events_absorbed} absorbed)" if inc.events_absorbed else ""
            if inc.needs_person:
                since = incidents.iso(inc.needs_person_since)
                absorbed += f" NEEDS A PERSON ({inc.detections} detections since {since})"
            print(f"{inc.id:>5}  {inc.scenario:<20} {inc.status:<10} {inc.outcome or '-':<10} "
                  f"{incidents.iso(inc.opened_at):<21} {_seconds(inc.recovery_time_s):>9} "
                  f"{_hours(inc.data_lost_hours):>9}  {told:<9} {inc.resource}{absorbed}")
    if open_only or needs_person:
        return
    print("\n# MTTR per scenario (recovered incidents, detection to verified recovery) against the runbook's ETA")
    print(f"{'scenario':<24} {'incidents':>9} {'recovered':>9} {'escalated':>9} {'failed':>6} "
          f"{'MTTR':>9} {'p95':>9} {'ETA':>7}  verdict")
    for s in stats:
        verdict = {None: "-", True: "within ETA", False: "OVER ETA"}[s.within_eta]
        print(f"{s.number} {s.scenario:<22} {s.incidents:>9} {s.recovered:>9} {s.escalated:>9} {s.failed:>6} "
              f"{_seconds(s.mttr_s):>9} {_seconds(s.p95_s):>9} {s.eta_s / 60:>5g} m  {verdict}")
