#!/usr/bin/env python3
"""Write fixtures/torch-save/*.pt: `torch.save` archives as users make them for
`image_embeds` parts (vLLM's "Multimodal Inputs" embeddings snippets), made
once here by the real torch so the tests that send them need no torch (PyPI's
Linux torch is the CUDA build, 5.5 GB with its nvidia-* wheels).

    python3 scripts/make_torch_save_fixtures.py   # needs torch, numpy, safetensors

The tensors are qwen2-vl-tiny's reference image embeddings (`one_image.item0.embeds`
of fixtures/qwen2-vl-tiny/reference.safetensors) and its grid, in the forms the
server accepts, plus the files it must refuse with a 400.
"""

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "torch-save"


class Evil:
    """A pickle that calls os.system when unpickled: the server must not run it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def saved(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def main() -> None:
    ref = load_file(str(ROOT / "fixtures" / "qwen2-vl-tiny" / "reference.safetensors"))
    embeds = ref["one_image.item0.embeds"].to(torch.float32).contiguous()
    grid = torch.tensor([[1, 6, 8]])
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (64 << 20))
    files = {
        "embeds": saved(embeds),
        "grid": saved(grid),
        # The same values in a column-major view, and in half precision.
        "strided": saved(embeds.t().contiguous().t()),
        "f16": saved(embeds.half()),
        # Pickle protocol 4 (FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL), a saved dict.
        "p4": saved({"image_embeds": embeds, "image_grid_thw": grid}, pickle_protocol=4),
        "ints": saved(torch.zeros(embeds.shape, dtype=torch.int32)),
        "narrow": saved(torch.zeros(embeds.shape[0], 8)),
        "evil": saved(Evil()),
        "legacy": saved(embeds, _use_new_zipfile_serialization=False),
        # A deflated archive whose data.pkl inflates to 64 MiB.
        "bomb": bomb.getvalue(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (OUT / f"{name}.pt").write_bytes(data)
    meta = {"generated_by": "scripts/make_torch_save_fixtures.py", "torch": torch.__version__,
            "python": sys.version.split()[0], "embeds_shape": list(embeds.shape)}
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{len(files)} files in {OUT.relative_to(ROOT)} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
