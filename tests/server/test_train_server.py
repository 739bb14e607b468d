"""TCD Distill LoRA in a real ComfyUI server over HTTP: training from a folder of captioned images, the loss on
fixed draws falls, Cancel through /interrupt then resume equals an uninterrupted run, the LoRA loads in core
LoraLoader and changes the image, bad inputs give clear errors and the server keeps serving."""
import json
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import comfyhost
from support import graphs

STEPS = 24


def train_graph(lora_name, folder="tcd_train_set", steps=STEPS, prefix="train_srv", **overrides):
    inputs = {
        "model": ["1", 0], "vae": ["1", 2], "clip": ["1", 1], "image_folder": folder, "resolution": 64,
        "steps": steps, "batch_size": 1, "learning_rate": 1e-3, "rank": 4, "alpha": 4.0, "w_min": 7.5,
        "w_max": 7.5, "original_steps": 50, "tcf_order": 1, "ema_decay": 0.95, "loss": "l2", "seed": 0,
        "lora_name": lora_name, "save_every": 4, "resume": True, "validation_every": 8, "validation_draws": 1,
        "validation_steps": 2, "save_dtype": "fp32", "training_dtype": "fp32",
    }
    inputs.update(overrides)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "TCD_DistillLoRA", "inputs": inputs},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 2], "filename_prefix": prefix + "_loss"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 3], "filename_prefix": prefix + "_val"}},
    }


def read_lora(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def dataset(server):
    """Four 64x64 images with captions in the server's input folder (what a user puts there)."""
    folder = server.base / "input" / "tcd_train_set"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (colour, caption) in enumerate([((220, 40, 40), "a red square"), ((40, 200, 60), "a green field"),
                                           ((40, 60, 220), "a blue sky"), ((230, 230, 230), "a white wall")]):
        img = Image.new("RGB", (64, 64), colour)
        for x in range(0, 64, 8):                       # some structure for the VAE to encode
            for y in range(0, 64, 8):
                if (x + y + 8 * i) % 16 == 0:
                    img.putpixel((x, y), (0, 0, 0))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def reference(server, dataset):
    """An uninterrupted run: the loss curve and the LoRA everything else is compared with."""
    result = server.run_prompt(train_graph("srv_ref"), timeout=900)
    return result


def test_training_over_the_api_lowers_the_loss_and_saves_a_lora(server, reference):
    sd, meta = read_lora(server.base / "models" / "loras" / "srv_ref.safetensors")
    losses = json.loads(meta["tcd.losses"])
    validation = json.loads(meta["tcd.validation_losses"])
    print(f"server run: {reference['seconds']:.1f} s for {STEPS} steps")
    print("per-step loss:", [round(v, 4) for v in losses])
    print("loss on the fixed validation draws [step, loss]:", validation)
    assert len(losses) == STEPS and [s for s, _ in validation] == [0, 8, 16, 24]
    assert validation[-1][1] < validation[0][1]
    assert len(reference["images"]) == 1 + 4            # the loss curve + one validation image per point
    assert not list((server.base / "models" / "loras").glob("*.tmp"))
    listed = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert "srv_ref.safetensors" in listed              # the loaders list it at once


def test_cancel_via_interrupt_then_resume_gives_the_uninterrupted_result(server, reference):
    state = server.base / "output" / "tcd_train" / "srv_cut.state.pt"
    pid = server.queue(train_graph("srv_cut"))
    t0 = time.time()
    while not state.exists():                         # the first periodic checkpoint (step 4) is on disk
        assert time.time() - t0 < 600, "training never reached its first checkpoint"
        time.sleep(0.05)
    server.interrupt()
    entry = server.wait(pid, timeout=600)
    assert entry["status"]["status_str"] != "success"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    cut_at = torch.load(state, weights_only=True)["step"]
    print("cancelled after step", cut_at)
    assert 4 <= cut_at < STEPS

    server.run_prompt(train_graph("srv_cut"), timeout=900)      # same graph, resume on
    ref, ref_meta = read_lora(server.base / "models" / "loras" / "srv_ref.safetensors")
    cut, cut_meta = read_lora(server.base / "models" / "loras" / "srv_cut.safetensors")
    assert json.loads(cut_meta["tcd.losses"]) == json.loads(ref_meta["tcd.losses"])
    assert json.loads(cut_meta["tcd.validation_losses"]) == json.loads(ref_meta["tcd.validation_losses"])
    worst = max(float((cut[k] - ref[k]).abs().max()) for k in ref)
    print("resumed vs uninterrupted: max |dLoRA| =", worst)
    assert set(cut) == set(ref) and worst <= 1e-6


def test_trained_lora_changes_the_image_in_core_loraloader(server, reference):
    base = server.run_prompt(graphs.txt2img(seed=11, prefix="base_for_lora"))["images"][0]
    g = graphs.txt2img(seed=11, prefix="with_lora")
    g["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                      "lora_name": "srv_ref.safetensors", "strength_model": 1.0,
                                                      "strength_clip": 1.0}}
    g["5"]["inputs"]["model"] = ["20", 0]
    with_lora = server.run_prompt(g)["images"][0]
    assert with_lora != base
    assert "lora key not loaded" not in server.log_tail(20000)


def test_bad_inputs_give_clear_errors_and_the_server_keeps_serving(server, dataset):
    with pytest.raises(comfyhost.PromptRejected) as rejected:
        server.queue(train_graph("bad", steps=0))
    assert "steps" in json.dumps(rejected.value.body)

    with pytest.raises(comfyhost.PromptFailed) as failed:
        server.run_prompt(train_graph("bad", folder="no_such_folder"))
    assert "does not exist" in failed.value.error["exception_message"]

    uncaptioned = server.base / "input" / "uncaptioned"
    uncaptioned.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (10, 10, 10)).save(uncaptioned / "lonely.png")
    with pytest.raises(comfyhost.PromptFailed) as failed:
        server.run_prompt(train_graph("bad", folder="uncaptioned"))
    assert "no caption file" in failed.value.error["exception_message"]
    assert "lonely.png" in failed.value.error["exception_message"]

    (uncaptioned / "lonely.txt").write_text("a dark square")
    (uncaptioned / "broken.png").write_bytes(b"\x89PNG broken")
    (uncaptioned / "broken.txt").write_text("broken")
    with pytest.raises(comfyhost.PromptFailed) as failed:
        server.run_prompt(train_graph("bad", folder="uncaptioned"))
    assert "cannot read training image 'broken.png'" in failed.value.error["exception_message"]

    assert not (server.base / "models" / "loras" / "bad.safetensors").exists()
    assert server.run_prompt(graphs.txt2img(seed=5, prefix="still_serving"))["images"]
