"""Run in a fresh interpreter by the cold-start part (P4); prints one JSON value.

``cold_child.py own``: adbackends' own share of a cold start, in seconds:
importing it, selecting the backend with its probes and making a transform,
after torch has done its own first-use work (one torch.func jacrev and vmap).

``cold_child.py stages adbackends|torch.func``: seconds spent importing torch,
importing the transforms, selecting, and in the first and second jacrev.
"""

import json
import sys
import time


def own() -> float:
    import torch
    import torch.func

    torch.func.jacrev(torch.sin)(torch.ones(3))
    torch.func.vmap(torch.sin)(torch.ones(2, 3))
    start = time.perf_counter()
    import adbackends

    adbackends.current()
    adbackends.jacrev(torch.sin)
    return time.perf_counter() - start


def stages(which: str) -> dict:
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    if which == "adbackends":
        import adbackends

        t2 = time.perf_counter()
        adbackends.current()
        jacrev = adbackends.jacrev
    else:
        import torch.func

        t2 = time.perf_counter()
        jacrev = torch.func.jacrev
    t3 = time.perf_counter()
    jacrev(torch.sin)(torch.ones(3))
    t4 = time.perf_counter()
    jacrev(torch.sin)(torch.ones(3))
    t5 = time.perf_counter()
    return {
        "import torch": t1 - t0,
        "import": t2 - t1,
        "selection and probes": t3 - t2,
        "first jacrev": t4 - t3,
        "second jacrev": t5 - t4,
    }


if __name__ == "__main__":
    print(json.dumps(own() if sys.argv[1] == "own" else stages(sys.argv[2])))
