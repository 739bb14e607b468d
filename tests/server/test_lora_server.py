"""TCD LoRA Loader in a real ComfyUI server over HTTP: a diffusers-format LoRA applies; every kind of bad file gives
a node error with a clear message, leaves nothing behind, and the next prompt still runs."""
import io
import struct

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import comfyhost
from support import graphs, lora_files

RANK = 4


def lora_graph(lora_name, strength=1.0, seed=7, prefix="lora_srv", on_unmatched="error"):
    g = graphs.txt2img(steps=1, seed=seed, prefix=prefix)
    g["20"] = {"class_type": "TCD_LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": strength,
        "strength_clip": strength, "on_unmatched": on_unmatched}}
    g["5"]["inputs"]["model"] = ["20", 0]
    g["2"]["inputs"]["clip"] = ["20", 1]
    g["3"]["inputs"]["clip"] = ["20", 1]
    return g


@pytest.fixture(scope="module")
def shapes(tiny_ckpt):
    return lora_files.tiny_sd15_shapes(tiny_ckpt)


def diffusers_lora(shapes, context=None):
    return lora_files.tiny_sd15_diffusers_lora(shapes, rank=RANK, context=context)


@pytest.fixture(scope="module")
def loras(server, shapes):
    d = server.base / "models" / "loras"
    save_file(diffusers_lora(shapes), str(d / "good_diffusers.safetensors"))
    yield d
    for p in d.iterdir():   # the server is shared with other test modules: take this module's files away
        if p.name.startswith(("bad_", "good_diffusers")):
            p.unlink()
    (server.base / "models" / "escape.safetensors").unlink(missing_ok=True)


def pixels(png):
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def snapshot(server):
    return ({p.name for p in (server.base / "models" / "loras").iterdir()},
            {p.name for p in (server.base / "output").rglob("*") if p.is_file()})


def test_node_is_listed_with_tooltips_and_the_loras_folder(server, loras):
    info = server.get("/object_info/TCD_LoraLoader")["TCD_LoraLoader"]
    assert info["category"] == "loaders" and info["display_name"] == "TCD LoRA Loader"
    assert info["output"] == ["MODEL", "CLIP", "STRING", "FEW_STEP_FAMILY"]
    req = info["input"]["required"]
    assert "good_diffusers.safetensors" in req["lora_name"][0]
    for spec in list(req.values()) + list(info["input"]["optional"].values()):
        assert spec[1]["tooltip"]


def test_diffusers_lora_changes_the_image_and_strength_zero_does_not(server, loras):
    base = server.run_prompt(graphs.txt2img(steps=1, seed=7, prefix="lora_base"))["images"][0]
    with_lora = server.run_prompt(lora_graph("good_diffusers.safetensors"))["images"][0]
    zero = server.run_prompt(lora_graph("good_diffusers.safetensors", strength=0.0, prefix="lora_zero"))["images"][0]
    assert pixels(with_lora) != pixels(base)
    assert pixels(zero) == pixels(base)


def _bad_files(loras, shapes):
    good = (loras / "good_diffusers.safetensors").read_bytes()
    (loras / "bad_empty.safetensors").write_bytes(b"")
    (loras / "bad_truncated.safetensors").write_bytes(good[: len(good) // 2])
    (loras / "bad_header.safetensors").write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(1)}, loras / "bad_pickle.ckpt")
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(1)}, loras / "bad_pickle_renamed.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(loras / "bad_checkpoint.safetensors"))
    save_file(diffusers_lora(shapes, context=2048), str(loras / "bad_sdxl.safetensors"))
    unmatched = diffusers_lora(shapes)
    unmatched["unet.down_blocks.3.resnets.0.conv1.lora.down.weight"] = torch.zeros(RANK, 320, 3, 3)
    unmatched["unet.down_blocks.3.resnets.0.conv1.lora.up.weight"] = torch.zeros(320, RANK, 1, 1)
    save_file(unmatched, str(loras / "bad_unmatched.safetensors"))
    return {
        "bad_empty.safetensors": ["empty (0 bytes)", "get the file again"],
        "bad_truncated.safetensors": ["truncated", "get the file again"],
        "bad_header.safetensors": ["corrupt", "not valid JSON"],
        "bad_pickle.ckpt": ["pickle-based", "Only .safetensors", "arbitrary code"],
        "bad_pickle_renamed.safetensors": ["pickle/zip", "arbitrary code"],
        "bad_checkpoint.safetensors": ["is not a LoRA", "full checkpoint", "Allowed:"],
        "bad_sdxl.safetensors": ["is for SDXL", "context 2048", "model is SD1.x", "Load an SDXL checkpoint"],
        "bad_unmatched.safetensors": ["1 of 8 layers", "down_blocks_3_resnets_0_conv1", "'warn'"],
    }


def test_bad_files_fail_with_clear_messages_leave_nothing_and_server_goes_on(server, loras, shapes):
    cases = _bad_files(loras, shapes)
    for i, (name, expected) in enumerate(cases.items()):
        before = snapshot(server)
        with pytest.raises(comfyhost.PromptFailed) as err:
            server.run_prompt(lora_graph(name, seed=100 + i, prefix=f"bad_{i}"))
        assert err.value.error.get("node_type") == "TCD_LoraLoader"
        message = err.value.error.get("exception_message", "")
        assert name in message, message
        for text in expected:
            assert text in message, (name, text, message)
        assert snapshot(server) == before       # no partial or temporary file in loras/ or output/
    out = server.run_prompt(lora_graph("good_diffusers.safetensors", seed=200, prefix="after_bad"))
    assert out["images"] and server.alive()


def test_unmatched_warn_runs(server, loras, shapes):
    if not (loras / "bad_unmatched.safetensors").exists():
        _bad_files(loras, shapes)
    out = server.run_prompt(lora_graph("bad_unmatched.safetensors", on_unmatched="warn", prefix="warn"))
    assert out["images"]
    assert "down_blocks_3_resnets_0_conv1" in server.log_tail(20000)


@pytest.mark.parametrize("name", ["../escape.safetensors", "/etc/passwd"])
def test_names_outside_the_loras_folder_are_rejected(server, loras, name):
    (server.base / "models" / "escape.safetensors").write_bytes(b"")
    with pytest.raises(comfyhost.PromptRejected) as err:
        server.queue(lora_graph(name))
    assert "lora_name" in str(err.value.body)           # ComfyUI's own list check refuses it before the node runs
    assert server.run_prompt(lora_graph("good_diffusers.safetensors", seed=300, prefix="after_escape"))["images"]
