"""Run in a fresh interpreter by the memory part (P6); prints one JSON object.

``memory_child.py BACKEND M N CHUNK``: after the imports and a tiny warm-up,
the kernel's peak resident-set counter is reset (``/proc/self/clear_refs``),
one ``jacrev`` with M outputs and N inputs is taken, and the peak resident
set (``VmHWM``) minus the resident set just before is printed. torch's CPU
allocator returns large blocks to the system, so this is the most the
computation had allocated at once, plus allocator slack. Linux only.
"""

import json
import sys
import warnings

warnings.simplefilter("ignore", FutureWarning)

import adbackends  # noqa: E402
from adbackends.bench import dense_problem  # noqa: E402


def status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(name: str, m: int, n: int, chunk: "int | None") -> dict:
    backend = adbackends.get(name)
    f, x = dense_problem(n, m)
    small_f, small_x = dense_problem(4, 8)
    backend.jacrev(small_f, chunk_size=chunk)(small_x)  # load the code paths first
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current resident set
    before = status("VmRSS")
    jac = backend.jacrev(f, chunk_size=chunk)(x)
    return {
        "peak_bytes": status("VmHWM") - before,
        "result_bytes": jac.numel() * jac.element_size(),
        "shape": list(jac.shape),
    }


if __name__ == "__main__":
    name, m, n, chunk = sys.argv[1:5]
    out = main(name, int(m), int(n), None if chunk == "none" else int(chunk))
    print(json.dumps(out))
