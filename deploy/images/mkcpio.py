#!/usr/bin/env python3
"""Writes a directory tree as a gzip-compressed cpio "newc" archive, reproducibly.

Used by build.sh for the guest initramfs. Every entry is owned by root, has mtime 0 and a
sequential inode number, entries are sorted by path, and the gzip header carries no name or time:
the same tree always gives the same bytes. Extra device nodes (which an unprivileged build could
not create on disk) are given as --dev PATH:TYPE:MAJOR:MINOR:MODE, e.g. dev/console:c:5:1:0600.

usage: mkcpio.py TREE OUTPUT.gz [--dev SPEC]...
"""

import gzip
import os
import stat
import sys


def header(ino, mode, nlink, size, rdev_major, rdev_minor, name_size):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev_major, rdev_minor, name_size, 0]
    return ("070701" + "".join("%08X" % f for f in fields)).encode()


def pad(n):
    return b"\0" * ((4 - n % 4) % 4)


def entries(tree):
    out = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), tree))
    return sorted(out)


def main(argv):
    args = [a for a in argv[1:]]
    devs = []
    while "--dev" in args:
        i = args.index("--dev")
        devs.append(args[i + 1])
        del args[i : i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    tree, output = args
    records = []
    for rel in entries(tree):
        path = os.path.join(tree, rel)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            data = os.readlink(path).encode()
            mode = stat.S_IFLNK | 0o777
        elif stat.S_ISDIR(st.st_mode):
            data = b""
            mode = stat.S_IFDIR | stat.S_IMODE(st.st_mode)
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                data = f.read()
            mode = stat.S_IFREG | stat.S_IMODE(st.st_mode)
        else:
            sys.exit("unsupported file type: " + path)
        records.append((rel, mode, data, 0, 0))
    for spec in devs:
        rel, kind, major, minor, perm = spec.split(":")
        ftype = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        records.append((rel, ftype | int(perm, 8), b"", int(major), int(minor)))
    records.sort(key=lambda r: r[0])
    tmp = output + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(
        filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0
    ) as gz:
        ino = 1
        for rel, mode, data, major, minor in records:
            name = rel.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(mode) else 1
            gz.write(header(ino, mode, nlink, len(data), major, minor, len(name)))
            gz.write(name + pad(110 + len(name)))
            gz.write(data + pad(len(data)))
            ino += 1
        name = b"TRAILER!!!\0"
        gz.write(header(0, 0, 1, 0, 0, 0, len(name)) + name + pad(110 + len(name)))
    os.replace(tmp, output)


if __name__ == "__main__":
    main(sys.argv)
