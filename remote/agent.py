#!/usr/bin/env python3
"""chaperone agent: runs one program detached, spools its output, reports back.

One file, Python 3.8+, standard library only; shipped verbatim to each host.

    agent.py [--root DIR] [--marker M] [--login-env FD] start [--follow]   < program.json
    agent.py [--root DIR] [--marker M] status ID
    agent.py [--root DIR] [--marker M] follow ID [--stdout-offset N] [--stderr-offset N]
    agent.py [--root DIR] output ID --stream stdout|stderr --offset N [--length L]
    agent.py [--root DIR] [--marker M] signal ID SIGNAL [--grace SECONDS]
    agent.py [--root DIR] [--marker M] list
    agent.py [--root DIR] [--marker M] clean ID [--force]
    agent.py [--root DIR] [--marker M] control ID   < message.json
    agent.py [--root DIR] [--marker M] stdin ID     < frames

The wire format (program.json, state.json, the follow frames, the callback
bodies) is documented in docs/protocol.md and defined in chaperone/models.py;
this file mirrors it in plain dicts.

Each run lives in ``ROOT/ID/`` (0700): ``program.json`` (token removed),
``state.json`` (written atomically at each transition), ``stdout``,
``stderr``, ``stdin`` (when given as data) and ``control`` (a FIFO the
supervisor reads requests from).  Files are 0600.

Output capture (``config.capture``): by default (``"file"``) the program's
stdout and stderr ARE the spool files (opened ``O_WRONLY``, as after
``nohup cmd > file``): the supervisor moves no bytes and only watches the sizes.
``"pipe"``: they are pipes the supervisor splices into the spool files.
"""

import _signal
import errno
import math
import os
import select
import struct
import stat
import sys
import time

# Every agent call pays for its imports (json, re, signal and threading
# alone cost 12-16 ms: json loads re, re and signal load enum), so the
# common paths import none of them: JSON goes through the C accelerator
# _json (see loads/dumps), signals through _signal (the C module under
# `signal`; see SIGNAL_NAMES), the run id and option checks are plain
# string tests, and threading is only imported by runs with a callback.
# Imported where needed, off the common paths: base64 (stdin data),
# shutil (which loads zlib, bz2, lzma), ssl, http.client, ctypes.

PROTOCOL_VERSION = 1
#: The run id pattern (chaperone/models.py's RUN_ID_PATTERN), as check_id
#: implements it without `re`: and never with '..' in it.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ID_FIRST = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ID_CHARS = _ID_FIRST + "._-"
MAX_PROGRAM_JSON = 16 << 20
#: Most program.json documents one batch start takes (the library sends
#: at most 256 at a time).
MAX_BATCH = 4096
#: Longest control message (one line of the FIFO, or `control`'s stdin).
MAX_CONTROL = 1 << 16
STREAMS = ("stdout", "stderr")
FINAL_STATES = ("done", "error", "lost")
RUSAGE_FIELDS = (
    "ru_utime", "ru_stime", "ru_maxrss", "ru_ixrss", "ru_idrss", "ru_isrss",
    "ru_minflt", "ru_majflt", "ru_nswap", "ru_inblock", "ru_oublock",
    "ru_msgsnd", "ru_msgrcv", "ru_nsignals", "ru_nvcsw", "ru_nivcsw",
)
CONFIG_DEFAULTS = {
    "timeout": None,
    "output_buffer": 16 << 20,
    "output_latency": 0.2,
    "retry_frequency": 10.0,
    "kill_grace": 10.0,
    "callback_timeout": 86400.0,
    "capture": "file",
}
#: ``config.capture``: the program writes the spool files itself, or pipes
#: the supervisor splices into them.
CAPTURES = ("file", "pipe")
#: Follow frames: kind (b"1" stdout, b"2" stderr, b"S" state JSON,
#: b"E" end), offset, length; then ``length`` bytes.
FRAME = struct.Struct("!cQI")
STREAM_KINDS = (b"1", b"2")
SEAL = FRAME.pack(b".", 0, 0)
CHUNK = 1 << 20

#: Exit status of ``stdin ID`` for a run whose input is not a stream.
NOT_A_STREAM = 5
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
#: Seconds to keep reading the pipes (pipe capture) or to wait for the
#: spool files to be let go of (file capture) after the program exited, for
#: output from children it left behind that still hold them open.
LINGER = 1.0
#: File capture, while something is left behind after the program exited:
#: how often to look whether it still holds a spool file.
HOLD_CHECK = 0.05
#: File capture where no inotify watch of the spool files wakes it at each
#: write (spool_watch): the supervisor looks at their sizes this soon after
#: they grew, backing off (doubling) to SIZE_POLL_MAX while they do not.
SIZE_POLL_MIN = 0.01
SIZE_POLL_MAX = 1.0
#: How often the supervisor looks whether its run's directory is still
#: there, where inotify cannot tell it.
DIR_CHECK = 1.0
#: How often a write that found the spool's file system full is tried again.
FULL_RETRY = 1.0
#: How long a final state waits for readers holding the run's lock (a
#: reader holds it for a few system calls; this bounds a stopped one).
LOCK_WAIT = 10.0


class AgentError(Exception):
    """A one-line error for the user; exit status ``code``."""

    def __init__(self, message, code=2):
        Exception.__init__(self, message)
        self.code = code


# --- JSON and signals without their (costly to import) modules -----------------


def _stdlib_json():
    import json

    return json


def _lean_json():
    """``(loads, dumps)`` over the C accelerator ``_json``, exactly as
    ``json.loads(text)`` and ``json.dumps(obj, sort_keys=...)`` (with
    every other argument left at its default) behave, without importing the
    json package (~10 ms: it loads re and enum).  They build the very
    scanner and encoder json builds from _json; anything they do not take
    (bytes, a BOM, invalid JSON, objects json cannot encode, ...) is handed
    to json itself, so the errors are json's own.  Raises when _json is
    missing or its interface differs (the caller then uses json)."""
    import _json

    scan_once = _json_scanner(_json)
    make_encoder = _json.make_encoder
    encode_str = _json.encode_basestring_ascii
    space = " \t\n\r"  # json.decoder.WHITESPACE
    default = _json_default

    def loads(text):
        if isinstance(text, str) and not text.startswith("\ufeff"):
            try:
                obj, end = scan_once(text, len(text) - len(text.lstrip(space)))
            except Exception:  # not JSON: json says how
                pass
            else:
                if end == len(text) or not text[end:].strip(space):
                    return obj
        return _stdlib_json().loads(text)

    def dumps(obj, sort_keys=False):
        # JSONEncoder.encode(): a str directly, else the C encoder with the
        # defaults (ensure_ascii, check_circular, allow_nan, separators
        # ", " and ": ", no indent, no skipkeys).
        if isinstance(obj, str):
            return encode_str(obj)
        try:
            return "".join(make_encoder({}, default, encode_str, None, ": ", ", ", sort_keys, False, True)(obj, 0))
        except Exception:  # json raises it too, or does it another way
            return _stdlib_json().dumps(obj, sort_keys=sort_keys)

    _check_lean_json(scan_once, make_encoder, encode_str)
    return loads, dumps


def _json_scanner(_json):
    """_json's scanner, as json.decoder.JSONDecoder() makes it."""
    constants = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}

    class Context(object):
        """What json.decoder.JSONDecoder() gives make_scanner."""
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = constants.__getitem__

    return _json.make_scanner(Context())


def _json_default(o):
    # (json.JSONEncoder.default)
    raise TypeError("Object of type %s is not JSON serializable" % o.__class__.__name__)


def _check_lean_json(scan_once, make_encoder, encode_str):
    """The interface check, on the very pieces (no fallback): an error or
    a difference here and the agent uses json."""
    doc = '{"b": [1, -2.5e-07, "\\u00e9\\ud83d\\ude00", null, true, NaN], "a": {}}'
    obj, end = scan_once(doc, 0)
    text = "".join(make_encoder({}, _json_default, encode_str, None, ": ", ", ", True, False, True)(obj, 0))
    if end != len(doc) or text != '{"a": {}, "b": [1, -2.5e-07, "\\u00e9\\ud83d\\ude00", null, true, NaN]}':
        raise ValueError("_json is not what json uses")


try:
    loads, dumps = _lean_json()
except Exception:  # pragma: no cover - no _json, or another interface
    def loads(text):
        return _stdlib_json().loads(text)

    def dumps(obj, sort_keys=False):
        return _stdlib_json().dumps(obj, sort_keys=sort_keys)


def _signal_names():
    """``{number: name}`` and ``{name: number}`` of the signals, as
    ``signal.Signals`` has them (without importing signal, which loads
    enum): the names ``signal`` takes from ``_signal`` that are upper case
    and start with SIG but not SIG_ (or with CTRL_), sorted by (value,
    name); of aliases the first is the name (SIGABRT, not SIGIOT), and
    every alias is a name for its number."""
    members = [(name, value) for name, value in vars(_signal).items()
               if not name.startswith("_")  # (what `from _signal import *` takes)
               and (name.isupper() and (name.startswith("SIG") and not name.startswith("SIG_"))
                    or name.startswith("CTRL_"))]
    try:
        members.sort(key=lambda t: (t[1], t[0]))
    except TypeError:  # pragma: no cover - (as enum does)
        members.sort(key=lambda t: t[0])
    names = {}
    for name, value in members:
        names.setdefault(value, name)
    return names, dict(members)


#: Signal number -> name, and name (aliases too) -> number.
SIGNAL_NAMES, SIGNAL_NUMBERS = _signal_names()


# --- small helpers ----------------------------------------------------------


def now_iso():
    """The time in ISO 8601 UTC, as ``datetime.now(timezone.utc).isoformat()``
    writes it (without importing datetime)."""
    t = time.time()
    secs = math.floor(t)
    micros = int(round((t - secs) * 1e6))
    if micros >= 1000000:
        secs, micros = secs + 1, micros - 1000000
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return text + (".%06d" % micros if micros else "") + "+00:00"


def remove_tree(path):
    """Remove the directory ``path`` and everything in it, ignoring errors,
    as ``shutil.rmtree(path, ignore_errors=True)`` (without importing
    shutil: ~10 ms, it loads re, fnmatch and the compression modules).
    Symbolic links in it are removed, never followed."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        entries = []
    for entry in entries:
        try:
            subdir = entry.is_dir(follow_symlinks=False)
        except OSError:
            subdir = False
        if subdir:
            remove_tree(entry.path)
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def private_dir(parent, prefix):
    """A new 0700 directory ``parent/prefix`` + 8 random characters (as
    ``tempfile.mkdtemp`` makes it, without importing tempfile)."""
    while True:
        path = os.path.join(parent, prefix + os.urandom(4).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def valid_id(name):
    """``name`` matches RUN_ID_PATTERN in full (so no newline, not even a
    trailing one) and has no '..' in it."""
    return (isinstance(name, str) and 0 < len(name) <= 128 and name[0] in _ID_FIRST
            and not name.strip(_ID_CHARS) and ".." not in name)


def check_id(run_id):
    if not valid_id(run_id):
        raise AgentError(
            "invalid run id %r: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'" % (run_id,)
        )
    return run_id


_BOOT_ID = []


def boot_id():
    if not _BOOT_ID:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID.append(f.read().strip() or None)
        except OSError:
            _BOOT_ID.append(None)
    return _BOOT_ID[0]


_HOST_ID = []


def host_id():
    """Who records and judges runs: ``MACHINE-ID/HOSTNAME/PIDNS``, the
    machine id (/etc/machine-id, ``-`` if none), the host name and the
    inode of this process's pid namespace (/proc/self/ns/pid, ``-`` if
    unknown).  A run is judged (found lost, signalled) only by an agent
    with the same host_id: two hosts sharing a home (NFS), or containers
    sharing a spool, each judge only their own runs."""
    if not _HOST_ID:
        machine = None
        for where in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
            try:
                with open(where, "rb") as f:
                    machine = f.read(256).decode("ascii", "replace").strip() or None
            except OSError:
                continue
            if machine:
                break
        try:
            ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            ns = None
        _HOST_ID.append("%s/%s/%s" % (machine or "-", os.uname()[1], ns or "-"))
    return _HOST_ID[0]


def proc_stat(pid):
    """(state letter, start time in clock ticks since boot, process group,
    session) of ``pid``, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        fields = data[data.rindex(b")") + 2:].split()
        return fields[0].decode("ascii", "replace"), int(fields[19]), int(fields[2]), int(fields[3])
    except (ValueError, IndexError):
        return None


#: Clock ticks per second (what /proc/PID/stat counts start times in).
try:
    CLK_TCK = os.sysconf("SC_CLK_TCK")
except (ValueError, OSError, AttributeError):  # pragma: no cover
    CLK_TCK = 100
try:
    PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):  # pragma: no cover
    PAGE_SIZE = 4096


def ticks_now():
    """Now, in clock ticks since boot, on the clock /proc/PID/stat's start
    times use (/proc/uptime: both count from boot, suspend included); or None."""
    try:
        with open("/proc/uptime", "rb") as f:
            return int(float(f.read(64).split()[0]) * CLK_TCK)
    except (OSError, ValueError, IndexError):
        return None


#: Process ids are below this (/proc/sys/kernel/pid_max; Linux's ceiling
#: is 2**22).
PID_LIMIT = 1 << 22


def pid_limit():
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            return min(int(f.read(32)), PID_LIMIT)
    except (OSError, ValueError):
        return PID_LIMIT


def valid_pid(value):
    """A number that can be another process's id (1 is init: never ours)."""
    return _is_int(value) and 1 < value < PID_LIMIT


def group_members(pgid):
    """[(pid, start ticks, session)] of the live processes in process
    group ``pgid`` (Linux /proc)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        info = proc_stat(int(entry))
        if info is not None and info[2] == pgid and info[0] not in ("Z", "X", "x"):
            out.append((int(entry), info[1], info[3]))
    return out


def run_group(st):
    """``(pgid, None)`` when the process group ``st`` records is proven to
    be the run's and has a live member; else ``(None, why)``.  Nothing is
    ever signalled by a recorded number without this proof (a damaged or
    stale state.json must not name someone else's processes):

    * ``pid``/``pgid`` are equal integers 1 < N < pid_max (the program
      leads its own session), ``pid_start`` is recorded;
    * the run was recorded in this boot (``boot_id``) by this host in this
      pid namespace (``host_id``);
    * either process N lives with the recorded start time (it is the
      program: a number is never used twice at once, and the start time
      tells a reused one), and it still leads group N;
    * or process N is gone, but processes of group N live on: Linux never
      gives out a number while it is some live process's group or session
      id, so they have been group N since the program made it, unless the
      run's whole group ended and a new session leader got the number
      later.  So each member must be in session N and have started after
      the program, and, once the run's end is known (``end_ticks``), one
      of them must have started before that end (a later group N would
      have only members started after the run's group was gone)."""
    pgid = st.get("pgid")
    if st.get("pid") is None and pgid is None:
        return None, "its program never started"
    limit = pid_limit()
    if not (valid_pid(pgid) and pgid < limit and st.get("pid") == pgid):
        return None, "its process group is not a process id of this host (%r)" % (pgid,)
    start = st.get("pid_start")
    if not _is_int(start) or isinstance(start, bool):
        return None, "its program's start time was not recorded"
    if not st.get("boot_id") or st.get("boot_id") != boot_id():
        return None, "it was recorded before the host's last boot"
    if st.get("host_id") != host_id():
        return None, "it was recorded by another host or pid namespace (%s)" % (st.get("host_id"),)
    info = proc_stat(pgid)
    if info is not None:
        if info[1] != start:
            return None, "process %d is another program now" % pgid
        if info[2] != pgid:
            return None, "process %d left its process group" % pgid
        return pgid, None
    members = group_members(pgid)
    if not members:
        return None, "nothing of it runs any more"
    end = st.get("end_ticks")
    for _, started, session in members:
        if session != pgid or started < start:
            return None, "process group %d is not the program's session any more" % pgid
    if _is_int(end) and not any(started <= end + 1 for _, started, _ in members):
        return None, "process group %d started after the run ended" % pgid
    return pgid, None


def signal_group(st, sig):
    """Send ``sig`` to the run's process group if run_group() proves it is
    the run's: ``(pgid, None)`` when sent, else ``(None, why)``."""
    pgid, why = run_group(st)
    if pgid is None:
        return None, why
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return None, "nothing of it runs any more"
    except PermissionError:
        return None, "process group %d is not this user's" % pgid
    return pgid, None


def proc_start_ticks(pid):
    """Start time of ``pid`` in clock ticks since boot, or None."""
    info = proc_stat(pid)
    return info and info[1]


def pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json_atomic(path, obj, durable=True, pad=0):
    """Replace ``path`` with ``obj`` as JSON (sorted keys), atomically: a
    temporary file renamed over it, so a reader sees the old document or
    the new one.  ``durable``: fsync it before the rename and its directory
    after (the rename itself is only durable then), so it survives a power
    loss too (a final state); without, an OS crash may leave the old
    document, the new one, or a damaged file (see Run.read_state).
    ``pad``: fill the file with spaces up to that size (JSON allows
    trailing white space).  A failed write leaves no temporary file."""
    data = json_bytes(obj, pad)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | SAFE_OPEN, 0o600)
    try:
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(os.path.dirname(path))


def json_bytes(obj, pad=0):
    """``obj`` as the agent stores JSON: sorted keys, a newline, then
    spaces up to ``pad`` bytes."""
    data = (dumps(obj, sort_keys=True) + "\n").encode()
    return data + b" " * (pad - len(data)) if pad > len(data) else data


def fsync_dir(path):
    try:
        fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # pragma: no cover - a directory we just wrote in
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directories
        pass
    finally:
        os.close(fd)


#: The space a run's next state is written into: a file of spaces as large
#: as state.json, made with the run (see write_state_file).
RESERVE = "state.json.next"


def reserve_size(st):
    """How large a run's state files are made: room for its final state
    (a few hundred bytes more than a running one: rusage, end, error),
    in whole 4 KiB blocks."""
    return (len(dumps(st, sort_keys=True)) + 4096 + 4095) // 4096 * 4096


def write_state_file(dirpath, st, durable, exchange=None):
    """Write the state ``st`` as ``dirpath``/state.json without needing
    any new room on the file system, when the run has its reserve (made
    with the run: a file of spaces as large as state.json): the document
    is written over the reserve's spaces in place, then the reserve is
    renamed over state.json.  A running state with ``exchange``
    (renameat2 RENAME_EXCHANGE) swaps the two instead, so the old
    state.json, as large, becomes the reserve for the next state; a final
    state uses the reserve up.  So a full file system (ENOSPC) cannot keep
    the end of a run from being recorded.  Without a reserve (or on a
    file system that must allocate to overwrite, such as btrfs): a
    temporary file renamed over state.json (write_json_atomic)."""
    path = os.path.join(dirpath, "state.json")
    spare = os.path.join(dirpath, RESERVE)
    final = st["state"] in FINAL_STATES
    try:
        fd = os.open(spare, os.O_WRONLY | SAFE_OPEN)
    except OSError:
        fd = None
    if fd is not None:
        try:
            info = os.fstat(fd)
            data = json_bytes(st, info.st_size)
            if stat.S_ISREG(info.st_mode) and len(data) == info.st_size:
                view, at = memoryview(data), 0
                while at < len(data):
                    at += os.pwrite(fd, view[at:], at)
                if durable:
                    os.fsync(fd)
            else:
                data = None
        finally:
            os.close(fd)
        if data is not None:
            if final or exchange is None or not exchange(spare, path):
                os.rename(spare, path)
                if not final:
                    make_reserve(dirpath, len(data))  # (best effort: it needs room)
            if durable:
                fsync_dir(dirpath)
            return
    write_json_atomic(path, st, durable, pad=0 if final else reserve_size(st))


def make_reserve(dirpath, size):
    """Make the run's reserve (RESERVE), ``size`` bytes of spaces, written
    (not sparse: the blocks are the file system's at once).  False when
    there is no room for it."""
    tmp = os.path.join(dirpath, RESERVE + ".%d.tmp" % os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | SAFE_OPEN, 0o600)
    except OSError:
        return False
    try:
        try:
            write_all(fd, b" " * size)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(dirpath, RESERVE))
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def renameat2_exchange():
    """``exchange(a, b)``: swap two paths atomically (Linux renameat2
    RENAME_EXCHANGE, through libc): True; False (and False from then on)
    where the file system cannot (NFS: EINVAL), so the caller renames
    instead; or None where there is no renameat2 at all."""
    lib = _libc()
    fn = getattr(lib, "renameat2", None) if lib is not None else None
    if fn is None:
        return None
    import ctypes

    unable = []

    def exchange(a, b):
        if unable:
            return False
        if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
            code = ctypes.get_errno()
            if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
                unable.append(code)
                return False
            raise OSError(code, os.strerror(code), a)
        return True

    return exchange


#: JSON the agent reads (program.json, batch starts, control messages,
#: state.json) is refused beyond this depth before it is parsed: the
#: agent's own documents are 4 levels deep at most, and a parser's
#: recursion must never be what stops a deep one.
MAX_DEPTH = 32
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def json_nesting_ok(data, limit=MAX_DEPTH):
    """Whether the JSON text ``data`` (bytes) nests arrays and objects at
    most ``limit`` deep, found without parsing it (at the speed of
    bytes.count/replace/translate for any size).  Brackets inside strings
    do not count: escaped backslashes and quotes are dropped, then every
    other piece between quotes is a string.  For invalid JSON the answer
    still bounds how deep a parser gets before it fails: up to there the
    text is valid, and read alike."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return True
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(text.split(b'"')[0::2]).translate(None, _NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return True
    depth = 0
    for c in brackets:
        if c == 91 or c == 123:  # [ {
            depth += 1
            if depth > limit:
                return False
        else:
            depth -= 1
            if depth < 0:
                return True  # a parser fails here (or before)
    return True


def parse_json(data, what, limit=MAX_DEPTH):
    """The JSON document ``data`` (bytes, UTF-8), refused in one line
    (AgentError) when it is not JSON or nests deeper than ``limit``."""
    if not json_nesting_ok(data, limit):
        raise AgentError("%s is nested too deep (over %d levels of arrays and objects)" % (what, limit))
    try:
        return loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise AgentError("%s is not valid JSON: %s" % (what, (str(e) or type(e).__name__).splitlines()[0]))


def write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue


def send_range(out, fd, pos, size):
    """Write ``size`` bytes of the file ``fd`` from ``pos`` to ``out`` (the
    agent's stdout): by ``sendfile`` (no copy through Python, no buffer to
    allocate: ``logs ID > file`` of a GiB at the pace of ``ssh HOST cat``),
    else by pread and write.  The bytes written: fewer only where the file
    ends sooner."""
    done = 0
    sendfile = getattr(os, "sendfile", None)
    while done < size:
        if sendfile is not None:
            try:
                n = sendfile(out, fd, pos + done, min(size - done, 1 << 30))
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                sendfile = None  # (not to this kind of output: read and write)
                continue
        else:
            data = os.pread(fd, min(CHUNK, size - done), pos + done)
            n = len(data)
            write_all(out, data)
        if n == 0:
            break
        done += n
    return done


def parse_signal(name):
    """'TERM', 'SIGTERM', 'sigterm' or '15' -> 15."""
    text = str(name).strip()
    if text.isdigit():
        try:
            num = int(text)
        except ValueError:  # e.g. a superscript digit: isdigit(), not a number
            num = None
        if num not in SIGNAL_NAMES:
            raise AgentError("unknown signal %r" % (name,))
        return num
    upper = text.upper()
    if not upper.startswith("SIG"):
        upper = "SIG" + upper
    if upper not in SIGNAL_NUMBERS:
        raise AgentError("unknown signal %r" % (name,))
    return SIGNAL_NUMBERS[upper]


def signal_name(num):
    return SIGNAL_NAMES.get(num) or "SIG%d" % num


# --- validation: mirrors chaperone/models.py --------------------------------


def _is_num(v):
    """A finite JSON number: NaN, infinities and ints too big for a float
    would break the supervisor's clock arithmetic."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _keys(obj, where, required, optional):
    if not isinstance(obj, dict):
        raise AgentError("%s: expected a JSON object" % where)
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise AgentError("%s: unknown field %r" % (where, unknown[0]))
    for key in required:
        if key not in obj:
            raise AgentError("%s: missing field %r" % (where, key))


