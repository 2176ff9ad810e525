"""The agent file shipped to hosts: its bytes and content hash."""

from __future__ import annotations

import functools
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # (hashlib and pathlib load when used: the fast `run local` path loads this module)
    from pathlib import Path

#: The start of both bootstraps (``python -I -S -c``): ``_rd(path)``, the
#: bytes of a regular file of this user (or root), opened without
#: following a symbolic link or waiting on a FIFO; None for anything else.
PRELUDE = """\
import sys,os,stat
def _rd(p):
    try:f=os.open(p,os.O_RDONLY|os.O_NOFOLLOW|os.O_NONBLOCK)
    except OSError:return None
    try:
        s=os.fstat(f)
        if not stat.S_ISREG(s.st_mode) or s.st_uid not in (os.getuid(),0):return None
        r=[]
        while 1:
            x=os.read(f,1<<20)
            if not x:return b''.join(r)
            r.append(x)
    finally:os.close(f)
"""

#: For the bootstraps that hash (the SSH one and the ship script): ``_H``,
#: SHA-256 from the interpreter's built-in module when it has one
#: (``hashlib`` loads OpenSSL and reads its configuration: 3 ms of every
#: agent call here).
SHA256 = """\
try:from _sha2 import sha256 as _H
except ImportError:
    try:from _sha256 import sha256 as _H
    except ImportError:from hashlib import sha256 as _H
"""

#: Python source that runs the agent from bytes the bootstrap has checked:
#: ``_p`` its file (``sys.argv[0]``, the arguments after it), ``_b`` its
#: bytes, ``_c`` the ``__pycache__`` directory to keep its bytecode in (or
#: None: compile every time), ``_D`` the exit status for a damaged cached
#: bytecode file (None: compile instead).  The cached bytecode is used only
#: if it is a checked-hash ``.pyc`` (PEP 552) of exactly these bytes (its
#: header holds their source hash), read from a directory nobody else can
#: write (the bootstraps check it: the header proves which source a file
#: was compiled from, not who wrote it); else the bytes are compiled and
#: the ``.pyc`` written again (atomically, 0600).  ``_V``, when the
#: bootstrap checked the bytes' SHA-256, is that hash: the module gets it as
#: ``BOOTSTRAP_SHA256`` (its own ``--expect-hash`` check is then done).  The module is run as
#: ``chaperone_agent``; its exit status is given without the interpreter's
#: teardown (~8 ms): what sys.stdout/sys.stderr hold is flushed (a failed
#: flush is status 120, as at a normal exit), then ``os._exit``.
RUN_AGENT = """\
import marshal,_imp,_frozen_importlib_external as _e
_h=_e.MAGIC_NUMBER+b'\\3\\0\\0\\0'+_imp.source_hash(_e._RAW_MAGIC_NUMBER,_b)
_k=_q=None
if _c:
    _q=os.path.join(_c,os.path.basename(_p).rpartition('.')[0]+'.'+sys.implementation.cache_tag+'.pyc')
    _y=_rd(_q)
    if _y and _y[:16]==_h:
        try:_k=marshal.loads(memoryview(_y)[16:])
        except Exception:pass
        if type(_k) is not type(_rd.__code__):
            _k=None
            if _D is not None:sys.exit(_D)
if _k is None:
    _k=compile(_b,_p,'exec',dont_inherit=True)
    if _q and not sys.dont_write_bytecode:
        _t=_q+'.%d.tmp'%os.getpid()
        try:
            if not os.path.isdir(_c):os.mkdir(_c,0o700)
            _f=os.open(_t,os.O_WRONLY|os.O_CREAT|os.O_EXCL|os.O_NOFOLLOW,0o600)
            try:
                _v=memoryview(_h+marshal.dumps(_k))
                while _v:_v=_v[os.write(_f,_v):]
            finally:os.close(_f)
            os.replace(_t,_q)
        except OSError:
            try:os.unlink(_t)
            except OSError:pass
_m=type(sys)('chaperone_agent')
_m.__file__=_p
_m.BOOTSTRAP_SHA256=globals().get('_V')
exec(_k,_m.__dict__)
_r=_m.main()
try:
    sys.stdout.flush()
    sys.stderr.flush()
except Exception:
    _r=120
os._exit(_r)
"""

#: The local bootstrap (``chaperone.transport.LocalTransport``):
#: ``BOOT AGENT_FILE ARGS...`` runs the installed package's agent file.  Its
#: bytecode cache is used only where nobody but this user or root can
#: write (the file, its directory and ``__pycache__``); elsewhere the agent
#: is compiled at every call and no ``.pyc`` written.
LOCAL_BOOTSTRAP = PRELUDE + """\
_p=sys.argv[1]
sys.argv=sys.argv[1:]
_b=_rd(_p)
if _b is None:
    sys.stderr.write('chaperone-agent: %s is not a regular file of this user or root\\n'%_p)
    os._exit(3)
def _ok(d):
    try:s=os.lstat(d)
    except OSError:return None
    return stat.S_ISDIR(s.st_mode) and s.st_uid in (os.getuid(),0) and not s.st_mode&18
_c=os.path.join(os.path.dirname(_p) or '.','__pycache__')
if not _ok(os.path.dirname(_p) or '.') or _ok(_c) is False:_c=None
_D=None
""" + RUN_AGENT


@functools.lru_cache(maxsize=1)
def agent_path() -> Path:
    """``remote/agent.py``: in the wheel it is ``chaperone/_remote/agent.py``."""
    from pathlib import Path

    return Path(agent_file())


@functools.lru_cache(maxsize=1)
def agent_file() -> str:
    """:func:`agent_path` as a string (without importing pathlib)."""
    here = os.path.dirname(os.path.realpath(__file__))
    for candidate in (os.path.join(here, "_remote", "agent.py"),
                      os.path.join(os.path.dirname(here), "remote", "agent.py")):
        if os.path.isfile(candidate):
            return candidate
    try:  # an installed wheel maps remote/ to the chaperone._remote package
        from importlib.resources import files

        path = str(files("chaperone._remote").joinpath("agent.py"))
        if os.path.isfile(path):
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    raise FileNotFoundError("the chaperone agent (remote/agent.py) is missing from this install")


@functools.lru_cache(maxsize=1)
def agent_bytes() -> bytes:
    return agent_path().read_bytes()


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` in hex, as the bootstraps compute it (``_H``:
    the built-in module, without loading OpenSSL, when there is one)."""
    try:
        from _sha2 import sha256  # Python >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256  # type: ignore[no-redef]
        except ImportError:  # (a Python built without its own hashes)
            from hashlib import sha256  # type: ignore[no-redef]
    return sha256(data).hexdigest()


@functools.lru_cache(maxsize=1)
def agent_hash() -> str:
    return sha256_hex(agent_bytes())


@functools.lru_cache(maxsize=1)
def agent_module():
    """``remote/agent.py`` loaded as a module (stdlib only, bytecode cached):
    the library validates program.json with the agent's own validator, which
    tests prove equal to ``chaperone.models`` (and is much faster to import
    than pydantic)."""
    # (what importlib.util re-exports, without importing importlib.util and
    # contextlib: the fast `run local` path loads the agent this way)
    from importlib._bootstrap import module_from_spec
    from importlib._bootstrap_external import spec_from_file_location

    spec = spec_from_file_location("chaperone._agent", agent_file())
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
