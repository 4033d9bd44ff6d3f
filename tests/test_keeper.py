"""The keeper's decisions (crypto_agent.keeper): a dead part restarted at once, a crash loop backed off and
told a few times, not at every restart; a part that stayed up long enough starts a new streak."""

from __future__ import annotations

from crypto_agent import keeper


def test_a_first_death_is_restarted_at_once_and_told() -> None:
    h = keeper.PartHistory("serve", started_at=1000.0)
    d = keeper.decide(h, 5000.0)
    assert d.restart and d.wait_s == 0 and d.tell and "at once" in d.reason


def test_a_crash_loop_backs_off_doubling_to_the_cap_and_is_told_at_the_first_third_and_hourly() -> None:
    h = keeper.PartHistory("serve")
    now = 0.0
    waits, tells = [], []
    for _ in range(10):
        d = keeper.decide(h, now)
        if not d.restart:
            waits.append(round(d.wait_s, 3))
            now += d.wait_s
            d = keeper.decide(h, now)
        assert d.restart
        tells.append(d.tell)
        keeper.restarted(h, now, d.tell)
        now += 0.1  # it dies again 0.1 s after each start
    assert waits == [0.9, 1.9, 3.9, 7.9, 15.9, 31.9, 59.9, 59.9, 59.9]
    assert tells == [True, False, True, False, False, False, False, False, False, False]
    assert h.streak == 10
    # an hour after the last tell, a death in the same loop is told again
    h.dead_since = None
    later = keeper.decide(h, (h.told_at or 0) + keeper.RETELL_S + 1)
    assert later.tell


def test_a_part_alive_past_the_reset_starts_a_new_streak() -> None:
    h = keeper.PartHistory("relay")
    keeper.restarted(h, 0.0, True)
    keeper.restarted(h, 1.0, False)
    keeper.seen_alive(h, 100.0)
    assert h.streak == 2  # not long enough
    keeper.seen_alive(h, 1.0 + keeper.RESET_AFTER_S)
    assert h.streak == 0
    d = keeper.decide(h, 2000.0)
    assert d.restart and d.wait_s == 0