def _str(v, where):
    if not isinstance(v, str):
        raise AgentError("%s: expected a string" % where)
    return v


def _no_nul(v, where):
    if "\0" in v:
        raise AgentError("%s: contains a NUL character" % where)
    return v


def validate_spec(spec):
    """Check program.json and fill defaults; raises AgentError."""
    _keys(spec, "program.json", ("id", "program"), ("version", "callback", "config"))
    version = spec.get("version", PROTOCOL_VERSION)
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise AgentError("program.json: unsupported version %r" % (spec.get("version"),))
    spec["version"] = PROTOCOL_VERSION
    check_id(spec["id"])
    _check_program(spec["program"])
    cb = spec.setdefault("callback", None)
    if cb is not None:
        _check_callback(cb)
    _check_config(spec.setdefault("config", {}))
    return spec



def _check_program(prog):
    """program.json's ``program`` (see validate_spec)."""
    _keys(prog, "program", ("argv",), ("cwd", "env", "env_inherit", "stdin", "umask", "shell", "tty"))
    argv = prog["argv"]
    if not isinstance(argv, list) or not argv:
        raise AgentError("program.argv: expected a non-empty list of strings")
    for i, arg in enumerate(argv):
        _no_nul(_str(arg, "program.argv[%d]" % i), "program.argv[%d]" % i)
    if argv[0] == "":
        raise AgentError("program.argv[0]: empty program name")
    shell = prog.setdefault("shell", False)
    if not isinstance(shell, bool):
        raise AgentError("program.shell: expected a boolean")
    if shell and len(argv) != 1:
        raise AgentError("program.argv: a shell command (shell: true) is exactly one string, the command line")
    if prog.get("cwd") is not None:
        _no_nul(_str(prog["cwd"], "program.cwd"), "program.cwd")
    env = prog.setdefault("env", {})
    if not isinstance(env, dict):
        raise AgentError("program.env: expected an object of strings or nulls")
    for k, v in env.items():
        if k == "" or "=" in k or "\0" in k:
            raise AgentError("program.env: invalid variable name %r" % (k,))
        if v is not None:
            _no_nul(_str(v, "program.env[%r]" % k), "program.env[%r]" % k)
    inherit = prog.setdefault("env_inherit", True)
    if not isinstance(inherit, bool):
        if not isinstance(inherit, list):
            raise AgentError("program.env_inherit: expected a boolean or a list of names")
        for i, name in enumerate(inherit):
            _str(name, "program.env_inherit[%d]" % i)
    _check_stdin(prog.setdefault("stdin", None))
    check_tty(prog.setdefault("tty", None))
    umask = prog.setdefault("umask", None)
    if umask is not None and (not _is_int(umask) or not 0 <= umask <= 0o777):
        raise AgentError("program.umask: expected an integer from 0 to 511")
    prog.setdefault("cwd", None)


def _check_stdin(stdin):
    """``program.stdin``: null, a path, data or a stream."""
    if stdin is not None:
        if isinstance(stdin, dict) and "path" in stdin:
            _keys(stdin, "program.stdin", ("path",), ())
            _str(stdin["path"], "program.stdin.path")
        elif isinstance(stdin, dict) and "stream" in stdin:
            _keys(stdin, "program.stdin", ("stream",), ())
            if stdin["stream"] is not True:
                raise AgentError("program.stdin.stream: expected true")
        elif isinstance(stdin, dict) and "data" in stdin:
            _keys(stdin, "program.stdin", ("data",), ())
            import base64

            try:
                base64.b64decode(_str(stdin["data"], "program.stdin.data"), validate=True)
            except ValueError:
                raise AgentError("program.stdin.data: not valid base64")
        else:
            raise AgentError('program.stdin: expected null, {"path": ...}, {"data": ...} or {"stream": true}')


def _check_callback(cb):
    """program.json's ``callback`` (when not null)."""
    _keys(cb, "callback", ("url", "token", "cert"), ("heartbeat",))
    _str(cb["url"], "callback.url")
    if not cb["url"].startswith("https://"):
        raise AgentError("callback.url: must be an https:// URL")
    if len(_str(cb["token"], "callback.token")) < 32:
        raise AgentError("callback.token: too short (at least 32 characters)")
    _str(cb["cert"], "callback.cert")
    hb = cb.setdefault("heartbeat", 30.0)
    if not _is_num(hb) or hb <= 0:
        raise AgentError("callback.heartbeat: expected a positive number")


def _check_config(cfg):
    """program.json's ``config``, its defaults filled in."""
    _keys(cfg, "config", (), tuple(CONFIG_DEFAULTS))
    for key, default in CONFIG_DEFAULTS.items():
        value = cfg.setdefault(key, default)
        if key == "timeout" and value is None:
            continue
        if key == "capture":
            ok = isinstance(value, str) and value in CAPTURES
        elif key == "output_buffer":
            ok = _is_int(value) and value > 0
        elif key in ("output_latency", "kill_grace"):
            ok = _is_num(value) and value >= 0
        else:
            ok = _is_num(value) and value > 0
        if not ok:
            raise AgentError("config.%s: invalid value %r" % (key, value))


# --- the spool --------------------------------------------------------------


def check_tty(tty):
    """``program.tty``: null (no terminal), or ``{"rows", "cols"[, "term"]}``:
    the program runs on a pseudo-terminal of that size (TERM: ``term``)."""
    if tty is None:
        return
    _keys(tty, "program.tty", ("rows", "cols"), ("term",))
    for key in ("rows", "cols"):
        if not _is_int(tty[key]) or not 1 <= tty[key] <= 0xFFFF:
            raise AgentError("program.tty.%s: expected an integer from 1 to 65535" % key)
    term = tty.setdefault("term", None)
    if term is not None:
        _no_nul(_str(term, "program.tty.term"), "program.tty.term")


def set_winsize(fd, rows, cols):
    """The terminal's window size (its foreground process group gets SIGWINCH)."""
    import fcntl
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def default_root():
    return os.environ.get("CHAPERONE_SPOOL") or os.path.join(
        os.path.expanduser("~"), ".chaperone", "runs"
    )


def ensure_root(root, check=True):
    if check:
        check_root(root)
    try:
        old_umask = os.umask(0o077)  # missing parents (~/.chaperone) are private too
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
        finally:
            os.umask(old_umask)
    except OSError as e:
        raise AgentError("cannot create spool directory %s: %s" % (root, e.strerror), 3)
    if check:
        check_root(root)
    if not os.access(root, os.W_OK | os.X_OK):
        raise AgentError("spool directory %s is not writable" % root, 3)
    return root


def check_root(root):
    """Refuse a spool root someone else could write in (AgentError, exit
    3, one line saying what to fix): see path_problem.  A root that does
    not exist yet is fine (start makes it, 0700)."""
    why = path_problem(root)
    if why:
        raise AgentError("unsafe spool directory %s: %s" % (root, why), 3)


def path_problem(path, uid=None):
    """What makes the directory ``path`` unsafe to keep runs in, or None:
    as OpenSSH's StrictModes, checked with lstat (never through a symbolic
    link it has not checked), from / down: every directory must belong to
    this user or root and be writable by no one else (a world-writable
    sticky directory such as /tmp is fine above it: no one can move what
    is not theirs there), and ``path`` itself must belong to this user.  A
    symbolic link on the way must belong to this user or root, and what it
    points to is checked the same way.  Anyone who could write in one of
    them could replace the spool or plant a run whose state names a
    process to signal."""
    uid = os.getuid() if uid is None else uid
    todo = [part for part in os.path.abspath(path).split("/") if part]
    current, hops = "/", 0
    try:
        info = os.lstat("/")
    except OSError:  # pragma: no cover
        return None
    while True:
        last = not todo
        why = _owner_problem(current, info, uid, last)
        if why or last:
            return why
        name = todo.pop(0)
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)
            info = os.lstat(current)
            continue
        nxt = os.path.join(current, name)
        try:
            info = os.lstat(nxt)
        except FileNotFoundError:
            return None  # (made 0700 by start)
        except OSError as e:
            return "%s: %s" % (nxt, e.strerror)
        if stat.S_ISLNK(info.st_mode):
            if info.st_uid not in (uid, 0):
                return "%s is a symbolic link of uid %d, not of this user or root" % (nxt, info.st_uid)
            hops += 1
            if hops > 40:
                return "%s: too many levels of symbolic links" % nxt
            target = os.readlink(nxt)
            parts = [part for part in target.split("/") if part]
            if target.startswith("/"):
                current = "/"
                info = os.lstat("/")
            else:
                info = os.lstat(current)
            todo = parts + todo
            continue
        if not stat.S_ISDIR(info.st_mode):
            return None  # (not a safety matter: nothing can be made below it, creating says so)
        current = nxt


def _owner_problem(current, info, uid, last):
    """What is wrong with the directory ``current`` (its lstat ``info``)
    on the way to a spool root, or None (see path_problem): ``last``, the
    root itself."""
    if info.st_uid not in ((uid,) if last else (uid, 0)):
        return "%s belongs to uid %d, not to this user (uid %d)%s" % (
            current, info.st_uid, uid, "" if last else " or root")
    if info.st_mode & 0o022 and (last or not info.st_mode & stat.S_ISVTX):
        return "%s is writable by %s (mode %04o): run chmod go-w %s" % (
            current, "group and others" if info.st_mode & 0o022 == 0o022 else
            "its group" if info.st_mode & 0o020 else "others", stat.S_IMODE(info.st_mode), current)
    return None


class DamagedRun(AgentError):
    """Something in a run's spool is not what the agent made there: one
    error (exit 3) for that run, never a hang or a traceback."""

    def __init__(self, message, code=3):
        AgentError.__init__(self, message, code)


class DamagedState(DamagedRun):
    """A run's state.json is not a state (only an OS crash can do that)."""


def _kind(mode):
    """What a file of mode ``mode`` is, in words."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def short_repr(value, limit=40):
    """repr(value), at most ``limit`` characters (a huge number has more
    digits than str() will convert)."""
    try:
        text = repr(value)
    except ValueError:
        text = "<a number too large to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


#: O_CLOEXEC is the default (PEP 446); these keep a spool file from being a
#: trap: a symbolic link is refused (ELOOP), a FIFO opens without waiting.
SAFE_OPEN = getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK


def open_regular(path, what, flags=os.O_RDONLY):
    """Open ``path`` (``what``: how errors name it) never following a
    symbolic link nor waiting on a FIFO, and make sure it is a regular
    file; else DamagedRun.  (FileNotFoundError as os.open raises it.)"""
    try:
        fd = os.open(path, flags | SAFE_OPEN)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DamagedRun("%s is a symbolic link, not the file the agent made" % what)
        if e.errno in (errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
            raise DamagedRun("%s is not a regular file (%s)" % (what, e.strerror))
        raise
    try:
        mode = os.fstat(fd).st_mode
    except OSError:  # pragma: no cover
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DamagedRun("%s is %s, not the file the agent made" % (what, _kind(mode)))
    return fd


def read_regular(path, what, limit):
    """The bytes of the regular file ``path`` (see open_regular), at most
    ``limit`` of them (DamagedRun if it holds more)."""
    fd = open_regular(path, what)
    try:
        parts, size = [], 0
        while size <= limit:
            part = os.read(fd, min(1 << 20, limit + 1 - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
    finally:
        os.close(fd)
    if size > limit:
        raise DamagedRun("%s is larger than %d bytes: not what the agent wrote" % (what, limit))
    return b"".join(parts)


#: Largest state.json a reader takes (the agent writes a few KiB).
MAX_STATE = 1 << 20
#: Fields of a state that name processes, and clock tick counts.
_PID_FIELDS = ("agent_pid", "pid", "pgid")
_TICK_FIELDS = ("agent_start", "pid_start", "end_ticks")


def state_damage(st):
    """Why the state ``st`` cannot be the agent's, or None.  (Its numbers
    are used to find and signal processes: they must be what they say.)"""
    if not isinstance(st, dict) or st.get("state") not in ("running",) + FINAL_STATES:
        return "not a run's state"
    for key in _PID_FIELDS:
        value = st.get(key)
        if value is not None and not (_is_int(value) and 0 < value <= PID_LIMIT):
            return "%s is not a process id: %s" % (key, short_repr(value))
    for key in _TICK_FIELDS:
        value = st.get(key)
        if value is not None and not (_is_int(value) and 0 <= value < 1 << 63):
            return "%s is not a clock tick count: %s" % (key, short_repr(value))
    for key in ("boot_id", "host_id", "error", "note"):
        if st.get(key) is not None and not isinstance(st[key], str):
            return "%s is not a string: %s" % (key, short_repr(st[key]))
    for key in ("stdout_bytes", "stderr_bytes"):
        value = st.get(key, 0)
        if not (_is_int(value) and 0 <= value < 1 << 63):
            return "%s is not a byte count: %s" % (key, short_repr(value))
    return None


def judged_here(st):
    """Whether this agent may judge the run (find it lost, signal it): it
    was recorded on this host in this pid namespace (``host_id``; a state
    without one was recorded by an older agent: as before, yes)."""
    return st.get("host_id") in (None, host_id())


class Run(object):
    """A run's spool directory."""

    def __init__(self, root, run_id):
        self.id = check_id(run_id)
        self.dir = os.path.join(root, run_id)

    def path(self, name):
        return os.path.join(self.dir, name)

    def what(self, name):
        return "run %s: its %s" % (self.id, name)

    def exists(self):
        return os.path.lexists(self.path("state.json"))

    def require(self):
        """This run, if its spool holds one: else "no such run" (exit 4).
        Its directory must be a real one of this user (DamagedRun)."""
        try:
            info = os.lstat(self.dir)
        except (FileNotFoundError, NotADirectoryError):
            raise AgentError("no such run: %s" % self.id, 4)
        if not stat.S_ISDIR(info.st_mode):
            raise DamagedRun("run %s: its spool entry %s is %s, not a directory; clean --force removes it"
                             % (self.id, self.dir, _kind(info.st_mode)))
        if info.st_uid != os.getuid():
            raise DamagedRun("run %s: its spool directory %s belongs to uid %d, not to this user"
                             % (self.id, self.dir, info.st_uid))
        if not self.exists():
            raise AgentError("no such run: %s" % self.id, 4)
        return self

    def read_state(self):
        """state.json.  It is replaced by rename, so a read always sees a
        whole document; but only final states are fsynced, so after an OS
        crash (power loss) the state of a run that was running may be
        damaged: that is a one-line AgentError (exit 3) for this run.
        Anything else in its place (a FIFO, a directory, a symbolic link, a
        huge file) is one too (DamagedRun)."""
        data = read_regular(self.path("state.json"), self.what("state.json"), MAX_STATE)
        try:
            if not json_nesting_ok(data, MAX_DEPTH):
                raise ValueError("nested too deep")
            st = loads(data.decode())
        except (ValueError, RecursionError) as e:  # (UnicodeDecodeError too)
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            why = state_damage(st)
            if why is None:
                return st
        raise DamagedState("run %s: state.json is damaged (%s), as an OS crash can leave the state of a run "
                           "that was running; clean --force removes the run" % (self.id, why), 3)

    def write_state(self, st, exchange=None):
        # Only a final state must survive a power loss (it is the result):
        # a run that was running is lost after a reboot anyway (boot_id).
        write_state_file(self.dir, st, durable=st["state"] in FINAL_STATES, exchange=exchange)

    def sizes(self, fds=None):
        """The spool files' sizes (``fds``: open descriptors of them, by
        name).  A spool file that is not a regular file is DamagedRun."""
        out = {}
        for name in STREAMS:
            try:
                if fds:
                    info = os.fstat(fds[name])
                else:
                    info = os.lstat(self.path(name))
            except OSError:
                out[name] = 0
                continue
            if not stat.S_ISREG(info.st_mode):
                raise DamagedRun("%s is %s, not the file the agent made" % (self.what(name), _kind(info.st_mode)))
            out[name] = info.st_size
        return out

    def lock(self, exclusive=False):
        """The run's lock (``flock`` of its directory), taken around each
        look at a running run's sizes (shared) and around the write of its
        final state (exclusive).  With file capture, children left behind
        can append after the end: the lock makes "the sizes while running"
        never exceed the final counts (see docs/protocol.md)."""
        return RunLock(self.dir, exclusive)

    def supervisor_alive(self, st):
        pid = st.get("agent_pid")
        if not valid_pid(pid):
            return False
        if st.get("boot_id") and boot_id() and st["boot_id"] != boot_id():
            return False
        if st.get("agent_start") is not None:
            # A dead supervisor stays a zombie until its new parent (often
            # an init that reaps lazily, or none in a container) reaps it.
            info = proc_stat(pid)
            return info is not None and info[1] == st["agent_start"] and info[0] not in ("Z", "X", "x")
        return pid_exists(pid)

    def refresh(self, fds=None):
        """The current state; marks the run ``lost`` when its supervisor is gone.

        For a running run, ``stdout_bytes``/``stderr_bytes`` are the current
        sizes of the spool files, taken under the run's shared lock, so they
        never exceed the final counts; for a final run, the recorded counts.
        Either way they bound what may be delivered of each stream.

        A running run recorded by another host (or pid namespace, see
        host_id) is never judged here: it is shown as recorded, with a
        ``note``."""
        st = self.read_state()
        if st["state"] != "running":
            return st
        here = judged_here(st)
        if not here or self.supervisor_alive(st):
            with self.lock():
                sizes = self.sizes(fds)
                st = self.read_state()  # after the sizes: it may have become final
            if st["state"] == "running":
                st["stdout_bytes"], st["stderr_bytes"] = sizes["stdout"], sizes["stderr"]
                if not here:
                    st["note"] = ("recorded by another host or pid namespace (%s; this is %s): shown as "
                                  "recorded there, never judged or signalled from here" % (st.get("host_id"), host_id()))
                elif spool_full(self.dir):
                    st["note"] = ("the spool's file system is full: output may be held back or cut, and the "
                                  "end is recorded once there is room")
            return st
        with self.lock(exclusive=True):
            st = self.read_state()  # it may have finished in between
            if st["state"] == "running" and not self.supervisor_alive(st):
                return self.mark_lost(st)
        return self.refresh(fds)

    def mark_lost(self, st):
        """Record a running run whose supervisor is gone as ``lost`` (under
        the exclusive lock), and SIGKILL what is left of its process group
        if run_group() proves it is the run's."""
        reason = "the supervisor (pid %s) is gone without a result" % st.get("agent_pid")
        if st.get("boot_id") and boot_id() and st["boot_id"] != boot_id():
            # The old pgid means nothing after a reboot: never kill by it.
            reason = "the host rebooted while the run was running"
        else:
            killed, why = signal_group(st, _signal.SIGKILL)
            if killed:
                reason += "; killed what was left of the program's process group"
            elif why not in ("nothing of it runs any more", "its program never started"):
                reason += "; its process group was not signalled: %s" % why
        sizes = self.sizes()
        st.update(
            state="lost", error=reason, end_time=now_iso(), end_ticks=ticks_now(),
            stdout_bytes=sizes["stdout"], stderr_bytes=sizes["stderr"],
        )
        self.write_state(st)
        return st


def spool_full(path):
    """Whether the file system of ``path`` has no room left for this user."""
    try:
        info = os.statvfs(path)
    except OSError:
        return False
    return info.f_bavail == 0


class RunLock(object):
    """``flock`` of a run's directory (a context manager).  Shared: waits.
    Exclusive: waits at most LOCK_WAIT seconds, then goes on without it (a
    reader holds the lock for a few system calls; only a stopped one could
    hold it longer, and the end of a run must not wait for it forever)."""

    def __init__(self, path, exclusive):
        self.path = path
        self.exclusive = exclusive
        self.fd = None

    def __enter__(self):
        try:
            import fcntl

            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | SAFE_OPEN)
        except (ImportError, OSError):
            return self
        self.fd = fd
        try:
            if not self.exclusive:
                fcntl.flock(fd, fcntl.LOCK_SH)
                return self
            end = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return self
                except BlockingIOError:
                    if time.monotonic() > end:
                        return self
                    time.sleep(0.001)
        except OSError:  # e.g. a file system without locks
            return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None
        return False


# --- processes --------------------------------------------------------------


_LIBC = []


def _libc():
    """libc for prctl(), loaded once (before the supervisors fork)."""
    if not _LIBC:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                # The running program's own symbols include libc's: no
                # find_library() (which runs ldconfig) needed.
                lib = ctypes.CDLL(None, use_errno=True)
                lib.prctl  # noqa: B018 - present?
            except (ImportError, OSError, AttributeError):  # pragma: no cover
                lib = None
        _LIBC.append(lib)
    return _LIBC[0]


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


#: inotify: IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF.  (Not IN_MOVED_FROM:
#: every start renames a new run into the root, and a moved run is not
#: a removed one.)
DIR_EVENTS = 0x200 | 0x400 | 0x800


#: inotify: IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO: a run's files were
#: written, or its state replaced (a follow wakes at once: run_watch).
RUN_EVENTS = 0x2 | 0x8 | 0x80


