"""A small seccomp filter for local sandboxes (handed to bwrap with ``--seccomp FD``).

Without a user namespace the sandbox runs as real uid 0 with no capabilities; two
kernel interfaces still reach beyond it, and the filter closes them:

- kernel keyrings (``add_key``, ``request_key``, ``keyctl``): not namespaced, so the
  sandbox would share root's keyring with the host and every other sandbox -> EPERM;
- new user namespaces (``unshare`` or ``clone`` with ``CLONE_NEWUSER``), which would
  hand back every capability inside them -> EPERM; ``clone3`` (whose flags a classic
  filter cannot read) -> ENOSYS, so libc falls back to ``clone``.

Both x86_64 and i386 system calls are covered (an x86_64 process can make i386 ones
with ``int 0x80``); x32 system calls are refused. Other architectures get no filter
(:func:`filter_program` returns None). The program is classic BPF, assembled here.
"""

from __future__ import annotations

import functools
import platform
import struct

_LD_W_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_RET = 0x06

_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_EPERM = 1
_ENOSYS = 38
_CLONE_NEWUSER = 0x10000000
_X32_BIT = 0x40000000

_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_I386 = 0x40000003
# (add_key, request_key, keyctl), unshare, clone, clone3
_X86_64 = ((248, 249, 250), 272, 56, 435)
_I386 = ((286, 287, 288), 310, 120, 435)

_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16

_Insn = tuple[int, int | str, int | str, int]  # code, jt, jf (label or 0), k


def _arch_block(prefix: str, numbers: tuple[tuple[int, ...], int, int, int]) -> list[_Insn]:
    keyrings, unshare, clone, clone3 = numbers
    block: list[_Insn] = [(_LD_W_ABS, 0, 0, _OFF_NR)]
    if prefix == "x64":
        block.append((_JGE, "eperm", 0, _X32_BIT))
    block += [(_JEQ, "eperm", 0, nr) for nr in keyrings]
    block += [
        (_JEQ, "enosys", 0, clone3),
        (_JEQ, "flags", 0, unshare),
        (_JEQ, "flags", 0, clone),
        (_RET, 0, 0, _ALLOW),
    ]
    return block


def _assemble(program: list[tuple[str | None, _Insn]]) -> bytes:
    """Resolve label jumps (forward only, as BPF requires) and pack ``sock_filter``s."""
    labels = {label: i for i, (label, _) in enumerate(program) if label}
    out = bytearray()
    for i, (_, (code, jt, jf, k)) in enumerate(program):
        offsets = []
        for target in (jt, jf):
            offset = labels[target] - i - 1 if isinstance(target, str) else target
            if not 0 <= offset <= 255:
                raise ValueError(f"seccomp jump out of range at {i}")
            offsets.append(offset)
        out += struct.pack("<HBBI", code, offsets[0], offsets[1], k)
    return bytes(out)


@functools.cache
def filter_program() -> bytes | None:
    """The BPF program (``struct sock_filter[]`` bytes), or None off x86_64."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    program: list[tuple[str | None, _Insn]] = [
        (None, (_LD_W_ABS, 0, 0, _OFF_ARCH)),
        (None, (_JEQ, "x64", 0, _AUDIT_ARCH_X86_64)),
        (None, (_JEQ, "i386", "allow", _AUDIT_ARCH_I386)),
    ]
    for prefix, numbers in (("x64", _X86_64), ("i386", _I386)):
        block = _arch_block(prefix, numbers)
        program.append((prefix, block[0]))
        program += [(None, insn) for insn in block[1:]]
    program += [
        ("flags", (_LD_W_ABS, 0, 0, _OFF_ARG0)),  # low 32 bits of the flags argument
        (None, (_JSET, "eperm", "allow", _CLONE_NEWUSER)),
        ("allow", (_RET, 0, 0, _ALLOW)),
        ("eperm", (_RET, 0, 0, _ERRNO | _EPERM)),
        ("enosys", (_RET, 0, 0, _ERRNO | _ENOSYS)),
    ]
    return _assemble(program)
