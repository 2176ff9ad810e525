"""Inventories (Ansible INI/YAML, chaperone's YAML), host patterns over them
(chaperone.fleet.patterns), host files and select_hosts."""

import textwrap

import pytest

from chaperone.fleet.inventory import (HostEntry, InventoryError, SelectionError, inventory_paths,
                                       load_inventory, parse_inventory, read_hostfile, select_hosts)
from chaperone.fleet.nodeset import NodeSetError
from chaperone.fleet.patterns import pattern_style, select

INI = textwrap.dedent("""\
    # ungrouped first
    mail.example.com:2200
    [web]
    web[01:03] ansible_user=deploy
    [db]
    db-[a:b] ansible_host=10.0.0.9 chaperone_labels=gpu,big
    [db:vars]
    ansible_python_interpreter=/usr/bin/python3
    chaperone_env={'A': 1, 'B': 'x y'}
    [prod:children]
    web
    db
    [prod:vars]
    chaperone_env={'A': 0, 'P': 'prod'}
    ansible_user=produser
    chaperone_spool=/scratch/ch
    [stage]
    web03
    """)


@pytest.fixture
def inv():
    return parse_inventory(INI, "hosts")


def test_ansible_ini(inv):
    assert inv.host_names() == ["mail.example.com", "web01", "web02", "web03", "db-a", "db-b"]
    mail = inv.hosts["mail.example.com"]
    assert (mail.hostname, mail.port, mail.user, mail.groups) == ("mail.example.com", 2200, None, ())
    w = inv.hosts["web01"]
    # host var beats group var; child group (depth 2) beats parent
    assert (w.user, w.spool, dict(w.env), w.groups) == ("deploy", "/scratch/ch", {"A": "0", "P": "prod"},
                                                          ("prod", "web"))
    d = inv.hosts["db-a"]
    assert (d.hostname, d.user, d.python) == ("10.0.0.9", "produser", "/usr/bin/python3")
    assert dict(d.env) == {"A": "1", "P": "prod", "B": "x y"}
    assert d.labels == {"gpu", "big"}
    assert inv.group_members("prod") == ["web01", "web02", "web03", "db-a", "db-b"]
    assert inv.group_members("ungrouped") == ["mail.example.com"]
    assert inv.hosts["web03"].groups == ("prod", "stage", "web")


@pytest.mark.parametrize("text, words", [
    ("[web:vars]\nx=1\n", "hosts:1: section [web:vars] is for a group never declared"),
    ("[p:children]\nweb\n", "hosts:2: section [p:children] names a group never declared: web"),
    ("[web]\nh1 notakeyvalue\n", "hosts:2: expected key=value"),
    ("[web:hosts]\nh1\n[web:oops]\n", "hosts:3: section [web:oops] has an unknown type"),
    ("[web]\nh[3:1]\n", "goes backwards"),
    ("[web]\nh1 ansible_port=http\n", "bad port 'http' for host h1"),
    ("[a:children]\nb\n[b:children]\na\n", "is its own child"),
])
def test_ansible_ini_errors(text, words):
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, "hosts")
    assert words in str(info.value) and "\n" not in str(info.value)


def test_ansible_ini_forward_declaration():
    inv = parse_inventory("[p:children]\nweb\n[p:vars]\nansible_user=u\n[web]\nh1\n", "hosts")
    assert inv.hosts["h1"].user == "u"


ANSIBLE_YAML = textwrap.dedent("""\
    all:
      hosts:
        mail.example.com:
      vars:
        ansible_user: everyone
      children:
        web:
          hosts:
            www[1:2].example.com:
              ansible_port: 2222
          vars:
            chaperone_labels: [front]
        prod:
          children:
            web:
            db:
              hosts:
                db1: {ansible_host: 10.1.1.1, ansible_user: dbadmin}
    """)