def run_watch(path):
    """An inotify descriptor that becomes readable when a file in the run's
    directory ``path`` is written or replaced; None where there is none
    (then the follow looks on its own, as often as before)."""
    libc = _libc()
    return dir_watch(path, libc, RUN_EVENTS) if libc is not None else None


def dir_watch(path, libc, events=DIR_EVENTS):
    """An inotify descriptor that becomes readable when an entry of the
    directory ``path`` is deleted, or ``path`` itself is deleted or moved
    (see entry_events); None where there is no inotify.  (A run's own
    directory is watched from its parent, the spool root: the kernel tells
    a directory's watch of its deletion only once nothing in it is open
    any more, and the program holds its stdout there.)"""
    try:
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except AttributeError:
        return None
    fd = init(0o4000 | 0o2000000)  # IN_NONBLOCK | IN_CLOEXEC
    if fd < 0:
        return None
    if add(fd, os.fsencode(path), events) < 0:
        os.close(fd)
        return None
    return fd


#: inotify: IN_MODIFY: a spool file written (file capture: spool_watch).
IN_MODIFY = 0x2
#: ... and IN_ATTRIB: its links changed, say it was unlinked (``rm -rf`` of
#: the run or of the spool): the same watch tells the supervisor of its
#: spool's removal, without a second inotify instance (a user has 128).
SPOOL_EVENTS = IN_MODIFY | 0x4


def spool_watch(paths, libc):
    """File capture: an inotify descriptor that becomes readable each time
    the program writes one of the files ``paths`` ({stream: path}), and
    {watch descriptor: stream}; (None, None) where there is no inotify (no
    libc, inotify_init fails, no watch left): then the supervisor looks at
    the files' sizes on a timer, as Timers says."""
    try:
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except AttributeError:
        return None, None
    fd = init(0o4000 | 0o2000000)  # IN_NONBLOCK | IN_CLOEXEC
    if fd < 0:
        return None, None
    names = {}
    for name, path in sorted(paths.items()):
        wd = add(fd, os.fsencode(path), SPOOL_EVENTS)
        if not 0 <= wd < 255:  # (see spool_events)
            os.close(fd)
            return None, None
        names[wd] = name
    return fd, names


#: Where in an inotify event (struct inotify_event: int wd, then mask,
#: cookie, len, each 4 bytes, native order) the low bytes of its watch and
#: of its mask are.
_WD_LOW = 0 if sys.byteorder == "little" else 3
_MASK_LOW = 4 if sys.byteorder == "little" else 7


def spool_events(fd, names):
    """Read what the inotify descriptor ``fd`` (spool_watch) holds: the
    streams written (by the time of each one's last write, the last one
    last), the first one written, how many times the writes went from
    one stream to the other, and whether anything else happened to the
    files (their links changed: see SPOOL_EVENTS); None: the queue
    overflowed (the order is not known, and what else happened neither).
    (A file's own watch names no entry: each event is 16 bytes, and
    spool_watch's few watches are numbered below 255: the low bytes of the
    watches are the order of the writes, read in C however many events a
    chatty program left.)"""
    key, masks = b"", b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # (EAGAIN: all read)
            data = b""
        if not data:
            break
        key += data[_WD_LOW::16]
        masks += data[_MASK_LOW::16]
    if not key or b"\xff" in key:  # (IN_Q_OVERFLOW: watch -1)
        return None if key else ([], None, 0, False)
    other = masks.count(IN_MODIFY) != len(masks)
    if other:  # (the writes' order from the writes alone)
        key = bytes(k for k, m in zip(key, masks) if m == IN_MODIFY)
    marks = dict((bytes((wd,)), name) for wd, name in names.items())
    last = sorted((key.rfind(mark), name) for mark, name in marks.items() if mark in key)
    changes = sum(key.count(a + b) for a in marks for b in marks if a != b)
    return [name for _, name in last], marks.get(key[:1]), changes, other


def entry_events(fd, name):
    """Read what the inotify descriptor ``fd`` (dir_watch) holds: whether
    any of it may concern the entry ``name`` (bytes) or the directory
    itself (an event of another entry does not)."""
    hit = False
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # (EAGAIN: all read)
            return hit
        if not data:
            return hit
        at = 0
        while at + 16 <= len(data):
            mask, size = struct.unpack_from("=I4xI", data, at + 4)
            entry = data[at + 16:at + 16 + size].rstrip(b"\0")
            if entry == name or not size or mask & 0x4000:  # (IN_Q_OVERFLOW: cannot tell)
                hit = True
            at += 16 + size


def descendants(root_pid, groups=None):
    """Pids of every process below ``root_pid`` (Linux /proc), deepest last.
    ``groups``: a dict to fill with each one's process group."""
    children = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                data = f.read()
            fields = data[data.rindex(b")") + 2:].split()
            ppid = int(fields[1])
            if groups is not None:
                groups[int(entry)] = int(fields[2])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


