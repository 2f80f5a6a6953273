#!/usr/bin/env python3
"""Bytes of the distinct regular files (by inode) a workload opened or
executed, from `strace -f -y -e trace=open,openat,execve,chroot` of
`chroot TREE CMD`: opened-bytes.py TREE STRACE_LOG [ORDER_OUT].
With ORDER_OUT, also writes those files' paths in the tree, first open
first, one per line: a recorded start for `shoal convert --order` (as
`ctr-remote image optimize` records one for stargz)."""
import os, re, struct, sys
tree, log = sys.argv[1], sys.argv[2]
def inside(p):  # p resolved in the tree: absolute symlinks stay inside it
    parts, cur = os.path.normpath("/" + p).strip("/").split("/"), ""
    for k, c in enumerate(parts):
        if os.path.islink(tree + cur + "/" + c):
            t = os.readlink(tree + cur + "/" + c)
            return inside((t if t.startswith("/") else cur + "/" + t) + "/" + "/".join(parts[k + 1:]))
        cur += "/" + c
    return tree + cur
def interp(p):  # an ELF executable's PT_INTERP (the kernel opens it on exec)
    with open(p, "rb") as f:
        h = f.read(64)
        if h[:4] != b"\x7fELF": return None
        (off,), (size, n) = struct.unpack_from("<Q", h, 32), struct.unpack_from("<HH", h, 54)
        for k in range(n):
            f.seek(off + k * size); ph = f.read(size)
            if struct.unpack_from("<I", ph)[0] == 3:
                f.seek(struct.unpack_from("<Q", ph, 8)[0])
                return f.read(struct.unpack_from("<Q", ph, 32)[0]).rstrip(b"\0").decode()
inside_chroot, paths = False, []
for line in open(log, errors="replace"):
    line = line.rstrip()
    if not inside_chroot:  # before chroot(): the host's chroot binary and its libraries
        inside_chroot = re.search(r'chroot\(.*\) += 0$', line) is not None
        continue
    if m := re.search(r'= \d+<(.+)>$', line):
        paths.append(m.group(1))
    elif m := re.search(r'execve\("([^"]+)".* = 0$', line):
        paths.append(inside(m.group(1)))
        if i := interp(paths[-1]):
            paths.append(inside(i))
seen, total, order = set(), 0, []
for p in paths:
    if p.startswith(tree + "/") and not p.startswith((tree + "/proc/", tree + "/dev/")) and os.path.isfile(p):
        st = os.stat(p)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino)); total += st.st_size
            order.append(p[len(tree):])
if len(sys.argv) > 3:
    with open(sys.argv[3], "w") as f:
        f.writelines(p + "\n" for p in order)
print(total)