def test_ansible_yaml():
    inv = parse_inventory(ANSIBLE_YAML, "inv.yml")
    assert inv.host_names() == ["mail.example.com", "www1.example.com", "www2.example.com", "db1"]
    assert inv.hosts["www1.example.com"].port == 2222
    assert inv.hosts["www1.example.com"].user == "everyone"
    assert inv.hosts["db1"].user == "dbadmin"
    assert inv.hosts["db1"].hostname == "10.1.1.1"
    assert inv.group_members("prod") == ["db1", "www1.example.com", "www2.example.com"] or \
        set(inv.group_members("prod")) == {"db1", "www1.example.com", "www2.example.com"}
    assert inv.label_members("front") == ["www1.example.com", "www2.example.com"]
    assert inv.group_members("ungrouped") == ["mail.example.com"]


NATIVE = textwrap.dedent("""\
    defaults:
      user: alice
      env: {TZ: UTC, LEVEL: default}
    hosts:
      gpu[1-3]:
        labels: [gpu]
      gpu2:
        env: {CUDA_VISIBLE_DEVICES: "0"}
      db1:
        hostname: 10.0.0.5
        port: 2222
        groups: [rack2]
    groups:
      rack2:
        hosts: node[01-02],gpu1
        children: [rack2b]
        env: {RACK: "2", LEVEL: rack}
        python: /opt/py/bin/python3
        spool: /scratch/chaperone
      rack2b:
        hosts: [node03]
        labels: [slow]
        env: {LEVEL: rack2b}
    """)


def test_native_yaml():
    inv = parse_inventory(NATIVE, "inventory.yaml")
    assert set(inv.host_names()) == {"gpu1", "gpu2", "gpu3", "db1", "node01", "node02", "node03"}
    g2 = inv.hosts["gpu2"]
    assert g2.labels == {"gpu"} and g2.user == "alice"
    assert dict(g2.env) == {"TZ": "UTC", "LEVEL": "default", "CUDA_VISIBLE_DEVICES": "0"}
    db = inv.hosts["db1"]
    assert (db.hostname, db.port, db.python, db.spool) == ("10.0.0.5", 2222, "/opt/py/bin/python3",
                                                          "/scratch/chaperone")
    n3 = inv.hosts["node03"]
    # rack2b is a child of rack2: its settings win; labels add up
    assert n3.env["LEVEL"] == "rack2b" and n3.env["RACK"] == "2" and n3.labels == {"slow"}
    assert n3.groups == ("rack2", "rack2b")
    assert inv.label_members("gpu") == ["gpu1", "gpu2", "gpu3"]


@pytest.mark.parametrize("text, words", [
    ("hosts:\n  a: {lables: [x]}\n", "host a has an unknown key 'lables'"),
    ("hosts:\n  a[1-2]: {hostname: x}\n", "one hostname cannot reach them all"),
    ("groups:\n  g: {children: [nope]}\n", "group g has the child nope"),
    ("hosts:\n  a: {env: [1]}\n", "env of a must be a mapping"),
    ("hosts:\n  a: {labels: 'bad label'}\n", "bad label 'bad label'"),
    ("hosts:\n  a: {port: 70000}\n", "bad port 70000"),
])
def test_native_errors(text, words):
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, "inventory.yaml")
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_yaml_group_called_hosts_is_ansible():
    inv = parse_inventory("hosts:\n  hosts:\n    h1:\n", "inv.yaml")
    assert inv.group_members("hosts") == ["h1"]


def test_bad_yaml_is_one_line():
    with pytest.raises(InventoryError, match=r"inv.yaml:3: not valid YAML"):
        parse_inventory("a:\n  - b\n c: [\n", "inv.yaml")


# --- where the inventory comes from ------------------------------------------------------------------------