#: What subprocess's ``restore_signals`` gives back to the program: the
#: signals Python ignores from its start (exec keeps an ignored signal
#: ignored).  (Handlers need nothing: exec resets them.)
RESTORE_SIGNALS = tuple(getattr(_signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ")
                        if hasattr(_signal, name))


def open_fds():
    """This process's open descriptors (/proc/self/fd, else /dev/fd), or None."""
    for where in ("/proc/self/fd", "/dev/fd"):
        try:
            return [int(name) for name in os.listdir(where)]
        except (OSError, ValueError):
            continue
    return None


def fork_exec(argv, cwd, env, stdio, umask, libc, executable=None, underscore=False, ctty=False):
    """Start a program; its pid.  What ``subprocess.Popen(argv, stdin=,
    stdout=, stderr=, cwd=cwd, env=env, start_new_session=True,
    restore_signals=True, close_fds=True, preexec_fn=...)`` did, with a
    preexec setting ``umask`` and PR_SET_PDEATHSIG=SIGKILL and making sure
    the parent is still this process, without importing subprocess (5-15 ms
    with what it loads, at every start).

    ``stdio``: the descriptors that become the program's 0, 1 and 2.  The
    child puts them in place, changes to ``cwd``, restores the signals
    Python ignores, starts a session, applies the umask, asks for SIGKILL
    when its parent dies, closes every other descriptor and execs
    ``executable`` (default ``argv[0]``) found as subprocess finds it (in
    the ``PATH`` of ``env``); with ``underscore``, the variable ``_`` is
    the path exec'd, as a shell sets it for a command; with ``ctty``, its
    stdin (a terminal) becomes the new session's controlling terminal.  Failures come back
    as Popen raised them: OSError(errno, strerror, executable) for exec,
    OSError(errno, strerror, cwd) for chdir, reported by
    the child through a close-on-exec pipe; the child never runs anything
    else after a failure.  Anything that cannot be converted for exec
    (UnicodeEncodeError) raises here, in Popen's order, before the fork."""
    import gc

    env_bytes = dict((_fsencode_env_name(k), os.fsencode(v)) for k, v in env.items())
    name = argv[0] if executable is None else executable
    executables = _exec_candidates(os.fsencode(name), env)
    args = [os.fsencode(a) for a in argv]
    cwd_bytes = os.fsencode(cwd)
    err_r, err_w = _report_pipe()
    fds = open_fds()
    parent = os.getpid()
    if ctty:
        import fcntl
        import termios

        ctty = (fcntl.ioctl, termios.TIOCSCTTY)  # (imported here: not in the child)
    gc_enabled = gc.isenabled()
    gc.disable()  # (as subprocess with a preexec_fn: no collection in the child)
    try:
        pid = os.fork()
        if pid == 0:
            _exec_child(executables, args, env_bytes, cwd_bytes, list(stdio), umask, libc, parent, fds, err_w,
                        underscore, ctty)
    except BaseException:
        os.close(err_r)
        os.close(err_w)
        raise
    finally:
        if gc_enabled:
            gc.enable()
    os.close(err_w)
    _child_report(pid, err_r, name, cwd)
    return pid


def _exec_candidates(executable, env):
    """The paths to try exec'ing, as subprocess and os.execvpe search: the
    name itself when it has a directory, else each of the ``PATH`` of
    ``env`` (os.get_exec_path(env), which imports warnings)."""
    if os.path.dirname(executable):
        return (executable,)
    path = env.get("PATH")
    return tuple(os.path.join(os.fsencode(d), executable)
                 for d in (os.defpath if path is None else path).split(os.pathsep))


def _report_pipe():
    """fork_exec's pipe for the child's report (both ends close-on-exec:
    PEP 446), its write end never one of the program's 0, 1, 2."""
    err_r, err_w = os.pipe()
    low = []
    while err_w < 3:
        low.append(err_w)
        err_w = os.dup(err_w)
    for fd in low:
        os.close(fd)
    return err_r, err_w


def _child_report(pid, err_r, name, cwd):
    """Read the child's report on ``err_r`` (closed here): nothing, exec
    closed the pipe and the program runs; else the child is reaped and its
    failure raised as Popen raises it (OSError naming ``name`` for exec,
    ``cwd`` for chdir)."""
    report = b""
    try:
        while True:
            part = os.read(err_r, 1024)
            if not part:
                break
            report += part
    finally:
        os.close(err_r)
    if not report:
        return
    try:
        os.waitpid(pid, 0)  # (the failed child: reaped, as subprocess does)
    except ChildProcessError:  # pragma: no cover
        pass
    step, _, number = report.partition(b":")
    code = int(number or 0)
    message = os.strerror(code) if code else "the program's process failed before exec"
    if step == b"exec":
        raise OSError(code, message, name)
    if step == b"chdir":
        raise OSError(code, message, cwd)
    raise OSError(code, message)


def _fsencode_env_name(name):
    name = os.fsencode(name)
    if b"=" in name:
        raise ValueError("illegal environment variable name")
    return name


def _exec_child(executables, args, env, cwd, stdio, umask, libc, parent, fds, err_w, underscore=False,
                ctty=None):
    """fork_exec's child: becomes the program, or reports why not and
    exits.  Never returns."""
    step, code = b"noexec", 0
    try:
        for i in range(3):  # a descriptor already on 0-2 moves up first
            while stdio[i] < 3 and stdio[i] != i:
                stdio[i] = os.dup(stdio[i])
        for i in range(3):
            if stdio[i] == i:
                os.set_inheritable(i, True)
            else:
                os.dup2(stdio[i], i)  # (inheritable)
        step = b"chdir"
        os.chdir(cwd)
        step = b"noexec"
        for sig in RESTORE_SIGNALS:
            _signal.signal(sig, _signal.SIG_DFL)
        os.setsid()
        if ctty:
            ctty[0](0, ctty[1], 0)  # TIOCSCTTY: the terminal is the session's
        if umask is not None:
            os.umask(umask)
        if libc is not None and sys.platform.startswith("linux"):
            # The program must not silently outlive its supervisor.
            libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(255)
        if fds is None:  # pragma: no cover - no /proc or /dev/fd to list them
            os.closerange(3, err_w)
            os.closerange(err_w + 1, min(max(os.sysconf("SC_OPEN_MAX"), 256), 65536))
        else:
            for fd in fds:
                if fd >= 3 and fd != err_w:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        step = b"exec"
        first = last = 0
        for path in executables:
            if underscore:
                env[b"_"] = path
            try:
                os.execve(path, args, env)
            except OSError as e:
                last = e.errno or 0
                if last not in (errno.ENOENT, errno.ENOTDIR) and not first:
                    first = last  # the first error that is not "not there" wins
        code = first or last
    except OSError as e:
        code = e.errno or 0
    except BaseException:
        pass
    finally:
        try:
            os.write(err_w, b"%s:%d" % (step, code))
        finally:
            os._exit(255)


def copy_stdin(source, dest):
    """Copy ``program.stdin.path`` into the spool (0600): only a regular
    file, and only the bytes it held when opened (a file that grows is not
    followed; a FIFO, a device such as /dev/zero or a directory is refused:
    OSError(EINVAL, ..., source), never waited on nor copied without end).
    A failed copy leaves no file."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        e.filename = source
        raise
    try:
        mode = os.fstat(src).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "%s, not a regular file (stdin.path is copied into the spool before "
                                        "the program starts)" % _kind(mode), source)
        size = os.fstat(src).st_size
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | SAFE_OPEN, 0o600)
        try:
            done = 0
            while done < size:
                try:
                    n = os.sendfile(dst, src, done, min(size - done, 1 << 30))
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS) or done:
                        raise
                    n = None
                if n is None:  # no sendfile to a file here: read and write
                    while done < size:
                        data = os.pread(src, min(size - done, CHUNK), done)
                        if not data:
                            break
                        write_all(dst, data)
                        done += len(data)
                    break
                if n == 0:
                    break  # (shorter than it was: what is there)
                done += n
        except BaseException:
            os.close(dst)
            try:
                os.unlink(dest)
            except OSError:
                pass
            raise
        os.close(dst)
    except OSError as e:
        if e.filename is None:
            e.filename = source
        raise
    finally:
        os.close(src)


def login_shell():
    """The login shell of this process's user, as sshd runs a command with
    it: its passwd entry's shell, ``/bin/sh`` when that is empty."""
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    except (ImportError, KeyError):
        return "/bin/sh"


def program_cwd(prog):
    """The program's working directory: ``cwd``, with ``~`` or ``~/...``
    the home directory and a relative path taken from it, as ``cd`` in a
    command that ssh runs (which starts in the home directory); the home
    directory without one."""
    home = os.path.expanduser("~")
    cwd = prog["cwd"]
    if not cwd:
        return home
    if cwd == "~" or cwd.startswith("~/"):
        cwd = home + cwd[1:]
    return os.path.join(home, cwd)  # (an absolute cwd stays as it is)


def program_argv(prog):
    """``(argv, executable)`` to exec for ``program``: its argv as is, or,
    for a shell command line (``shell``), what sshd execs for a command:
    the login shell, named by its base name, with ``-c LINE``."""
    if not prog.get("shell"):
        return prog["argv"], None
    shell = login_shell()
    return [os.path.basename(shell) or shell, "-c", prog["argv"][0]], shell


#: The environments programs inherit (see login_environ), once known:
#: [for an exact argv, for a shell command line].
_LOGIN_ENV = []


def parse_environ(data):
    """An environment block (``NAME=VALUE`` entries, NUL-terminated, as
    /proc/PID/environ holds them) as a dict of str (bytes that are not
    text kept by surrogateescape, as os.environ keeps them); the first of
    two entries of one name wins, as getenv() finds it."""
    env = {}
    for item in data.split(b"\0"):
        name, eq, value = item.partition(b"=")
        if name and eq:
            env.setdefault(os.fsdecode(name), os.fsdecode(value))
    return env


def proc_environ(pid):
    """The environment process ``pid`` was executed with, or None."""
    try:
        with open("/proc/%s/environ" % pid, "rb") as f:
            return parse_environ(f.read())
    except OSError:
        return None


def read_login_env(pid):
    """``--login-env PID``: where the environments of the login shell are.
    The remote bootstrap runs, for ``start``, ``SHELL -c 'sh -c "python3
    ... --login-env $$; exit $?"; exit'``: neither shell execs the next
    (see chaperone/transports/ssh/common.py), so this process's parent
    ``PID`` is that ``sh``, whose environment is the one the login shell
    gives the commands it runs (after its rc files: PATH as the user set
    it), and its parent is the login shell itself, whose environment is
    the one sshd gave it.  Both are what they were before ``python3`` ran
    (a shim, as pyenv's, changes PATH and adds PYENV_* variables; Python
    adds LC_CTYPE=C.UTF-8 in the C locale: PEP 538).  An exact argv starts
    from the first (as under ``ssh HOST 'ARGV'``), a shell command line
    from the second (the login shell then reads its rc files once, as
    under ``ssh HOST LINE``).  Anything unexpected (PID is not the
    parent, the grandparent is not the login shell, no /proc) leaves
    login_environ() to its fallbacks."""
    if pid < 2 or os.getppid() != pid:
        return
    commands = proc_environ(pid)
    if commands is None:
        return
    shell_env = None
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        parent = int(data[data.rindex(b")") + 2:].split()[1])
        shell = os.stat(login_shell())
        exe = os.stat("/proc/%d/exe" % parent) if parent > 1 else None
    except (OSError, ValueError, IndexError):
        exe = None
    if exe is not None and (exe.st_dev, exe.st_ino) == (shell.st_dev, shell.st_ino):
        shell_env = proc_environ(parent)
    if shell_env is not None:
        # The login shell raised SHLVL for the `sh` it ran: a command it
        # execs (as bash does `ssh HOST 'prog args'`) gets the level back.
        ours, given = commands.get("SHLVL", ""), shell_env.get("SHLVL", "0")
        if ours.isdigit() and given.isdigit() and int(ours) == int(given) + 1:
            commands = dict(commands, SHLVL=str(int(given)))
    _LOGIN_ENV[:] = [commands, shell_env if shell_env is not None else commands]


def login_environ(shell=False):
    """The environment programs inherit (``env_inherit``): the login
    shell's (read_login_env): for a shell command line (``shell``) the one
    the login shell started with, else the one it gives commands; without
    it, the one this interpreter was executed with (/proc/self/environ:
    before Python changed its own, say PEP 538's ``LC_CTYPE=C.UTF-8``);
    else os.environ."""
    if not _LOGIN_ENV:
        env = proc_environ("self")
        env = dict(os.environ) if env is None else env
        _LOGIN_ENV[:] = [env, env]
    return _LOGIN_ENV[1 if shell else 0]


def build_env(prog, cwd=None):
    base = login_environ(prog.get("shell"))
    inherit = prog["env_inherit"]
    if inherit is True:
        env = dict(base)
    elif inherit is False:
        env = {}
    else:
        env = dict((k, base[k]) for k in inherit if k in base)
    env.pop("CHAPERONE_SPOOL", None)
    if cwd is not None and "PWD" in env and not same_dir(env["PWD"], cwd):
        env["PWD"] = cwd  # (as a shell's cd: PWD names the program's directory)
    for k, v in prog["env"].items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


#: A record of the spool's ``timeline``: when (microseconds since the
#: epoch), which stream (``1`` stdout, ``2`` stderr, as in follow frames),
#: and the size it had reached by then (see docs/protocol.md).
TIMELINE = struct.Struct("!QcQ")
#: Growth of a stream within this long of the last record is held back,
#: and written as one record when this has passed (or another stream grows).
TIMELINE_GRAIN = 0.01
_KINDS = {"stdout": b"1", "stderr": b"2"}


class TimelineWriter(object):
    """The supervisor's side of the spool's ``timeline`` (append-only;
    made empty by start: a run without one was started by an older agent).
    Records never go back in time, and each one says a stream has reached
    a size no record said before."""

    def __init__(self, path):
        try:
            self.fd = open_regular(path, "the timeline", os.O_WRONLY | os.O_APPEND)
        except (OSError, AgentError):  # (none, or not ours: no timeline; readers serve each stream in turn)
            self.fd = None
        self.ends = {"stdout": 0, "stderr": 0}  # what the records (and the held one) say
        self.last_us = 0
        self.last_at = -TIMELINE_GRAIN
        self.held = None  # [us, name, end]: growth right after a record
        self.held_until = None

    def grew(self, name, end, us):
        if end <= self.ends[name]:
            return
        self.ends[name] = end
        us = max(us, self.last_us)
        if self.held is not None and self.held[1] != name:
            self.flush()  # (the order of the streams is what a timeline is for)
        if self.held is not None:
            self.held[0], self.held[2] = us, end
        elif time.monotonic() - self.last_at >= TIMELINE_GRAIN:
            self.write(us, name, end)
        else:
            self.held = [us, name, end]
            self.held_until = self.last_at + TIMELINE_GRAIN

    def due(self):
        return self.held_until if self.held is not None else None

    def flush(self):
        if self.held is not None:
            held, self.held, self.held_until = self.held, None, None
            self.write(*held)

    def write(self, us, name, end):
        self.last_us, self.last_at = us, time.monotonic()
        if self.fd is None:
            return
        record = TIMELINE.pack(us, _KINDS[name], end)
        try:
            n = os.write(self.fd, record)
        except OSError:  # (the file system full: this growth goes with the next record)
            return
        if n != len(record):  # (a part of it: take it back, or write no more)
            try:
                os.ftruncate(self.fd, os.fstat(self.fd).st_size - n)
            except OSError:
                os.close(self.fd)
                self.fd = None


def same_dir(a, b):
    """Whether two paths name one directory (a shell keeps an inherited
    PWD that names its working directory, even through a link)."""
    try:
        x, y = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


class Timers(object):
    """The supervisor's timers as data: with ``step`` (below), its pure
    part.  What the loop waits for and what is due are functions of these
    fields, ``now`` and the facts the loop passes in: no clock is read and
    no I/O is done here (tests drive it with a fake clock).  The loop
    carries out what it says.

    ``deadline``: when --timeout ends the program (None: never);
    ``kill_at``: when a SIGKILL escalation is owed (a signal's grace
    ends); ``exited_at``: when the program's exit was seen;
    ``next_dir_check``: the next look at the run's directory where
    inotify is missing; ``next_retry``: the next try at a running state
    the full spool refused; ``next_size_check``, ``size_poll``: file
    capture, the next look at the spool files' sizes (nobody wakes the
    loop when the program writes them) and the pause before it: short
    right after they grew, doubling up to SIZE_POLL_MAX while they do
    not: only where no inotify watch tells the loop of each write
    (``size_watch``; then the sizes are looked at once more at the end,
    by the final state); ``watch_pause``: until when that watch is not
    read (see spool_written)."""

    __slots__ = ("deadline", "kill_at", "exited_at", "next_dir_check", "next_retry", "next_size_check",
                 "size_poll", "size_watch", "watch_pause")

    def __init__(self, started, timeout):
        self.deadline = started + timeout if timeout else None
        self.kill_at = None
        self.exited_at = None
        self.next_dir_check = None
        self.next_retry = None
        self.next_size_check = None
        self.size_poll = SIZE_POLL_MIN
        self.size_watch = False
        self.watch_pause = None

    def exited(self, now):
        """The program's exit is known (from ``now`` on, if not before)."""
        if self.exited_at is None:
            self.exited_at = now

    def arm_kill(self, at):
        """A SIGKILL is owed at ``at`` (the earliest owed wins)."""
        if self.kill_at is None or at < self.kill_at:
            self.kill_at = at

    def sizes_seen(self, now, grew):
        """File capture: the sizes were looked at ``now``; look again soon
        if they ``grew``, later and later if not."""
        self.size_poll = SIZE_POLL_MIN if grew else min(self.size_poll * 2, SIZE_POLL_MAX)
        self.next_size_check = now + self.size_poll

    def spool_written(self, switched, exact, held_until):
        """File capture with an inotify watch: it said the program wrote.
        While one stream alone is written (not ``switched`` from the one
        written last) and the timeline holds its growth back (until
        ``held_until``), the watch is not read until then: a chatty
        program costs the loop a wake-up per TIMELINE_GRAIN, not one per
        write, and the queue still holds the order of the streams' turns
        (exact unless they took turns twice within the pause).  Once the
        streams take turns, each write wakes the loop, as long as it keeps
        up with them (``exact``: the watch told no more than one change of
        stream since its last read; else the turns come faster than the
        loop can record each: it reads once per grain).  Whether to pause."""
        self.watch_pause = held_until if not switched or not exact else None
        return self.watch_pause is not None

    def lingering(self, now, output_open):
        """Output may still come from children the program left behind
        (they hold the pipes or spool files open), for LINGER seconds."""
        return self.exited_at is not None and now - self.exited_at <= LINGER and output_open

    def over(self, now, output_open, has_descendants):
        """Whether the loop ends: the program exited, nothing lingers, and
        no SIGKILL escalation is owed to something still alive (a kill with
        a grace is not over while, e.g., a grandchild that escaped with
        setsid and ignores SIGTERM lives).  ``has_descendants``: a callable
        (asked only when it matters)."""
        if self.exited_at is None or self.lingering(now, output_open):
            return False
        return self.kill_at is None or not has_descendants()

    def wait(self, now, running, timed_out, lingering, pipes, poll_sizes, timeline_due, dir_poll, unwritten,
             held_until):
        """Milliseconds for poll() until the next timer (None: no timer;
        capped at an hour, so that a huge timeout or grace cannot overflow).
        Starts the size, directory and retry timers that are needed and not
        running.  ``poll_sizes``: file capture while the program runs;
        ``timeline_due``: when a timeline record held back is due."""
        waits = []
        if self.deadline is not None and not timed_out and running:
            waits.append(self.deadline - now)
        if self.kill_at is not None:
            waits.append(self.kill_at - now)
        if lingering:
            # (a pipe's end wakes the poll; a file let go of does not)
            left = self.exited_at + LINGER - now
            waits.append(left if pipes else min(left, HOLD_CHECK))
        if self.watch_pause is not None:
            waits.append(self.watch_pause - now)
        if poll_sizes and not self.size_watch:
            if self.next_size_check is None:
                self.next_size_check = now + self.size_poll
            waits.append(self.next_size_check - now)
        if dir_poll:
            if self.next_dir_check is None:
                self.next_dir_check = now + DIR_CHECK
            waits.append(self.next_dir_check - now)
        if unwritten:
            if self.next_retry is None:
                self.next_retry = now + FULL_RETRY
            waits.append(self.next_retry - now)
        waits.extend(at - now for at in (timeline_due, held_until) if at is not None)
        return None if not waits else max(0, int(min(min(waits), 3600.0) * 1000) + 1)

    def due(self, now, running, timed_out, poll_sizes=False, timeline_due=None):
        """What is due at ``now``, in order: ``timeout`` (SIGTERM the tree,
        then SIGKILL after the grace), ``kill`` (the SIGKILL escalation),
        ``check_dir``, ``retry_state``, ``check_sizes`` (then sizes_seen()),
        ``flush_timeline``, ``read_watch`` (the pause of spool_written
        over).  The timers that fired are reset."""
        actions = []
        if self.deadline is not None and not timed_out and running and now >= self.deadline:
            actions.append("timeout")
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            actions.append("kill")
        if self.next_dir_check is not None and now >= self.next_dir_check:
            self.next_dir_check = None
            actions.append("check_dir")
        if self.next_retry is not None and now >= self.next_retry:
            self.next_retry = None
            actions.append("retry_state")
        poll_sizes = poll_sizes and not self.size_watch
        if poll_sizes and self.next_size_check is not None and now >= self.next_size_check:
            actions.append("check_sizes")
        if timeline_due is not None and now >= timeline_due:
            actions.append("flush_timeline")
        if self.watch_pause is not None and now >= self.watch_pause:
            self.watch_pause = None
            actions.append("read_watch")
        return actions


class Life(object):
    """Where the supervisor is in a run's life (see TRANSITIONS): its
    ``phase``, and whether it ended the program for a timeout
    (``timed_out``) or because the run's directory was removed
    (``spool_removed``).  Never changed in place: step() makes the next."""

    __slots__ = ("phase", "timed_out", "spool_removed")

    def __init__(self, phase="starting", timed_out=False, spool_removed=False):
        self.phase, self.timed_out, self.spool_removed = phase, timed_out, spool_removed

    def __eq__(self, other):
        return isinstance(other, Life) and self.key() == other.key()

    __hash__ = None

    def __repr__(self):
        return "Life%r" % (self.key(),)

    def key(self):
        return (self.phase, self.timed_out, self.spool_removed)


#: The supervisor's transitions, as h11 keeps its own: (phase, event) ->
#: (next phase, flags set, actions).  Phases: ``starting`` (the spool made,
#: the program not started), ``running``, ``exited`` (its exit seen: output
#: may still come from what it left behind), ``ending`` (recording the
#: end), then the state recorded (``done``, ``error``, ``lost``; or a final
#: state someone else recorded first).  A phase of None: the same phase,
#: or (``recorded``) the state that was recorded.  Events: ``started``,
#: ``exec_failed``, ``exited`` (reaped), ``timeout`` and ``kill`` (the
#: timers), ``signal`` (one the supervisor got: forwarded),
#: ``signal_request`` (the control FIFO's), ``spool_removed``, ``over``
#: (nothing more to wait for), ``recorded``.  An event a phase has no entry
#: for changes nothing and does nothing (say a timeout after the exit).
#: The timers' housekeeping (``check_dir``, ``retry_state``,
#: ``check_sizes``, ``flush_timeline``, ``read_watch``) is carried out in
#: any phase.
TRANSITIONS = {
    ("starting", "started"): ("running", (), ("record_start", "ready", "start_sender")),
    ("starting", "exec_failed"): ("error", (), ("record_error", "ready")),
    ("running", "exited"): ("exited", (), ("linger",)),
    ("running", "timeout"): (None, ("timed_out",), ("terminate",)),
    ("running", "spool_removed"): (None, ("spool_removed",), ("terminate",)),
    ("exited", "spool_removed"): (None, ("spool_removed",), ()),
    ("ending", "spool_removed"): (None, ("spool_removed",), ()),
    ("running", "kill"): (None, (), ("kill",)),
    ("exited", "kill"): (None, (), ("kill",)),
    ("running", "signal"): (None, (), ("forward",)),
    ("exited", "signal"): (None, (), ("forward",)),
    ("running", "signal_request"): (None, (), ("forward",)),
    ("exited", "signal_request"): (None, (), ("forward",)),
    ("done", "signal_request"): (None, (), ("forward",)),
    ("lost", "signal_request"): (None, (), ("forward",)),
    ("exited", "over"): ("ending", (), ("drain", "record_end")),
    ("ending", "recorded"): (None, (), ("restore_signals", "close_spool")),
}
HOUSEKEEPING = ("check_dir", "retry_state", "check_sizes", "flush_timeline", "read_watch")


def step(life, event, recorded=None):
    """The supervisor's next Life and what it does, for ``event`` in
    ``life`` (pure: TRANSITIONS as a function).  ``recorded``: for the
    ``recorded`` event, the state the spool now holds."""
    if event in HOUSEKEEPING:
        return life, (event,)
    entry = TRANSITIONS.get((life.phase, event))
    if entry is None:
        return life, ()
    phase, flags, actions = entry
    if phase is None:
        phase = recorded if event == "recorded" else life.phase
    return Life(phase, life.timed_out or "timed_out" in flags, life.spool_removed or "spool_removed" in flags), \
        actions


class Supervisor(object):
    """Runs in the detached process: starts the program, spools, reaps."""

    def __init__(self, run, spec, ready_fd):
        self.run = run
        self.spec = spec
        self.cfg = spec["config"]
        self.ready_fd = ready_fd
        self.capture = self.cfg.get("capture", "file")
        self.pid = None
        self.status = None
        self.rusage = None
        #: Bytes spooled: counted by pump() (pipe capture) or the spool
        #: files' sizes as last seen by watch_sizes() (file capture).
        #: Updated by the supervisor's thread only.
        self.counts = {"stdout": 0, "stderr": 0}
        self.files = {}  # name -> fd: written by pump() (pipe), or watched (file, read-only)
        self.pipes = {}  # read end -> name (pipe capture)
        self.has_children = True  # until wait4 says ECHILD
        self.life = Life()  # where the run's life is (step() moves it on)
        self.timers = None  # its timers (Timers), from the program's start
        self.sender = None
        self.ctl_skip = False  # dropping a control line that is too long
        self.exchange = None  # renameat2 RENAME_EXCHANGE (see write_state_file)
        self.unwritten = False  # a running state still to be written (spool full)
        self.held = {}  # pipe capture, spool full: pipe fd -> when to try again
        self.backlog = {}  # pipe capture without splice: name -> bytes read, not yet written
        self.dir_key = None  # the run's directory (device, inode), to notice its removal
        # stdin from a stream (see feed_stdin): the pipe (or terminal) the
        # program reads, the spool's stdin file, how much of it was fed.
        self.feed_fd = None
        self.feed_src = None
        self.fed = 0
        self.feed_end = None
        self.feed_polled = False
        self.poller = None
        self.tty_fd = None  # program.tty: the terminal's master side (read by pump, sized by resize)
        self.tty_done = None  # ... once read to its end: closed with the spool files (close_spool)
        # The loop's: signals it got, the control FIFO, the inotify watch.
        self.pending = []
        self.ctl_fd = None
        self.ctl_buf = b""
        self.watch_fd = None
        self.spool_fd = None  # file capture: the inotify watch of the spool files (spool_watch)
        self.unwatched = []  # inotify descriptors done with, closed after the end (unwatch)
        self.spool_names = {}
        self.spool_unlinked = False  # a spool file unlinked, its directory not gone yet (links_changed)
        self.spool_last = None  # the stream it said was written last
        self.spool_polled = False  # in the poller (not while Timers.spool_written pauses it)
        self.use_splice = hasattr(os, "splice")

    @property
    def timed_out(self):
        return self.life.timed_out

    @property
    def spool_removed(self):
        return self.life.spool_removed

    # The state record -------------------------------------------------------

    def base_state(self):
        return {
            "version": PROTOCOL_VERSION,
            "id": self.run.id,
            "host": os.uname()[1],  # gethostname(); no socket module to import
            "state": "running",
            "agent_pid": os.getpid(),
            "agent_start": proc_start_ticks(os.getpid()),
            "boot_id": boot_id(),
            "host_id": host_id(),
            "pid": None,
            "pgid": None,
            "pid_start": None,
            "return_code": None,
            "signal": None,
            "timed_out": False,
            "error": None,
            "errno": None,
            "rusage": None,
            "start_time": now_iso(),
            "end_time": None,
            "end_ticks": None,
            "stdout_bytes": 0,
            "stderr_bytes": 0,
            "spool": self.run.dir,
            "note": None,
        }

    def set_state(self, **changes):
        """Record a transition.  A running state that cannot be written
        (the spool's file system is full and the run has no reserve left)
        is kept and written again by the loop (``unwritten``); a final
        state that cannot be written raises (record_end tries again)."""
        if self.capture == "file" and self.files and "stdout_bytes" not in changes:
            before = dict(self.counts)
            self.watch_sizes()
            if self.counts != before:
                self.sizes_grew()  # (what it wrote before this state is in the timeline, at its own time)
            changes.update(stdout_bytes=self.counts["stdout"], stderr_bytes=self.counts["stderr"])
        self.state.update(changes)
        try:
            self.run.write_state(self.state, self.exchange)
            self.unwritten = False
        except OSError:
            if self.state["state"] in FINAL_STATES:
                raise
            self.unwritten = True
        if self.sender:
            self.sender.state_changed(dict(self.state), self.counts)

    def ready(self):
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, b"1")
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    # Start -------------------------------------------------------------------

    def main(self):
        self.state = self.base_state()
        libc = _libc()
        self.exchange = renameat2_exchange()
        try:
            info = os.lstat(self.run.dir)
            self.dir_key = (info.st_dev, info.st_ino)
        except OSError:  # pragma: no cover - made a moment ago
            self.dir_key = None
        if libc is not None and sys.platform.startswith("linux"):
            # Orphaned grandchildren become ours, so a kill can find them.
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if self.spec.get("callback"):
            self.sender = CallbackSender(self)
        # The control FIFO is read from before the program starts: a
        # request sent as soon as the start is answered (a Ctrl-C right
        # after the program's first line) finds a reader, and waits there
        # for the loop.
        self.ctl_fd = os.open(self.run.path("control"), os.O_RDWR | os.O_NONBLOCK)
        try:
            self.start_program(libc)
        except (OSError, ValueError) as e:
            # ValueError: e.g. a NUL byte in argv, env or cwd (valid JSON)
            self.handle("exec_failed", e)
            self.finish_callbacks()
            return
        self.timers = Timers(self.started, self.cfg["timeout"])
        self.handle("started")
        self.loop()
        self.finish_callbacks()

    def exec_failed(self, e):
        prog = self.spec["program"]
        what = getattr(self, "executable", None) or prog["argv"][0]
        filename = getattr(e, "filename", None)
        if filename is not None and prog.get("cwd") and filename in (prog["cwd"], getattr(self, "cwd", None)):
            what = "cwd %s" % prog["cwd"]
        elif filename is not None and prog["stdin"] and filename == prog["stdin"].get("path"):
            what = "stdin %s" % filename
        self.set_state(
            state="error", errno=getattr(e, "errno", None), end_time=now_iso(), end_ticks=ticks_now(),
            error="%s: %s" % (what, getattr(e, "strerror", None) or e),
        )

    def start_program(self, libc):
        prog = self.spec["program"]
        if prog.get("tty") is not None:
            stdio = self.open_terminal(prog)
        else:
            stdio = self.open_stdio(prog)
        cwd = self.cwd = program_cwd(prog)
        argv, self.executable = program_argv(prog)
        env = build_env(prog, cwd)
        if prog.get("tty") is not None and prog["tty"]["term"] and "TERM" not in prog["env"]:
            env["TERM"] = prog["tty"]["term"]  # (as sshd sets it for a session with a terminal)
        try:
            self.pid = fork_exec(argv, cwd, env, stdio, prog["umask"], libc, executable=self.executable,
                                 # (as the login shell sets it for a command; a shell sets its own)
                                 underscore=not prog["shell"] and "_" in env and "_" not in prog["env"],
                                 ctty=self.tty_fd is not None)
        except OSError as e:
            if e.filename is None and not os.path.isdir(cwd):
                e.filename = cwd
            raise
        finally:
            for fd in set(stdio):
                os.close(fd)
        self.started = time.monotonic()

    def open_stdio(self, prog):
        """The program's 0, 1 and 2 without a terminal (closed here once it
        started): its input, and its spool files (file capture) or pipes
        the loop empties into them (pipe capture)."""
        stdin = prog["stdin"]
        if stdin is None:
            stdin_fd = os.open(os.devnull, os.O_RDONLY)
        elif "stream" in stdin:
            # A pipe the supervisor fills from the spool's stdin file as it
            # grows (feed_stdin), closed once the input ended: one EOF.
            self.feed_src = open_regular(self.run.path("stdin"), self.run.what("stdin"))
            stdin_fd, self.feed_fd = os.pipe()
            try:
                import fcntl

                fcntl.fcntl(self.feed_fd, 1031, CHUNK)  # F_SETPIPE_SZ
            except (ImportError, OSError):
                pass
            os.set_blocking(self.feed_fd, False)
        else:
            if "path" in stdin:
                # Copied into the spool first: the spool keeps what the
                # program was given, whatever happens to the original.
                copy_stdin(stdin["path"], self.run.path("stdin"))
            stdin_fd = os.open(self.run.path("stdin"), os.O_RDONLY | SAFE_OPEN)
        child_fds = {}
        for name in STREAMS:
            if self.capture == "file":
                # The program writes its spool file itself, as after
                # `cmd > file` (no O_APPEND: so copy_file_range() and
                # sendfile() work, and the size only grows even when the
                # program truncates its stdout by reopening /dev/stdout;
                # see docs/protocol.md, output capture).
                child_fds[name] = os.open(self.run.path(name), os.O_WRONLY)
                self.files[name] = os.open(self.run.path(name), os.O_RDONLY)
                continue
            self.files[name] = os.open(self.run.path(name), os.O_WRONLY)
            r, w = os.pipe()
            try:
                import fcntl

                fcntl.fcntl(r, 1031, CHUNK)  # F_SETPIPE_SZ: fewer wake-ups
            except (ImportError, OSError):
                pass
            os.set_blocking(r, False)
            self.pipes[r] = name
            child_fds[name] = w
        return (stdin_fd, child_fds["stdout"], child_fds["stderr"])

    def open_terminal(self, prog):
        """``program.tty``: the program's 0, 1 and 2 are one pseudo-terminal
        (its controlling terminal), as under ``ssh -t``.  The loop empties
        the terminal's master side into the spool's stdout (stderr stays
        empty: a terminal has one output); its input, if any, is fed to the
        master from the spool's stdin file as it grows (feed_stdin).  The
        input's end closes only that copy of the master: as under ``ssh
        -t``, the program reads no end of file from a terminal (^D does
        that, in canonical mode)."""
        tty = prog["tty"]
        master, slave = os.openpty()
        try:
            set_winsize(master, tty["rows"], tty["cols"])
            os.set_blocking(master, False)
            stdin = prog["stdin"]
            if stdin is not None:
                if "path" in stdin:
                    copy_stdin(stdin["path"], self.run.path("stdin"))
                self.feed_src = open_regular(self.run.path("stdin"), self.run.what("stdin"))
                if "stream" not in stdin:
                    self.feed_end = os.fstat(self.feed_src).st_size
                self.feed_fd = os.dup(master)
                os.set_blocking(self.feed_fd, False)
            for name in STREAMS:
                self.files[name] = os.open(self.run.path(name), os.O_WRONLY)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self.capture = "pipe"  # (what the loop reads: the master)
        self.pipes[master] = "stdout"
        self.tty_fd = master
        return (slave, slave, slave)

    # The loop ------------------------------------------------------------------

    def loop(self):
        """Supervise the running program: spool its output, act on signals,
        control requests and timers, until it and what it left behind are
        done; then record the end (the ``over`` event: see TRANSITIONS)."""
        wake_r = self.catch_signals()
        self.poller = poller = select.poll()
        for fd in list(self.pipes) + [wake_r, self.ctl_fd]:
            poller.register(fd, select.POLLIN)
        self.start_feeding(poller)
        self.watch_spool()
        # The run's directory removed (rm -rf): inotify says so at once, at
        # no cost while nothing happens: file capture's watch of the spool
        # files sees them unlinked (one inotify instance per supervisor);
        # else a watch of the spool root; without inotify, look once a second.
        if self.spool_fd is None and self.dir_key is not None:
            self.watch_fd = dir_watch(os.path.dirname(self.run.dir), _libc())
            if self.watch_fd is not None:
                poller.register(self.watch_fd, select.POLLIN)
        self.reap()
        self.check_dir()
        while True:
            now = time.monotonic()
            output_open = self.timers.exited_at is not None and self.output_open()
            if self.timers.over(now, output_open, lambda: bool(descendants(os.getpid()))):
                break
            self.poll_once(self.wait_ms(now, output_open), wake_r)
            self.after_poll()
        self.handle("over")

    def catch_signals(self):
        """SIGCHLD, SIGTERM, SIGINT, SIGHUP wake the loop (through the
        returned pipe's read end) and wait in ``pending``; SIGPIPE is
        ignored."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        _signal.set_wakeup_fd(wake_w)

        def on_signal(signum, frame):
            self.pending.append(signum)

        for sig in (_signal.SIGCHLD, _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
            _signal.signal(sig, on_signal)
        _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
        return wake_r

    def wait_ms(self, now, output_open):
        """How long the loop's poll() may block (Timers.wait)."""
        return self.timers.wait(
            now, running=self.life.phase == "running", timed_out=self.timed_out,
            lingering=self.timers.lingering(now, output_open), pipes=bool(self.pipes),
            poll_sizes=self.polls_sizes(), timeline_due=self.timeline_due(),
            dir_poll=self.watch_fd is None and (self.spool_fd is None or self.spool_unlinked)
            and self.dir_key is not None and not self.spool_removed,
            unwritten=self.unwritten, held_until=min(self.held.values()) if self.held else None)

    def poll_once(self, wait_ms, wake_r):
        """Wait up to ``wait_ms`` for the pipes, signals, the control FIFO,
        the stdin feed or the run's directory, and serve what is ready."""
        try:
            events = self.poller.poll(wait_ms)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            events = []
        for fd, ev in events:
            if fd in self.pipes:
                self.pump(fd, self.poller, self.use_splice)
            elif fd == wake_r:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            elif fd == self.ctl_fd:
                self.ctl_buf = self.read_control(self.ctl_fd, self.ctl_buf)
            elif fd == self.feed_fd:
                self.feed_stdin()
            elif fd == self.watch_fd:
                if entry_events(self.watch_fd, os.fsencode(self.run.id)):
                    self.check_dir()
            elif fd == self.spool_fd:
                self.spool_written()

    def after_poll(self):
        """After each wake-up: the signals got, the exit, the timers due,
        the pipes held back by a full spool whose pause is over."""
        while self.pending:
            sig = self.pending.pop(0)
            if sig != _signal.SIGCHLD:
                self.handle("signal", (sig, None))
        self.reap()
        now = time.monotonic()
        for event in self.timers.due(now, running=self.life.phase == "running", timed_out=self.timed_out,
                                     poll_sizes=self.polls_sizes(), timeline_due=self.timeline_due()):
            self.handle(event, now)
        for fd, at in list(self.held.items()):
            if now >= at and fd in self.pipes:
                del self.held[fd]
                self.poller.register(fd, select.POLLIN)
                self.pump(fd, self.poller, self.use_splice)

    def drain(self):
        """The loop is over: the last of the pipes into the spool (when the
        spool is full, once there is room: the end waits for it, nothing
        the program wrote is lost)."""
        # (The inotify descriptors are closed once the end is on disk, by
        # close_spool: closing one waits for the kernel's SRCU grace period,
        # 5-8 ms each here, which the end of a short run should not wait for.)
        if self.watch_fd is not None:
            self.unwatch(self.watch_fd)
            self.watch_fd = None
        if self.spool_fd is not None:
            self.spool_written()  # (the last turns, in order, before the final look)
            self.unwatch(self.spool_fd)
            self.spool_fd = None
        self.stop_feeding()
        for fd in list(self.pipes):
            self.pump(fd, self.poller, self.use_splice, final=True)
        while self.pipes and not self.spool_removed:
            time.sleep(FULL_RETRY)
            self.check_dir()
            for fd in list(self.pipes):
                self.pump(fd, self.poller, self.use_splice, final=True)

    def unwatch(self, fd):
        """No more wake-ups from the inotify descriptor ``fd``: closed by
        close_spool."""
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
        self.unwatched.append(fd)

    def close_spool(self):
        for fd in list(self.files.values()) + self.unwatched:
            os.close(fd)
        self.files, self.unwatched = {}, []
        if self.tty_done is not None:
            os.close(self.tty_done)  # (the program was reaped: what it left gets its SIGHUP now, as after ssh -t)
            self.tty_done = None

    def restore_signals(self):
        """The program is gone and its final state is on disk: from here a
        SIGTERM/SIGINT/SIGHUP ends the supervisor (and any callbacks it
        still owes) instead of being forwarded to nobody; one that came
        since the loop's last turn (say as soon as the state was read)
        does so now.  (Requests on the control FIFO are still read while
        the final state waits for its callback: a new callback address
        must get in.)"""
        _signal.set_wakeup_fd(-1)
        ending = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)
        for sig in ending:
            _signal.signal(sig, _signal.SIG_DFL)
        for sig in [s for s in self.pending if s in ending][:1]:
            os.kill(os.getpid(), sig)

    def handle(self, event, arg=None):
        """An event of the run's life: step() says what the supervisor
        becomes and does; this does it.  ``arg``: the exec error
        (``exec_failed``), ``(signal, grace)`` (``signal``,
        ``signal_request``), the state recorded (``recorded``), ``now``
        (the timers' events)."""
        self.life, actions = step(self.life, event, arg if event == "recorded" else None)
        for action in actions:
            self.carry_out(action, arg)

    def carry_out(self, action, arg):
        """Do one action that step() decided (see TRANSITIONS)."""
        if action == "record_start":
            self.set_state(pid=self.pid, pgid=self.pid, pid_start=proc_start_ticks(self.pid))
        elif action == "record_error":
            self.exec_failed(arg)
        elif action == "ready":
            self.ready()
        elif action == "start_sender" and self.sender:
            self.sender.start()
        elif action == "linger":
            self.timers.exited(time.monotonic())
        elif action == "terminate":
            self.kill_tree(_signal.SIGTERM, grace=self.cfg["kill_grace"])
        elif action == "kill":
            # Also when the program itself already exited: what it left
            # behind gets the SIGKILL (kill_tree skips the old group then).
            self.kill_tree(_signal.SIGKILL)
        elif action == "forward":
            self.kill_tree(arg[0], grace=arg[1])
        elif action == "drain":
            self.drain()
        elif action == "record_end":
            self.record_end()
            self.handle("recorded", self.state["state"])
        elif action == "close_spool":
            self.close_spool()
        elif action == "restore_signals":
            self.restore_signals()
        else:
            self.housekeeping(action, arg)

    def housekeeping(self, action, now):
        """The timers' chores (Timers.due), in any phase."""
        if action == "check_dir":
            self.check_dir()
        elif action == "retry_state":
            if self.unwritten and not self.spool_removed:
                self.set_state()
        elif action == "check_sizes":
            self.timers.sizes_seen(now, self.poll_sizes())
        elif action == "flush_timeline":
            due = self.timeline_due()
            if due is not None and now >= due:
                self.timeline.flush()
        elif action == "read_watch" and self.spool_fd is not None:
            self.poller.register(self.spool_fd, select.POLLIN)
            self.spool_polled = True
            self.spool_written()

    def pump(self, fd, poller, use_splice, final=False):
        """Move what the pipe ``fd`` holds into its spool file.  When the
        spool's file system is full (ENOSPC, EDQUOT) the pipe is left
        alone for FULL_RETRY seconds (``held``): the program blocks on a
        full pipe instead of losing output; bytes already read (no splice)
        wait in ``backlog``."""
        name = self.pipes[fd]
        out = self.files[name]
        total = 0
        use_splice = use_splice and fd != self.tty_fd  # (splice needs a pipe)
        while True:
            try:
                if use_splice:
                    n = os.splice(fd, out, CHUNK, flags=SPLICE_FLAGS)
                else:
                    data = self.backlog.pop(fd, None) or os.read(fd, CHUNK)
                    n = len(data)
                    view = memoryview(data)
                    while view:
                        try:
                            view = view[os.write(out, view):]
                        except OSError:
                            self.backlog[fd] = bytes(view)
                            n -= len(view)
                            self.counts[name] += n
                            total += n
                            raise
            except BlockingIOError:
                if final:
                    n = 0  # a child still holds the pipe: stop reading it
                else:
                    break
            except OSError as e:
                if e.errno == errno.EIO and fd == self.tty_fd:
                    n = 0  # (the terminal's last user closed it: its end)
                else:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    if not final:
                        self.hold_pipe(fd, poller)
                    break
            if n == 0:
                self.close_pipe(fd, poller)
                break
            total += n
            self.counts[name] += n
            if not final and total >= 4 * CHUNK:
                break  # give the other stream and signals a turn
        if total:
            self.grew(name, self.counts[name], time.time())
        if total and self.sender:
            self.sender.output_written(self.counts)

    def hold_pipe(self, fd, poller):
        """The spool is full: the pipe ``fd`` is left alone for FULL_RETRY
        seconds (the loop takes it back: ``held``)."""
        try:
            poller.unregister(fd)
        except KeyError:  # pragma: no cover
            pass
        self.held[fd] = time.monotonic() + FULL_RETRY

    def close_pipe(self, fd, poller):
        """The pipe ``fd`` (or the terminal) ended: it is read no more.  The
        terminal's master side stays open until the program was reaped
        (close_spool): closing it hangs the terminal up, and a program
        still on its way out, or a process it left, would get a SIGHUP
        for it (a run that exited 0 was recorded killed by SIGHUP)."""
        try:
            poller.unregister(fd)
        except KeyError:  # (held)
            pass
        if fd == self.tty_fd:
            self.tty_done = fd
            self.tty_fd = None
        else:
            os.close(fd)
        del self.pipes[fd]
        self.held.pop(fd, None)
        self.backlog.pop(fd, None)

    # stdin from a stream ---------------------------------------------------------

    def start_feeding(self, poller):
        """The loop began (``poller`` is its poll object): feed what the
        input holds already."""
        self.poller = poller
        self.feed_stdin()

    def feed_stdin(self):
        """Give the program what the spool's stdin file holds beyond what it
        got (``agent.py stdin`` appends to it, then says so on the control
        FIFO: op ``stdin``): as much as its pipe takes now, the rest when
        the pipe has room again (POLLOUT).  Once all of it was fed and the
        input's end is recorded (``stdin.end``), the pipe is closed: the
        program reads end of file, once.  A program that closed its stdin
        (EPIPE) is fed no more."""
        fd = self.feed_fd
        if fd is None:
            return
        while True:
            size = os.fstat(self.feed_src).st_size
            if self.feed_end is not None:
                size = min(size, self.feed_end)
            if self.fed < size:
                data = os.pread(self.feed_src, min(CHUNK, size - self.fed), self.fed)
                if not data:  # pragma: no cover - shorter than its size a moment ago
                    break
                try:
                    self.fed += os.write(fd, data)
                except BlockingIOError:
                    return self._feed_poll(True)
                except OSError:  # EPIPE (SIGPIPE is ignored here), EIO: nobody reads it
                    return self.stop_feeding()
                continue
            break
        self._feed_poll(False)
        if self.feed_end is None:
            try:
                self.feed_end = stdin_end(self.run)
            except (AgentError, OSError):  # (damaged: the input goes on, as far as we know)
                self.feed_end = None
            if self.feed_end is not None:
                return self.feed_stdin()
        elif self.fed >= self.feed_end:
            self.stop_feeding()

    def _feed_poll(self, on):
        if self.poller is not None and on != self.feed_polled:
            if on:
                self.poller.register(self.feed_fd, select.POLLOUT)
            else:
                self.poller.unregister(self.feed_fd)
            self.feed_polled = on

    def stop_feeding(self):
        """No more input for the program: close its end of the stream."""
        if self.feed_fd is not None:
            self._feed_poll(False)
            os.close(self.feed_fd)
            os.close(self.feed_src)
            self.feed_fd = self.feed_src = None

    # File capture --------------------------------------------------------------

    def watch_sizes(self):
        """File capture: counts := the spool files' sizes (and ``mtimes``:
        when each was last written, in microseconds since the epoch)."""
        if self.mtimes is None:
            self.mtimes = {}
        for name, fd in self.files.items():
            info = os.fstat(fd)
            self.counts[name] = info.st_size
            self.mtimes[name] = info.st_mtime_ns // 1000

    def poll_sizes(self):
        """File capture: note in the timeline what grew, and wake the
        sender.  Whether the sizes grew (the timers' size_poll follows)."""
        before = dict(self.counts)
        self.watch_sizes()
        if self.counts == before:
            return False
        self.sizes_grew()
        if self.sender:
            self.sender.output_written(self.counts)
        return True

    def watch_spool(self):
        """File capture: an inotify watch of the spool files in the loop's
        poller, so that each write wakes it (spool_written); else (no
        inotify) the timers' size polling.  Then one look at the sizes,
        for what was written before the watch."""
        if self.capture == "file" and self.files:
            paths = dict((name, self.run.path(name)) for name in self.files)
            self.spool_fd, self.spool_names = spool_watch(paths, _libc())
            if self.spool_fd is not None:
                self.poller.register(self.spool_fd, select.POLLIN)
                self.timers.size_watch = self.spool_polled = True
            self.poll_sizes()

    def spool_written(self):
        """File capture, the watch said the program wrote: each stream
        written gets its size now as a timeline record, in the order of
        the writes (the last write of each: the size a stream has now is
        what it had after its last turn), and the sender wakes.  The
        watch may pause (Timers.spool_written)."""
        events = spool_events(self.spool_fd, self.spool_names)
        if events is None:  # (the queue overflowed: the files' mtimes say the order)
            self.poll_sizes()
            self.links_changed()
            return
        order, first, changes, other = events
        if other:
            self.links_changed()
        if not order:
            return
        before = dict(self.counts)
        self.watch_sizes()
        last = dict((name, i) for i, name in enumerate(order))
        switched = changes > 0 or first != self.spool_last
        self.spool_last = order[-1]
        if self.counts != before:
            self.sizes_grew(key=lambda n: last.get(n, -1))
            if self.sender:
                self.sender.output_written(self.counts)
        if self.timers.spool_written(switched, changes <= 1, self.timeline_due()) and self.spool_polled:
            self.poller.unregister(self.spool_fd)
            self.spool_polled = False

    def links_changed(self):
        """The spool files' watch told of something else than a write:
        their links changed (say ``rm -rf`` unlinked them).  Was the run's
        directory removed?  While it is still there and a spool file is
        unlinked, it is looked at again on the timers (``rm -rf`` removes
        the files first and the directory last, and only the files are
        watched)."""
        if not self.check_dir():
            self.spool_unlinked = any(os.fstat(fd).st_nlink == 0 for fd in self.files.values())

    # The output timeline ---------------------------------------------------------

    #: The spool's timeline (TimelineWriter), opened at the first growth.
    timeline = None
    #: File capture: when each spool file was last written (watch_sizes).
    mtimes = None

    def polls_sizes(self):
        """File capture, while the program runs: nobody wakes the loop when
        it writes, so the loop looks at the spool files' sizes (for the
        timeline and the callbacks) on the timers' ``check_sizes``."""
        return self.capture == "file" and bool(self.files) and self.status is None

    def timeline_due(self):
        """When a timeline record held back (growth right after a record)
        is due; None: none is."""
        return self.timeline.due() if self.timeline is not None else None

    def grew(self, name, end, when):
        """Stream ``name`` reached ``end`` bytes by ``when`` (seconds, or
        microseconds as an int, since the epoch): a timeline record."""
        if self.timeline is None:
            self.timeline = TimelineWriter(self.run.path("timeline"))
        self.timeline.grew(name, end, when if isinstance(when, int) else int(when * 1e6))

    def sizes_grew(self, key=None):
        """File capture: the streams whose size (counts) passed what the
        timeline holds, the earlier written first (by ``key``; by default
        each file's mtime: the time of its last write, so of the last of
        these bytes)."""
        held = self.timeline.ends if self.timeline is not None else {}
        for name in sorted((n for n in STREAMS if self.counts[n] > held.get(n, 0)),
                           key=key or (lambda n: self.mtimes.get(n, 0))):
            self.grew(name, self.counts[name], self.mtimes.get(name) or time.time())

    def timeline_end(self):
        """At the end (the final counts just taken): the last growth, and
        what was held back, into the timeline."""
        if self.capture == "file" and self.mtimes is not None:
            self.sizes_grew()
        if self.timeline is not None:
            self.timeline.flush()

    def output_open(self):
        """After the program exited: may more output still come?  Pipe
        capture: while a pipe is open.  File capture: while a process left
        behind holds a spool file open."""
        if self.capture != "file":
            return bool(self.pipes)
        if not self.has_children:
            return False  # nothing left behind: no descendant at all
        if not os.path.isdir("/proc/self/fd"):
            return True  # cannot look: wait for LINGER
        keys = set()
        for fd in self.files.values():
            info = os.fstat(fd)
            keys.add((info.st_dev, info.st_ino))
        for pid in descendants(os.getpid()):
            where = "/proc/%d/fd" % pid
            try:
                names = os.listdir(where)
            except PermissionError:
                info = proc_stat(pid)
                if info is not None and info[0] not in ("Z", "X", "x"):
                    return True  # not ours to look at (setuid): it may hold them
                continue
            except OSError:
                continue  # gone
            for name in names:
                try:
                    info = os.stat(os.path.join(where, name))
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) in keys:
                    return True
        return False

    def read_control(self, fd, buf):
        """Read what the control FIFO holds, act on each whole line, and
        return the partial line left over.  A line longer than MAX_CONTROL
        is dropped (up to its newline) unread."""
        try:
            buf += os.read(fd, 65536)
        except BlockingIOError:
            pass
        while True:
            line, nl, rest = buf.partition(b"\n")
            if self.ctl_skip:
                if nl:
                    self.ctl_skip, buf = False, rest
                    continue
                return b""
            if not nl:
                if len(buf) > MAX_CONTROL:
                    self.ctl_skip = True
                    return b""
                return buf
            buf = rest
            if len(line) <= MAX_CONTROL:
                self.control(line)

    def control(self, line):
        """One request from the FIFO.  Nothing in it can end the
        supervisor: anything but a valid request is ignored."""
        try:
            if not json_nesting_ok(line):
                return
            msg = loads(line.decode())
            op = msg.get("op")
        except Exception:  # (not JSON, not an object, too deep ...)
            return
        if op == "signal":
            sig = msg.get("signal")
            if not _is_int(sig) or sig not in SIGNAL_NAMES:
                return  # an invalid number would make killpg raise
            grace = msg.get("grace")
            grace = grace if _is_num(grace) and grace >= 0 else None
            if grace is None and sig == _signal.SIGTERM:
                grace = self.cfg["kill_grace"]  # like `docker stop`
            self.handle("signal_request", (sig, grace))
        elif op == "stdin":
            self.feed_stdin()
        elif op == "callback" and self.sender:
            self.sender.update(msg)
        elif op == "release" and self.sender:
            self.sender.release()
        elif op == "resize" and self.tty_fd is not None:
            rows, cols = msg.get("rows"), msg.get("cols")
            if _is_int(rows) and _is_int(cols) and 1 <= rows <= 0xFFFF and 1 <= cols <= 0xFFFF:
                try:
                    set_winsize(self.tty_fd, rows, cols)
                except OSError:
                    pass

    def kill_tree(self, sig, grace=None):
        """Signal the program's process group and every other descendant:
        each process once.  (The program is this process's unreaped child,
        so its number, and its group's, cannot be anyone else's until it is
        reaped; after that only descendants are signalled, one by one.)"""
        grouped = self.status is None
        if grouped:
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                grouped = False
        groups = {}
        for pid in descendants(os.getpid(), groups):
            if grouped and groups.get(pid) == self.pid:
                continue  # (the group's signal reached it)
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if grace is not None and sig != _signal.SIGKILL:
            self.timers.arm_kill(time.monotonic() + grace)

    def reap(self):
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                self.has_children = False
                return
            if pid == 0:
                self.has_children = True
                return
            if pid == self.pid:
                self.status = status
                self.rusage = rusage
                self.handle("exited")

    def record_end(self):
        """Record the end.  If the spool's file system is full and the
        write fails anyway (no reserve: see write_state_file), the end is
        kept here and written again every second until there is room;
        meanwhile readers see the run running (and a note that the spool
        is full).  A final state found on disk (say a reader on another
        host marked the run lost) is never overwritten: it stays."""
        if self.spool_removed:
            return self.record_removed()
        while True:
            try:
                return self._record_end()
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT) or self.spool_removed:
                    raise
            time.sleep(1.0)
            self.check_dir()
            if self.spool_removed:
                return self.record_removed()

    def _record_end(self):
        status = self.status
        # Under the run's exclusive lock: no reader sees "running" with
        # sizes larger than these counts (file capture: children left
        # behind may still append; what they append now is not the run's).
        with self.run.lock(exclusive=True):
            try:
                recorded = self.run.read_state()
            except (OSError, AgentError):
                recorded = None
            if recorded is not None and recorded["state"] in FINAL_STATES:
                self.state = recorded
                if self.sender:
                    self.sender.state_changed(dict(recorded), self.counts)
                return
            if self.capture == "file":
                self.watch_sizes()
            self.timeline_end()
            changes = {
                "state": "done",
                "end_time": now_iso(),
                "end_ticks": ticks_now(),
                "timed_out": self.timed_out,
                "stdout_bytes": self.counts["stdout"],
                "stderr_bytes": self.counts["stderr"],
                "rusage": dict((f, getattr(self.rusage, f)) for f in RUSAGE_FIELDS),
            }
            if os.WIFSIGNALED(status):
                changes["signal"] = signal_name(os.WTERMSIG(status))
            else:
                changes["return_code"] = os.WEXITSTATUS(status)
            self.set_state(**changes)

    def check_dir(self):
        """Notice that the run's directory was removed (``rm -rf`` of the
        spool): it is not there any more, or another one is in its place.
        (No descriptor of it is held: while one is, the kernel tells
        inotify of its deletion only when the last one is closed.)"""
        if not self.spool_removed and self.spool_gone():
            # While it runs, nothing could reach the program any more
            # (its control FIFO is gone): it is ended, as a timeout does.
            self.handle("spool_removed")
        return self.spool_removed

    def spool_gone(self):
        """Whether the run's directory is no longer the one this supervisor
        made (removed: cleaned; or another run of the same id in its place)."""
        if self.dir_key is None:
            return False
        try:
            info = os.lstat(self.run.dir)
        except FileNotFoundError:
            return True
        except OSError:  # pragma: no cover - say EACCES: cannot tell
            return False
        return (info.st_dev, info.st_ino) != self.dir_key

    def record_removed(self):
        """The run's directory was removed while it ran: the program was
        ended; make the directory again (in a private one, renamed into
        place: never over a new run of the same id) with a final ``lost``
        state saying so, and empty stdout and stderr (what they held went
        with the directory)."""
        self.state.update(
            state="lost", end_time=now_iso(), end_ticks=ticks_now(), stdout_bytes=0, stderr_bytes=0,
            error="the run's spool directory was removed while it was running; the program was ended "
                  "(SIGTERM, then SIGKILL after kill_grace) and its output is gone",
        )
        root = os.path.dirname(self.run.dir)
        try:
            ensure_root(root, check=False)
            tmp = private_dir(root, ".new-%s-" % self.run.id)
        except (OSError, AgentError):
            tmp = None
        if tmp is not None:
            try:
                write_json_atomic(os.path.join(tmp, "program.json"), stored_spec(self.spec), durable=False)
                for name in STREAMS:
                    os.close(os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                write_json_atomic(os.path.join(tmp, "state.json"), self.state)
                os.rename(tmp, self.run.dir)
                fsync_dir(root)
                info = os.lstat(self.run.dir)
                self.dir_key = (info.st_dev, info.st_ino)  # (its spool now: see spool_gone)
            except OSError:
                remove_tree(tmp)  # (a new run of this id took its place: it stays)
        if self.sender:
            self.sender.state_changed(dict(self.state), self.counts)

    def finish_callbacks(self):
        ctl_fd, self.ctl_fd = getattr(self, "ctl_fd", None), None
        try:
            if not self.sender:
                return
            self.sender.finish(wait=False)
            buf = getattr(self, "ctl_buf", b"")
            while self.sender.is_alive():
                if ctl_fd is None:
                    self.sender.thread.join(0.5)
                elif select.select([ctl_fd], [], [], 0.5)[0]:
                    buf = self.read_control(ctl_fd, buf)
                    continue
                if self.spool_gone():
                    # Cleaned: nobody can take this run back (reattach reads
                    # its spool), so no one is waiting for its callbacks.
                    self.sender.release()
                    self.sender.thread.join(5.0)
                    return
        finally:
            if ctl_fd is not None:
                os.close(ctl_fd)


# --- HTTPS callbacks ----------------------------------------------------------


#: Output bodies are read from the spool and sent this much at a time.
SEND_CHUNK = 1 << 20
#: Output bodies on the wire at once: the next one goes out while the
#: scheduler stores the last, so the bytes never wait for an answer.
PIPELINE = 2
#: The most of an answer's body the sender reads (they are small JSON).
MAX_ANSWER = 1 << 16


class SendTimers(object):
    """The callback sender's timers as data (as Timers is the
    supervisor's): the heartbeat (a running state sent again every
    ``heartbeat`` seconds), the output latency (output waits up to
    ``latency`` seconds from its first byte not sent, or until ``buffer``
    bytes wait) and the retry backoff.  Pure: no clock read, no I/O; the
    sender passes ``now`` (under its condition: the supervisor's thread
    calls output_pending)."""

    __slots__ = ("heartbeat", "latency", "buffer", "next_heartbeat", "first_pending")

    def __init__(self, now, heartbeat, latency, buffer):
        self.heartbeat, self.latency, self.buffer = heartbeat, latency, buffer
        self.next_heartbeat = now + heartbeat
        self.first_pending = None

    def output_pending(self, now):
        """Output was written: the latency runs from the first not sent."""
        if self.first_pending is None:
            self.first_pending = now

    def output_sent(self):
        self.first_pending = None

    def sent_state(self, now):
        """A state went out: the next heartbeat is one period later."""
        self.next_heartbeat = now + self.heartbeat

    def wait(self, now, urgent, pending):
        """Seconds the sender may sleep (0: send now).  ``urgent``: a
        state or the end waits to be sent; ``pending``: bytes written, not
        sent."""
        if urgent or pending >= self.buffer:
            return 0
        waits = [self.next_heartbeat - now]
        if pending:
            waits.append((self.first_pending or now) + self.latency - now)
        return max(0, min(waits))

    def heartbeat_due(self, now, latest):
        """Whether the last state (``latest``) is due again: still running."""
        return now >= self.next_heartbeat and latest is not None and latest["state"] == "running"

    @staticmethod
    def backoff(delay, most):
        """The pause before the next try after a failed one: doubling from
        0.1 s up to ``most`` (retry_frequency)."""
        return min(max(delay * 2, 0.1), most)


class CallbackSender(object):
    """Pushes output and state to the scheduler, from a thread of its own;
    the spool stays the truth.

    Never blocks the supervisor's loop: it reads the spool files on its own.
    It never reads the supervisor's fields from its thread: the supervisor
    hands it copies (state_changed, output_written), under its condition.
    """

    def __init__(self, sup):
        import threading  # only runs with a callback pay for it

        self.thread = threading.Thread(target=self.run, name="callback", daemon=True)
        self.sup = sup  # (its run: the spool's paths, which never change)
        self.cfg = sup.cfg
        #: Copies the supervisor handed over: the bytes it counted (pipe
        #: capture) or the sizes it last saw (file capture), and its last state.
        self.counts = dict(sup.counts)
        self.latest = dict(sup.state) if getattr(sup, "state", None) else None
        self.cb = dict(sup.spec["callback"])
        self.cond = threading.Condition()
        self.sent = {"stdout": 0, "stderr": 0}
        self.state_to_send = None
        self.final = None
        self.done = False
        self.conn = None
        self.reader = None  # where the answers to pipelined requests are read (answer())
        self.buf = None  # (send_file's)
        self.ctx = None
        self.timers = SendTimers(time.monotonic(), self.cb["heartbeat"], self.cfg["output_latency"],
                                 self.cfg["output_buffer"])
        self.finish_deadline = None
        self.updated = False
        self.reset = False

    # Called from the supervisor ----------------------------------------------

    def state_changed(self, st, counts=None):
        with self.cond:
            self.latest = st
            if counts is not None:
                self.counts = dict(counts)
            if st["state"] in FINAL_STATES:
                self.final = st
            else:
                self.state_to_send = st
            self.cond.notify()

    def output_written(self, counts):
        with self.cond:
            self.counts = dict(counts)
            self.timers.output_pending(time.monotonic())
            self.cond.notify()

    def update(self, msg):
        with self.cond:
            for key in ("url", "token", "cert"):
                if isinstance(msg.get(key), str):
                    self.cb[key] = msg[key]
            self.reset = True  # the sender thread reconnects (it owns the connection)
            self.updated = True
            self.cond.notify()

    def release(self):
        """The scheduler has what it needs (it caught up from the spool):
        no more callbacks for this run."""
        with self.cond:
            self.done = True
            self.cond.notify()

    def finish(self, wait=True):
        """After the program ended: send until the final state is
        acknowledged or ``callback_timeout`` passed (``wait``: join)."""
        if self.final is None:
            return
        with self.cond:
            self.finish_deadline = time.monotonic() + self.cfg["callback_timeout"]
            self.cond.notify()
        if not self.is_alive() and self.thread.ident is None:
            self.start()
        if wait:
            self.thread.join()

    def start(self):
        self.thread.start()

    def is_alive(self):
        return self.thread.is_alive()

    # The thread ----------------------------------------------------------------

    def written(self):
        with self.cond:
            return dict(self.counts)

    def run(self):
        delay = 0.0
        while True:
            with self.cond:
                if delay:
                    # Back off; a new callback address (update()) ends the wait.
                    retry_at = time.monotonic() + delay
                    self.updated = False
                    while not self.updated and not self.done:
                        left = retry_at - time.monotonic()
                        if left <= 0:
                            break
                        self.cond.wait(min(left, 3600.0))
                else:
                    wait = self._wait_time()
                    if wait > 0:
                        self.cond.wait(min(wait, 3600.0))  # < threading.TIMEOUT_MAX
                if self.done:
                    return
                if self.finish_deadline is not None and time.monotonic() > self.finish_deadline:
                    return
                reset, self.reset = self.reset, False
            if reset:
                self.close()
                self.ctx = None
            try:
                if self._step():
                    return
                delay = 0.0
            except Exception:  # network, TLS, HTTP, a bad answer: retry, never die
                self.close()
                delay = SendTimers.backoff(delay, self.cfg["retry_frequency"])

    def _wait_time(self):
        now = time.monotonic()
        written = self.written()
        pending = sum(written[s] - self.sent[s] for s in STREAMS)
        return self.timers.wait(now, self.final is not None or self.state_to_send is not None, pending)

    def _step(self):
        """Send what is due; True when the final state was acknowledged."""
        now = time.monotonic()
        if self.state_to_send is not None:
            st, self.state_to_send = self.state_to_send, None
            try:
                self.post("state", dumps(st).encode(), "application/json")
            except Exception:
                with self.cond:
                    if self.state_to_send is None:
                        self.state_to_send = st
                raise
            self.timers.sent_state(now)
        final = self.final
        written = final and {"stdout": final["stdout_bytes"], "stderr": final["stderr_bytes"]}
        written = written or self.written()
        with self.cond:
            self.timers.output_sent()
        for name in STREAMS:
            self.send_stream(name, written[name])
        if final is not None:
            self.post("completed", dumps(final).encode(), "application/json")
            return True
        with self.cond:
            latest = self.latest
        if self.timers.heartbeat_due(time.monotonic(), latest):
            st = dict(latest)
            # What the supervisor counted (file capture: the sizes it last
            # saw): never more than the final counts will be.
            sizes = self.written()
            st["stdout_bytes"], st["stderr_bytes"] = sizes["stdout"], sizes["stderr"]
            self.post("state", dumps(st).encode(), "application/json")
            self.timers.sent_state(time.monotonic())
        return False

    def send_stream(self, name, upto):
        """Output of ``name`` up to ``upto`` in bodies of at most
        output_buffer, PIPELINE of them on the wire at once (HTTP/1.1
        pipelining: the flow does not stop at each answer).  Each answer
        says what the scheduler holds; one that is not the end of its body
        (a gap: 409, or a body cut short) voids the bodies behind it: the
        connection is closed and sending goes on from what it holds."""
        if self.sent[name] >= upto:
            return
        fd = open_regular(self.sup.run.path(name), self.sup.run.what(name))  # (never a FIFO to wait on)
        try:
            ends, pos, short = [], self.sent[name], False
            while True:
                while not short and pos < upto and len(ends) < PIPELINE:
                    want = min(self.cfg["output_buffer"], upto - pos, os.fstat(fd).st_size - pos)
                    if want <= 0:
                        short = True  # (the file is shorter than counted: truncated by the program)
                        break
                    self.send_file("output/%s?offset=%d" % (name, pos), fd, pos, want)
                    pos += want
                    ends.append(pos)
                if not ends:
                    return
                _, body = self.answer("output", accept=(200, 409))
                held = int(parse_json(body, "the scheduler's answer")["offset"])
                self.sent[name] = held
                if held != ends.pop(0) or self.conn is None:
                    self.close()  # what was sent behind it is void (or the scheduler closed)
                    ends, pos = [], held
        finally:
            os.close(fd)

    # HTTP -------------------------------------------------------------------------

    def close(self):
        if self.reader is not None:
            try:
                self.reader.close()
            except Exception:
                pass
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
        self.conn = self.reader = None

    def connection(self):
        if self.conn is None:
            import ssl  # only runs with callbacks pay for it
            from urllib.parse import urlsplit

            url = urlsplit(self.cb["url"])
            if self.ctx is None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(cadata=self.cb["cert"])
                # Trust exactly the pinned certificate: it is the only
                # anchor, and the peer's certificate must equal it byte for
                # byte (checked in post()); the host name is not what is
                # pinned, so it is not checked.
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_REQUIRED
                self.ctx = ctx
                self.pinned = ssl.PEM_cert_to_DER_cert(self.cb["cert"].strip() + "\n")
            self.prefix = url.path.rstrip("/") + "/" + self.sup.run.id + "/"
            self.host_header = url.netloc.rpartition("@")[2]
            self.conn = http_client().HTTPSConnection(
                url.hostname, url.port or 443, context=self.ctx, timeout=30
            )
            self.conn.connect()
            if self.conn.sock.getpeercert(binary_form=True) != self.pinned:
                self.close()
                raise ssl.SSLError("the scheduler's certificate is not the pinned one")
        return self.conn

    def send_file(self, route, fd, offset, length):
        """Send a POST of ``length`` bytes of ``fd`` from ``offset``, read
        and sent SEND_CHUNK at a time (a body as large as output_buffer
        costs no more memory than that), without waiting for its answer
        (:meth:`answer`).  Written on the socket itself: http.client
        allows one request in flight."""
        conn = self.connection()
        sock = conn.sock
        sock.sendall((
            "POST %s%s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
            % (self.prefix, route, self.host_header, self.cb["token"], length)).encode("latin-1"))
        if self.buf is None:
            self.buf = bytearray(SEND_CHUNK)
        buf = memoryview(self.buf)
        end = offset + length
        while offset < end:
            n = preadv(fd, buf[:min(SEND_CHUNK, end - offset)], offset)
            if not n:  # truncated meanwhile: this body cannot be completed
                self.close()
                raise OSError("the spool file shrank while it was being sent")
            sock.sendall(buf[:n])
            offset += n

    def answer(self, what, accept=(200,)):
        """Read the answer to the oldest request sent by :meth:`send_file`."""
        if self.reader is None:
            self.reader = self.conn.sock.makefile("rb")
        resp = http_client().HTTPResponse(_Shared(self.reader), method="POST")
        try:
            resp.begin()
            data = resp.read(MAX_ANSWER + 1)
        except Exception:
            self.close()
            raise
        if resp.will_close or len(data) > MAX_ANSWER or not resp.isclosed():
            self.close()  # (nothing more can be read from it in order)
        if resp.status not in accept:
            self.close()
            raise OSError("callback %s answered %d" % (what, resp.status))
        return resp.status, data

    def post(self, route, body, ctype, accept=(200,)):
        conn = self.connection()
        conn.request("POST", self.prefix + route, body=body, headers={
            "Authorization": "Bearer " + self.cb["token"],
            "Content-Type": ctype,
        })
        return self._response(conn, route, accept)

    @staticmethod
    def _response(conn, route, accept):
        resp = conn.getresponse()
        data = resp.read()
        if resp.status not in accept:
            raise OSError("callback %s answered %d" % (route.split("?")[0], resp.status))
        return resp.status, data


def http_client():
    import http.client

    return http.client


def preadv(fd, view, offset):
    """Read into ``view`` at ``offset`` of ``fd``; the count read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


class _Shared(object):
    """The connection's one reader, as http.client.HTTPResponse takes a
    socket: each answer to pipelined requests is read from where the last
    ended (a reader of its own could swallow the start of the next)."""

    def __init__(self, reader):
        self.reader = reader

    def makefile(self, mode):
        return self

    def close(self):
        pass  # (the reader outlives each answer)

    def __getattr__(self, name):
        return getattr(self.reader, name)


# --- commands -------------------------------------------------------------------


class Output(object):
    """The agent's stdout, after an optional marker line that lets the client
    skip whatever a login script printed first."""

    def __init__(self, marker):
        self.fd = sys.stdout.fileno()
        self._watch = None
        self._wake = None  # (run_watch: what ends an idle wait early)
        # An output frame was the last thing written: before going idle, a
        # seal (a ``.`` frame) follows it, whose header shows the client
        # that the frame was whole (nothing else wrote into it).
        self._open = False
        if marker:
            # (os.fsencode: the bytes it had on the command line, even
            # those that are not UTF-8)
            write_all(self.fd, b"\n" + os.fsencode(marker) + b"\n")

    def json(self, obj):
        write_all(self.fd, (dumps(obj, sort_keys=True) + "\n").encode())

    def frame(self, kind, offset, data):
        write_all(self.fd, FRAME.pack(kind, offset, len(data)) + bytes(data))
        self._open = kind in STREAM_KINDS

    def frame_range(self, kind, offset, fd, length):
        """A frame of ``length`` bytes of the file ``fd`` from ``offset``
        (which holds them: the caller checked its size)."""
        write_all(self.fd, FRAME.pack(kind, offset, length))
        self._open = True
        sent = send_range(self.fd, fd, offset, length)
        if sent < length:  # (truncated meanwhile: the frame cannot be whole)
            raise DamagedRun("a spool file shrank while it was sent (%d of %d bytes)" % (sent, length))

    def idle(self, seconds):
        """Wait ``seconds`` with nothing to send; :class:`BrokenPipeError`
        as soon as nobody reads this output any more (the client, or its
        SSH connection, went away: the pipe or socket reports an error or a
        hang-up), so that a follow whose client died does not wait, unseen,
        for the run's end."""
        if self._watch is None:
            self._watch = select.poll()
            self._watch.register(self.fd, 0)  # (POLLERR/POLLHUP come anyway)
            if self._wake is not None:
                self._watch.register(self._wake, select.POLLIN)
        if self._open:
            write_all(self.fd, SEAL)
            self._open = False
        for fd, _ in self._watch.poll(seconds * 1000.0):
            if fd == self.fd:
                raise BrokenPipeError(errno.EPIPE, "the reader of this output is gone")
            try:
                while os.read(fd, 65536):  # (what woke it: read, the follow looks now)
                    pass
            except OSError:
                pass

    def wake_on(self, run):
        """An idle wait ends as soon as a file of ``run`` is written (the
        program's output, its state): no polling delay for what comes.
        Closed by :meth:`close`."""
        if self._wake is None and self._watch is None:
            self._wake = run_watch(run.dir)

    def close(self):
        if self._wake is not None:
            os.close(self._wake)
            self._wake = None


def read_program_json():
    data = b""
    stdin = sys.stdin.buffer
    while len(data) <= MAX_PROGRAM_JSON:
        chunk = stdin.read(1 << 16)
        if not chunk:
            break
        data += chunk
    if len(data) > MAX_PROGRAM_JSON:
        raise AgentError("program.json is too large (over %d bytes)" % MAX_PROGRAM_JSON)
    if not data.strip():
        raise AgentError("program.json is empty")
    spec = parse_json(data, "program.json")
    if isinstance(spec, list) and len(spec) > MAX_BATCH:
        raise AgentError("program.json: a batch of %d starts; at most %d at once" % (len(spec), MAX_BATCH))
    return spec


def wait_for_start(run, seconds=10.0):
    """A concurrent start of the same id: wait until it has a pid or an end."""
    end = time.monotonic() + seconds
    while True:
        st = run.refresh()
        if st["pid"] or st["state"] != "running" or time.monotonic() > end:
            return st
        time.sleep(0.01)


def stored_spec(spec):
    """program.json as the spool keeps it: no secret, no stdin data."""
    stored = loads(dumps(spec))
    if stored.get("callback"):
        stored["callback"]["token"] = "<redacted>"
    stdin = stored["program"]["stdin"]
    if stdin is not None and "data" in stdin:
        stored["program"]["stdin"] = {"data": "<in the stdin file>"}
    return stored


def claim(root, spec):
    """Create the run's spool and claim its id: ``(run, True)``; or
    ``(run, False)`` when the id already exists (start is idempotent).

    The run is built in a private directory, then claimed with one rename:
    of two concurrent starts of one id, exactly one rename succeeds.
    """
    run = Run(root, spec["id"])
    if os.path.lexists(run.dir):
        return run, False
    tmp = private_dir(root, ".new-%s-" % spec["id"])
    try:
        stored = stored_spec(spec)
        stdin = spec["program"]["stdin"]
        if stdin is not None and "data" in stdin:
            import base64

            fd = os.open(os.path.join(tmp, "stdin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            write_all(fd, base64.b64decode(stdin["data"]))
            os.close(fd)
        elif stdin is not None and "stream" in stdin:
            # (empty: `agent.py stdin` appends to it as the input comes)
            os.close(os.open(os.path.join(tmp, "stdin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        # (program.json and the placeholder state are not fsynced: see Run.write_state)
        write_json_atomic(os.path.join(tmp, "program.json"), stored, durable=False)
        for name in STREAMS:
            os.close(os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.close(os.open(os.path.join(tmp, "timeline"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.mkfifo(os.path.join(tmp, "control"), 0o600)
        placeholder = Supervisor(run, spec, None).base_state()
        # state.json and its reserve are as large as the final state can
        # be: its end is recorded in room taken now (see write_state_file).
        size = reserve_size(placeholder)
        write_json_atomic(os.path.join(tmp, "state.json"), placeholder, durable=False, pad=size)
        if not make_reserve(tmp, size):
            raise OSError(errno.ENOSPC, "no room for the run's state on the spool's file system")
        try:
            os.rename(tmp, run.dir)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            remove_tree(tmp)
            return run, False
    except OSError as e:
        remove_tree(tmp)
        raise AgentError("cannot create the run's spool: %s" % e, 3)
    return run, True


def spawn(run, spec, close=()):
    """Fork the detached supervisor; returns the read end of the pipe it
    closes once the program started (or failed to).  ``close``: fds of this
    process the supervisor must not keep."""
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the supervisor
        code = 0
        try:
            os.close(ready_r)
            for fd in close:
                os.close(fd)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            os.chdir("/")
            Supervisor(run, spec, ready_w).main()
        except BaseException:
            code = 1
            try:
                import traceback

                fd = os.open(run.path("agent.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                write_all(fd, traceback.format_exc().encode())
                os.close(fd)
            except Exception:
                pass
        os._exit(code)
    os.close(ready_w)
    return ready_r


def started_state(run, ready_r):
    """Wait for the supervisor's word, then the run's state."""
    while True:
        try:
            got = os.read(ready_r, 1)
            break
        except InterruptedError:  # pragma: no cover
            continue
    os.close(ready_r)
    st = run.refresh()
    if not got and st["state"] == "running" and st["agent_pid"] == os.getpid():
        # The supervisor died before it wrote a state of its own: the
        # placeholder names this process, which would look alive (and a
        # --follow would wait for itself forever).
        why = "the supervisor failed before starting the program"
        try:
            with open(run.path("agent.log"), "rb") as f:
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
            if lines:
                why += ": " + lines[-1]
        except OSError:
            pass
        st.update(state="error", error=why, end_time=now_iso())
        run.write_state(st)
    return st


def prepare_fork(callbacks=False):
    """Load, once, what every supervisor needs, before forking them
    (``callbacks``: some will call back, from a thread)."""
    _libc()
    if callbacks:
        import threading  # noqa: F401 - into sys.modules, for CallbackSender


def start_one(root, spec, close=()):
    run, claimed = claim(root, spec)
    if claimed:
        prepare_fork()
        return run, started_state(run, spawn(run, spec, close))
    return run, wait_for_start(run.require())


def start_many(root, docs, close=()):
    """Start a list of program.json documents with one agent process: every
    supervisor is forked first, then each one's start is awaited.  Each
    answer is the run's state, or ``{"id", "rejected"}``.  ``close``: fds
    of this process the supervisors must not keep (see spawn)."""
    answers = [None] * len(docs)
    waiting = []
    prepare_fork(callbacks=any(isinstance(doc, dict) and doc.get("callback") for doc in docs))
    for i, doc in enumerate(docs):
        run_id = doc.get("id") if isinstance(doc, dict) else None
        try:
            spec = validate_spec(doc)
            run, claimed = claim(root, spec)
        except AgentError as e:
            answers[i] = {"id": run_id, "rejected": str(e)}
            continue
        ready = spawn(run, spec, close=list(close) + [r for _, _, r in waiting if r is not None]) if claimed else None
        waiting.append((i, run, ready))
    for i, run, ready in waiting:
        try:
            answers[i] = started_state(run, ready) if ready is not None else wait_for_start(run.require())
        except AgentError as e:  # (an existing run whose state is damaged)
            answers[i] = {"id": run.id, "rejected": str(e)}
    return answers


#: A batch start is shared among processes (see start_shared) from this
#: many documents per process on.
BATCH_SHARE = 16
#: At most this many processes share one batch.
BATCH_WORKERS = 8


def batch_workers(count):
    """How many processes share a batch of ``count`` starts: one per CPU
    this process may run on, each with at least BATCH_SHARE documents."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, BATCH_WORKERS, count // BATCH_SHARE))


def start_shared(root, docs, workers=None):
    """start_many, the documents shared among ``workers`` processes: this
    one and others forked from it, each a slice of the list in its order,
    so that the claims and the forks of the supervisors run on every CPU
    at once (one channel and one Python start-up still).  Each helper
    writes its slice's answers (JSON) to a pipe of its own.  A slice whose
    helper did not answer it all (it died) is started again here: a start
    is idempotent by id, so a run it did start is answered, not started
    twice."""
    workers = batch_workers(len(docs)) if workers is None else workers
    if workers <= 1:
        return start_many(root, docs)
    # What each supervisor would load on its own after the fork (an
    # extension module's dlopen every time): the run lock's fcntl,
    # fork_exec's gc, and resource (os.wait4 builds its rusage with it).
    for name in ("fcntl", "gc", "resource"):
        try:
            __import__(name)
        except ImportError:  # pragma: no cover
            pass
    size = -(-len(docs) // workers)
    slices = [docs[i:i + size] for i in range(0, len(docs), size)]
    helpers = []  # (slice, pid, read end)
    for part in slices[1:]:
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # a helper: its slice, its answers, and out
            code = 1
            try:
                os.close(r)
                for _, _, fd in helpers:
                    os.close(fd)
                write_all(w, dumps(start_many(root, part, close=[w])).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        helpers.append((part, pid, r))
    answers = start_many(root, slices[0], close=[fd for _, _, fd in helpers])
    for part, pid, r in helpers:
        got = _helper_answers(pid, r)
        if not isinstance(got, list) or len(got) != len(part):
            got = start_many(root, part)  # (it died: what it started is answered, the rest started)
        answers.extend(got)
    return answers


def _helper_answers(pid, r):
    """What start_shared's helper ``pid`` wrote to its pipe ``r`` (closed
    here, the helper reaped), as JSON; None if that is not JSON."""
    chunks = []
    while True:
        try:
            chunk = os.read(r, 1 << 16)
        except InterruptedError:  # pragma: no cover
            continue
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    try:
        return loads(b"".join(chunks).decode())
    except ValueError:
        return None


def cmd_start(args, out_marker):
    if args.login_env is not None:
        read_login_env(args.login_env)
    doc = read_program_json()
    root = ensure_root(args.root)
    if isinstance(doc, list):
        if not doc:
            raise AgentError("program.json: expected a JSON object, or a non-empty list of them")
        if args.follow:
            raise AgentError("start --follow takes one program.json, not a list")
        answers = start_shared(root, doc)
        Output(out_marker).json(answers)
        return 0
    run, st = start_one(root, validate_spec(doc))
    out = Output(out_marker)
    out.json(st)
    if args.follow:
        follow(run, out, {"stdout": 0, "stderr": 0}, st)
    return 0


def send_frame(out, kind, fd, offset, most):
    """One output frame of the file ``fd`` from ``offset``: at most
    ``most`` bytes (and CHUNK), never past the file's end; its length (0:
    the file ends there).  To a sink with ``frame_range`` (the agent's
    stdout) the data goes by sendfile, with no copy through Python."""
    if not hasattr(out, "frame_range"):
        data = os.pread(fd, min(CHUNK, most), offset)
        if data:
            out.frame(kind, offset, data)
        return len(data)
    n = max(0, min(CHUNK, most, os.fstat(fd).st_size - offset))
    if n:
        out.frame_range(kind, offset, fd, n)
    return n


def follow(run, out, offsets, last=None):
    """Stream output frames from ``offsets`` until the run is final and all
    its output was sent; then the final state frame and an end frame.
    Never past the state's counts (see Run.refresh): what children left
    behind append after the end is not the run's output."""
    fds = {}
    try:
        for name in STREAMS:
            fds[name] = open_regular(run.path(name), run.what(name))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    kinds = {"stdout": b"1", "stderr": b"2"}
    shown = last and (last["state"], last["pid"])
    interval = 0.001
    try:
        while True:
            st = run.refresh(fds)
            final = st["state"] in FINAL_STATES
            moved = False
            short = False
            for name in STREAMS:
                size = st[name + "_bytes"]
                while offsets[name] < size:
                    n = send_frame(out, kinds[name], fds[name], offsets[name], size - offsets[name])
                    if not n:
                        # The file is shorter than its count: truncated
                        # after the end (say a child left behind reopened
                        # /dev/stdout).  Those bytes are gone: once the run
                        # is final, end rather than wait for them forever.
                        short = final
                        break
                    offsets[name] += n
                    moved = True
            if final and (short or all(offsets[n] >= st[n + "_bytes"] for n in STREAMS)):
                out.frame(b"S", 0, dumps(st, sort_keys=True).encode())
                out.frame(b"E", 0, b"")
                return
            if not final and (st["state"], st["pid"]) != shown:
                out.frame(b"S", 0, dumps(st, sort_keys=True).encode())
                shown = (st["state"], st["pid"])
            if moved:
                interval = 0.001
            else:
                # (the watch only once there is something to wait for: a
                # run already over needs none, and an inotify descriptor
                # costs milliseconds to close, at this command's exit)
                out.wake_on(run)
                out.idle(interval)
                interval = min(interval * 1.5, 0.05)  # (a quick program's end is seen soon)
    finally:
        out.close()
        for fd in fds.values():
            os.close(fd)


def cmd_status(args, marker):
    st = Run(args.root, args.id).require().refresh()
    Output(marker).json(st)
    return 0


# --- watching many runs ---------------------------------------------------------

#: At most this many run ids in one ``watch``.
MAX_WATCH = 1 << 16
#: Without inotify: look at each watched state.json this often (seconds).
WATCH_POLL = 0.05
#: Look whether each watched run's supervisor still lives this often
#: (a supervisor that dies writes no state: its run is then found lost).
WATCH_SWEEP = 1.0
#: inotify: IN_MOVED_TO | IN_CREATE (entries: state.json renamed into place,
#: a run's directory made again) | IN_DELETE_SELF | IN_MOVE_SELF (the
#: directory removed, or moved away by clean).
WATCH_EVENTS = 0x80 | 0x100 | 0x400 | 0x800


def read_watch_ids(data):
    """The run ids of ``watch``'s stdin (separated by white space), each
    checked, without repeats, in their order."""
    if len(data) > MAX_WATCH * 130:
        raise AgentError("watch: stdin is too large (at most %d run ids)" % MAX_WATCH)
    ids, seen = [], set()
    for word in data.split():
        try:
            run_id = word.decode("ascii")
        except UnicodeDecodeError:
            raise AgentError("invalid run id %r" % word.decode("utf-8", "replace"))
        check_id(run_id)
        if run_id not in seen:
            seen.add(run_id)
            ids.append(run_id)
    if not ids:
        raise AgentError("watch: no run ids on stdin")
    if len(ids) > MAX_WATCH:
        raise AgentError("watch: %d run ids; at most %d at once" % (len(ids), MAX_WATCH))
    return ids


class Watch(object):
    """``watch``: one ``S`` frame with each run's final state as it becomes
    final (an ``X`` frame for a run that cannot be read), then ``E``.

    Nothing is polled while nothing happens, where inotify is there: a
    state is replaced by a rename into the run's directory, which wakes
    the watch at once; once a WATCH_SWEEP, each supervisor is looked at
    (/proc), since one that dies writes no state.  Without inotify (or
    for runs another host records, whose writes a network file system
    does not tell), each state.json is looked at every WATCH_POLL."""

    def __init__(self, root, ids, out):
        self.root = root
        self.out = out
        self.pending = dict((run_id, Run(root, run_id)) for run_id in ids)
        self.seen = {}  # run id -> (supervisor pid, its start) while running, judged here
        self.keys = {}  # run id -> what stat said of its state.json (polling)
        self.remote = set()  # runs recorded by another host: polled
        self.fd = None
        self.wds = {}  # watch descriptor -> run id (None: the root)

    def run(self):
        try:
            self._inotify()
            self.check(list(self.pending))
            next_sweep = time.monotonic() + WATCH_SWEEP
            while self.pending:
                now = time.monotonic()
                if now >= next_sweep:
                    self.check(self.dead())
                    next_sweep = now + WATCH_SWEEP
                    continue
                polled = self.fd is None or self.remote
                wait = min(next_sweep - now, WATCH_POLL) if polled else next_sweep - now
                self.check(self.woken(wait))
                if polled:
                    self.check(self.changed())
            self.out.frame(b"E", 0, b"")
        finally:
            if self.fd is not None:
                os.close(self.fd)

    def check(self, ids):
        """Read these runs again; answer those that ended (or cannot be read)."""
        for run_id in ids:
            run = self.pending.get(run_id)
            if run is None:
                continue
            # (watched, and its state.json's look taken, before it is read:
            # a change in between is not missed)
            self._add_watch(run_id)
            self.keys[run_id] = self._key(run)
            try:
                st = run.require().refresh()
            except AgentError as e:
                self.answer(run_id, b"X", {"id": run_id, "error": one_line(e), "code": e.code})
                continue
            except OSError as e:  # (removed meanwhile: the next look says so)
                st = None
                if not os.path.lexists(run.dir):
                    self.answer(run_id, b"X", {"id": run_id, "error": "no such run: %s" % run_id, "code": 4})
                    continue
            if st is None:
                continue
            if st["state"] in FINAL_STATES:
                self.answer(run_id, b"S", st)
                continue
            if judged_here(st):
                self.seen[run_id] = (st["agent_pid"], st["agent_start"])
                self.remote.discard(run_id)
            else:
                self.remote.add(run_id)

    def answer(self, run_id, kind, obj):
        self.out.frame(kind, 0, dumps(obj, sort_keys=True).encode())
        del self.pending[run_id]
        self.seen.pop(run_id, None)
        self.keys.pop(run_id, None)
        self.remote.discard(run_id)

    def dead(self):
        """Runs whose supervisor is gone (or that this agent cannot judge)."""
        out = list(self.remote)
        for run_id, (pid, start) in self.seen.items():
            info = proc_stat(pid) if valid_pid(pid) else None
            if info is None or (start is not None and info[1] != start) or info[0] in ("Z", "X", "x"):
                out.append(run_id)
        return out

    def changed(self):
        """Polling: the runs whose state.json changed since the last look."""
        out = []
        for run_id, run in self.pending.items():
            if self.fd is not None and run_id not in self.remote:
                continue
            key = self._key(run)
            if self.keys.get(run_id, key) != key:
                out.append(run_id)
            self.keys[run_id] = key
        return out

    @staticmethod
    def _key(run):
        try:
            info = os.lstat(run.path("state.json"))
            return (info.st_ino, info.st_mtime_ns, info.st_size)
        except OSError:
            return None

    # inotify ---------------------------------------------------------------

    def _inotify(self):
        libc = _libc()
        fd = dir_watch(self.root, libc) if libc is not None else None
        if fd is None:
            return
        # (dir_watch watched the root for deletions: add what a watch needs)
        wd = libc.inotify_add_watch(fd, os.fsencode(self.root), WATCH_EVENTS | DIR_EVENTS)
        if wd < 0:
            os.close(fd)
            return
        self.fd, self.add = fd, libc.inotify_add_watch
        self.wds[wd] = None

    def _add_watch(self, run_id):
        if self.fd is None or run_id in self.wds.values():
            return
        wd = self.add(self.fd, os.fsencode(self.pending[run_id].dir), WATCH_EVENTS)
        if wd >= 0:
            self.wds[wd] = run_id
        else:  # (no watch left: look at it by polling)
            self.remote.add(run_id)

    def woken(self, seconds):
        """Wait up to ``seconds`` for news; the runs it may concern.
        BrokenPipeError when nobody reads this output any more."""
        poller = select.poll()
        poller.register(self.out.fd, 0)  # (POLLERR/POLLHUP: the reader is gone)
        if self.fd is not None:
            poller.register(self.fd, select.POLLIN)
        ids = set()
        for fd, ev in poller.poll(max(0, seconds) * 1000.0):
            if fd == self.out.fd:
                raise BrokenPipeError(errno.EPIPE, "the reader of this output is gone")
            ids.update(self.events())
        return ids

    def events(self):
        ids = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # (EAGAIN: all read)
                return ids
            if not data:
                return ids
            at = 0
            while at + 16 <= len(data):
                wd, mask, size = struct.unpack_from("=iI4xI", data, at)
                name = data[at + 16:at + 16 + size].rstrip(b"\0").decode("ascii", "replace")
                at += 16 + size
                if mask & 0x4000:  # IN_Q_OVERFLOW: cannot tell what changed
                    ids.update(self.pending)
                    continue
                run_id = self.wds.get(wd, False)
                if run_id is None:  # the root: an entry of that name
                    if name in self.pending:
                        ids.add(name)
                        # (a directory made again: watch the new one)
                        for old in [w for w, r in self.wds.items() if r == name]:
                            del self.wds[old]
                elif run_id is not False:
                    ids.add(run_id)
                    if mask & (0x400 | 0x800 | 0x8000):  # gone, moved, or the watch removed
                        self.wds.pop(wd, None)


def cmd_watch(args, marker):
    data = sys.stdin.buffer.read(MAX_WATCH * 130 + 1)
    ids = read_watch_ids(data)
    Watch(args.root, ids, Output(marker)).run()
    return 0


def cmd_follow(args, marker):
    run = Run(args.root, args.id).require()
    offsets = {"stdout": args.stdout_offset, "stderr": args.stderr_offset}
    if min(offsets.values()) < 0:
        raise AgentError("offsets must not be negative")
    follow(run, Output(marker), offsets)
    return 0


# --- logs: both streams in the order they were written -------------------------

#: Records of the timeline read at a time.
TIMELINE_BATCH = 1 << 16
#: logs --follow: output not in the timeline yet (file capture: the
#: supervisor looks at the sizes up to a second apart while they do not
#: grow) is sent after this long anyway, with its file's mtime.
TAIL_WAIT = 0.03


def timeline_records(fd, index, count=TIMELINE_BATCH):
    """Up to ``count`` whole records of the timeline from record ``index``:
    a list of (microseconds, stream name, end)."""
    data = os.pread(fd, count * TIMELINE.size, index * TIMELINE.size)
    whole = len(data) - len(data) % TIMELINE.size
    names = {b"1": "stdout", b"2": "stderr"}
    return [(us, names.get(kind), end) for us, kind, end in TIMELINE.iter_unpack(data[:whole])
            if kind in names]


def timeline_since(fd, since_us):
    """The index of the first record at or after ``since_us`` (records
    never go back in time: a bisection), and where each stream was before
    it (the end of its last earlier record)."""
    lo, hi = 0, os.fstat(fd).st_size // TIMELINE.size
    while lo < hi:
        mid = (lo + hi) // 2
        rec = timeline_records(fd, mid, 1)
        if rec and rec[0][0] < since_us:
            lo = mid + 1
        else:
            hi = mid
    starts, at = {}, lo
    while at > 0 and len(starts) < len(STREAMS):
        first = max(0, at - TIMELINE_BATCH)
        for _, name, end in reversed(timeline_records(fd, first, at - first)):
            starts.setdefault(name, end)
        at = first
    return lo, dict((n, starts.get(n, 0)) for n in STREAMS)


class Logs(object):
    """``logs``: the run's output in the order it was written, by its
    timeline: a ``T`` frame (when: microseconds since the epoch in the
    offset field; 0 when not known), then the output frames written by
    then; at the end the state (``S``) and ``E``.  Without ``follow``,
    what the run holds now; with it, until its end (as ``follow``)."""

    def __init__(self, run, out, offsets, since_us=None, follow_on=False):
        self.run, self.out = run, out
        self.sent = dict(offsets)
        self.since = since_us
        self.follow_on = follow_on
        self.fds = {}
        self.last_t = None
        self.kinds = {"stdout": b"1", "stderr": b"2"}

    def serve(self):
        try:
            for name in STREAMS:
                self.fds[name] = open_regular(self.run.path(name), self.run.what(name))
            try:
                tl = open_regular(self.run.path("timeline"), self.run.what("timeline"))
            except FileNotFoundError:  # started by an older agent
                return self.without_timeline()
            self.fds["timeline"] = tl
            if self.follow_on:
                self.out.wake_on(self.run)
            self.with_timeline(tl)
        finally:
            self.out.close()
            for fd in self.fds.values():
                os.close(fd)

    def when(self, us):
        us = max(us, self.last_t or 0)
        if us != self.last_t:
            self.out.frame(b"T", us, b"")
            self.last_t = us

    def send(self, name, end):
        """Send stream ``name`` up to ``end``; False if the file is shorter."""
        while self.sent[name] < end:
            n = send_frame(self.out, self.kinds[name], self.fds[name], self.sent[name], end - self.sent[name])
            if not n:
                return False
            self.sent[name] += n
        return True

    def rest(self, st):
        """What no record covers yet, up to the state's counts: the file
        written earlier first, each after its mtime (by then it was written)."""
        mtimes = dict((n, os.fstat(self.fds[n]).st_mtime_ns // 1000) for n in STREAMS)
        for name in sorted(STREAMS, key=lambda n: mtimes[n]):
            if self.sent[name] >= st[name + "_bytes"]:
                continue
            if self.since is not None and mtimes[name] < self.since:
                self.sent[name] = st[name + "_bytes"]  # (all written before --since)
                continue
            self.when(mtimes[name])
            self.send(name, st[name + "_bytes"])

    def end(self, st):
        self.out.frame(b"S", 0, dumps(st, sort_keys=True).encode())
        self.out.frame(b"E", 0, b"")

    def without_timeline(self):
        """A run of an older agent: each stream in turn; when is not known."""
        self.out.frame(b"T", 0, b"")
        if self.since is not None:
            for name in STREAMS:
                if os.fstat(self.fds[name]).st_mtime_ns // 1000 < self.since:
                    self.sent[name] = 1 << 62  # (nothing of it after --since)
        if self.follow_on:
            return follow(self.run, self.out, self.sent)
        st = self.run.refresh(self.fds)
        for name in STREAMS:
            self.send(name, st[name + "_bytes"])
        self.end(st)

    def with_timeline(self, tl):
        index, queue = 0, []
        if self.since is not None:
            index, starts = timeline_since(tl, self.since)
            for name in STREAMS:
                self.sent[name] = max(self.sent[name], starts[name])
        shown = None
        interval, tail_seen = 0.001, None
        while True:
            st = self.run.refresh(self.fds)
            final = st["state"] in FINAL_STATES
            moved = False
            while True:
                if not queue:
                    queue = timeline_records(tl, index)
                    index += len(queue)
                    queue.reverse()
                    if not queue:
                        break
                us, name, end = queue[-1]
                upto = min(end, st[name + "_bytes"])
                if self.sent[name] < upto:
                    self.when(us)
                    self.send(name, upto)
                    moved = True
                if end > st[name + "_bytes"] and self.follow_on and not final:
                    break  # (its bytes are not counted yet: the next look)
                queue.pop()
            if final or not self.follow_on:
                if not queue:
                    self.rest(st)
                self.end(st)
                return
            # Following a running run: output the timeline has not caught
            # up with (file capture, between the supervisor's looks).
            behind = not queue and any(self.sent[n] < st[n + "_bytes"] for n in STREAMS)
            now = time.monotonic()
            if not behind:
                tail_seen = None
            elif tail_seen is None:
                tail_seen = now
            elif now - tail_seen >= TAIL_WAIT:
                self.rest(st)
                tail_seen, moved = None, True
            if (st["state"], st["pid"]) != shown:
                self.out.frame(b"S", 0, dumps(st, sort_keys=True).encode())
                shown = (st["state"], st["pid"])
            if moved:
                interval = 0.001
            else:
                self.out.idle(interval)
                interval = min(interval * 1.5, 0.05)


def cmd_logs(args, marker):
    run = Run(args.root, args.id).require()
    offsets = {"stdout": args.stdout_offset, "stderr": args.stderr_offset}
    if min(offsets.values()) < 0:
        raise AgentError("offsets must not be negative")
    since = None
    if args.since is not None:
        if not (_is_num(args.since) and args.since >= 0):
            raise AgentError("--since must be a time in seconds since the epoch, not negative")
        since = int(args.since * 1e6)
    Logs(run, Output(marker), offsets, since, args.follow).serve()
    return 0


def cmd_output(args, marker):
    run = Run(args.root, args.id).require()
    if args.offset < 0 or (args.length is not None and args.length < 0):
        raise AgentError("offset and length must not be negative")
    if args.stream == "both":
        return output_both(run, args, marker)
    fd = open_regular(run.path(args.stream), run.what(args.stream))
    try:
        # Up to what the run holds now, never past its final count.
        upto = run.refresh()[args.stream + "_bytes"]
        pos = args.offset
        left = max(0, upto - pos) if args.length is None else max(0, min(args.length, upto - pos))
        if args.direct:
            left = max(0, min(left, os.fstat(fd).st_size - pos))
            direct_head(marker, left, 0)
            send_all(1, fd, pos, left, run.what(args.stream))
        elif args.counted:  # (a line with the count first: bytes after them are not the reply's)
            left = max(0, min(left, os.fstat(fd).st_size - pos))
            out = Output(marker)
            write_all(out.fd, b"%d\n" % left)
            send_all(out.fd, fd, pos, left, run.what(args.stream))
            write_all(out.fd, counted_end(marker))
        else:
            send_range(Output(marker).fd, fd, pos, left)
    finally:
        os.close(fd)
    return 0


def counted_end(marker):
    """What follows a counted reply's bytes (``--counted``, ``--stream
    both``): the marker line again.  Found right after the counted bytes,
    it shows the client that nothing else wrote into them (a job a login
    script left running, printing into the session)."""
    return b"\n" + os.fsencode(marker or "") + b"\n"


def direct_head(marker, stdout_size, stderr_size):
    """``output --direct``: its head goes to stderr (the marker line, then
    ``N M``), so that stdout holds the data from its first byte: a client
    can give ssh its own stdout, a file, and check afterwards that it grew
    by exactly N (``logs ID > file`` at the pace of ``ssh HOST cat``)."""
    head = b"\n" + os.fsencode(marker or "") + b"\n"
    write_all(2, head + ("%d %d\n" % (stdout_size, stderr_size)).encode())


def send_all(out, fd, pos, size, what):
    if send_range(out, fd, pos, size) < size:
        raise AgentError("%s shrank while it was read" % what, 3)


def output_both(run, args, marker):
    """``output ID --stream both``: one call for both streams as they are
    (``logs ID > file``): a line ``N M``, then N bytes of stdout, then M of
    stderr, all the run holds now (never past its counts).  ``--direct``:
    the line, then the M bytes of stderr, on stderr; stdout's N on
    stdout."""
    if args.offset or args.length is not None:
        raise AgentError("--stream both takes no --offset or --length")
    fds = {}
    try:
        for name in STREAMS:
            fds[name] = open_regular(run.path(name), run.what(name))
        st = run.refresh()
        # (a spool file shorter than its count: a leftover child truncated it; what is there)
        sizes = [min(st[n + "_bytes"], os.fstat(fds[n]).st_size) for n in STREAMS]
        if args.direct:
            direct_head(marker, *sizes)
            send_all(2, fds["stderr"], 0, sizes[1], run.what("stderr"))
            send_all(1, fds["stdout"], 0, sizes[0], run.what("stdout"))
            return 0
        out = Output(marker)
        write_all(out.fd, ("%d %d\n" % tuple(sizes)).encode())
        for name, size in zip(STREAMS, sizes):
            send_all(out.fd, fds[name], 0, size, run.what(name))
        write_all(out.fd, counted_end(marker))
    finally:
        for fd in fds.values():
            os.close(fd)
    return 0


def send_control(run, msg):
    """Write one request to the supervisor's FIFO; False when nobody reads
    it.  Anything but a FIFO in its place is DamagedRun."""
    try:
        fd = os.open(run.path("control"), os.O_WRONLY | SAFE_OPEN)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENOENT):
            return False
        if e.errno == errno.ELOOP:
            raise DamagedRun("%s is a symbolic link, not the FIFO the agent made" % run.what("control"))
        if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.ETXTBSY):
            raise DamagedRun("%s is not the FIFO the agent made (%s)" % (run.what("control"), e.strerror))
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISFIFO(mode):
            raise DamagedRun("%s is %s, not the FIFO the agent made" % (run.what("control"), _kind(mode)))
        try:
            write_all(fd, (dumps(msg) + "\n").encode())
        except BlockingIOError:
            return False  # (the supervisor does not read: its FIFO is full)
    finally:
        os.close(fd)
    return True


def cmd_signal(args, marker):
    sig = parse_signal(args.signal)
    if args.grace is not None and not (_is_num(args.grace) and args.grace >= 0):
        raise AgentError("--grace must be a finite number of seconds, not negative")
    run = Run(args.root, args.id).require()
    st = run.refresh()
    if not judged_here(st):
        raise AgentError("run %s was started by another host or pid namespace (%s; this is %s): signal it "
                         "from there" % (run.id, st.get("host_id"), host_id()), 1)
    if st["state"] != "running":
        return signal_leftovers(run, st, sig, args.grace, marker)
    if not send_control(run, {"op": "signal", "signal": sig, "grace": args.grace}):
        st = run.refresh()
        if st["state"] != "running":
            return signal_leftovers(run, st, sig, args.grace, marker)
        raise AgentError("run %s is running, but its supervisor does not read its control FIFO (it is not the "
                         "FIFO the agent made, or no longer there)" % run.id, 1)
    Output(marker).json(run.refresh())
    return 0


def signal_leftovers(run, st, sig, grace, marker):
    """``signal`` of a run that ended: what it left behind in its process
    group (say ``sh -c 'slow & exit 0'``) gets the signal, if run_group()
    proves the group is the run's; with ``grace``, SIGKILL follows if the
    group still has members after that many seconds (this command waits
    for it).  Processes that left the group (setsid) are not found."""
    pgid, why = signal_group(st, sig) if st["state"] in ("done", "lost") else (None, None)
    if pgid is None:
        raise AgentError("run %s is not running (%s)%s" % (
            run.id, st["state"], "; its process group was not signalled: %s" % why if why else ""), 1)
    if grace is not None and sig != _signal.SIGKILL:
        end = time.monotonic() + min(grace, 3600.0)
        while time.monotonic() < end and group_members(pgid):
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        signal_group(st, _signal.SIGKILL)
    st["note"] = ("the run had ended (%s): %s went to what it left behind in its process group %d"
                  % (st["state"], signal_name(sig), pgid))
    Output(marker).json(st)
    return 0


def cmd_control(args, marker):
    run = Run(args.root, args.id).require()
    data = sys.stdin.buffer.read(MAX_CONTROL + 1)
    if len(data) > MAX_CONTROL:
        raise AgentError("control message is too large (over %d bytes)" % MAX_CONTROL)
    msg = parse_json(data, "control message")
    if not isinstance(msg, dict) or msg.get("op") not in ("callback", "release", "resize"):
        raise AgentError("control message: unknown op")
    if msg["op"] == "resize" and not all(_is_int(msg.get(k)) and 1 <= msg[k] <= 0xFFFF for k in ("rows", "cols")):
        raise AgentError("control message: rows and cols must be integers from 1 to 65535")
    if msg["op"] == "callback" and not all(isinstance(msg.get(k), str) for k in ("url", "token", "cert") if k in msg):
        raise AgentError("control message: url, token and cert must be strings")
    ok = send_control(run, msg)
    Output(marker).json({"delivered": ok})
    return 0


def cmd_release(args, marker):
    """``release`` of many runs at once (their ids on stdin, as for
    ``watch``): ``{"delivered": {ID: true|false}}``; a run that is not
    there, or whose supervisor no longer reads its FIFO, is false."""
    ids = read_watch_ids(sys.stdin.buffer.read(MAX_WATCH * 130 + 1))
    delivered = {}
    for run_id in ids:
        try:
            delivered[run_id] = send_control(Run(args.root, run_id).require(), {"op": "release"})
        except (AgentError, OSError):
            delivered[run_id] = False
    Output(marker).json({"delivered": delivered})
    return 0


#: ``agent.py stdin``'s frames: data at an offset, the end at an offset.
#: The largest payload it takes.
STDIN_KINDS = (b"D", b"E")
MAX_STDIN_FRAME = CHUNK
#: How often ``agent.py stdin`` looks whether the run ended (seconds).
STDIN_LOOK = 0.25


def stdin_end(run):
    """The length of a stream's input once the client said it ended
    (``stdin.end``, a JSON integer), else None."""
    try:
        data = read_regular(run.path("stdin.end"), run.what("stdin.end"), 64)
    except FileNotFoundError:
        return None
    try:
        end = loads(data.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        end = None
    if not _is_int(end) or end < 0:
        raise DamagedRun("%s is damaged: %r" % (run.what("stdin.end"), data[:40]))
    return end


def read_exactly(fd, n):
    """``n`` bytes from ``fd``; fewer only at its end."""
    parts, got = [], 0
    while got < n:
        part = os.read(fd, n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class StdinSpool(object):
    """The spool's stdin file of a run whose stdin is a stream, as
    ``agent.py stdin`` appends to it: idempotent by offset, under a lock
    (two calls at once, say a reconnect while the old call has not seen
    its connection drop, append each byte once)."""

    def __init__(self, run, tty=False):
        import fcntl

        self.run = run
        self.tty = tty  # (the program reads it on a terminal: program.tty)
        self.flock = fcntl.flock
        self.fd = open_regular(run.path("stdin"), run.what("stdin"), os.O_RDWR)
        self.fifo = None  # the supervisor's control FIFO, to say the input grew
        self.final = False
        self.looked = None

    def close(self):
        os.close(self.fd)
        if self.fifo is not None:
            os.close(self.fifo)

    def answer(self):
        """What the spool holds: ``{"held": bytes, "end": whether the end is
        recorded, "closed": whether the program ended, "tty": whether it
        reads a terminal}`` (StdinAck)."""
        now = time.monotonic()
        if not self.final and (self.looked is None or now - self.looked >= STDIN_LOOK):
            self.looked = now
            self.final = self.run.read_state()["state"] in FINAL_STATES
        return {"held": os.fstat(self.fd).st_size, "end": stdin_end(self.run) is not None, "closed": self.final,
                "tty": self.tty}

    def append(self, offset, data):
        """Bytes of the input from ``offset``: what the spool does not hold yet
        is appended.  A gap (``offset`` past what it holds) or bytes past a
        recorded end are refused (exit 1)."""
        self.flock(self.fd, 2)  # LOCK_EX
        try:
            held = os.fstat(self.fd).st_size
            if offset > held:
                raise AgentError("stdin of run %s: a gap: it holds %d bytes, the data starts at %d"
                                 % (self.run.id, held, offset), 1)
            end = stdin_end(self.run)
            if end is not None and offset + len(data) > end:
                raise AgentError("stdin of run %s ended at %d bytes: no more is taken" % (self.run.id, end), 1)
            view = memoryview(data)[held - offset:]
            at = held
            while view:
                n = os.pwrite(self.fd, view, at)
                view, at = view[n:], at + n
        finally:
            self.flock(self.fd, 8)  # LOCK_UN
        if at > held:
            self.poke()

    def end(self, offset):
        """The input ends at ``offset`` (recorded once; the same end again is harmless)."""
        self.flock(self.fd, 2)
        try:
            held = os.fstat(self.fd).st_size
            end = stdin_end(self.run)
            if end is not None and end != offset:
                raise AgentError("stdin of run %s ended at %d bytes, not %d" % (self.run.id, end, offset), 1)
            if held != offset:
                raise AgentError("stdin of run %s holds %d bytes: it cannot end at %d" % (self.run.id, held, offset), 1)
            if end is None:
                write_json_atomic(self.run.path("stdin.end"), offset, durable=False)
        finally:
            self.flock(self.fd, 8)
        self.poke()

    def poke(self, msg=None):
        """Tell the supervisor (op ``stdin``, or ``msg``) on its control
        FIFO, kept open; not read any more (the program ended): closed."""
        line = (dumps(msg or {"op": "stdin"}) + "\n").encode()
        try:
            if self.fifo is None:
                self.fifo = os.open(self.run.path("control"), os.O_WRONLY | SAFE_OPEN)
                if not stat.S_ISFIFO(os.fstat(self.fifo).st_mode):
                    raise DamagedRun("%s is not the FIFO the agent made" % self.run.what("control"))
            os.write(self.fifo, line)
        except BlockingIOError:
            pass  # (its FIFO is full of requests: it will look at the input anyway)
        except OSError as e:
            if e.errno not in (errno.ENXIO, errno.ENOENT, errno.EPIPE):
                raise
            self.final = True  # nobody reads it: the supervisor is done


def cmd_stdin(args, marker):
    """Append to the input of a run whose stdin is a stream: frames on
    stdin (``!cQI`` as follow's: ``D`` bytes at an offset, ``E`` the end
    at an offset), idempotent by offset; one answer
    line (StdinAck) first and after each frame, so a client resumes at
    what is held.  Ends at the end of this stdin, or at once when the run
    is over (``closed``)."""
    run = Run(args.root, args.id).require()
    spec = loads(read_regular(run.path("program.json"), run.what("program.json"), MAX_PROGRAM_JSON).decode())
    if not isinstance(spec, dict) or spec.get("program", {}).get("stdin") != {"stream": True}:
        raise AgentError("run %s does not read its stdin from a stream (program.stdin is not {\"stream\": true})"
                         % run.id, NOT_A_STREAM)
    spool = StdinSpool(run, tty=spec["program"].get("tty") is not None)
    try:
        out = Output(marker)
        answer = spool.answer()
        out.json(answer)
        while not answer["closed"]:
            head = read_exactly(0, FRAME.size)
            if len(head) < FRAME.size:
                break  # (the client is done, or gone: a frame cut short is not taken)
            kind, offset, length = FRAME.unpack(head)
            if kind not in STDIN_KINDS or length > MAX_STDIN_FRAME:
                raise AgentError("stdin of run %s: not a frame (kind %r, %d bytes)" % (run.id, kind, length))
            data = read_exactly(0, length)
            if len(data) < length:
                break
            if kind == b"D":
                spool.append(offset, data)
            else:
                spool.end(offset)
            answer = spool.answer()
            out.json(answer)
    finally:
        spool.close()
    return 0


def cmd_list(args, marker):
    states = []
    root = args.root
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    for name in names:
        if name.startswith(".") or not valid_id(name):
            continue
        run = Run(root, name)
        try:
            states.append(run.require().refresh())
        except (OSError, ValueError):
            continue  # (e.g. removed meanwhile)
        except AgentError as e:  # its state is damaged: say so, list the others
            if e.code != 4:  # (not a run: a directory without a state)
                sys.stderr.write("chaperone-agent: %s\n" % one_line(e))
    Output(marker).json(states)
    return 0


def proc_info(pid, boot_ticks_now):
    """One process, as ``procs`` answers it (Linux /proc), or None if gone:
    pid, ppid, pgid, state letter, CPU seconds (user + system), resident
    bytes, seconds since it started, its argv (its name in brackets when
    it has none: a kernel thread, a zombie)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    try:
        name = data[data.index(b"(") + 1:data.rindex(b")")]
        fields = data[data.rindex(b")") + 2:].split()
        ticks = int(fields[11]) + int(fields[12])
        started = int(fields[19])
        rss = int(fields[21]) * PAGE_SIZE
    except (ValueError, IndexError):
        return None
    argv = [a.decode("utf-8", "replace") for a in cmdline.split(b"\0")[:-1]] if cmdline else []
    return {"pid": pid, "ppid": int(fields[1]), "pgid": int(fields[2]), "state": fields[0].decode("ascii", "replace"),
            "cpu": round(ticks / float(CLK_TCK), 2), "rss": rss,
            "elapsed": round(max(0, boot_ticks_now - started) / float(CLK_TCK), 2),
            "argv": argv or ["[%s]" % name.decode("utf-8", "replace")]}


def cmd_procs(args, marker):
    """The run's processes now (as ``docker top``): while its supervisor
    lives, every process below it (it is their subreaper: the program, its
    children, and what left its process group, daemons included); after,
    what is left in its process group, when run_group() proves that group
    is the run's.  A JSON list, the program first, then by pid."""
    run = Run(args.root, args.id).require()
    st = run.refresh()
    if not judged_here(st):
        raise AgentError("run %s was started by another host or pid namespace (%s; this is %s): look from there"
                         % (run.id, st.get("host_id"), host_id()), 1)
    if st["state"] == "running" and run.supervisor_alive(st):
        pids = descendants(st["agent_pid"])
    else:
        pgid, _ = run_group(st)
        pids = [pid for pid, _, _ in group_members(pgid)] if pgid is not None else []
    now = ticks_now() or 0
    procs = [info for info in (proc_info(pid, now) for pid in pids) if info is not None]
    procs.sort(key=lambda p: (p["pid"] != st.get("pid"), p["pid"]))
    Output(marker).json(procs)
    return 0


def cmd_clean(args, marker):
    try:
        run = Run(args.root, args.id).require()
        st = run.refresh()
    except DamagedRun:
        if not args.force:
            raise
        run = Run(args.root, args.id)
        # Damaged by an OS crash while it was running: nothing of it is
        # left to stop (the crash ended it), and its state is unknown.
        st = {"state": None}
    if st["state"] == "running":
        if not judged_here(st) and not args.force:
            raise AgentError("run %s is running on another host or pid namespace (%s): clean it from there, "
                             "or clean --force removes its spool without stopping it" % (run.id, st.get("host_id")), 1)
        if not args.force:
            raise AgentError("run %s is running: kill it first, or clean --force (force=True in the library)"
                             % run.id, 1)
        if judged_here(st):
            try:
                send_control(run, {"op": "signal", "signal": _signal.SIGKILL})
            except DamagedRun:
                pass
            end = time.monotonic() + 10
            while st["state"] == "running" and time.monotonic() < end:
                time.sleep(0.02)
                try:
                    st = run.refresh()
                except DamagedRun:
                    break
    # (one rename, no new directory: it works on a full file system too)
    trash = os.path.join(args.root, ".trash-%s-%s" % (run.id, os.urandom(4).hex()))
    os.rename(run.dir, trash)
    remove_tree(trash)
    Output(marker).json({"id": run.id, "cleaned": True, "state": st["state"]})
    return 0


USAGE = """\
usage: agent.py [--root DIR] [--marker M] [--expect-hash SHA256] [--login-env FD] COMMAND ...

commands:
  start [--follow]                       < program.json (or a JSON array of them)
  status ID
  follow ID [--stdout-offset N] [--stderr-offset N]
  output ID --stream {stdout,stderr,both} [--offset N] [--length L] [--counted|--direct]
  signal ID SIGNAL [--grace SECONDS]
  list
  procs ID
  clean ID [--force]
  control ID                             < message.json
  logs ID [--follow] [--since SECONDS] [--stdout-offset N] [--stderr-offset N]
  watch                                  < run ids (white space between)
  release                                < run ids (white space between)
  stdin ID                               < frames
"""
#: The global options (before the command): option -> attribute.
GLOBAL_OPTIONS = {"--root": "root", "--marker": "marker", "--expect-hash": "expect_hash", "--login-env": "login_env"}
#: Each command: its positional arguments and its options, option ->
#: (attribute, None for a flag / a type / a tuple of choices, default).
COMMAND_ARGS = {
    "start": ((), {"--follow": ("follow", None, False)}),
    "status": (("id",), {}),
    "follow": (("id",), {"--stdout-offset": ("stdout_offset", int, 0),
                         "--stderr-offset": ("stderr_offset", int, 0)}),
    "output": (("id",), {"--stream": ("stream", STREAMS + ("both",), None), "--offset": ("offset", int, 0),
                         "--length": ("length", int, None), "--direct": ("direct", None, False),
                         "--counted": ("counted", None, False)}),
    "signal": (("id", "signal"), {"--grace": ("grace", float, None)}),
    "list": ((), {}),
    "procs": (("id",), {}),
    "clean": (("id",), {"--force": ("force", None, False)}),
    "control": (("id",), {}),
    "logs": (("id",), {"--follow": ("follow", None, False), "--since": ("since", float, None),
                       "--stdout-offset": ("stdout_offset", int, 0), "--stderr-offset": ("stderr_offset", int, 0)}),
    "watch": ((), {}),
    "release": ((), {}),
    "stdin": (("id",), {}),
}
REQUIRED_OPTIONS = {"output": ("--stream",)}


class Args(object):
    """The parsed command line (what argparse would give)."""


class _Help(Exception):
    pass


def _is_negative_number(arg):
    """What argparse's ``re.match(r"^-\\d+$|^-\\d*\\.\\d+$", arg)`` says,
    without `re`: ``-`` then decimal digits, or digits (maybe none), a point
    and digits.  As there, ``\\d`` is any Unicode decimal digit (what
    str.isdecimal() takes), and ``$`` also matches before one trailing
    newline: ``"-1\\n"`` is a number too (argparse's rule, kept; run ids,
    in contrast, never end with a newline)."""
    if not arg.startswith("-"):
        return False
    body = arg[1:-1] if arg.endswith("\n") else arg[1:]
    if body.isdecimal():
        return True
    whole, point, fraction = body.partition(".")
    return bool(point) and (not whole or whole.isdecimal()) and fraction.isdecimal()


def _is_option(arg):
    """An option, as argparse tells them apart: ``-1`` or ``-2.5`` (a
    negative number), ``-`` alone and anything with a space are values."""
    return arg.startswith("-") and arg != "-" and " " not in arg and not _is_negative_number(arg)


def parse_args(argv):
    """The agent's command line (argparse's behaviour for these commands,
    without the 10+ ms that importing and building argparse costs at every
    agent call): the global options, the command (COMMAND_ARGS: its
    positional arguments and options), then its arguments.  Bad usage
    raises AgentError (exit 2)."""
    args = Args()
    for attr in GLOBAL_OPTIONS.values():
        setattr(args, attr, None)
    argv = list(argv)
    command, i = _parse_global_options(argv, args)
    if command is None:
        raise AgentError("usage: agent.py [--root DIR] {%s} ..." % ",".join(COMMAND_ARGS))
    if command not in COMMAND_ARGS:
        raise AgentError("usage: argument command: invalid choice: %r (choose from %s)"
                         % (command, ", ".join(repr(c) for c in COMMAND_ARGS)))
    args.command = command
    positional, options = COMMAND_ARGS[command]
    for attr, kind, default in options.values():
        setattr(args, attr, default)
    given, seen = _parse_command_args(argv, i, args, positional, options)
    if len(given) > len(positional):
        raise AgentError("usage: unrecognized arguments: %s" % " ".join(given[len(positional):]))
    missing = list(positional[len(given):]) + [o for o in REQUIRED_OPTIONS.get(command, ()) if o not in seen]
    if missing:
        raise AgentError("usage: the following arguments are required: %s" % ", ".join(missing))
    for attr, text in zip(positional, given):
        setattr(args, attr, text)
    args.root = os.path.abspath(args.root or default_root())
    if args.login_env is not None:
        try:
            args.login_env = int(args.login_env)
        except ValueError:
            raise AgentError("usage: argument --login-env: invalid int value: %r" % args.login_env)
    if getattr(args, "id", None) is not None:
        check_id(args.id)
    return args


def _option_text(argv, i, opt, inline):
    """The value of the option ``opt`` at ``argv[i]`` (``--opt=X``:
    ``inline``, or ``--opt X``) and how many arguments it took."""
    if inline is not None:
        return inline, 1
    if i + 1 >= len(argv) or _is_option(argv[i + 1]):
        raise AgentError("usage: argument %s: expected one argument" % opt)
    return argv[i + 1], 2


def _parse_global_options(argv, args):
    """The global options (set on ``args``) up to the command: the command
    (None: none) and the index after it."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise _Help()
        name, eq, inline = arg.partition("=")
        if name in GLOBAL_OPTIONS:
            text, used = _option_text(argv, i, name, inline if eq else None)
            setattr(args, GLOBAL_OPTIONS[name], text)
            i += used
            continue
        if _is_option(arg):
            raise AgentError("usage: unrecognized arguments: %s" % arg)
        return arg, i + 1
    return None, i


def _parse_command_args(argv, i, args, positional, options):
    """The command's options from ``argv[i]`` on (set on ``args``): the
    positional arguments given, and the options seen."""
    given, seen, only_values = [], set(), False
    while i < len(argv):
        arg = argv[i]
        if only_values or not _is_option(arg):
            given.append(arg)
            i += 1
            continue
        if arg == "--":
            if not positional:  # (as argparse: nothing it could stand before)
                raise AgentError("usage: unrecognized arguments: --")
            only_values = True
            i += 1
            continue
        if arg in ("-h", "--help"):
            raise _Help()
        name, eq, inline = arg.partition("=")
        if name not in options:
            raise AgentError("usage: unrecognized arguments: %s" % arg)
        attr, kind, default = options[name]
        seen.add(name)
        if kind is None:
            if eq:
                raise AgentError("usage: argument %s: ignored explicit argument %r" % (name, inline))
            setattr(args, attr, True)
            i += 1
            continue
        text, used = _option_text(argv, i, name, inline if eq else None)
        i += used
        setattr(args, attr, _option_value(name, kind, text))
    return given, seen


def _option_value(name, kind, text):
    """An option's ``text`` as its ``kind`` says: one of a tuple of
    choices, or a type (int, float ...)."""
    if isinstance(kind, tuple):
        if text not in kind:
            raise AgentError("usage: argument %s: invalid choice: %r (choose from %s)"
                             % (name, text, ", ".join(repr(c) for c in kind)))
        return text
    try:
        return kind(text)
    except ValueError:
        raise AgentError("usage: argument %s: invalid %s value: %r" % (name, kind.__name__, text))


COMMANDS = {
    "start": cmd_start, "status": cmd_status, "follow": cmd_follow, "output": cmd_output,
    "signal": cmd_signal, "list": cmd_list, "clean": cmd_clean, "control": cmd_control, "stdin": cmd_stdin,
    "watch": cmd_watch, "release": cmd_release, "logs": cmd_logs, "procs": cmd_procs,
}


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        # (The SSH bootstrap checked the very bytes this module was made of
        # against that hash before running them, without loading OpenSSL:
        # BOOTSTRAP_SHA256; run otherwise, the agent checks itself.)
        if args.expect_hash is not None and args.expect_hash != globals().get("BOOTSTRAP_SHA256"):
            import hashlib

            with open(os.path.abspath(__file__), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != args.expect_hash:
                    return 97  # stale or damaged copy: the client ships it again
        if args.command != "start":  # (start checks it, and makes it)
            check_root(args.root)
        return COMMANDS[args.command](args, args.marker)
    except _Help:
        sys.stdout.write(USAGE)
        return 0
    except AgentError as e:
        sys.stderr.write("chaperone-agent: %s\n" % one_line(e))
        return e.code
    except BrokenPipeError:
        return 141
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        sys.stderr.write("chaperone-agent: %s\n" % one_line(e))
        return 3


#: Control characters (a newline in an argument, say) as escapes: an
#: error is one line whatever it quotes.
_CONTROLS = dict((c, "\\x%02x" % c) for c in list(range(32)) + [127])


def one_line(message):
    return str(message).translate(_CONTROLS)


def exit_now(code):
    """End a command-line run with ``code`` without the interpreter's
    teardown (freeing every module costs ~8 ms at each agent call): flush
    sys.stdout and sys.stderr (a failed flush is status 120, as at a normal
    exit), then ``os._exit``.  (The bootstraps in chaperone/transports/ssh/common.py and
    chaperone/transports/local.py do the same after ``main()``.)"""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        code = 120
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
