"""Commands: incidents (the incident log with MTTR and MTTA per scenario against the runbook's ETA; close-report),
ack (a person takes an incident: its pages stop climbing), silence (pages held during maintenance)."""

from __future__ import annotations

import getpass
import json

import typer

from crypto_agent import incidents
from crypto_agent.cli.app import app
from crypto_agent.errors import InputError
from crypto_agent.incidents import silences
from crypto_agent.incidents.report import prevention_item
from crypto_agent.settings import Settings, load_settings

incidents_app = typer.Typer(
    help="The incident log: list, report, resolve by hand, close a report (owner, prevention).",
    invoke_without_command=True,
)
app.add_typer(incidents_app, name="incidents")
silence_app = typer.Typer(
    help="Hold the pages about a resource while it is worked on (recoveries still run): start, list, expire.",
    invoke_without_command=True,
)
app.add_typer(silence_app, name="silence")


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


@incidents_app.callback()
def incidents_command(
    ctx: typer.Context,
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
    if ctx.invoked_subcommand is not None:
        return
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
              f"{'recovery':>9} {'data lost':>9}  {'told':<9} {'acked':>7} resource")
        for inc in found:
            told = ",".join(inc.levels_told) or "-"
            absorbed = f" (+{inc.events_absorbed} absorbed)" if inc.events_absorbed else ""
            if inc.needs_person:
                since = incidents.iso(inc.needs_person_since)
                absorbed += f" NEEDS A PERSON ({inc.detections} detections since {since})"
            acked = _seconds(inc.ack_s) if inc.acked_at is not None else ("no" if inc.first_paged_at else "-")
            if inc.acked_at is not None:
                absorbed += f" acked by {inc.acked_by}"
            print(f"{inc.id:>5}  {inc.scenario:<20} {inc.status:<10} {inc.outcome or '-':<10} "
                  f"{incidents.iso(inc.opened_at):<21} {_seconds(inc.recovery_time_s):>9} "
                  f"{_hours(inc.data_lost_hours):>9}  {told:<9} {acked:>7} {inc.resource}{absorbed}")
    if open_only or needs_person:
        return
    print("\n# MTTR per scenario (recovered incidents, detection to verified recovery) against the runbook's ETA")
    print(f"{'scenario':<24} {'incidents':>9} {'recovered':>9} {'escalated':>9} {'failed':>6} "
          f"{'MTTR':>9} {'p95':>9} {'ETA':>7} {'MTTA':>9}  verdict")
    for s in stats:
        verdict = {None: "-", True: "within ETA", False: "OVER ETA"}[s.within_eta]
        print(f"{s.number} {s.scenario:<22} {s.incidents:>9} {s.recovered:>9} {s.escalated:>9} {s.failed:>6} "
              f"{_seconds(s.mttr_s):>9} {_seconds(s.p95_s):>9} {s.eta_s / 60:>5g} m {_seconds(s.mtta_s):>9}  {verdict}")
    print("(MTTA: mean time from the first page to its acknowledgement, `crypto-agent ack ID`)")


def _log_of(settings: Settings, incident_id: int) -> None:
    """InputError when there is no incident log yet (so no such incident): nothing is created."""
    if not incidents.incidents_db_path(settings).exists():
        raise incidents.IncidentError(f"no incident #{incident_id} (no incident log yet)",
                                      hint="list them with `crypto-agent incidents`")


@incidents_app.command("close-report")
def close_report_command(
    incident_id: int = typer.Argument(..., help="The incident whose post-incident report is closed."),
    owner: str = typer.Option(..., "--owner", help="Who owns the follow-up (the report's 'Assigned to')."),
    prevention: list[str] = typer.Option(
        ..., "--prevention", help="What prevents it next time; repeat it. One of the runbook's items "
        "(auto-restart, backup validation, monitoring threshold) or any text (Other)."),
    due: str | None = typer.Option(None, "--due", help="Due date, YYYY-MM-DD (default: 2 days after the incident)."),
) -> None:
    """Fill the report's Prevention and Owner fields; the artifact incident-<id> is republished by page-clock."""
    import datetime as _dt

    if not owner.strip():
        raise InputError("--owner is empty", hint="name who owns the follow-up, e.g. --owner alice")
    items = [prevention_item(p) for p in prevention if p.strip()]
    if not items:
        raise InputError("--prevention is empty", hint="say what prevents it, e.g. --prevention auto-restart")
    if due is not None:
        try:
            _dt.date.fromisoformat(due)
        except ValueError:
            raise InputError(f"cannot read the due date {due!r}", hint="write it as YYYY-MM-DD") from None
    settings = load_settings()
    _log_of(settings, incident_id)
    with incidents.open_incident_store(settings) as store:
        incidents.close_report(store, incident_id, owner=owner, prevention=items, due=due,
                               link=_report_link(incidents.get(store, incident_id)))
    print(f"incident #{incident_id}: report closed (owner {owner.strip()}, prevention: {'; '.join(items)}); "
          f"the artifact incident-{incident_id} is republished by the page-clock flow within a minute")


