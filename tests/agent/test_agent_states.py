"""The supervisor's life (remote/agent.py's step and TRANSITIONS) as a
pure table: (life, event) -> (next life, actions), driven with the timers
on a fake clock.  No process, no sleep, no spool."""

from support.helpers import load_agent

ag = load_agent("chaperone_agent_states_test")
Life, step, T = ag.Life, ag.step, ag.Timers


def run(events, life=None):
    """Feed ``events`` ((event, recorded) or event) through step(): the
    phases passed and every action, in order."""
    life = life or Life()
    phases, actions = [life.phase], []
    for event in events:
        event, recorded = event if isinstance(event, tuple) else (event, None)
        life, done = step(life, event, recorded)
        phases.append(life.phase)
        actions.extend(done)
    return life, phases, actions


def test_a_program_that_runs_and_exits():
    life, phases, actions = run(["started", "exited", "over", ("recorded", "done")])
    assert phases == ["starting", "running", "exited", "ending", "done"]
    assert actions == ["record_start", "ready", "start_sender", "linger", "drain", "record_end", "restore_signals",
                       "close_spool"]
    assert not life.timed_out and not life.spool_removed


def test_a_program_that_cannot_start_ends_in_error_and_nothing_else_moves_it():
    life, phases, actions = run(["exec_failed"])
    assert (phases, actions) == (["starting", "error"], ["record_error", "ready"])
    for event in ("started", "exited", "timeout", "kill", "signal", "signal_request", "over", "spool_removed"):
        assert step(life, event) == (life, ())


def test_nothing_happens_out_of_order():
    """An event a phase has no entry for changes nothing and does nothing."""
    assert step(Life(), "exited") == (Life(), ())                         # not started yet
    assert step(Life(), "over") == (Life(), ())
    assert step(Life("running"), "over") == (Life("running"), ())         # the exit comes first
    assert step(Life("running"), "started") == (Life("running"), ())
    assert step(Life("exited"), "exited") == (Life("exited"), ())
    assert step(Life("ending"), "signal") == (Life("ending"), ())         # (signals wait; then they end it)
    assert step(Life("done"), "signal") == (Life("done"), ())


def test_a_timeout_terminates_a_running_program_once_then_the_kill_escalates():
    """--timeout 30, kill_grace 5: SIGTERM of the tree at 30 s, SIGKILL at
    35 s, timed_out recorded; a fake clock drives the timers."""
    timers, life = T(started=100.0, timeout=30), Life("running")
    done = []
    for now in (110.0, 129.9, 130.0, 131.0, 134.9, 135.0, 136.0):
        for event in timers.due(now, running=life.phase == "running", timed_out=life.timed_out):
            life, actions = step(life, event)
            done.append((now, event, actions))
            if "terminate" in actions:
                timers.arm_kill(now + 5)                  # (what kill_tree does with the grace)
    assert done == [(130.0, "timeout", ("terminate",)), (135.0, "kill", ("kill",))]
    assert life == Life("running", timed_out=True)
    life, phases, actions = run(["exited", "over", ("recorded", "done")], life)
    assert life == Life("done", timed_out=True) and phases[-1] == "done"


def test_a_timeout_after_the_exit_does_nothing():
    timers, life = T(started=0.0, timeout=10), Life("running")
    life, _ = step(life, "exited")
    assert timers.due(11.0, running=life.phase == "running", timed_out=life.timed_out) == []
    assert step(life, "timeout") == (life, ())                            # (even if it came)


def test_the_spool_removed_ends_a_running_program_but_only_marks_an_exited_one():
    life, actions = step(Life("running"), "spool_removed")
    assert (life, actions) == (Life("running", spool_removed=True), ("terminate",))
    life, actions = step(Life("exited"), "spool_removed")
    assert (life, actions) == (Life("exited", spool_removed=True), ())
    life, actions = step(Life("ending"), "spool_removed")
    assert (life, actions) == (Life("ending", spool_removed=True), ())
    life, phases, _ = run(["exited", "over", ("recorded", "lost")], Life("running", spool_removed=True))
    assert phases[-1] == "lost" and life.spool_removed


def test_signals_are_forwarded_while_the_program_or_its_leftovers_live():
    for phase in ("running", "exited"):
        assert step(Life(phase), "signal") == (Life(phase), ("forward",))
        assert step(Life(phase), "kill") == (Life(phase), ("kill",))
    for phase in ("running", "exited", "done", "lost"):
        assert step(Life(phase), "signal_request") == (Life(phase), ("forward",))   # (leftovers too)
    assert step(Life("starting"), "signal_request") == (Life("starting"), ())


def test_a_final_state_recorded_by_someone_else_stays_the_phase():
    life, _, _ = run(["started", "exited", "over", ("recorded", "lost")])
    assert life.phase == "lost"


def test_housekeeping_is_carried_out_in_any_phase_and_changes_nothing():
    for phase in ("running", "exited", "ending", "done"):
        for chore in ag.HOUSEKEEPING:
            assert step(Life(phase), chore) == (Life(phase), (chore,))


def test_every_transition_names_known_phases_events_and_actions():
    """The table is the whole vocabulary: each action is carried out in
    Supervisor.carry_out, each event is sent by the supervisor (or is one
    of the timers', Timers.due)."""
    import ast

    from support.helpers import AGENT

    lines = AGENT.read_text().splitlines()
    code = {n.name: "\n".join(lines[n.lineno - 1:n.end_lineno]) for n in ast.walk(ast.parse("\n".join(lines)))
            if isinstance(n, (ast.ClassDef, ast.FunctionDef))
            and n.name in ("Supervisor", "Timers", "carry_out", "housekeeping")}
    carried = code["carry_out"] + code["housekeeping"]
    phases = {"starting", "running", "exited", "ending"} | set(ag.FINAL_STATES)
    for (phase, event), (nxt, flags, actions) in ag.TRANSITIONS.items():
        assert phase in phases and (nxt is None or nxt in phases)
        assert set(flags) <= {"timed_out", "spool_removed"}
        assert 'self.handle("%s"' % event in code["Supervisor"] or '"%s"' % event in code["Timers"], event
        for action in actions:
            assert '"%s"' % action in carried, action
    for chore in ag.HOUSEKEEPING:
        assert '"%s"' % chore in carried and '"%s"' % chore in code["Timers"]