def test_inventory_paths(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert inventory_paths((), env) == ([], False)
    (tmp_path / "chaperone").mkdir()
    (tmp_path / "chaperone" / "inventory.ini").write_text("h1\n")
    assert inventory_paths((), env) == ([str(tmp_path / "chaperone" / "inventory.ini")], False)
    (tmp_path / "chaperone" / "inventory.yaml").write_text("hosts: {h2: {}}\n")
    assert inventory_paths((), env)[0] == [str(tmp_path / "chaperone" / "inventory.yaml")]
    assert load_inventory(env=env).host_names() == ["h2"]
    assert inventory_paths((), dict(env, CHAPERONE_INVENTORY="/a:/b")) == (["/a", "/b"], True)
    assert inventory_paths(["x"], dict(env, CHAPERONE_INVENTORY="/a")) == (["x"], True)


def test_missing_inventory(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert len(load_inventory(env=env)) == 0   # no default file: fine
    with pytest.raises(InventoryError, match="inventory /nope/inv.ini: no such file"):
        load_inventory(["/nope/inv.ini"], env=env)
    with pytest.raises(InventoryError, match="no such file"):
        load_inventory(env=dict(env, CHAPERONE_INVENTORY="/nope/x"))


def test_several_inventories_merge(tmp_path):
    a = tmp_path / "a.ini"
    a.write_text("[web]\nh1 ansible_user=a\nh2\n")
    b = tmp_path / "b.yaml"
    b.write_text("hosts:\n  h1: {user: b}\n  h3: {}\n")
    inv = load_inventory([str(a), str(b), "h4,h5:2200,"])
    assert inv.host_names() == ["h1", "h2", "h3", "h4", "h5"]
    assert inv.hosts["h1"].user == "b" and inv.hosts["h5"].port == 2200
    assert inv.group_members("web") == ["h1", "h2"]


# --- patterns ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, hosts", [
    ("all", "db-a db-b mail.example.com web01 web02 web03"),
    ("web", "web01 web02 web03"),                          # a bare group name (Ansible)
    ("web01", "web01"),
    ("web:db", "db-a db-b web01 web02 web03"),
    ("web,db", "db-a db-b web01 web02 web03"),
    ("prod:&stage", "web03"),
    ("prod:!db", "web01 web02 web03"),
    ("prod:!db:mail.example.com", "mail.example.com web01 web02 web03"),
    ("web:!web01:web01", "web02 web03"),                   # Ansible order: ! last, whatever the position
    ("web01:&stage:web02", ""),                            # ... and & after every union
    ("web!web01,web01", "web01 web02 web03"),              # the same in ClusterShell syntax: left to right
    ("!prod", "mail.example.com"),                         # Ansible: all implied
    ("&stage", "web03"),
    ("prod!db,db-a", "db-a web01 web02 web03"),            # ClusterShell order: left to right
    ("web[0]", "web01"),                                   # subscripts (Ansible, inclusive)
    ("web[-1]", "web03"),
    ("web[0:1]", "web01 web02"),
    ("web[1:]", "web02 web03"),
    ("web[01-02]", "web01 web02"),                          # a dash is a range of names
    ("web0[1-2]", "web01 web02"),
    ("node[1:2]", "node1 node2"),                          # not a group: an Ansible range of names
    ("@gpu", "db-a db-b"),                                 # a label
    ("@label:big", "db-a db-b"),
    ("@group:web", "web01 web02 web03"),
    ("@web&@gpu", ""),
    ("prod&@gpu", "db-a db-b"),
    ("~web0[12]", "web01 web02"),
    ("~(?:web|db)", "db-a db-b web01 web02 web03"),          # regex on groups and hosts; ':' inside () kept
    ("web*", "web01 web02 web03"),
    ("*.example.com", "mail.example.com"),
    ("db-?", "db-a db-b"),
    ("ungrouped", "mail.example.com"),
    ("elsewhere,web01", "elsewhere web01"),                # unknown names are plain hosts
    ("fe80::1,::1", "::1 fe80::1"),                         # IPv6 literals: no ':' separators
    ("prod^web", "db-a db-b"),
])
def test_select(inv, pattern, hosts):
    assert select(pattern, inv) == hosts.split()


