"""Every API-format example workflow validates against the live server's /object_info and runs headless on the
tiny models (model file names, sizes and training length substituted); its images come back."""
import io

import pytest
from PIL import Image

from support import workflows

API = workflows.api_workflows()


def combo_options(spec):
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0] if isinstance(spec[0], list) else None


def test_there_are_workflows_for_every_use_case():
    expected = {"sd15_tcd_lora_txt2img", "sdxl_tcd_custom_advanced", "gamma_comparison", "img2img", "inpainting",
                "hypersd_1step", "distill_tcd_lora", "train_then_sample", "sd3_tcd_txt2img", "flux_tcd_txt2img"}
    assert expected <= set(API), expected - set(API)
    assert set(API) == set(workflows.ui_workflows()), "each API workflow has its UI twin and vice versa"
    for name in API:
        assert (workflows.WORKFLOWS / f"{name}.jpg").is_file(), f"{name}: no thumbnail"


@pytest.mark.parametrize("name", sorted(API))
def test_workflow_validates_against_object_info(server, name):
    info = server.get("/object_info")
    for node_id, node in API[name].items():
        assert node["class_type"] in info, f"{name} #{node_id}: unknown node {node['class_type']}"
        spec = info[node["class_type"]]["input"]
        for key in spec.get("required", {}):
            assert key in node["inputs"], f"{name} #{node_id} {node['class_type']}: missing input {key}"
        for key, value in node["inputs"].items():
            declared = {**spec.get("required", {}), **spec.get("optional", {})}.get(key)
            assert declared is not None, f"{name} #{node_id}: {node['class_type']} has no input {key}"
            options = combo_options(declared)
            if options is not None and not isinstance(value, list) and key not in workflows.MODEL_KEYS \
                    and key != "image":
                assert value in options, f"{name} #{node_id} {key}={value!r} not in {options[:10]}"


def lora_names(api):
    """The LoRAs a workflow loads (a distill node's lora_name is the file it writes, not one to provide)."""
    return {n["inputs"]["lora_name"] for n in api.values()
            if "lora_name" in n["inputs"] and n["class_type"] != "TCD_DistillLoRA"}


@pytest.fixture(scope="module")
def tiny_inputs(server, tiny_flow_models):
    from support import flow_lora_files, lora_files
    lora = lora_files.write_tiny_sd15_lora(server.base / "models" / "loras" / "tiny_tcd_lora.safetensors")
    # the flow workflows' LoRAs (Hyper-SD3 / Hyper-FLUX), written for the tiny models under the workflows' own
    # names so the loader reads the family from them as it would from the real files
    for name, kind in workflows.FLOW_KIND.items():
        unet = tiny_flow_models["sd3_unet" if kind == "sd3" else "flux_unet"]
        for lora_name in lora_names(API[name]):
            flow_lora_files.write_tiny_lora(kind, unet, server.base / "models" / "loras" / lora_name,
                                            naming="ldm" if kind == "sd3" else "diffusers")
    img = Image.new("RGBA", (64, 64), (120, 90, 60, 255))
    for x in range(32, 64):        # alpha 0 on the right half: LoadImage turns it into the inpainting mask
        for y in range(64):
            img.putpixel((x, y), (120, 90, 60, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    server.upload_image("example.png", buf.getvalue())
    dataset = server.base / "input" / "tcd_train"      # the trainer workflows' captioned image folder
    dataset.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(("a red square", "a blue circle")):
        Image.new("RGB", (64, 64), (40 * i + 60, 90, 200 - 60 * i)).save(dataset / f"img{i}.png")
        (dataset / f"img{i}.txt").write_text(caption)
    return {"lora": lora.name}


@pytest.mark.parametrize("name", sorted(API))
def test_workflow_runs_headless_on_tiny_models(server, tiny_inputs, name):
    graph = workflows.for_tiny_models(API[name], lora=tiny_inputs["lora"], kind=workflows.FLOW_KIND.get(name, "sd15"))
    result = server.run_prompt(graph, timeout=600)
    assert result["images"], f"{name}: no image came back"
    for png in result["images"]:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"{name}: {result['seconds']:.2f}s headless on the tiny model")
