#!/usr/bin/env python3
"""Writes the tiny fixture's golden UNet call (inputs, timestep, diffusers'
f32 output) as the two files `worker bench --unet-io` and
`diffusers_reference.py --compare` read:  tiny_unet_io.py OUT_DIR
Standard library only (the GPU machine's Python may lack safetensors' numpy side)."""
import json
import os
import struct
import sys

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "sdxl-reference", "golden.safetensors")
INPUTS = {
    "unet_in_sample": "sample",
    "unet_in_encoder_hidden_states": "encoder_hidden_states",
    "unet_in_text_embeds": "text_embeds",
    "unet_in_time_ids": "time_ids",
}


def read(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]]) for k, v in header.items()}


def write(path, tensors):
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main(out_dir):
    golden = read(FIXTURE)
    timestep = json.load(open(FIXTURE.replace(".safetensors", ".json")))["unet_timestep"]
    os.makedirs(out_dir, exist_ok=True)
    io = {new: golden[old] for old, new in INPUTS.items()}
    io["timestep"] = ("F32", [1], struct.pack("<f", timestep))
    write(os.path.join(out_dir, "unet-io.safetensors"), io)
    write(os.path.join(out_dir, "unet-io.diffusers.safetensors"), {"unet_out": golden["unet_out"]})


if __name__ == "__main__":
    main(sys.argv[1])
