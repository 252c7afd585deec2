# --- seccomp.py: fewer system calls for the program, then exec it -----------------------------
# Run as `python3 -I -S seccomp.py PROGRAM ARGS...` after setpriv's no_new_privs: installs a
# seccomp filter (kept across execve, irremovable) that refuses with EPERM what a program has
# no business calling and what widens the kernel's attack surface, then execs PROGRAM:
# namespaces (unshare, setns, clone with a CLONE_NEW* flag), mounts, ptrace and
# process_vm_*, keyrings, bpf, userfaultfd, perf_event_open, io_uring, module and kexec
# loading, swap, reboot, acct, handle-based opens. clone3 gets ENOSYS (its flags live in
# memory a filter cannot read), so libc falls back to clone, whose flags it can. A system
# call of another ABI (i386 or x32 on x86_64) is refused whole.
import ctypes
import os
import platform
import struct
import sys

EPERM, ENOSYS = 1, 38
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
NAMESPACE_FLAGS = 0x7E020080  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
DENIED = {  # name: (x86_64, aarch64)
    "ptrace": (101, 117),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "acct": (163, 89),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "kexec_load": (246, 104),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "keyctl": (250, 219),
    "unshare": (272, 97),
    "setns": (308, 268),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "bpf": (321, 280),
    "userfaultfd": (323, 282),
    "perf_event_open": (298, 241),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
}
ARCHES = {"x86_64": (0xC000003E, 0, 56, 435), "aarch64": (0xC00000B7, 1, 220, 435)}
# BPF: ld word, jeq, jset, ret
LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06


def filter_program(machine):
    arch, column, clone, clone3 = ARCHES[machine]
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, ERRNO | EPERM), (LD, 0, 0, 0)]
    if machine == "x86_64":  # x32 system calls carry bit 30
        prog += [(0x35, 0, 1, 0x40000000), (RET, 0, 0, ERRNO | EPERM)]  # jge
    for numbers in DENIED.values():
        prog += [(JEQ, 0, 1, numbers[column]), (RET, 0, 0, ERRNO | EPERM)]
    prog += [(JEQ, 0, 1, clone3), (RET, 0, 0, ERRNO | ENOSYS)]
    prog += [(JEQ, 0, 4, clone), (LD, 0, 0, 16), (JSET, 0, 1, NAMESPACE_FLAGS)]
    prog += [(RET, 0, 0, ERRNO | EPERM), (RET, 0, 0, ALLOW)]
    prog += [(RET, 0, 0, ALLOW)]
    return prog


def install(machine):
    prog = filter_program(machine)
    raw = b"".join(struct.pack("=HBBI", *op) for op in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


def main():
    machine = platform.machine()
    if machine in ARCHES:
        install(machine)
    elif os.environ.get("AHA_SECCOMP") == "required":
        sys.exit(f"seccomp.py: no filter for {machine}")
    os.execvp(sys.argv[1], sys.argv[1:])


main()
