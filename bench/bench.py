#!/usr/bin/python3
"""Benchmark the ext2filter nbdkit filter against nbdkit's C ext2 filters (Debian's, and that
of $EXT2FILTER_NBDKIT when it names another nbdkit) and
against the raw file plugin serving the same bytes as a plain file.

Run with /usr/bin/python3 (Debian's Python, the only one with the `nbd`
module that the random-read client needs).  Standard library only otherwise.

    /usr/bin/python3 bench/bench.py                 # full run (~5-15 min)
    /usr/bin/python3 bench/bench.py --quick         # smoke check (~1 min)
    /usr/bin/python3 bench/bench.py --markdown      # table for README.md

See bench/README.md for what each column means.
"""

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_FILTER = os.path.join(REPO, "target", "release", "libext2filter.so")
C_FILTER = "ext2"            # nbdkit's own C filter, by name
DEBIAN_PYTHON = "/usr/bin/python3"
INNER = "/data.bin"          # path of the served file inside every image
MiB = 1 << 20
GiB = 1 << 30



def nbdkit_program():
    """The nbdkit under test, chosen as the tests choose it (tests/common/mod.rs,
    nbdkit_program): $EXT2FILTER_NBDKIT (a path, or a name looked up on PATH), else
    `nbdkit` from PATH."""
    return os.environ.get("EXT2FILTER_NBDKIT") or "nbdkit"


def filter_so():
    """--filter's default, chosen as the tests choose theirs (tests/common/mod.rs,
    filter_so): $EXT2FILTER_SO (a path, or `ext2` for nbdkit's C filter), else
    target/release/libext2filter.so."""
    return os.environ.get("EXT2FILTER_SO") or DEFAULT_FILTER


def nbdkit_argv(nbdkit, filter=None, plugin_args=(), options=(), socket=None, run=None):
    """The one launcher of nbdkit: every command line the benchmark runs has the shape
    of the tests' (tests/common/mod.rs, `Nbdkit`):

        NBDKIT [-f -U SOCKET | -U -] OPTIONS --filter=FILTER PLUGIN_ARGS [--run SCRIPT]

    `-f -U SOCKET` with a socket, `-U - ... --run SCRIPT` with a script, neither for a
    query (--dump-plugin).  FILTER is the outermost filter (ours, or C_FILTER); the raw
    candidate has none.  PLUGIN_ARGS may start with further --filter= options, placed
    below it, then the plugin and everyone's parameters."""
    argv = [nbdkit]
    if socket is not None:
        argv += ["-f", "-U", socket]
    elif run is not None:
        argv += ["-U", "-"]
    argv += list(options)
    if filter is not None:
        argv.append("--filter=" + filter)
    argv += list(plugin_args)
    if run is not None:
        argv += ["--run", run]
    return argv


# The nbdkit serving ours, raw and "cnew" ($EXT2FILTER_NBDKIT, as for the tests; our
# filter must be built against its headers).  Debian's C filter ("c") always runs on
# Debian's nbdkit; when EXT2FILTER_NBDKIT names another nbdkit (e.g. upstream 1.45.2),
# "cnew" is that nbdkit's own C filter.
DEBIAN_NBDKIT = "nbdkit"
NBDKIT = nbdkit_program()
OTHER_NBDKIT = os.path.realpath(shutil.which(NBDKIT) or NBDKIT) != \
    os.path.realpath(shutil.which(DEBIAN_NBDKIT) or DEBIAN_NBDKIT)

CANDIDATES = ("ours", "c", "cnew", "raw")
CAND_LABEL = {"ours": "ours (Rust)", "c": "C --filter=ext2", "cnew": "C --filter=ext2",
              "raw": "raw file plugin"}


def nbdkit_version(nbdkit):
    r = subprocess.run([nbdkit, "--version"], stdout=subprocess.PIPE, text=True)
    return r.stdout.strip().replace("nbdkit ", "")

# Scenario table: key -> (number, title, kind)
SCENARIOS = [
    ("seq4k", 1, "sequential read, ext4 4 KiB blocks", "read"),
    ("seq1k", 2, "sequential read, ext4 1 KiB blocks", "read"),
    ("delay", 3, "sequential read through delay rdelay=1ms (under the filter)", "read"),
    ("rand4k", 4, "random 4 KiB reads, 8 connections", "rand"),
    ("write", 5, "sequential write into an allocated file + flush", "write"),
    ("fill", 6, "sequential write filling a sparse file + flush (journalled)", "write"),
    ("randw", 12, "random 4 KiB writes into holes, fio 2 jobs x 16 deep + flush (journalled)",
     "fio"),
]
SCEN_BY_KEY = {s[0]: s for s in SCENARIOS}
SCEN_BY_NUM = {str(s[1]): s for s in SCENARIOS}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------
# Random-read client (run as a subprocess of Debian's python3)
# --------------------------------------------------------------------------

