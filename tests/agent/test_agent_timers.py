"""The supervisor's timers (remote/agent.py's Timers) and the callback
sender's (SendTimers), as pure data driven by a fake clock: no process, no
sleep.  What the loop waits for and what is
due, as functions of (the timers, now, the facts the loop passes in)."""

import pytest
from support.helpers import load_agent

ag = load_agent("chaperone_agent_timers_test")
T = ag.Timers


def wait(t, now, running=True, timed_out=False, lingering=False, pipes=True, poll_sizes=False, timeline_due=None,
         dir_poll=False, unwritten=False, held_until=None):
    return t.wait(now, running=running, timed_out=timed_out, lingering=lingering, pipes=pipes,
                  poll_sizes=poll_sizes, timeline_due=timeline_due, dir_poll=dir_poll, unwritten=unwritten,
                  held_until=held_until)


def test_nothing_to_wait_for_blocks_without_a_timeout():
    t = T(started=100.0, timeout=None)
    assert wait(t, 100.0) is None
    assert t.due(1e9, running=True, timed_out=False) == []


def test_the_deadline_fires_once_while_running_and_never_after_the_exit():
    t = T(started=100.0, timeout=30)
    assert wait(t, 100.0) == 30001                   # ms, rounded up: never wakes early
    assert t.due(129.999, running=True, timed_out=False) == []
    assert t.due(130.0, running=True, timed_out=False) == ["timeout"]
    assert t.due(131.0, running=True, timed_out=True) == []       # once
    assert wait(t, 131.0, timed_out=True) is None
    assert t.due(131.0, running=False, timed_out=False) == []     # exited first: no timeout
    assert wait(t, 120.0, running=False) is None


def test_the_kill_escalation_is_waited_for_and_due_at_its_time():
    t = T(started=0.0, timeout=None)
    t.arm_kill(15.0)
    t.arm_kill(20.0)                                      # the earliest owed wins
    assert wait(t, 10.0) == 5001
    assert t.due(14.9, running=True, timed_out=False) == []
    assert t.due(15.0, running=True, timed_out=False) == ["kill"]
    assert t.kill_at is None and t.due(16.0, running=True, timed_out=False) == []   # once
    # a huge grace cannot overflow poll(): an hour at most
    t.arm_kill(1e12)
    assert wait(t, 0.0) == 3600 * 1000 + 1


def test_linger_after_the_exit_then_over_unless_a_kill_is_owed_to_the_living():
    t = T(started=0.0, timeout=None)
    alive = []
    assert not t.over(5.0, output_open=True, has_descendants=lambda: alive.append(1) or True)
    t.exited(5.0)
    t.exited(6.0)                                         # the first sighting counts
    assert t.exited_at == 5.0
    assert t.lingering(5.5, output_open=True) and not t.lingering(5.5, output_open=False)
    assert not t.lingering(5.0 + ag.LINGER + 0.01, output_open=True)
    assert not t.over(5.5, output_open=True, has_descendants=lambda: False)
    assert t.over(5.5, output_open=False, has_descendants=lambda: True)
    assert alive == []                                    # (descendants asked only when a kill is owed)
    t.arm_kill(12.0)
    assert not t.over(9.0, output_open=False, has_descendants=lambda: True)
    assert t.over(9.0, output_open=False, has_descendants=lambda: False)
    # lingering on a pipe: woken by its end; on files: looked at every HOLD_CHECK
    assert wait(t, 5.5, running=False, lingering=True, pipes=True) == int((ag.LINGER - 0.5) * 1000) + 1
    assert wait(t, 5.5, running=False, lingering=True, pipes=False) == int(ag.HOLD_CHECK * 1000) + 1


def test_directory_polling_without_inotify_and_the_full_spool_retry():
    t = T(started=0.0, timeout=None)
    assert wait(t, 0.0, dir_poll=True) == int(ag.DIR_CHECK * 1000) + 1
    assert wait(t, 0.5, dir_poll=True) == int((ag.DIR_CHECK - 0.5) * 1000) + 1   # the same timer, not a new one
    assert t.due(ag.DIR_CHECK, running=True, timed_out=False) == ["check_dir"]
    assert t.next_dir_check is None                       # fired: the next wait starts it again
    assert wait(t, 2.0, unwritten=True) == int(ag.FULL_RETRY * 1000) + 1
    assert t.due(2.0 + ag.FULL_RETRY, running=True, timed_out=False) == ["retry_state"]
    assert t.due(2.0 + ag.FULL_RETRY, running=True, timed_out=False) == []


def test_the_earliest_timer_wins_and_all_due_come_in_order():
    t = T(started=0.0, timeout=10)
    t.arm_kill(4.0)
    assert wait(t, 0.0, timeline_due=0.25, held_until=2.0, dir_poll=True, unwritten=True) == 251
    assert wait(t, 0.0, timeline_due=-1.0) == 0           # overdue: poll without blocking
    assert wait(t, 0.0, poll_sizes=True) == int(ag.SIZE_POLL_MIN * 1000) + 1
    assert t.due(11.0, running=True, timed_out=False, poll_sizes=True, timeline_due=0.25) == [
        "timeout", "kill", "check_dir", "retry_state", "check_sizes", "flush_timeline"]


