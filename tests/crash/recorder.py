# An nbdkit plugin (nbdkit's python plugin) serving an image file and
# recording, in order, every write, zero, trim and flush that reaches it,
# so that tests can rebuild what a power cut could have left on the medium.
#
#   nbdkit python tests/crash/recorder.py file=IMAGE log=LOG [trim=no]
#
# LOG gets one record per request: b'W' + offset (u64 LE) + length (u32
# LE) + the bytes written (zeroes for a zero request), b'T' + offset +
# length for a trim, or b'F' for a flush.  A trimmed range holds unknown
# content afterwards: the plugin fills it with TRIMMED bytes (so that a
# filter reading it back gets garbage), and a crash state may show the
# range as it was or as that garbage.  With trim=no the plugin cannot
# trim.  LOG.count holds the number of records so far, rewritten after
# each, so a client can tell which requests its flush covered.  Requests
# are serialized: the log's order is the order they reached the file.

import io
import os
import struct

import nbdkit

API_VERSION = 2

image = None
log_path = None
log = None
records = 0
trim_ok = True

# What a trimmed range reads as (the crash judges use the same byte).
TRIMMED = 0xDB


def config(key, value):
    global image, log_path, trim_ok
    if key == "file":
        image = value
    elif key == "log":
        log_path = value
    elif key == "trim":
        trim_ok = value != "no"
    else:
        raise RuntimeError("unknown parameter " + key)


def config_complete():
    if image is None or log_path is None:
        raise RuntimeError("file= and log= are required")


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def record(kind, offset=0, data=b""):
    global log, records
    if log is None:
        log = io.open(log_path, "ab")
    if kind == b"W":
        log.write(kind + struct.pack("<QI", offset, len(data)) + data)
    elif kind == b"T":
        log.write(kind + struct.pack("<QI", offset, len(data)))
    else:
        log.write(kind)
    log.flush()
    records += 1
    with io.open(log_path + ".count.tmp", "w") as f:
        f.write(str(records))
    os.replace(log_path + ".count.tmp", log_path + ".count")


# nbdkit calls the plugin's open(); the built-in is io.open above.
def open(readonly):
    flags = os.O_RDONLY if readonly else os.O_RDWR
    return os.open(image, flags)


def close(h):
    os.close(h)


def get_size(h):
    return os.fstat(h).st_size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return trim_ok


def can_zero(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    data = os.pread(h, len(buf), offset)
    buf[: len(data)] = data


def pwrite(h, buf, offset, flags):
    data = bytes(buf)
    os.pwrite(h, data, offset)
    record(b"W", offset, data)


def zero(h, count, offset, flags):
    data = bytes(count)
    os.pwrite(h, data, offset)
    record(b"W", offset, data)


def trim(h, count, offset, flags):
    data = bytes([TRIMMED]) * count
    os.pwrite(h, data, offset)
    record(b"T", offset, data)


def flush(h, flags):
    record(b"F")
