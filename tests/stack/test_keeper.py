"""The stack supervises itself: a part of the stack as `crypto-agent up` starts it, killed for real (SIGKILL), is
restarted by the keeper within seconds and L2 is told once; a crash loop backs off and is told twice, not once per
death; a part stopped on purpose stays stopped; `down` stops the keeper first and leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from crypto_agent import process
from deployments.stack.parts import part_spec
from tests.stack_kit import RunningStack, run_cli, run_deployment, start_stack, sweep

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(900)]

QUICK = "integrity-check/quick"
SERVER_BACK_S = 150.0  # a restarted server answers after its start-up (about 5-10 s here, more under load)
PART_BACK_S = 60.0


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A stack of its own (one deployment served), so killing its server disturbs no other test."""
    home = tmp_path_factory.mktemp("keeper-home")
    stack = start_stack(home, only=(QUICK,))
    try:
        yield stack
    finally:
        stack.close()
        sweep(home)


def now_iso() -> str:
    """Now, as the receiver stamps its messages."""
    return datetime.now(UTC).isoformat()


def live_pid(stack: RunningStack, part: str) -> int | None:
    """The PID of our live process of `part`, read from its pidfile now (stack.json may lag a restart)."""
    check = process.inspect(part_spec(part, stack.settings))
    return check.pid if check.alive else None


def kill(stack: RunningStack, part: str, back_s: float = PART_BACK_S) -> tuple[int, int, float]:
    """SIGKILL our process of `part`, then wait for the keeper to bring up another; (old PID, new PID, seconds)."""
    old = live_pid(stack, part)
    assert old is not None, f"{part} is not running"
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)

    def back() -> int | None:  # a new process that answers: the keeper records it once it is ready
        pid = live_pid(stack, part)
        ready = pid not in (None, old) and stack.read_record()["parts"].get(part, {}).get("pid") == pid
        return pid if ready else None

    new = stack.wait(back, back_s, f"the keeper to restart the {part}", alive="keeper")
    return old, new, time.monotonic() - killed


def told(stack: RunningStack, part: str, since: str) -> list[str]:
    """The subjects of L2's messages about `part` dying, since `since`."""
    return [m["body"]["subject"] for m in stack.messages("l2", since)
            if f"stack part {part} died" in m["body"]["subject"]]


def test_a_killed_serving_process_is_restarted_serves_again_and_l2_is_told_once(kept: RunningStack) -> None:
    since = now_iso()
    old, new, seconds = kill(kept, "serve", SERVER_BACK_S)
    print(f"\nserve killed -> a new serving process answering: {seconds:.1f} s")
    subjects = kept.wait(lambda: told(kept, "serve", since), 60, "L2 to be told of the serving process")
    assert subjects == [f"[crypto-agent] stack part serve died: restarted (PID {new})"]
    assert kept.read_record()["parts"]["serve"]["pid"] == new
    run = run_deployment(kept, QUICK)  # the new serving process runs flows
    assert run.state_type.value == "COMPLETED", f"{run.state_name}: {run.state and run.state.message}"
    time.sleep(3)  # no second message for the same death
    assert told(kept, "serve", since) == subjects
    body = next(m["body"]["body"] for m in kept.messages("l2", since) if "serve died" in m["body"]["subject"])
    assert f"Process {old} not running" in body and "first death: restarted at once" in body


def test_the_server_and_the_receiver_killed_come_back_and_the_stack_works(kept: RunningStack) -> None:
    since = now_iso()
    _, _, server_s = kill(kept, "prefect-server", SERVER_BACK_S)
    _, _, receiver_s = kill(kept, "receiver")
    print(f"\nprefect-server killed -> answering again: {server_s:.1f} s; receiver: {receiver_s:.1f} s")
    # L2 is told through the receiver, which was itself dead: the message about it arrives once it is back
    kept.wait(lambda: told(kept, "prefect-server", since) and told(kept, "receiver", since), 90,
              "L2 to be told of the server and the receiver")
    assert len(told(kept, "prefect-server", since)) == 1 and len(told(kept, "receiver", since)) == 1
    kept.wait(lambda: kept.alive("serve"), SERVER_BACK_S, "a serving process")
    run = kept.wait(lambda: _completed(kept), SERVER_BACK_S, "a flow run to complete on the restarted server")
    assert run.state_type.value == "COMPLETED"


def _completed(stack: RunningStack) -> object | None:
    try:
        run = run_deployment(stack, QUICK)
    except Exception:  # noqa: BLE001 (the serving process may still be reconnecting to the new server)
        return None
    return run if run.state_type.value == "COMPLETED" else None


def test_a_crash_loop_backs_off_and_tells_l2_at_the_first_and_third_death(kept: RunningStack) -> None:
    since = now_iso()
    seconds = [kill(kept, "simulator")[2] for _ in range(4)]
    print("\nsimulator killed 4 times in a row -> back after " + ", ".join(f"{s:.1f} s" for s in seconds))
    assert seconds[3] > seconds[0] + 2  # the 4th restart waited out a backoff (4 s) the first did not
    kept.wait(lambda: len(told(kept, "simulator", since)) >= 2, 60, "L2 to be told of the crash loop")
    time.sleep(3)
    subjects = told(kept, "simulator", since)
    assert len(subjects) == 2, subjects
    bodies = [m["body"]["body"] for m in kept.messages("l2", since) if "simulator died" in m["body"]["subject"]]
    assert "Death 1 in a row" in bodies[0] and "Death 3 in a row" in bodies[1]
    assert re.search(r"death 3 in a row: restarted after a \d s backoff", bodies[1])


def test_a_part_stopped_on_purpose_stays_stopped(kept: RunningStack) -> None:
    assert kept.stop_part("relay") == 0
    time.sleep(10)  # twenty looks of the keeper
    assert not kept.alive("relay") and kept.alive("keeper")
    again = run_cli(["up", "--detach", "--no-ui", "--only", QUICK], kept.env, 300, cwd=kept.home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"^relay: started", again.stdout, re.MULTILINE), again.stdout
    assert re.search(r"^keeper: already running.*reused", again.stdout, re.MULTILINE), again.stdout


def test_down_stops_the_keeper_first_and_leaves_nothing(kept: RunningStack) -> None:
    pids = kept.pids()
    left = kept.close()
    assert left == []
    lines = [line for line in kept.down.stdout.splitlines() if ": stopped PID" in line]
    assert lines[0].startswith("keeper: stopped PID"), kept.down.stdout
    assert not any(process.inspect(part_spec(name, kept.settings)).alive for name in pids if name != "up")