def test_size_polling_looks_again_soon_after_growth_and_ever_later_while_nothing_grows():
    """File capture: nobody wakes the loop when the program writes, so the
    timers say when to look at the spool files' sizes."""
    t = T(started=0.0, timeout=None)
    assert wait(t, 0.0, poll_sizes=False) is None         # (pipe capture, or the program exited)
    assert wait(t, 0.0, poll_sizes=True) == int(ag.SIZE_POLL_MIN * 1000) + 1
    assert t.due(ag.SIZE_POLL_MIN / 2, running=True, timed_out=False, poll_sizes=True) == []
    now = ag.SIZE_POLL_MIN
    pauses = []
    for grew in (False, False, False, True, False):
        assert t.due(now, running=True, timed_out=False, poll_sizes=True) == ["check_sizes"]
        assert t.due(now, running=False, timed_out=False, poll_sizes=False) == []   # not polled: not due
        t.sizes_seen(now, grew)
        pauses.append(round(t.next_size_check - now, 6))
        assert 0 <= wait(t, now, poll_sizes=True) - pauses[-1] * 1000 <= 1.001   # (ms, rounded up)
        now = t.next_size_check
    m = ag.SIZE_POLL_MIN
    assert pauses == [2 * m, 4 * m, 8 * m, m, 2 * m]
    for _ in range(20):                                   # doubling, up to SIZE_POLL_MAX
        t.sizes_seen(now, False)
    assert t.size_poll == ag.SIZE_POLL_MAX
    # a record held back in the timeline is due at its time
    assert t.due(5.0, running=False, timed_out=False, timeline_due=5.5) == []
    assert t.due(5.5, running=False, timed_out=False, timeline_due=5.5) == ["flush_timeline"]


def test_the_callback_heartbeat_and_the_output_latency():
    """The sender's timers (SendTimers) on a fake clock: a running state
    again every heartbeat; output waits up to its latency from the first
    byte not sent, or until the buffer is full; a state or the end at once."""
    S = ag.SendTimers(100.0, heartbeat=30.0, latency=0.5, buffer=1000)
    assert S.wait(100.0, urgent=False, pending=0) == 30.0
    assert S.wait(100.0, urgent=True, pending=0) == 0
    assert not S.heartbeat_due(129.9, {"state": "running"})
    assert S.heartbeat_due(130.0, {"state": "running"})
    assert not S.heartbeat_due(130.0, {"state": "done"}) and not S.heartbeat_due(130.0, None)
    S.sent_state(130.0)
    assert not S.heartbeat_due(159.9, {"state": "running"}) and S.wait(150.0, False, 0) == 10.0
    S.output_pending(140.0)
    S.output_pending(140.3)                               # the first byte not sent counts
    assert S.wait(140.3, urgent=False, pending=10) == pytest.approx(0.2)
    assert S.wait(140.6, urgent=False, pending=10) == 0    # overdue
    assert S.wait(140.1, urgent=False, pending=1000) == 0  # the buffer is full
    S.output_sent()
    assert S.wait(141.0, urgent=False, pending=10) == 0.5  # (written since: from now)
    assert S.wait(141.0, urgent=False, pending=0) == 19.0  # nothing waits: the heartbeat


def test_the_callback_retries_back_off_to_the_retry_frequency():
    delays, d = [], 0.0
    for _ in range(8):
        d = ag.SendTimers.backoff(d, 2.0)
        delays.append(d)
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]


def test_the_sender_reads_no_field_of_the_supervisor_from_its_thread():
    """CallbackSender runs in a thread of its own: it works from the copies
    the supervisor hands it (state_changed, output_written), never from the
    supervisor's own fields, which only the supervisor's thread changes."""
    import ast

    from support.helpers import AGENT

    tree = [n for n in ast.parse(AGENT.read_text()).body if isinstance(n, ast.ClassDef)
            and n.name == "CallbackSender"][0]
    reads = sorted({"%s.%s" % (node.value.attr, node.attr) for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"
                    and node.value.attr == "sup"})
    assert reads == ["sup.run"], reads   # (the run: the spool's paths, which never change)


def test_an_inotify_watch_of_the_spool_files_replaces_the_size_polling():
    """File capture with an inotify watch: no look at the sizes on a
    timer; while one stream alone is written and the timeline holds its
    growth back, the watch is not read until that record is due; once the
    streams take turns, every write is read at once, while the loop keeps
    up with them."""
    t = T(started=0.0, timeout=None)
    t.size_watch = True
    assert wait(t, 0.0, poll_sizes=True) is None
    assert t.due(5.0, running=True, timed_out=False, poll_sizes=True) == []
    assert t.spool_written(switched=False, exact=True, held_until=1.5) is True
    assert wait(t, 1.0, poll_sizes=True) == 501
    assert t.due(1.4, running=True, timed_out=False, poll_sizes=True, timeline_due=1.5) == []
    assert t.due(1.5, running=True, timed_out=False, poll_sizes=True, timeline_due=1.5) == [
        "flush_timeline", "read_watch"]
    assert t.watch_pause is None and wait(t, 1.5, poll_sizes=True) is None
    assert t.spool_written(switched=True, exact=True, held_until=2.0) is False and wait(t, 1.6) is None
    assert t.spool_written(switched=False, exact=True, held_until=None) is False
    # turns faster than the loop reads them (more than one change of stream
    # in one read): read once per grain
    assert t.spool_written(switched=True, exact=False, held_until=2.01) is True and wait(t, 2.0) in (10, 11)
    assert t.due(2.01, running=True, timed_out=False) == ["read_watch"]
    t.size_watch = False  # (no watch: the sizes polled, as before)
    assert 10 <= wait(t, 3.0, poll_sizes=True) <= 11  # SIZE_POLL_MIN
