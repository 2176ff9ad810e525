"""What runs on a host for each agent call: the bootstrap that checks and
runs the shipped agent, the script that ships it, and the command line
given to the login shell (:func:`agent_command`).  Stdlib only, and no
asyncio: the head start's fast paths build their calls from here before
anything else loads (see chaperone/cli/fastlogs.py)."""

from __future__ import annotations

import shlex

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional

from ...agent_source import PRELUDE, RUN_AGENT, SHA256, agent_hash

#: Exit status of the remote bootstrap when the agent file is missing, stale or damaged.
SHIP_AGAIN = 97
REMOTE_DIR = "~/.chaperone"

#: ``_dir(path)``: 1 for a directory of this user that nobody else can
#: write, 0 when there is none, -1 for something else than a directory;
#: anything unsafe (a symbolic link, another owner, writable by group or
#: others: someone else could plant code there that would run as this
#: user) is refused: one line saying what to do, exit 3.
SAFE_DIR = """\
def _no(m):
    sys.stderr.write('chaperone-agent: %s\\n'%m)
    sys.exit(3)
def _dir(d):
    try:s=os.lstat(d)
    except FileNotFoundError:return 0
    except OSError as e:_no('%s: %s'%(d,e.strerror))
    if stat.S_ISLNK(s.st_mode):_no('%s is a symbolic link; chaperone runs its agent only from a directory of its own: remove the link (chaperone makes the directory)'%d)
    if not stat.S_ISDIR(s.st_mode):return -1
    if s.st_uid!=os.getuid():_no('%s belongs to uid %d, not to this user: remove it (chaperone makes it again)'%(d,s.st_uid))
    if s.st_mode&18:_no('%s is writable by group or others (mode %04o): run chmod go-w %s'%(d,stat.S_IMODE(s.st_mode),d))
    return 1
"""

#: Run by ``python -c`` on the host: ``BOOT AGENT_FILE SHA256 ARGS...`` runs
#: AGENT_FILE with ARGS if its content has that hash, else exits 97 (ship it
#: again): also when the file is not a regular file (a directory, a FIFO, a
#: symbolic link), when ``__pycache__`` is not a directory, or when the
#: cached bytecode of these very bytes is damaged (the ship script moves
#: such entries aside and says so).  ``~/.chaperone`` and its
#: ``__pycache__`` must be directories of this user that nobody else can
#: write (else one line, exit 3); the code run is the checked bytes, or a
#: checked-hash ``.pyc`` of them (see agent_source.RUN_AGENT).
BOOTSTRAP = PRELUDE + SHA256 + SAFE_DIR + """\
_p=sys.argv[1]
_d=os.path.dirname(_p) or '.'
_x=_dir(_d)
if _x<0:_no('%s is not a directory: move it away (chaperone makes it)'%_d)
_c=os.path.join(_d,'__pycache__')
if _x<1 or _dir(_c)<0:sys.exit(97)
_b=_rd(_p)
if _b is None or _H(_b).hexdigest()!=sys.argv[2]:sys.exit(97)
_V=sys.argv[2]
sys.argv=sys.argv[1:2]+sys.argv[3:]
_D=97
""" + RUN_AGENT

