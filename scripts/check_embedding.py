"""Check embedding files sdkit wrote with diffusers and webui's loader (run where the
reference venv exists: source ../shared/scripts/refenv.sh && $REFPY scripts/check_embedding.py DIR).

DIR holds kohya/myemb.safetensors, diffusers/myemb.safetensors and webui/myemb.pt as the
test `written_files_match_other_tools_files` writes them with SDKIT_EMBEDDING_OUT=DIR:
  1. kohya's file has the single key `emb_params`, string metadata with
     modelspec.architecture `.../textual-inversion`; diffusers' file has one key, the name;
     webui's .pt passes the checks of --webui-pt below.
  2. diffusers' `load_textual_inversion(file, token="myemb")` accepts all three and gives
     the text-encoder output recorded in tests/fixtures/embedding/expected.safetensors.
Prints one line per check and exits non-zero on the first failure.

    scripts/check_embedding.py --webui-pt FILE

loads FILE with torch.load(weights_only=True) (only allow-listed globals, stricter than
webui's own restricted unpickler), then as webui's EmbeddingDatabase.load_from_file
does for a .pt (modules/textual_inversion/textual_inversion.py, restated: one
string_to_param entry, detached to float32, width = last dim, vectors = first dim, step /
sd_checkpoint / sd_checkpoint_name from the dict), and prints one JSON object: the
top-level keys with their Python types, those fields, and the vectors.
"""

import os
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
import gen_embedding_fixtures as ge  # noqa: E402


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def webui_load_pt(path):
    """webui's load_from_file for a .pt / .bin, restated (the embedding's name is the file
    stem; an image embedding or a safetensors file takes other branches)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:
        param_dict = data["string_to_param"]
        param_dict = getattr(param_dict, "_parameters", param_dict)
        assert len(param_dict) == 1, "embedding file has multiple terms in it"
        emb = next(iter(param_dict.items()))[1]
        vec = emb.detach().to(dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif type(data) == dict and type(next(iter(data.values()))) == torch.Tensor:
        assert len(data.keys()) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        if len(emb.shape) == 1:
            emb = emb.unsqueeze(0)
        vec = emb.detach().to(dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise Exception(f"Couldn't identify {path} as neither textual inversion embedding nor diffuser concept.")
    return data, {
        "name": os.path.splitext(os.path.basename(path))[0],
        "step": data.get("step", None),
        "sd_checkpoint": data.get("sd_checkpoint", None),
        "sd_checkpoint_name": data.get("sd_checkpoint_name", None),
        "shape": int(shape),
        "vectors": int(vectors),
        "vec": vec.tolist(),
    }


def webui_pt_report(path):
    data, emb = webui_load_pt(path)
    kinds = lambda d: [[k, type(v).__name__] for k, v in d.items()]
    emb["keys"] = kinds(data)
    emb["string_to_token"] = kinds(data["string_to_token"]) + [["*", data["string_to_token"]["*"]]]
    t = data["string_to_param"]["*"]
    emb["param"] = {"type": type(t).__name__, "dtype": str(t.dtype), "shape": list(t.shape)}
    emb["file_name"] = data.get("name")
    return emb


def main():
    import json

    if sys.argv[1] == "--webui-pt":
        print(json.dumps(webui_pt_report(sys.argv[2])))
        return
    import open_clip.tokenizer as oct

    d = sys.argv[1]
    kohya = os.path.join(d, "kohya", "myemb.safetensors")
    diff = os.path.join(d, "diffusers", "myemb.safetensors")
    with safe_open(kohya, "pt") as f:
        meta, keys = f.metadata() or {}, list(f.keys())
    if keys != ["emb_params"]:
        fail(f"kohya file keys {keys}")
    if not meta.get("modelspec.architecture", "").endswith("/textual-inversion"):
        fail(f"kohya metadata {meta}")
    print("ok: kohya file: emb_params", tuple(load_file(kohya)["emb_params"].shape), meta["modelspec.architecture"])
    if list(load_file(diff).keys()) != ["myemb"]:
        fail("diffusers file keys")
    print("ok: diffusers file: one key `myemb`")
    exp = load_file(os.path.join(HERE, "..", "tests", "fixtures", "embedding", "expected.safetensors"))
    webui = os.path.join(d, "webui", "myemb.pt")
    rep = webui_pt_report(webui)
    want = [["string_to_token", "dict"], ["string_to_param", "dict"], ["name", "str"], ["step", "int"],
            ["sd_checkpoint", "str"], ["sd_checkpoint_name", "str"]]
    if rep["keys"] != want:
        fail(f"webui .pt keys {rep['keys']}")
    if not torch.equal(torch.tensor(rep["vec"]), exp["vectors"]):
        fail("webui .pt: webui's loader gives other vectors")
    print(f"ok: webui .pt: torch.load(weights_only=True), webui's loader: {rep['vectors']} x {rep['shape']}, step {rep['step']}")
    tmp = tempfile.mkdtemp()
    for path in (kohya, diff, webui):
        te, ids = ge.te_with(path, oct.SimpleTokenizer(), tmp)
        if not torch.equal(ids, exp["ids"]):
            fail(f"{path}: token ids differ")
        with torch.no_grad():
            out = ge.encode(te, ids)
        err = ((out - exp["te_out"]).abs().max() / exp["te_out"].abs().max()).item()
        if err > 1e-5:
            fail(f"{path}: text-encoder output differs, rel {err:.2e}")
        print(f"ok: diffusers load_textual_inversion({os.path.basename(os.path.dirname(path))}): output rel err {err:.1e}")


if __name__ == "__main__":
    main()
