"""Loads a .pt that sdkit wrote the way torch and webui load it, and prints what it holds.

    python scripts/check_torch_pt.py FILE [--hypernetwork]

torch.load(FILE, weights_only=True) must accept it (only allow-listed globals). The
output is one JSON object: the value tree with tensors as {"tensor": dtype, "shape",
"sum"}, dict keys as "int:768" / "str:name". With --hypernetwork, every (k, v) pair is
also loaded into webui's HypernetworkModule (tests/fixtures/gen_hypernetwork_fixtures.py)
with strict load_state_dict, built from the file's own layer_structure, activation_func,
is_layer_norm, activate_output and dropout_structure as webui's Hypernetwork.load does,
and each module's output on a fixed input is printed ("outputs": {width: [k_sum, v_sum]}).
"""

import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))


def describe(v):
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).replace("torch.", ""), "shape": list(v.shape),
                "sum": float(v.double().sum())}
    if isinstance(v, collections.OrderedDict):
        return {"ordered_dict": [[key(k), describe(x)] for k, x in v.items()]}
    if isinstance(v, dict):
        return {"dict": [[key(k), describe(x)] for k, x in v.items()]}
    if isinstance(v, tuple):
        return {"tuple": [describe(x) for x in v]}
    if isinstance(v, list):
        return {"list": [describe(x) for x in v]}
    if isinstance(v, bool):
        return {"bool": v}
    if isinstance(v, int):
        return {"int": v}
    if isinstance(v, float):
        return {"float": v}
    if isinstance(v, str):
        return {"str": v}
    if v is None:
        return {"none": None}
    raise SystemExit(f"unexpected {type(v)}")


def key(k):
    return f"int:{k}" if isinstance(k, int) else f"str:{k}"


def webui_outputs(d):
    from gen_hypernetwork_fixtures import HnModule

    out = {}
    for size, (k, v) in ((s, p) for s, p in d.items() if isinstance(s, int)):
        sums = []
        for sd in (k, v):
            m = HnModule(size, d["layer_structure"], d["activation_func"], d["is_layer_norm"],
                         d["activate_output"], d["dropout_structure"]).eval()
            m.load_state_dict(sd, strict=True)
            x = torch.linspace(-1, 1, 3 * size).reshape(1, 3, size)
            with torch.no_grad():
                sums.append(float(m(x).double().sum()))
        out[str(size)] = sums
    return out


def main():
    path = sys.argv[1]
    d = torch.load(path, weights_only=True)
    res = {"value": describe(d)}
    if "--hypernetwork" in sys.argv:
        res["outputs"] = webui_outputs(d)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
