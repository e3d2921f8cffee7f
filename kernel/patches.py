"""Edits microvmc makes to the Linux source of its own kernel, as data: each an exact piece of text
replaced in one file, with the reason and what it was measured to save. They are few on purpose:
the fragment (kernel/requirements.py) does what configuration can; an edit is only for work no option
and no parameter can skip.

An edit must find its text exactly once, or the build stops naming the edit and the file (a source
of another version, where the text moved or changed): a kernel is never built half-edited. The edits'
digest is part of the own kernel's key (compiler/kernels.py), so changing one rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

__all__ = ["Edit", "EDITS", "edits_digest", "apply_edit"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Edit:
    name: str
    path: str  # in the source tree
    old: str  # the exact text, found once
    new: str
    reason: str


EDITS: tuple[Edit, ...] = (
    Edit(name="x86-initmem-unpoisoned", path="arch/x86/mm/init.c",
         old="\t\tfree_reserved_area((void *)begin, (void *)end,\n\t\t\t\t   POISON_FREE_INITMEM, what);\n",
         new="\t\tfree_reserved_area((void *)begin, (void *)end,\n\t\t\t\t   -1, what);\n",
         reason="x86's free_init_pages fills the freed init memory with 0xcc before giving it to the page "
                "allocator. Under TCG the stores into .init.text, whose pages QEMU has translated code from, each "
                "take QEMU's self-modifying-code path until the page's last translated block is invalidated: "
                "the boot's second most sampled function (free_reserved_area, 5 % of the guest's samples), "
                "-0.013 to -0.039 s wall and -0.014 to -0.037 s CPU paired per boot (bench/boot_ab.py, three runs of "
                "20 and 30 rounds). No option or "
                "parameter skips it (only debug_pagealloc=on, which costs on every allocation). What the "
                "poison caught is kept: free_init_pages has already made the range non-executable, so a call "
                "into freed init code still faults; only a read of freed init data goes unnoticed"),
)


def edits_digest(edits: tuple[Edit, ...] = EDITS) -> str:
    blob = json.dumps([[e.name, e.path, e.old, e.new] for e in edits])
    return hashlib.sha256(blob.encode()).hexdigest()


def apply_edit(edit: Edit, text: str) -> str | None:
    """The file's text with the edit made, or None when its text is not there exactly once."""
    if text.count(edit.old) != 1:
        return None
    return text.replace(edit.old, edit.new)
