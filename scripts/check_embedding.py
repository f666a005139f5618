"""Check embedding files sdkit wrote with diffusers (run where the reference venv exists:
source ../shared/scripts/refenv.sh && $REFPY scripts/check_embedding.py DIR).

DIR holds kohya/myemb.safetensors and diffusers/myemb.safetensors as the test
`written_files_match_other_tools_files` writes them with SDKIT_EMBEDDING_OUT=DIR:
  1. kohya's file has the single key `emb_params`, string metadata with
     modelspec.architecture `.../textual-inversion`; diffusers' file has one key, the name.
  2. diffusers' `load_textual_inversion(file, token="myemb")` accepts both and gives the
     text-encoder output recorded in tests/fixtures/embedding/expected.safetensors.
Prints one line per check and exits non-zero on the first failure.
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


def main():
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
    tmp = tempfile.mkdtemp()
    for path in (kohya, diff):
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