@pytest.mark.parametrize("pattern, style", [
    ("node[1-3]", "nodeset"), ("a,b!c", "nodeset"), ("a!b,c", "nodeset"), ("web:db", "ansible"),
    ("a,!b", "ansible"), ("!b", "ansible"), ("~x", "ansible"), ("@src:g,a", "nodeset"), ("db[01:10]", "nodeset"),
])
def test_pattern_style(pattern, style):
    assert pattern_style(pattern) == style


@pytest.mark.parametrize("pattern, words", [
    ("@nope", "@nope at column 1 is no group or label of the inventory"),
    ("@group:gpu", "no group"),
    ("@rack:x", "unknown group source 'rack'"),
    ("web:db^x", "'^' at column 7 (ClusterShell's xor) cannot be mixed with Ansible's syntax"),
    ("~(", "bad regular expression"),
    ("nothere*", "'nothere*' at column 1 matches no inventory host or group"),
    ("~zz", "matches no inventory host or group"),
    ("web[7]", "group web has 3 hosts"),
    ("web[2:1]", "goes backwards"),
    ("web:", "nothing after ':'"),
    ("web::db", "missing name before ':'"),
])
def test_select_errors(inv, pattern, words):
    with pytest.raises(NodeSetError) as info:
        select(pattern, inv)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_exclusion_of_nothing_is_fine(inv):
    assert select("web:!nothere*", inv) == ["web01", "web02", "web03"]


def test_unknown_group_without_inventory():
    with pytest.raises(NodeSetError, match=r"no inventory: give one with --inventory FILE"):
        select("@gpu")


# --- host files and select_hosts ------------------------------------------------------------------------------


def test_read_hostfile(tmp_path):
    f = tmp_path / "hosts.txt"
    f.write_text("# pssh and clush\nh1\nroot@h2:2200  # comment\n\nn[1-2]\n[::1]:22\n")
    entries = read_hostfile(str(f))
    assert [(e.name, e.user, e.port) for e in entries] == [
        ("h1", None, None), ("h2", "root", 2200), ("n1", None, None), ("n2", None, None), ("::1", None, 22)]
    with pytest.raises(SelectionError, match="host file /nope: No such file"):
        read_hostfile("/nope")
    f.write_text("ok\nbad[1-\n")
    with pytest.raises(SelectionError, match=r"hosts.txt:2: .*never closed"):
        read_hostfile(str(f))


def test_select_hosts(inv, tmp_path):
    f = tmp_path / "more"
    f.write_text("web01\nroot@extra:2222\n")
    got = select_hosts(["web", "@gpu"], inventory=inv, exclude=["web02"], hostfiles=[str(f)])
    assert [h.name for h in got] == ["db-a", "db-b", "extra", "web01", "web03"]
    assert got[0].hostname == "10.0.0.9"                  # the inventory's entry
    assert got[2] == HostEntry.plain("extra", user="root", port=2222)
    assert select_hosts(["a,b"]) == [HostEntry.plain("a"), HostEntry.plain("b")]
    assert len(set(got) | set(got)) == 5                  # entries are hashable (sets, dict keys)


def test_pick_is_random_and_seeded(inv):
    a = select_hosts(["all"], inventory=inv, pick=3, seed=1)
    b = select_hosts(["all"], inventory=inv, pick=3, seed=1)
    assert a == b and len(a) == 3
    picks = {tuple(h.name for h in select_hosts(["all"], inventory=inv, pick=2, seed=s)) for s in range(20)}
    assert len(picks) > 3
    assert len(select_hosts(["all"], inventory=inv, pick=100)) == 6


@pytest.mark.parametrize("kw, words", [
    (dict(patterns=["web"], exclude=["web"]), "no host selected by web minus -x web"),
    (dict(patterns=["@nope"]), "@nope at column 1"),
    (dict(patterns=["web"], pick=0), "--pick needs a number of hosts"),
    (dict(patterns=["n[1-20]"], limit=10), "over the limit of 10"),
])
def test_select_hosts_errors(inv, kw, words):
    with pytest.raises(SelectionError) as info:
        select_hosts(inventory=inv, **kw)
    assert words in str(info.value)
