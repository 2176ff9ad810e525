"""The supervisor's timers (remote/agent.py's Timers), as pure data driven
by a fake clock: no process, no sleep.  What the loop waits for and what is
due, as functions of (the timers, now, the facts the loop passes in)."""

from helpers import load_agent

ag = load_agent("chaperone_agent_timers_test")
T = ag.Timers


def wait(t, now, running=True, timed_out=False, kill_at=None, lingering=False, pipes=True, size_check_at=None,
         dir_poll=False, unwritten=False, held_until=None):
    return t.wait(now, running=running, timed_out=timed_out, kill_at=kill_at, lingering=lingering, pipes=pipes,
                  size_check_at=size_check_at, dir_poll=dir_poll, unwritten=unwritten, held_until=held_until)


def test_nothing_to_wait_for_blocks_without_a_timeout():
    t = T(started=100.0, timeout=None)
    assert wait(t, 100.0) is None
    assert t.due(1e9, running=True, timed_out=False, kill_at=None) == []


def test_the_deadline_fires_once_while_running_and_never_after_the_exit():
    t = T(started=100.0, timeout=30)
    assert wait(t, 100.0) == 30001                   # ms, rounded up: never wakes early
    assert t.due(129.999, running=True, timed_out=False, kill_at=None) == []
    assert t.due(130.0, running=True, timed_out=False, kill_at=None) == ["timeout"]
    assert t.due(131.0, running=True, timed_out=True, kill_at=None) == []       # once
    assert wait(t, 131.0, timed_out=True) is None
    assert t.due(131.0, running=False, timed_out=False, kill_at=None) == []     # exited first: no timeout
    assert wait(t, 120.0, running=False) is None


def test_the_kill_escalation_is_waited_for_and_due_at_its_time():
    t = T(started=0.0, timeout=None)
    assert wait(t, 10.0, kill_at=15.0) == 5001
    assert t.due(14.9, running=True, timed_out=False, kill_at=15.0) == []
    assert t.due(15.0, running=True, timed_out=False, kill_at=15.0) == ["kill"]
    # a huge grace cannot overflow poll(): an hour at most
    assert wait(t, 0.0, kill_at=1e12) == 3600 * 1000 + 1


def test_linger_after_the_exit_then_over_unless_a_kill_is_owed_to_the_living():
    t = T(started=0.0, timeout=None)
    alive = []
    assert not t.over(5.0, output_open=True, kill_at=None, has_descendants=lambda: alive.append(1) or True)
    t.exited(5.0)
    t.exited(6.0)                                         # the first sighting counts
    assert t.exited_at == 5.0
    assert t.lingering(5.5, output_open=True) and not t.lingering(5.5, output_open=False)
    assert not t.lingering(5.0 + ag.LINGER + 0.01, output_open=True)
    assert not t.over(5.5, output_open=True, kill_at=None, has_descendants=lambda: False)
    assert t.over(5.5, output_open=False, kill_at=None, has_descendants=lambda: True)
    assert alive == []                                    # (descendants asked only when a kill is owed)
    assert not t.over(9.0, output_open=False, kill_at=12.0, has_descendants=lambda: True)
    assert t.over(9.0, output_open=False, kill_at=12.0, has_descendants=lambda: False)
    # lingering on a pipe: woken by its end; on files: looked at every HOLD_CHECK
    assert wait(t, 5.5, running=False, lingering=True, pipes=True) == int((ag.LINGER - 0.5) * 1000) + 1
    assert wait(t, 5.5, running=False, lingering=True, pipes=False) == int(ag.HOLD_CHECK * 1000) + 1


def test_directory_polling_without_inotify_and_the_full_spool_retry():
    t = T(started=0.0, timeout=None)
    assert wait(t, 0.0, dir_poll=True) == int(ag.DIR_CHECK * 1000) + 1
    assert wait(t, 0.5, dir_poll=True) == int((ag.DIR_CHECK - 0.5) * 1000) + 1   # the same timer, not a new one
    assert t.due(ag.DIR_CHECK, running=True, timed_out=False, kill_at=None) == ["check_dir"]
    assert t.next_dir_check is None                       # fired: the next wait starts it again
    assert wait(t, 2.0, unwritten=True) == int(ag.FULL_RETRY * 1000) + 1
    assert t.due(2.0 + ag.FULL_RETRY, running=True, timed_out=False, kill_at=None) == ["retry_state"]
    assert t.due(2.0 + ag.FULL_RETRY, running=True, timed_out=False, kill_at=None) == []


def test_the_earliest_timer_wins_and_all_due_come_in_order():
    t = T(started=0.0, timeout=10)
    assert wait(t, 0.0, kill_at=4.0, size_check_at=0.25, held_until=2.0, dir_poll=True, unwritten=True) == 251
    assert wait(t, 0.0, size_check_at=-1.0) == 0          # overdue: poll without blocking
    assert t.due(11.0, running=True, timed_out=False, kill_at=5.0) == ["timeout", "kill", "check_dir",
                                                                          "retry_state"]


def test_the_sender_reads_no_field_of_the_supervisor_from_its_thread():
    """CallbackSender runs in a thread of its own: it works from the copies
    the supervisor hands it (state_changed, output_written), never from the
    supervisor's own fields, which only the supervisor's thread changes."""
    import ast

    from helpers import AGENT

    tree = [n for n in ast.parse(AGENT.read_text()).body if isinstance(n, ast.ClassDef)
            and n.name == "CallbackSender"][0]
    reads = sorted({"%s.%s" % (node.value.attr, node.attr) for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"
                    and node.value.attr == "sup"})
    assert reads == ["sup.run"], reads   # (the run: the spool's paths, which never change)