def randread_client(argv):
    """--randread-client SOCKET COUNT CONNS DEPTH SEED [VERIFY_FILE]

    CONNS connections, one thread each; each keeps DEPTH random 4 KiB-aligned
    4 KiB reads in flight (libnbd aio) until it has done COUNT/CONNS of them.
    Prints JSON with the elapsed time of the whole thing, connects included
    (a server that serializes connections makes the threads take turns, which
    is its real behaviour).  With VERIFY_FILE every read is compared with the
    same offset of that plain file.
    """
    import nbd  # only Debian's /usr/bin/python3 has it
    sock, count, conns, depth, seed = (argv[0], int(argv[1]), int(argv[2]),
                                       int(argv[3]), int(argv[4]))
    verify = argv[5] if len(argv) > 5 else None
    per = count // conns
    errors = []
    bad = [0]
    lock = threading.Lock()

    def worker(i):
        try:
            h = nbd.NBD()
            h.connect_unix(sock)
            nblocks = h.get_size() // 4096
            rng = random.Random(seed * 1000 + i)
            vf = open(verify, "rb") if verify else None
            bufs = [nbd.Buffer(4096) for _ in range(depth)]
            offs = [0] * depth
            free = list(range(depth))
            st = {"done": 0, "err": 0, "bad": 0}

            def make_cb(slot):
                def cb(err):
                    e = getattr(err, "value", err)
                    if e:
                        st["err"] += 1
                    elif vf is not None:
                        vf.seek(offs[slot])
                        if vf.read(4096) != bytes(bufs[slot].to_bytearray()):
                            st["bad"] += 1
                    st["done"] += 1
                    free.append(slot)
                    return 1
                return cb
            cbs = [make_cb(k) for k in range(depth)]
            issued = 0
            while st["done"] < per:
                while free and issued < per:
                    k = free.pop()
                    offs[k] = rng.randrange(nblocks) * 4096
                    h.aio_pread(bufs[k], offs[k], completion=cbs[k])
                    issued += 1
                h.poll(-1)
            h.shutdown()
            if vf is not None:
                vf.close()
            with lock:
                bad[0] += st["bad"]
                if st["err"]:
                    errors.append("conn %d: %d reads failed" % (i, st["err"]))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            with lock:
                errors.append("conn %d: %s" % (i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    print(json.dumps({"elapsed": elapsed, "reads": per * conns,
                      "errors": errors, "mismatches": bad[0]}))
    return 0 if not errors else 1


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def run(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MiB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_random(path, size, seed):
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(rng.randbytes(n))
            left -= n


def copy_fresh(src, dst):
    if os.path.exists(dst):
        os.unlink(dst)
    run(["cp", "--reflink=auto", "--sparse=always", src, dst])


def mkfs(img, srcdir, blocksize, size_bytes):
    img_mib = int(size_bytes / MiB * 1.2) + 32
    if os.path.exists(img):
        os.unlink(img)
    r = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(blocksize),
                        "-d", srcdir, img, "%dM" % img_mib],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise BenchError("mke2fs failed for %s:\n%s" % (img, r.stdout))


def fmt_s(x):
    if x is None:
        return "-"
    if x >= 100:
        return "%.0f" % x
    if x >= 10:
        return "%.1f" % x
    if x >= 1:
        return "%.2f" % x
    return "%.3f" % x


def fmt_ratio(x):
    return "-" if x is None else "%.2f" % x


# --------------------------------------------------------------------------
# Random writes into holes (scenario "randw"): fio's nbd engine
# --------------------------------------------------------------------------

def randw_cmd(uri, size, verify):
    """fio writing every 4 KiB block of a `size`-byte file once, in random
    order, from 2 jobs (each its own half) with 16 writes in flight each,
    then flushing.  Into a sparse file every write fills a hole.  With
    `verify`, fio then reads every block back and checks its checksum and
    offset header."""
    half = size // 2
    cmd = ["fio", "--name=randw", "--ioengine=nbd", "--uri=" + uri,
           "--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=2",
           "--size=%d" % half, "--offset_increment=%d" % half,
           "--end_fsync=1", "--group_reporting", "--output-format=json"]
    if verify:
        cmd += ["--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                "--verify_state_save=0"]
    return cmd


def randw_result(stdout):
    """(IOPS, seconds) of the write phase of a randw_cmd run."""
    out = json.loads(stdout[stdout.index("{"):])
    write = out["jobs"][0]["write"]
    return write["iops"], write["runtime"] / 1000.0


# --------------------------------------------------------------------------
# Server handling
# --------------------------------------------------------------------------

class Server:
    """nbdkit in the foreground (-f), so the Popen pid *is* the server and
    os.wait4 gives exactly its user+sys CPU time and peak RSS (ru_maxrss)."""

    def __init__(self, argv, sock, logpath):
        # argv from nbdkit_argv(..., socket=sock) (see Bench.server_args).
        self.sock = sock
        self.logpath = logpath
        if os.path.exists(sock):
            os.unlink(sock)
        self.logf = open(logpath, "wb")
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        self.reaped = None
        self.hwm = 0

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def log_tail(self, n=20):
        try:
            with open(self.logpath, "r", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout=60):
        """Wait until a client can connect and read the size; returns it.
        The probe keeps the server's start-up (opening the filesystem) out
        of the timed client run."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.exited():
                raise BenchError("nbdkit exited (rc %s) during start-up:\n  %s\n%s"
                                 % (self.proc.returncode, " ".join(self.argv),
                                    self.log_tail()))
            if os.path.exists(self.sock):
                r = subprocess.run(["nbdinfo", "--size", self.uri],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
                if r.returncode == 0:
                    return int(r.stdout.strip())
                last = r.stderr.strip()
            time.sleep(0.02)
        raise BenchError("nbdkit not ready after %ds: %s\n%s" % (timeout, last, self.log_tail()))

    def _reap(self, block):
        """wait4 the server once; keeps (cpu_seconds, status)."""
        if self.reaped is None:
            pid, status, ru = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
            if pid == 0:
                return False
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.reaped = ru.ru_utime + ru.ru_stime
            self.logf.close()
        return True

    def exited(self):
        return self._reap(False)

    def stop(self, timeout=60):
        """SIGTERM, reap with wait4; returns (cpu_seconds, VmHWM_kib)."""
        if self.reaped is None:
            # ru_maxrss of a child started by vfork+exec keeps the parent's
            # high-water mark, so read the server's own VmHWM before stopping.
            try:
                with open("/proc/%d/status" % self.proc.pid) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.hwm = int(line.split()[1])
            except (OSError, ValueError):
                pass
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while not self._reap(False):
                if time.monotonic() > deadline:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self._reap(True)
                    break
                time.sleep(0.005)
        return self.reaped, self.hwm


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.a = args
        self.wd = args.workdir
        self.imgdir = os.path.join(self.wd, "images")
        self.rundir = os.path.join(self.wd, "run")
        os.makedirs(self.imgdir, exist_ok=True)
        os.makedirs(self.rundir, exist_ok=True)
        self.sock = os.path.join(self.rundir, "nbd.sock")
        self.size = args.size * MiB
        self.delay_size = args.delay_size * MiB
        self._images = {}
        self.results = {}   # scen -> cand -> dict
        self.notes = []

    # ---- images -----------------------------------------------------------

    def image(self, name):
        if name in self._images:
            return self._images[name]
        d = self.imgdir
        p = lambda *x: os.path.join(d, *x)  # noqa: E731
        t0 = time.monotonic()
        if name == "data":           # the plain bytes served by raw
            os.makedirs(p("src_data"), exist_ok=True)
            path = p("src_data", "data.bin")
            write_random(path, self.size, 1)
            val = (path, sha256_file(path))
        elif name == "small":
            os.makedirs(p("src_small"), exist_ok=True)
            path = p("src_small", "data.bin")
            write_random(path, self.delay_size, 3)
            val = (path, sha256_file(path))
        elif name == "src":          # what the write scenarios write
            path = p("write_src.bin")
            write_random(path, self.size, 2)
            val = (path, sha256_file(path))
        elif name == "sparse_plain":
            path = p("src_sparse", "data.bin")
            os.makedirs(p("src_sparse"), exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(self.size)
            val = path
        elif name == "fs4k":
            mkfs(p("fs4k.img"), os.path.dirname(self.image("data")[0]), 4096, self.size)
            val = p("fs4k.img")
        elif name == "fs1k":
            mkfs(p("fs1k.img"), os.path.dirname(self.image("data")[0]), 1024, self.size)
            val = p("fs1k.img")
        elif name == "fs4k_small":
            mkfs(p("fs4k_small.img"), os.path.dirname(self.image("small")[0]), 4096,
                 self.delay_size)
            val = p("fs4k_small.img")
        elif name == "fs_sparse":
            mkfs(p("fs_sparse.img"), os.path.dirname(self.image("sparse_plain")), 4096,
                 self.size)
            val = p("fs_sparse.img")
        else:
            raise KeyError(name)
        log("  built %s in %.1fs" % (name, time.monotonic() - t0))
        self._images[name] = val
        return val

    # ---- server command lines --------------------------------------------

    def server_args(self, cand, fs_img, plain_img, under=(), params=()):
        """The server's argv (nbdkit_argv), on self.sock, exiting with the benchmark."""
        under, params = list(under), list(params)
        nbdkit, filt = NBDKIT, None
        if cand == "ours":
            filt, plugin = self.a.filter, ["file", fs_img] + params + ["ext2file=" + INNER]
        elif cand in ("c", "cnew"):
            nbdkit = DEBIAN_NBDKIT if cand == "c" else NBDKIT
            filt, plugin = C_FILTER, ["file", fs_img] + params + ["ext2file=" + INNER]
        else:
            plugin = ["file", plain_img] + params
        return nbdkit_argv(nbdkit, filt, under + plugin, options=["--exit-with-parent"],
                           socket=self.sock)

    def start(self, argv, tag):
        srv = Server(argv, self.sock, os.path.join(self.rundir, "nbdkit-%s.log" % tag))
        try:
            srv.size = srv.wait_ready()
        except BaseException:
            srv.stop(timeout=5)
            raise
        return srv

    # ---- one scenario ------------------------------------------------------

    def scenario_setup(self, key):
        """Returns a dict describing the scenario for each candidate."""
        S = {"key": key}
        if key in ("seq4k", "seq1k", "rand4k"):
            data, digest = self.image("data")
            fs = self.image("fs1k" if key == "seq1k" else "fs4k")
            S.update(fs=fs, plain=data, digest=digest, nbytes=self.size,
                     under=(), params=(), fresh=False)
            if key == "rand4k":
                S["nbytes"] = (self.a.rand_count // 8) * 8 * 4096
        elif key == "delay":
            data, digest = self.image("small")
            fs = self.image("fs4k_small")
            S.update(fs=fs, plain=data, digest=digest, nbytes=self.delay_size,
                     under=("--filter=delay",), params=("rdelay=1ms",), fresh=False)
        elif key == "randw":
            S.update(fs=self.image("fs_sparse"), plain=self.image("sparse_plain"),
                     nbytes=self.size, under=(), params=(), fresh=True)
        elif key in ("write", "fill"):
            src, digest = self.image("src")
            if key == "write":
                fs, plain = self.image("fs4k"), self.image("data")[0]
            else:
                fs, plain = self.image("fs_sparse"), self.image("sparse_plain")
            S.update(fs=fs, plain=plain, src=src, digest=digest, nbytes=self.size,
                     under=(), params=(), fresh=True)
        return S

    def prepare_run(self, S, cand):
        """Fresh copies for write scenarios (outside the timing).
        Returns (server argv, the image file the server writes)."""
        fs, plain = S["fs"], S["plain"]
        target = None
        if S["fresh"]:
            if cand == "raw":
                target = os.path.join(self.rundir, "run-plain.img")
                copy_fresh(plain, target)
                plain = target
            else:
                target = os.path.join(self.rundir, "run-fs.img")
                copy_fresh(fs, target)
                fs = target
        return self.server_args(cand, fs, plain, S["under"], S["params"]), target

    def client_cmd(self, S, srv, verify=False):
        key = S["key"]
        if key == "randw":
            return randw_cmd(srv.uri, self.size, verify)
        if key == "rand4k":
            cmd = [self.a.python, os.path.abspath(__file__), "--randread-client", srv.sock,
                   str(self.a.rand_count), "8", str(self.a.rand_depth), "42"]
            if verify:
                cmd.append(S["plain"])
            return cmd
        if key in ("write", "fill"):
            return ["nbdcopy", "--flush", S["src"], srv.uri]
        return ["nbdcopy", "--no-extents", srv.uri, "-" if verify else "null:"]

    def verify(self, S, cand):
        """Once per scenario and candidate, outside the timing: check that the
        bytes served (or written) are the right ones."""
        key = S["key"]
        argv, target = self.prepare_run(S, cand)
        srv = self.start(argv, "%s-%s-verify" % (key, cand))
        try:
            size = srv.size
            if size != (self.delay_size if key == "delay" else self.size):
                return "wrong size %d" % size
            cmd = self.client_cmd(S, srv, verify=True)
            timeout = self.a.timeout
            if key == "randw":
                r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, timeout=timeout)
                if r.returncode != 0:
                    return "client failed: fio: %s" % (r.stderr.strip() or r.stdout)[-500:]
                if cand == "raw":
                    return "ok"
            elif key == "rand4k":
                r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, timeout=timeout)
                if r.returncode != 0:
                    return "client failed: %s %s" % (r.stdout.strip(), r.stderr.strip()[-500:])
                res = json.loads(r.stdout)
                if res["errors"]:
                    return "client failed: %s" % "; ".join(res["errors"])[:500]
                if res["mismatches"]:
                    return "%d of %d random reads returned wrong bytes" % (
                        res["mismatches"], res["reads"])
                return "ok"
            if key == "randw":
                pass  # checked once the server has stopped, below
            elif key in ("write", "fill"):
                r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, timeout=timeout)
                if r.returncode != 0:
                    return "nbdcopy failed: %s" % r.stderr.strip()[-500:]
            else:
                h = hashlib.sha256()
                n = 0
                p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                deadline = time.monotonic() + timeout
                while True:
                    b = p.stdout.read(MiB)
                    if not b:
                        break
                    h.update(b)
                    n += len(b)
                    if time.monotonic() > deadline:
                        p.kill()
                        p.wait()
                        return "timeout"
                err = p.stderr.read().decode(errors="replace")
                if p.wait() != 0:
                    return "nbdcopy failed: %s" % err.strip()[-500:]
                if n != S["nbytes"] or h.hexdigest() != S["digest"]:
                    return "WRONG BYTES (sha256 of %d bytes differs from the source)" % n
                return "ok"
        except subprocess.TimeoutExpired:
            return "timeout"
        finally:
            srv.stop()
        # write scenarios: check what landed in the image, server stopped
        if key == "randw":
            fsck = subprocess.run(["e2fsck", "-fn", target], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            if fsck.returncode != 0:
                return "e2fsck -fn after a clean shutdown exited %d" % fsck.returncode
            return "ok"
        if cand == "raw":
            got = sha256_file(target)
        else:
            out = os.path.join(self.rundir, "dump.bin")
            if os.path.exists(out):
                os.unlink(out)
            r = subprocess.run(["debugfs", "-R", "dump %s %s" % (INNER, out), target],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0 or not os.path.exists(out):
                return "debugfs dump failed: %s" % r.stderr.strip()[-300:]
            got = sha256_file(out) if os.path.getsize(out) == self.size else "size"
            os.unlink(out)
            fsck = subprocess.run(["e2fsck", "-fn", target], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            if fsck.returncode != 0:
                self.notes.append("%s/%s: e2fsck -fn after a clean shutdown exited %d"
                                  % (key, cand, fsck.returncode))
        if got != S["digest"]:
            return "WRONG BYTES written (file content differs from the source)"
        return "ok"

    def timed_run(self, S, cand, runno):
        """One timed run. Returns dict(wall, cpu, rss) or dict(error=...)."""
        key = S["key"]
        argv, _ = self.prepare_run(S, cand)
        srv = self.start(argv, "%s-%s-%d" % (key, cand, runno))
        res = {}
        try:
            cmd = self.client_cmd(S, srv)
            t0 = time.perf_counter()
            try:
                r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, timeout=self.a.timeout)
            except subprocess.TimeoutExpired:
                res["error"] = "timeout"
                return res
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                res["error"] = "client failed: " + (r.stderr.strip() or r.stdout.strip())[-300:]
                return res
            if key == "rand4k":
                out = json.loads(r.stdout)
                wall = out["elapsed"]
                res["iops"] = out["reads"] / wall
            if key == "randw":
                res["iops"], wall = randw_result(r.stdout)
            res["wall"] = wall
        finally:
            cpu, rss = srv.stop()
            res["cpu"], res["rss"] = cpu, rss
        return res

    def run_scenario(self, key):
        num, title = SCEN_BY_KEY[key][1], SCEN_BY_KEY[key][2]
        log("[%d] %s" % (num, title))
        S = self.scenario_setup(key)
        cands = self.a.candidates
        R = {c: {"runs": [], "verify": None, "timeout": False, "error": None} for c in cands}
        self.results[key] = (S, R)
        for c in cands:
            try:
                v = self.verify(S, c)
            except BenchError as e:
                v = "error: %s" % e
            R[c]["verify"] = v
            log("  verify %-4s: %s" % (c, v))
            if v == "timeout":
                R[c]["timeout"] = True
            elif v.startswith("error") or v.startswith("nbdcopy failed") or \
                    v.startswith("client failed"):
                R[c]["error"] = v
        for i in range(self.a.runs):
            for c in cands:
                if R[c]["timeout"] or R[c]["error"]:
                    continue
                try:
                    res = self.timed_run(S, c, i)
                except BenchError as e:
                    res = {"error": str(e)}
                if res.get("error") == "timeout":
                    R[c]["timeout"] = True
                    log("  run %d %-4s: timeout (>%ds)" % (i + 1, c, self.a.timeout))
                    continue
                if "error" in res:
                    R[c]["error"] = res["error"]
                    log("  run %d %-4s: %s" % (i + 1, c, res["error"]))
                    continue
                R[c]["runs"].append(res)
                log("  run %d %-4s: %.3fs  cpu %.3fs  rss %d MiB" % (
                    i + 1, c, res["wall"], res["cpu"], res["rss"] // 1024))

    # ---- reporting ---------------------------------------------------------

    def summary(self, key):
        S, R = self.results[key]
        out = {}
        for c, r in R.items():
            d = {"verify": r["verify"], "timeout": r["timeout"], "error": r["error"]}
            runs = r["runs"]
            if runs and not r["timeout"] and not r["error"]:
                walls = [x["wall"] for x in runs]
                cpus = [x["cpu"] for x in runs]
                d["wall"] = statistics.median(walls)
                d["wmin"], d["wmax"] = min(walls), max(walls)
                d["cpu"] = statistics.median(cpus)
                d["rss"] = max(x["rss"] for x in runs) / 1024.0
                d["cpu_gib"] = d["cpu"] / (S["nbytes"] / GiB)
                if key in ("rand4k", "randw"):
                    d["speed"] = statistics.median([x["iops"] for x in runs])
                else:
                    d["speed"] = S["nbytes"] / MiB / d["wall"]
            out[c] = d
        raw = out.get("raw", {})
        for c, d in out.items():
            if "wall" in d and "wall" in raw:
                d["wall_ratio"] = d["wall"] / raw["wall"]
                d["speed_ratio"] = d["speed"] / raw["speed"]
                d["cpu_ratio"] = d["cpu_gib"] / raw["cpu_gib"] if raw["cpu_gib"] else None
        return S, out

    def targets(self):
        """(scenario, metric, target text, ours value, c value, verdict)."""
        rows = []
        spec = {
            "seq4k": [("time ours/raw", "wall_ratio", "<=", 1.1),
                      ("CPU/GiB ours/raw", "cpu_ratio", "<=", 1.2)],
            "seq1k": [("time ours/raw", "wall_ratio", "<=", 1.1),
                      ("CPU/GiB ours/raw", "cpu_ratio", "<=", 1.2)],
            "delay": [("time ours/raw", "wall_ratio", "<=", 1.5)],
            "rand4k": [("IOPS ours/raw", "speed_ratio", ">=", 0.8)],
            "write": [("time ours/raw", "wall_ratio", "<=", 1.2)],
            "fill": [("throughput ours/raw", "speed_ratio", ">=", 0.5)],
            "randw": [("IOPS ours/raw", "speed_ratio", ">=", 0.5)],
        }
        for key, _, _, _ in SCENARIOS:
            if key not in self.results:
                continue
            S, out = self.summary(key)
            for label, field, op, lim in spec[key]:
                def val(c):
                    d = out.get(c)
                    if d is None:
                        return None, "n/a"
                    if d.get("timeout"):
                        return None, "timeout"
                    if d.get("error"):
                        return None, "error"
                    v = d.get(field)
                    return v, ("-" if v is None else "%.2f" % v)
                ov, otxt = val("ours")
                cv, ctxt = val("c")
                if "ours" not in out or "raw" not in out:
                    verdict = "n/a"
                elif ov is None:
                    verdict = "MISS" if otxt in ("timeout", "error") else "n/a"
                else:
                    ok = ov <= lim if op == "<=" else ov >= lim
                    verdict = "PASS" if ok else "MISS"
                    if out["ours"]["verify"] != "ok":
                        verdict = "INVALID (bytes)"
                rows.append((SCEN_BY_KEY[key][1], key, label, "%s %.1f" % (op, lim),
                             otxt, ctxt, verdict))
        return rows

    def report(self, facts):
        md = self.a.markdown
        lines = []

        def table(header, rows):
            if md:
                lines.append("| " + " | ".join(header) + " |")
                lines.append("|" + "|".join("---" for _ in header) + "|")
                for r in rows:
                    lines.append("| " + " | ".join(str(x) for x in r) + " |")
            else:
                w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
                fmt = "  ".join("%%-%ds" % n for n in w)
                lines.append(fmt % tuple(header))
                lines.append("  ".join("-" * n for n in w))
                for r in rows:
                    lines.append(fmt % tuple(str(x) for x in r))
            lines.append("")

        for k, v in facts:
            lines.append(("- **%s**: %s" if md else "%-14s %s") % (k, v))
        lines.append("")

        header = ["#", "scenario", "candidate", "wall s (median)", "min–max s",
                  "MiB/s or IOPS", "server CPU s", "CPU s/GiB", "peak RSS MiB",
                  "wall/raw", "CPU/GiB vs raw", "bytes"]
        rows = []
        for key, num, title, kind in SCENARIOS:
            if key not in self.results:
                continue
            S, out = self.summary(key)
            if key == "delay":
                name = "%s (%d MiB file)" % (key, self.a.delay_size)
            elif key == "rand4k":
                name = "%s (%d reads)" % (key, (self.a.rand_count // 8) * 8)
            else:
                name = "%s (%d MiB)" % (key, self.a.size)
            for c in self.a.candidates:
                d = out[c]
                ver = d["verify"] if d["verify"] in ("ok", "timeout") else "BAD"
                if "wall" not in d:
                    why = ("timeout >%ds" % self.a.timeout) if d["timeout"] else "error"
                    rows.append((num, name, CAND_LABEL[c], why, "-", "-", "-", "-", "-",
                                 "-", "-", ver))
                    continue
                speed = ("%.0f IOPS" % d["speed"]) if key in ("rand4k", "randw") \
                    else "%.0f" % d["speed"]
                rows.append((num, name, CAND_LABEL[c], fmt_s(d["wall"]),
                             "%s–%s" % (fmt_s(d["wmin"]), fmt_s(d["wmax"])), speed,
                             fmt_s(d["cpu"]), fmt_s(d["cpu_gib"]), "%.0f" % d["rss"],
                             fmt_ratio(d.get("wall_ratio")), fmt_ratio(d.get("cpu_ratio")),
                             ver))
        table(header, rows)

        lines.append("**Targets** (our filter vs raw; C shown for reference)" if md
                     else "Targets (our filter vs raw; C shown for reference)")
        lines.append("")
        table(["#", "scenario", "metric", "target", "ours", "C", "ours verdict"],
              self.targets())

        bad = []
        for key in self.results:
            _, R = self.results[key]
            for c, r in R.items():
                if r["verify"] not in ("ok", "timeout"):
                    bad.append("%s/%s: verification: %s" % (key, c, r["verify"]))
                if r["error"] and r["error"] != r["verify"]:
                    bad.append("%s/%s: %s" % (key, c, r["error"]))
        for n in bad + self.notes:
            lines.append(("- " if md else "! ") + n)
        print("\n".join(lines), flush=True)



# --------------------------------------------------------------------------
# Metadata at scale and latency (issue 12): self-contained scenarios with
# their own images and table.  Each function returns table rows.
# --------------------------------------------------------------------------

# The three files of the issue, each served from its own image:
# (key, label, mkfs type, block size, file blocks, data in every n-th block)
META_FILES = [
    ("frag1k", "ext4 1 KiB blocks, 300,000 one-block extents with holes", "ext4", 1024,
     600000, 2),
    ("ext2_256m", "ext2 1 KiB blocks, 256 MiB (1,028 indirect blocks)", "ext2", 1024,
     262144, 1),
    ("ext4_100k", "ext4 4 KiB blocks, 100,000 extents", "ext4", 4096, 200000, 2),
]
META_MILLION = ("million", "ext4 1 KiB blocks, 1,000,000 one-block extents", "ext4", 1024,
                2000000, 2)


def first_byte_client(argv):
    """--first-byte-client SOCKET: connect, read the first byte, print the
    seconds it took (the interpreter's start-up is not counted)."""
    import nbd
    t0 = time.perf_counter()
    h = nbd.NBD()
    h.connect_unix(argv[0])
    h.pread(1, 0)
    elapsed = time.perf_counter() - t0
    h.shutdown()
    print(json.dumps({"elapsed": elapsed}))
    return 0


def conn_rate_client(argv):
    """--conn-rate-client SOCKET COUNT: open, read one byte and close COUNT
    connections one after the other; print connections per second."""
    import nbd
    sock, count = argv[0], int(argv[1])
    t0 = time.perf_counter()
    for _ in range(count):
        h = nbd.NBD()
        h.connect_unix(sock)
        h.pread(1, 0)
        h.shutdown()
        del h
    print(json.dumps({"rate": count / (time.perf_counter() - t0)}))
    return 0


class MetaBench:
    """Scenarios meta-first, meta-copy, fio, connrate, peakmem."""

    def __init__(self, bench):
        self.b = bench
        self.a = bench.a
        self.rows = []
        self._built = {}

    def sparse_image(self, spec):
        """(image, plain file, sha256) for one of META_FILES / META_MILLION."""
        key, _, fstype, bs, blocks, every = spec
        if key in self._built:
            return self._built[key]
        t0 = time.monotonic()
        d = os.path.join(self.b.imgdir, "meta_" + key)
        os.makedirs(d, exist_ok=True)
        plain = os.path.join(d, "data.bin")
        img = os.path.join(self.b.imgdir, "meta_%s.img" % key)
        done = img + ".sha256"
        if os.path.exists(done):
            # Built by an earlier run in this --workdir.
            with open(done) as f:
                self._built[key] = (img, plain, f.read().strip())
            return self._built[key]
        rng = random.Random(key)
        h = hashlib.sha256()
        with open(plain, "wb") as f:
            chunk = rng.randbytes(bs * 256)
            for b in range(blocks):
                if b % every == 0:
                    piece = chunk[(b % 256) * bs:(b % 256 + 1) * bs]
                    if every > 1:
                        f.seek(b * bs)
                    f.write(piece)
                    h.update(piece)
                else:
                    h.update(bytes(bs))
            f.truncate(blocks * bs)
        data_mib = blocks // every * bs / MiB
        if os.path.exists(img):
            os.unlink(img)
        r = subprocess.run(["mke2fs", "-q", "-F", "-t", fstype, "-b", str(bs), "-d", d, img,
                            "%dM" % int(data_mib * 1.15 + 64)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise BenchError("mke2fs failed for %s:\n%s" % (img, r.stdout))
        log("  built %s in %.1fs" % (key, time.monotonic() - t0))
        with open(done, "w") as f:
            f.write(h.hexdigest())
        self._built[key] = (img, plain, h.hexdigest())
        return self._built[key]

    def serve(self, cand, img, plain, tag, delay=False, params=()):
        under = ("--filter=delay",) if delay else ()
        p = tuple(params) + (("rdelay=1ms",) if delay else ())
        return self.b.start(self.b.server_args(cand, img, plain, under, p), tag)

    def client(self, argv, timeout):
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise BenchError("client %s failed: %s" % (argv[0], r.stderr.strip()[-300:]))
        return r.stdout

    def interleaved(self, cands, one):
        """Median over --runs interleaved runs of one(cand) -> number or None."""
        vals = {c: [] for c in cands}
        for _ in range(self.a.runs):
            for c in cands:
                if vals[c] is None:
                    continue
                try:
                    v = one(c)
                except (BenchError, subprocess.TimeoutExpired) as e:
                    log("  %s: %s" % (c, str(e)[:200]))
                    vals[c] = None
                    continue
                vals[c].append(v)
        return {c: (statistics.median(v) if v else None) for c, v in vals.items()}

    def row(self, scen, what, res, unit, fmt, target_text, ok):
        def show(c):
            v = res.get(c)
            return "-" if v is None else fmt % v
        verdict = "n/a" if res.get("ours") is None else ("PASS" if ok(res) else "MISS")
        self.rows.append((scen, what, show("ours"), show("c"), show("raw"), unit, target_text,
                          verdict))

    def first_byte(self):
        cands = self.a.candidates
        for spec in META_FILES:
            img, plain, _ = self.sparse_image(spec)

            def one(c):
                srv = self.serve(c, img, plain, "first-%s-%s" % (spec[0], c), delay=True)
                try:
                    out = self.client([self.a.python, os.path.abspath(__file__),
                                       "--first-byte-client", srv.sock], 60)
                    return json.loads(out)["elapsed"] * 1000
                finally:
                    srv.stop()
            res = self.interleaved(cands, one)
            self.row("first byte, 1 ms plugin", spec[1], res, "ms", "%.1f", "<= 50 ms",
                     lambda r: r["ours"] <= 50)

    def copy(self):
        cands = self.a.candidates
        for spec in META_FILES:
            img, plain, digest = self.sparse_image(spec)
            # Verify once (outside the timing).
            srv = self.serve("ours", img, plain, "copyv-%s" % spec[0], delay=True)
            try:
                out = os.path.join(self.b.rundir, "copy.bin")
                self.client(["nbdcopy", "--no-extents", srv.uri, out], 600)
                if sha256_file(out) != digest:
                    self.b.notes.append("copy %s: WRONG BYTES from our filter" % spec[0])
                os.unlink(out)
            finally:
                srv.stop()

            def one(c):
                srv = self.serve(c, img, plain, "copy-%s-%s" % (spec[0], c), delay=True)
                try:
                    t0 = time.perf_counter()
                    self.client(["nbdcopy", "--no-extents", srv.uri, "null:"],
                                self.a.meta_timeout)
                    return time.perf_counter() - t0
                finally:
                    srv.stop()
            res = self.interleaved(cands, one)
            raw = res.get("raw")
            ratio = {c: (v / raw if v is not None and raw else None) for c, v in res.items()}
            self.row("whole copy, 1 ms plugin", spec[1], res, "s", "%.2f", "", lambda r: True)
            self.row("whole copy, 1 ms plugin", spec[1] + " (/ raw)", ratio, "x", "%.2f",
                     "<= 1.3x raw", lambda r: r["ours"] <= 1.3)

    def fio(self):
        if shutil.which("fio") is None:
            self.b.notes.append("fio: not installed (apt-get install fio)")
            return
        data, _ = self.b.image("data")
        fs = self.b.image("fs4k")

        def one(c):
            srv = self.b.start(self.b.server_args(c, fs, data), "fio-%s" % c)
            try:
                out = self.client(["fio", "--name=rand", "--ioengine=nbd", "--uri=" + srv.uri,
                                   "--rw=randread", "--bs=4k", "--numjobs=4", "--iodepth=32",
                                   "--runtime=%d" % self.a.fio_seconds, "--time_based",
                                   "--group_reporting", "--output-format=json"], 120)
                return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]
            finally:
                srv.stop()
        res = self.interleaved(self.a.candidates, one)
        self.row("fio random 4 KiB reads, 4 x 32", "ext4 4 KiB, %d MiB" % self.a.size, res,
                 "IOPS", "%.0f", "", lambda r: True)
        raw = res.get("raw")
        ratio = {c: (v / raw if v is not None and raw else None) for c, v in res.items()}
        self.row("fio random 4 KiB reads, 4 x 32", "IOPS / raw", ratio, "x", "%.2f",
                 ">= 0.9x raw", lambda r: r["ours"] >= 0.9)

    def connrate(self):
        img, plain, _ = self.sparse_image(META_FILES[0])

        def one(c):
            srv = self.serve(c, img, plain, "conn-%s" % c)
            try:
                out = self.client([self.a.python, os.path.abspath(__file__),
                                   "--conn-rate-client", srv.sock, "200"], 120)
                return json.loads(out)["rate"]
            finally:
                srv.stop()
        res = self.interleaved(self.a.candidates, one)
        self.row("connections opened and closed", META_FILES[0][1], res, "per s", "%.0f", "",
                 lambda r: True)

    def peakmem(self):
        small = self.sparse_image(META_FILES[0])
        big = self.sparse_image(META_MILLION)
        for spec, (img, plain, _) in ((META_FILES[0], small), (META_MILLION, big)):
            def one(c):
                srv = self.serve(c, img, plain, "mem-%s-%s" % (spec[0], c))
                try:
                    self.client(["nbdcopy", "--no-extents", srv.uri, "null:"],
                                self.a.meta_timeout)
                finally:
                    _, hwm = srv.stop()
                return hwm / 1024.0
            res = self.interleaved(self.a.candidates, one)
            self.row("nbdkit peak memory, copying", spec[1], res, "MiB", "%.1f", "<= 64 MiB",
                     lambda r: r["ours"] <= 64)

    def run(self, key):
        log("[%s] %s" % (key, SCEN_BY_KEY[key][2]))
        {"meta-first": self.first_byte, "meta-copy": self.copy, "fio": self.fio,
         "connrate": self.connrate, "peakmem": self.peakmem}[key]()

    def report(self):
        if not self.rows:
            return
        header = ["scenario", "file", "ours", "C", "raw", "unit", "target", "ours verdict"]
        md = self.a.markdown
        lines = ["", "**Metadata at scale and latency**" if md else "Metadata at scale and latency", ""]
        if md:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            for r in self.rows:
                lines.append("| " + " | ".join(str(x) for x in r) + " |")
        else:
            w = [max(len(str(x)) for x in col) for col in zip(header, *self.rows)]
            fmt = "  ".join("%%-%ds" % n for n in w)
            lines.append(fmt % tuple(header))
            for r in self.rows:
                lines.append(fmt % tuple(str(x) for x in r))
        print("\n".join(lines), flush=True)


META_SCENARIOS = [
    ("meta-first", 7, "connect + first byte of three big files through a 1 ms plugin", "meta"),
    ("meta-copy", 8, "whole nbdcopy of three big files through a 1 ms plugin", "meta"),
    ("fio", 9, "fio random 4 KiB reads, 4 jobs x 32 in flight", "meta"),
    ("connrate", 10, "connections opened and closed per second on one file", "meta"),
    ("peakmem", 11, "nbdkit peak memory copying a 1,000,000-extent file", "meta"),
]
SCENARIOS.extend(META_SCENARIOS)
SCEN_BY_KEY.update({s[0]: s for s in META_SCENARIOS})
SCEN_BY_NUM.update({str(s[1]): s for s in META_SCENARIOS})

# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def machine_facts(args):
    facts = [("date", time.strftime("%Y-%m-%d %H:%M:%S %Z"))]
    facts.append(("nproc", str(os.cpu_count())))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts.append(("cpu", line.split(":", 1)[1].strip()))
                    break
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            facts.append(("loadavg", " ".join(f.read().split()[:3])))
    except OSError:
        pass
    facts.append(("kernel", platform.release()))
    facts.append(("nbdkit", "%s (%s)" % (nbdkit_version(NBDKIT), NBDKIT)))
    if OTHER_NBDKIT and "c" in args.candidates:
        facts.append(("nbdkit for C", "%s (%s, Debian's C filter)"
                      % (nbdkit_version(DEBIAN_NBDKIT), DEBIAN_NBDKIT)))
    v = subprocess.run(["nbdcopy", "--version"], stdout=subprocess.PIPE, text=True).stdout
    facts.append(("nbdcopy", v.splitlines()[0].strip() if v else "?"))
    if "ours" in args.candidates:
        st = os.stat(args.filter)
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        facts.append(("filter", "%s (%s, built %s, repo HEAD %s)" % (
            args.filter, "%.1f MiB" % (st.st_size / MiB),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime)),
            rev.stdout.strip() or "?")))
    fstype = subprocess.run(["stat", "-f", "-c", "%T", args.workdir],
                            stdout=subprocess.PIPE, text=True).stdout.strip()
    facts.append(("workdir", "%s (%s%s)" % (args.workdir, fstype,
                  ": flush/fsync is nearly free" if fstype == "tmpfs" else "")))
    order = "→".join(args.candidates)
    facts.append(("settings", ("runs=%d interleaved %s, size=%d MiB, delay-size=%d MiB, "
                  "rand reads=%d over 8 connections x %d in flight, timeout=%ds per client run") % (
                      args.runs, order, args.size, args.delay_size, args.rand_count, args.rand_depth,
                      args.timeout)))
    return facts


def preflight(args):
    problems = []
    for tool in ("nbdkit", "nbdcopy", "nbdinfo", "mke2fs", "debugfs", "e2fsck", "cp"):
        if shutil.which(tool) is None:
            problems.append("missing tool %r on PATH (apt-get install nbdkit libnbd-bin e2fsprogs)"
                            % tool)
    if problems:
        return problems
    if "ours" in args.candidates and args.filter != C_FILTER and not os.path.isfile(args.filter):
        problems.append("our filter %s does not exist: build it with `cargo build --release` "
                        "in %s, pass --filter PATH, or leave it out with --candidates c,raw"
                        % (args.filter, REPO))
    elif "ours" in args.candidates:
        r = subprocess.run(nbdkit_argv(NBDKIT, args.filter, ["null"], options=["--dump-plugin"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            problems.append("nbdkit cannot load our filter %s:\n  %s" % (
                args.filter, r.stderr.strip().replace("\n", "\n  ")))
    needs = {}
    for cand in args.candidates:
        nbdkit = DEBIAN_NBDKIT if cand == "c" else NBDKIT
        need = needs.setdefault(nbdkit, set(["delay"] if {"delay", "meta-first", "meta-copy"} & set(args.scenarios) else []))
        if cand in ("c", "cnew"):
            need.add("ext2")
    for nbdkit, need in sorted(needs.items()):
        filterdir = ""
        r = subprocess.run([nbdkit, "--dump-config"], stdout=subprocess.PIPE, text=True)
        for line in r.stdout.splitlines():
            if line.startswith("filterdir="):
                filterdir = line.split("=", 1)[1]
        for f in sorted(need):
            if not os.path.exists(os.path.join(filterdir, "nbdkit-%s-filter.so" % f)):
                problems.append("nbdkit filter %r not installed in %s (apt-get install nbdkit)"
                                % (f, filterdir))
    if "randw" in args.scenarios and shutil.which("fio") is None:
        problems.append("missing tool 'fio' on PATH (apt-get install fio)")
    if {"rand4k", "meta-first", "connrate"} & set(args.scenarios):
        r = subprocess.run([args.python, "-c", "import nbd"], stderr=subprocess.DEVNULL)
        if r.returncode != 0:
            problems.append("%s cannot import the nbd module (apt-get install python3-libnbd)"
                            % args.python)
    return problems


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filter", default=filter_so(),
                    help="our filter .so (default: $EXT2FILTER_SO, else %s)" % DEFAULT_FILTER)
    ap.add_argument("--runs", type=int, default=None, help="timed runs per candidate (default 5)")
    ap.add_argument("--scenarios", default="all",
                    help="comma list of %s or numbers 1-12 (default all)"
                    % ",".join(s[0] for s in SCENARIOS))
    ap.add_argument("--candidates", default="ours,c,cnew,raw" if OTHER_NBDKIT else "ours,c,raw",
                    help="subset of ours,c,raw, and cnew (the C filter of "
                         "$EXT2FILTER_NBDKIT) when that is not Debian's nbdkit")
    ap.add_argument("--size", type=int, default=None, help="file size in MiB (default 256)")
    ap.add_argument("--delay-size", type=int, default=None,
                    help="file size in MiB for the 1 ms delay scenario (default 32)")
    ap.add_argument("--rand-count", type=int, default=None,
                    help="random 4 KiB reads per run, over 8 connections (default 20000)")
    ap.add_argument("--rand-depth", type=int, default=8,
                    help="random reads in flight per connection (default 8)")
    ap.add_argument("--timeout", type=int, default=None,
                    help="seconds per client run before it counts as timeout (default 60)")
    ap.add_argument("--workdir", default=None,
                    help="where images go (default: a temp dir, on /dev/shm when it has room, "
                         "removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the temp workdir")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: 64 MiB, 4 MiB delay file, 4000 random reads, 3 runs")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--meta-timeout", type=int, default=300,
                    help="seconds per whole copy in scenarios 8 and 11 (default 300)")
    ap.add_argument("--fio-seconds", type=int, default=5,
                    help="seconds per fio run in scenario 9 (default 5)")
    ap.add_argument("--python", default=DEBIAN_PYTHON,
                    help="python with the nbd module, for the random-read client")
    a = ap.parse_args(argv)
    q = a.quick
    a.runs = a.runs if a.runs is not None else (3 if q else 5)
    a.size = a.size if a.size is not None else (64 if q else 256)
    a.delay_size = a.delay_size if a.delay_size is not None else (4 if q else 32)
    a.rand_count = a.rand_count if a.rand_count is not None else (4000 if q else 20000)
    a.timeout = a.timeout if a.timeout is not None else (20 if q else 60)
    if a.filter != C_FILTER:
        a.filter = os.path.abspath(a.filter)
    cands = [c.strip() for c in a.candidates.split(",") if c.strip()]
    for c in cands:
        if c not in CANDIDATES or (c == "cnew" and not OTHER_NBDKIT):
            ap.error("unknown candidate %r (choose from ours,c,raw%s)"
                     % (c, ",cnew" if OTHER_NBDKIT else ""))
    a.candidates = [c for c in CANDIDATES if c in cands]
    if a.scenarios == "all":
        a.scenarios = [s[0] for s in SCENARIOS]
    else:
        keys = []
        for s in a.scenarios.split(","):
            s = s.strip()
            if s in SCEN_BY_NUM:
                s = SCEN_BY_NUM[s][0]
            if s not in SCEN_BY_KEY:
                ap.error("unknown scenario %r" % s)
            keys.append(s)
        a.scenarios = [s[0] for s in SCENARIOS if s[0] in keys]
    if a.size < 1 or a.delay_size < 1 or a.runs < 1 or a.rand_count < 8:
        ap.error("sizes, runs and counts must be positive")
    return a


def main(argv):
    if argv and argv[0] == "--randread-client":
        return randread_client(argv[1:])
    if argv and argv[0] == "--first-byte-client":
        return first_byte_client(argv[1:])
    if argv and argv[0] == "--conn-rate-client":
        return conn_rate_client(argv[1:])
    a = parse_args(argv)
    if OTHER_NBDKIT:
        CAND_LABEL["c"] = "C --filter=ext2, nbdkit %s" % nbdkit_version(DEBIAN_NBDKIT)
        CAND_LABEL["cnew"] = "C --filter=ext2, nbdkit %s" % nbdkit_version(NBDKIT)
    problems = preflight(a)
    if problems:
        for p in problems:
            print("bench: " + p, file=sys.stderr)
        return 2
    tmp = None
    if a.workdir is None:
        base = None
        need = a.size * MiB * 6 + (1 << 30)
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            st = os.statvfs("/dev/shm")
            if st.f_bavail * st.f_frsize > need:
                base = "/dev/shm"
        tmp = a.workdir = tempfile.mkdtemp(prefix="ext2filter-bench-", dir=base)
    else:
        a.workdir = os.path.abspath(a.workdir)
        os.makedirs(a.workdir, exist_ok=True)
    try:
        facts = machine_facts(a)
        if "ours" in a.candidates:
            # Snapshot the .so so that a rebuild during the run cannot mix builds.
            snap = os.path.join(a.workdir, "libext2filter-snapshot.so")
            shutil.copyfile(a.filter, snap)
            facts.append(("filter sha256", sha256_file(snap)[:16] + " (a copy is benchmarked)"))
            a.filter = snap
        for k, v in facts:
            log("%-14s %s" % (k, v))
        b = Bench(a)
        meta = MetaBench(b)
        t0 = time.monotonic()
        for key in a.scenarios:
            try:
                if SCEN_BY_KEY[key][3] == "meta":
                    meta.run(key)
                    continue
                b.run_scenario(key)
            except BenchError as e:
                log("scenario %s failed: %s" % (key, e))
                b.notes.append("scenario %s failed: %s" % (key, e))
        facts.append(("bench time", "%.0f s" % (time.monotonic() - t0)))
        b.report(facts)
        meta.report()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if tmp and not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