#: Run by ``python -c`` in the ship script: ``SHIP TMP SHA256 DEST`` checks
#: the directory (as BOOTSTRAP; exit 3 when unsafe) and the upload (exit 4
#: when its hash is not SHA256), moves aside what is in the way (anything
#: but a regular file at DEST, anything but a directory at __pycache__),
#: renames TMP to DEST, and writes its checked-hash bytecode (replacing a
#: damaged one).  Each repair is a line ``chaperone-agent: note: ...`` on
#: stderr (see ship_notes).
SHIP = PRELUDE + SHA256 + SAFE_DIR + """\
import time,marshal,_imp,_frozen_importlib_external as _e
_t,_s,_p=sys.argv[1:4]
_d=os.path.dirname(_p) or '.'
if _dir(_d)<1:_no('%s is not a directory: move it away (chaperone makes it)'%_d)
_b=_rd(_t)
if _b is None or _H(_b).hexdigest()!=_s:sys.exit(4)
_c=os.path.join(_d,'__pycache__')
_n=[]
def _kind(m):
    for t,w in ((stat.S_ISDIR,'a directory'),(stat.S_ISFIFO,'a FIFO'),(stat.S_ISLNK,'a symbolic link'),(stat.S_ISREG,'a file')):
        if t(m):return w
    return 'a special file'
def _aside(p,want):
    try:s=os.lstat(p)
    except FileNotFoundError:return
    if want(s.st_mode):return
    a='%s.damaged-%d-%d'%(p,time.time(),os.getpid())
    os.rename(p,a)
    _n.append('moved aside %s (%s) to %s'%(p,_kind(s.st_mode),a))
_aside(_p,stat.S_ISREG)
_aside(_c,stat.S_ISDIR)
if _dir(_c)==0:os.mkdir(_c,0o700)
os.rename(_t,_p)
_h=_e.MAGIC_NUMBER+b'\\3\\0\\0\\0'+_imp.source_hash(_e._RAW_MAGIC_NUMBER,_b)
_q=os.path.join(_c,os.path.basename(_p).rpartition('.')[0]+'.'+sys.implementation.cache_tag+'.pyc')
_y=_rd(_q)
if _y and _y[:16]==_h:
    try:marshal.loads(memoryview(_y)[16:])
    except Exception:_n.append('replaced the damaged cached bytecode %s'%_q)
_z=_h+marshal.dumps(compile(_b,_p,'exec',dont_inherit=True))
_u=_q+'.%d.tmp'%os.getpid()
_f=os.open(_u,os.O_WRONLY|os.O_CREAT|os.O_EXCL|os.O_NOFOLLOW,0o600)
try:
    _v=memoryview(_z)
    while _v:_v=_v[os.write(_f,_v):]
finally:os.close(_f)
os.replace(_u,_q)
for _x in _n:sys.stderr.write('chaperone-agent: note: %s\\n'%_x)
"""


def agent_file() -> str:
    """Where the agent lives on a host (content-addressed)."""
    return "%s/agent-%s.py" % (REMOTE_DIR, agent_hash()[:16])


#: The agent's global options that take a value (see command_of).
_GLOBAL_VALUES = ("--root", "--marker", "--expect-hash", "--login-env")


def command_of(args: List[str]) -> Optional[str]:
    """The agent command in an agent argv (after its global options)."""
    i = 0
    while i < len(args):
        name = args[i].partition("=")[0]
        if name in _GLOBAL_VALUES:
            i += 1 if "=" in args[i] else 2
            continue
        return args[i]
    return None


def agent_command(python: str, root: Optional[str], args: List[str]) -> str:
    """The remote command that runs ``agent.py ARGS`` (for the login shell).

    Most commands: ``exec sh -c 'exec python3 ...'``, one process all the
    way.  ``start`` instead keeps the two shells (``sh -c 'python3 ...
    --login-env $$; exit $?'; exit``: a fork each instead of an exec), so
    that the agent reads, in /proc, the environment the login shell was
    given by sshd and the one it gives the commands it runs, as they were
    before ``python3`` ran (a shim, such as pyenv's, changes PATH and adds
    variables; Python adds LC_CTYPE=C.UTF-8 in the C locale, PEP 538): the
    bases of the program's environment (see the agent's read_login_env)."""
    start = command_of(args) == "start"
    if root:
        args = ["--root", root, *args]
    # A small bootstrap reads the agent file, checks its sha256 and only
    # then runs it (as __main__, in the same process): a missing, damaged,
    # truncated or stale copy exits 97 ("ship it again") before any of it
    # runs.  (Checking the hash inside the agent alone misses a copy too
    # damaged to reach that check: empty, truncated, a syntax error.)  The
    # agent, told the hash the bootstrap checked (BOOTSTRAP_SHA256), does
    # not check it again; run any other way, --expect-hash makes it check.
    # -I -S: stdlib only, nothing from the host's site-packages or PYTHON* vars.
    # A missing python makes `exec` fail with 127.
    run = "%s -I -S -c %s %s %s --expect-hash %s%s %s" % (
        shlex.quote(python), shlex.quote(BOOTSTRAP), agent_file(), agent_hash(), agent_hash(),
        " --login-env $$" if start else "", " ".join(shlex.quote(a) for a in args))
    # The login shell runs this: plain sh syntax only, and a bare `exit`
    # (fish and csh have no `$?`) after a command it must not replace by
    # an exec (a list: `;`).
    if start:
        return "sh -c %s; exit" % shlex.quote(run + "; exit $?")
    return "exec sh -c %s" % shlex.quote("exec " + run)
