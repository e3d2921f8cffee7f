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


_FILL_QUEUE_BODY = (  # fill_queue's body up to its loop's end, as Linux 6.1 has it
    "\tstruct port_buffer *buf;\n\tint nr_added_bufs;\n\tint ret;\n\n\tnr_added_bufs = 0;\n\tdo {\n"
    "\t\tbuf = alloc_buf(vq->vdev, PAGE_SIZE, 0);\n\t\tif (!buf)\n\t\t\treturn -ENOMEM;\n\n"
    "\t\tspin_lock_irq(lock);\n\t\tret = add_inbuf(vq, buf);\n\t\tif (ret < 0) {\n\t\t\tspin_unlock_irq(lock);\n"
    "\t\t\tfree_buf(buf, true);\n\t\t\treturn ret;\n\t\t}\n\t\tnr_added_bufs++;\n\t\tspin_unlock_irq(lock);\n"
)

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
    Edit(name="virtio-console-fill-queue-max", path="drivers/char/virtio_console.c",
         old="static int fill_queue(struct virtqueue *vq, spinlock_t *lock)\n{\n" + _FILL_QUEUE_BODY
             + "\t} while (ret > 0);\n\n\treturn nr_added_bufs;\n}\n",
         new="static int fill_queue_max(struct virtqueue *vq, spinlock_t *lock, int max)\n{\n" + _FILL_QUEUE_BODY
             + "\t} while (ret > 0 && nr_added_bufs < max);\n\n\treturn nr_added_bufs;\n}\n\n"
             "#define PORT_BUFS 16\n\nstatic int fill_queue(struct virtqueue *vq, spinlock_t *lock)\n{\n\treturn fill_queue_max(vq, lock, INT_MAX);\n}\n",
         reason="fill_queue with a limit on the buffers it adds, for virtio-console-port-buffers; fill_queue itself "
                "(the control queue's, and a port's after a resume) still fills its queue"),
    Edit(name="virtio-console-port-buffers", path="drivers/char/virtio_console.c",
         old="\terr = fill_queue(port->in_vq, &port->inbuf_lock);\n",
         new="\terr = fill_queue_max(port->in_vq, &port->inbuf_lock, PORT_BUFS);\n",
         reason="virtio-console fills every port's receive queue when the port appears: one page for each of the "
                "queue's 128 entries (QEMU's fixed size), 3 MiB for microvmc's six ports, allocated during the boot "
                "and, for the ports only the guest writes to (stdout, stderr, status), never used. Under TCG it is the "
                "boot's most sampled work (allocate_slab and ___slab_alloc, 7 % of the guest's samples). 16 pages a "
                "port (64 KiB in flight, the exec channel's window) cut it to an eighth: PORT_BUFS. A port's buffers "
                "go back into its queue as init reads them, so a host writing faster than 64 KiB ahead waits (QEMU "
                "stops reading its chardev), as it would for a full pipe. The control queue keeps its 128: QEMU "
                "drops a control message it has no buffer for"),
)


def edits_digest(edits: tuple[Edit, ...] = EDITS) -> str:
    blob = json.dumps([[e.name, e.path, e.old, e.new] for e in edits])
    return hashlib.sha256(blob.encode()).hexdigest()


def apply_edit(edit: Edit, text: str) -> str | None:
    """The file's text with the edit made, or None when its text is not there exactly once."""
    if text.count(edit.old) != 1:
        return None
    return text.replace(edit.old, edit.new)
