"""Node sets (chaperone.fleet.nodeset): ClusterShell's syntax and Ansible's
ranges, errors with their column, bounds, groups, folding; folding and
expanding round-trip (hypothesis), and agree with ClusterShell itself when
it is installed."""

import pytest
from hypothesis import given, settings, strategies as st

from chaperone.fleet.nodeset import DEFAULT_LIMIT, NodeSetError, expand, fold, natural_key


@pytest.mark.parametrize("pattern, names", [
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("node[01-03,10]", ["node01", "node02", "node03", "node10"]),
    ("node[9-11]", ["node9", "node10", "node11"]),
    ("dc[1-2]n[1-2]", ["dc1n1", "dc1n2", "dc2n1", "dc2n2"]),
    ("node[1-9/4]", ["node1", "node5", "node9"]),
    ("node[1-3]-ilo", ["node1-ilo", "node2-ilo", "node3-ilo"]),
    ("node1[0-2]", ["node10", "node11", "node12"]),
    ("db[01:03]", ["db01", "db02", "db03"]),
    ("db[01:10:3]", ["db01", "db04", "db07", "db10"]),
    ("db[:2]", ["db0", "db1", "db2"]),
    ("x[a:c]", ["xa", "xb", "xc"]),
    ("x[y:B]", ["xA", "xB", "xy", "xz"]),       # Ansible's order y..z A..B (listed sorted)
    ("n[1-2][a-b]", ["n1a", "n1b", "n2a", "n2b"]),
    ("node[007]", ["node007"]),
    (" a , b ", ["a", "b"]),
    ("b,a,b", ["a", "b"]),
    ("node10,node9,node09", ["node9", "node09", "node10"]),
    ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
])
def test_expand(pattern, names):
    assert expand(pattern) == names


@pytest.mark.parametrize("pattern, names", [
    # ClusterShell: strictly left to right, one precedence.
    ("a,b!a", ["b"]),
    ("a!b,b", ["a", "b"]),
    ("n[1-5]&n[3-9]", ["n3", "n4", "n5"]),
    ("n[1-3]^n[2-5]", ["n1", "n4", "n5"]),
    ("n[1-5]!n2&n[2-4]", ["n3", "n4"]),
    ("n[1-3]&n[2-3]^n[3-4]", ["n2", "n4"]),
])
def test_operators_left_to_right(pattern, names):
    assert expand(pattern) == names


@pytest.mark.parametrize("pattern, column, words", [
    ("node[1-3", 5, "never closed"),
    ("node1]", 6, "has no '['"),
    ("node[]", 6, "empty range"),
    ("node[3-1]", 6, "backwards"),
    ("node[01-100]", 6, "padding"),
    ("node[1-010]", 6, "padding"),
    ("node[a-3]", 6, "letter and a number"),
    ("node[1-2/0]", 6, "step"),
    ("node[xy]", 6, "not a number or a letter"),
    ("a,,b", 3, "missing name"),
    ("a,", 2, "nothing after"),
    ("!a", 1, "needs a name before"),
    ("a b", 2, "space inside a name"),
    ("a,b[1-2,#]", 9, "not a number"),
    ("@", 1, "empty group name"),
])
def test_errors_name_the_column(pattern, column, words):
    with pytest.raises(NodeSetError) as info:
        expand(pattern, lambda g, s: [])
    msg = str(info.value)
    assert "\n" not in msg
    assert info.value.position == column - 1
    assert ("column %d" % column) in msg and words in msg, msg
    assert msg.startswith("host pattern %r: " % pattern)


def test_expansion_is_bounded_before_it_is_built():
    with pytest.raises(NodeSetError, match="over the limit of 100000"):
        expand("n[1-1000000000]")
    with pytest.raises(NodeSetError, match="over the limit"):
        expand("a[1-1000]b[1-1000]")
    with pytest.raises(NodeSetError, match="more than 10 names"):
        expand("a[1-6],b[1-6]", limit=10)
    assert len(expand("n[1-10]", limit=10)) == 10        # the limit itself is allowed
    with pytest.raises(NodeSetError, match="11 names, over the limit of 10"):
        expand("n[1-11]", limit=10)
    assert DEFAULT_LIMIT == 100_000


GROUPS = {
    ("web", None): ["w[1-2]", "@db"],
    ("db", None): ["d1"],
    ("rack1", None): ["r1n[1-2]"],
    ("rack2", None): ["r2n1"],
    ("gpu", "slurm"): ["g[1-3]"],
    ("*", None): ["w[1-2]", "d1", "r1n[1-2]", "r2n1"],
    ("loop", None): ["@loop2"],
    ("loop2", None): ["x,@loop"],
    ("bad", None): ["x[1-"],
}


