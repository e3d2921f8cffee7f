"""A tiny PVH guest: an ELF that QEMU boots directly and that only says it ran.

It writes one byte to the isa-debug-exit port, which makes QEMU exit with (byte << 1) | 1. The host
probe boots it under KVM to learn whether KVM really executes guest code with this QEMU, rather
than trusting that /dev/kvm answers an ioctl.
"""

from __future__ import annotations

import struct

__all__ = ["tiny_pvh_guest", "DEBUG_EXIT_PORT", "expected_status"]

DEBUG_EXIT_PORT = 0xF4
_LOAD_ADDRESS = 0x100000  # 1 MiB, where PVH kernels are loaded
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def expected_status(value: int) -> int:
    return (value << 1) | 1


def tiny_pvh_guest(value: int = 0x31) -> bytes:
    """An ELF32 with one loadable segment of code and the Xen PVH entry note pointing at it."""
    # mov al, value; out DEBUG_EXIT_PORT, al; hlt; jmp back to hlt
    code = bytes([0xB0, value & 0xFF, 0xE6, DEBUG_EXIT_PORT, 0xF4, 0xEB, 0xFD])
    name = b"Xen\0"
    note = struct.pack("<III", len(name), 4, _XEN_ELFNOTE_PHYS32_ENTRY) + name + struct.pack("<I", _LOAD_ADDRESS)
    ehsize, phentsize, phnum = 52, 32, 2
    code_offset = ehsize + phentsize * phnum
    note_offset = code_offset + len(code)
    note_offset += -note_offset % 4
    ident = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)  # 32-bit, little-endian, version 1
    header = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, _LOAD_ADDRESS, ehsize, 0, 0, ehsize, phentsize, phnum,
                                 40, 0, 0)  # ET_EXEC, EM_386
    load = struct.pack("<IIIIIIII", 1, code_offset, _LOAD_ADDRESS, _LOAD_ADDRESS, len(code), len(code), 5, 0x1000)
    notes = struct.pack("<IIIIIIII", 4, note_offset, 0, 0, len(note), len(note), 4, 4)
    image = header + load + notes + code
    return image + bytes(note_offset - len(image)) + note