def _report_link(inc: incidents.Incident) -> str | None:
    """The flow run link a report already carries (kept when it is re-rendered)."""
    for line in (inc.report_md or "").splitlines():
        if line.startswith("Flow run: "):
            return line.removeprefix("Flow run: ").strip()
    return None


@app.command("ack")
def ack_command(
    incident_id: int = typer.Argument(..., help="The incident to acknowledge (ids: `crypto-agent incidents`)."),
    by: str = typer.Option("", "--by", help="Who takes it (default: your login name)."),
    note: str = typer.Option("", "--note", help="What you are doing about it, kept in the incident."),
) -> None:
    """Acknowledge an incident: you are on it, its pages stop climbing to the next level (MTTA counted)."""
    settings = load_settings()
    _log_of(settings, incident_id)
    with incidents.open_incident_store(settings) as store:
        before = incidents.get(store, incident_id)
        done = incidents.acknowledge(store, incident_id, by=by or _person(), note=note)
    if before.acked_at is not None:
        print(f"incident #{done.id} was already acknowledged by {done.acked_by} at {incidents.iso(done.acked_at)}")
        return
    mtta = f" {_seconds(done.ack_s)} after its first page" if done.ack_s is not None else ""
    print(f"incident #{done.id} ({done.scenario}, {done.resource}) acknowledged by {done.acked_by}{mtta}: "
          "its pages no longer climb")


@silence_app.callback()
def silence_command(
    ctx: typer.Context,
    resource: str = typer.Option("", "--resource", help="What to silence: trader, backtest, store, a resource id "
                                 "(crypto-agent.service.paper-trader) or a glob of them."),
    duration: str = typer.Option("", "--for", help="How long: 90s, 15m, 2h, 1d (at most 30d)."),
    reason: str = typer.Option("", "--reason", help="Why (shown in the pages it holds back, once it ends)."),
    by: str = typer.Option("", "--by", help="Who silences (default: your login name)."),
) -> None:
    """Silence the pages about a resource for a while: held and listed, told once after it ends; recoveries run."""
    if ctx.invoked_subcommand is not None:
        return
    if not resource or not duration:
        raise InputError("say what to silence and for how long",
                         hint="e.g. `crypto-agent silence --resource trader --for 2h --reason 'exchange maintenance'`"
                         "; `crypto-agent silence list` shows them")
    seconds = silences.parse_duration(duration)
    settings = load_settings()
    with incidents.open_incident_store(settings) as store:
        s = silences.add(store, resource, seconds, reason, by=by or _person())
    print(f"silence #{s.id}: pages about {s.pattern!r} held until {incidents.iso(s.ends_at)} ({s.reason}); "
          f"end it early with `crypto-agent silence expire {s.id}`")


@silence_app.command("list")
def silence_list_command(
    all_: bool = typer.Option(False, "--all", help="Also the silences that ended."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The silences in force (with --all, also those that ended) and the pages each held back."""
    settings = load_settings()
    if not incidents.incidents_db_path(settings).exists():
        found: list[silences.Silence] = []
    else:
        with incidents.open_incident_store(settings) as store:
            found = silences.list_silences(store, active_only=not all_)
    if as_json:
        print(json.dumps([s.to_dict() for s in found], indent=2))
        return
    if not found:
        print("no silences" + ("" if all_ else " in force (`--all` lists those that ended)"))
        return
    for s in found:
        print(f"#{s.id} {s.pattern!r} {s.to_dict()['starts']} -> {s.to_dict()['ends']} by {s.created_by}: "
              f"{s.reason}; {len(s.held)} page(s) held")
        for page in s.held:
            print(f"    {incidents.iso(page.get('at'))} {str(page.get('level', '')).upper()} {page.get('subject')}")


@silence_app.command("expire")
def silence_expire_command(silence_id: int = typer.Argument(..., help="The silence to end now.")) -> None:
    """End a silence now: the pages it held are told at the next page-clock round."""
    settings = load_settings()
    if not incidents.incidents_db_path(settings).exists():
        raise InputError(f"no silence #{silence_id}", hint="list them with `crypto-agent silence list`")
    with incidents.open_incident_store(settings) as store:
        s = silences.expire(store, silence_id)
    print(f"silence #{s.id} ({s.pattern!r}) ended at {incidents.iso(s.ends_at)}; {len(s.held)} page(s) it held "
          "are told at the next page-clock round")