def resolver(group, source):
    return GROUPS.get((group, source))


def test_groups():
    assert expand("@web", resolver) == ["d1", "w1", "w2"]
    assert expand("@web!@db", resolver) == ["w1", "w2"]
    assert expand("@rack[1-2]", resolver) == ["r1n1", "r1n2", "r2n1"]
    assert expand("@slurm:gpu&g[2-9]", resolver) == ["g2", "g3"]
    assert len(expand("@*", resolver)) == 6


def test_group_errors():
    with pytest.raises(NodeSetError, match=r"unknown group @nope at column 3"):
        expand("a,@nope", resolver)
    with pytest.raises(NodeSetError, match=r"group @loop contains itself: @loop -> @loop2 -> @loop"):
        expand("@loop", resolver)
    with pytest.raises(NodeSetError, match=r"in group @bad at column 1, 'x\[1-': '\[' at column 2 is never closed"):
        expand("@bad", resolver)
    with pytest.raises(NodeSetError, match="needs an inventory"):
        expand("@web")


@pytest.mark.parametrize("hosts, folded", [
    (["node1", "node2", "node3", "node5"], "node[1-3,5]"),
    (["dc1n1", "dc1n2", "dc2n1", "dc2n2"], "dc[1-2]n[1-2]"),
    (["dc1n1", "dc1n2", "dc2n1"], "dc1n[1-2],dc2n1"),
    (["n1x1", "n1x2", "n2x1", "n2x2", "n3x1"], "n[1-2]x[1-2],n3x1"),
    (["node08", "node09", "node10", "node11"], "node[08-11]"),
    (["node1", "node01"], "node[1,01]"),
    (["b", "a", "node1"], "a,b,node1"),
    (["node1", "node3", "node5"], "node[1,3,5]"),
    (["10.0.0.1", "10.0.0.2", "10.0.1.1"], "10.0.0.[1-2],10.0.1.1"),
    (["node5"], "node5"),
    (["h02", "h01", "h10", "h03"], "h[01-03,10]"),
    ([], ""),
])
def test_fold(hosts, folded):
    assert fold(hosts) == folded


def test_natural_key():
    assert sorted(["n10", "n9", "n09", "m1", "n1a"], key=natural_key) == ["m1", "n1a", "n9", "n09", "n10"]


# --- properties -------------------------------------------------------------------------------------

_index = st.one_of(st.integers(0, 40).map(str), st.integers(0, 40).map(lambda i: str(i).zfill(2)),
                   st.integers(0, 40).map(lambda i: str(i).zfill(3)))
_host = st.one_of(
    st.builds(lambda p, i: p + i, st.sampled_from(["n", "node", "x-", "10.0.0."]), _index),
    st.builds(lambda p, i, q, j: p + i + q + j, st.sampled_from(["dc", "r"]), _index, st.sampled_from(["n", "s"]),
              _index),
    st.sampled_from(["a", "b", "login", "gw-x"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_host, max_size=40))
def test_fold_then_expand_gives_the_hosts_back(hosts):
    folded = fold(hosts)
    assert expand(folded) == sorted(set(hosts), key=natural_key) if hosts else folded == ""


_range = st.builds(lambda a, n, pad: "%s-%s" % (str(a).zfill(pad), str(a + n).zfill(pad)),
                   st.integers(0, 30), st.integers(0, 20), st.sampled_from([0, 2, 3]))
_bracket = st.lists(st.one_of(_range, st.integers(0, 60).map(str)), min_size=1, max_size=4).map(
    lambda items: "[" + ",".join(items) + "]")
_nodeset_term = st.builds(lambda p, b, q: p + b + q, st.sampled_from(["n", "node", "dc"]), _bracket,
                          st.sampled_from(["", "-ilo", "x"]))
_nodeset = st.builds(lambda first, rest: first + "".join(op + t for op, t in rest), _nodeset_term,
                     st.lists(st.tuples(st.sampled_from([",", "!", "&", "^"]), _nodeset_term), max_size=3))


@settings(max_examples=200, deadline=None)
@given(_nodeset)
def test_expand_fold_expand_is_stable(pattern):
    names = expand(pattern)
    assert expand(fold(names)) == names if names else fold(names) == ""


@settings(max_examples=200, deadline=None)
@given(_nodeset)
def test_same_names_as_clustershell(pattern):
    ns = pytest.importorskip("ClusterShell.NodeSet")
    try:
        theirs = set(ns.NodeSet(pattern))
    except ns.NodeSetParseError:
        with pytest.raises(NodeSetError):
            expand(pattern)
        return
    names = expand(pattern)
    assert set(names) == theirs
    # and ClusterShell reads our folding as the same set
    assert set(ns.NodeSet(fold(names))) == theirs if names else True
