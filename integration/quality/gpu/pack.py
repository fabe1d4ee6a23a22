"""Packs what the GPU run (integration/quality/gpu/README.md) needs into one folder of at most
the device tool's 64 MiB: a truncated copy of the SmolLM2 GGUF, xz-compressed.

    build/python-venv/bin/python integration/quality/gpu/pack.py --layers 27 --out DIR

The full model does not fit: its 30 blocks are 66.4 MB of Q4_1 data and its token embedding
30.1 MB of Q8_0 (98.4 MB in all; xz saves ~7% of quantized data). The copy keeps every metadata
key (tokenizer included) except block_count, the first --layers blocks byte for byte, the final
norm, and the token embedding with every row zeroed except the tokens of --keep-tokens (a
.json list; zero rows compress to almost nothing). CPU and GPU then run the *same* truncated
model, so their selections and outputs can be compared exactly; its answers are not SmolLM2's.
"""

from __future__ import annotations

import argparse
import json
import lzma
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def truncate(src: pathlib.Path, dst: pathlib.Path, layers: int, keep: set[int]) -> dict:
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(str(src))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    block_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    total = reader.get_field(block_key).contents()
    if not 1 <= layers <= total:
        raise ValueError(f"--layers must be in [1, {total}], got {layers}")
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == block_key else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    kept = []
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        data = t.data
        if t.name == "token_embd.weight":
            data = np.zeros_like(data)
            rows = sorted(i for i in keep if 0 <= i < data.shape[0])
            data[rows] = t.data[rows]
        kept.append((t, data))
    for t, data in kept:
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in kept:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return {"layers": layers, "of": int(total), "tensors": len(kept),
            "embedding_rows_kept": len(keep)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=27, help="blocks kept; default: 27")
    p.add_argument("--keep-tokens", default="",
                   help="JSON list of token ids whose embedding rows are kept; default: none")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    import smollm
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep = set(json.loads(pathlib.Path(args.keep_tokens).read_text())) if args.keep_tokens else set()
    raw = out / f"smollm2-{args.layers}l.gguf"
    info = truncate(smollm.gguf_path(), raw, args.layers, keep)
    with open(raw, "rb") as f, lzma.open(str(raw) + ".xz", "wb", preset=1) as g:
        while chunk := f.read(1 << 22):
            g.write(chunk)
    info["bytes"] = raw.stat().st_size
    info["xz_bytes"] = pathlib.Path(str(raw) + ".xz").stat().st_size
    (out / "pack.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"[pack] {info}", flush=True)


if __name__ == "__main__":
    main()
