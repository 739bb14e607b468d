"""The pack in a real ComfyUI server, spoken to over HTTP like a headless API user would."""
import copy
import io

import pytest
from PIL import Image

import comfyhost
from support import graphs


def combo_options(spec):
    """V1 combos are [[options], {...}], V3 combos ["COMBO", {"options": [...]}] in /object_info."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_object_info_lists_nodes_and_tcd_names(server):
    info = server.get("/object_info")
    assert {"TCD_Sampler", "TCD_Scheduler"} <= set(info)
    ks = info["KSampler"]["input"]["required"]
    assert "tcd" in combo_options(ks["sampler_name"]) and "tcd" in combo_options(ks["scheduler"])
    assert "tcd" in combo_options(info["KSamplerSelect"]["input"]["required"]["sampler_name"])
    assert "tcd" in combo_options(info["BasicScheduler"]["input"]["required"]["scheduler"])
    gamma = info["TCD_Sampler"]["input"]["required"]["gamma"][1]
    assert gamma["min"] == 0.0 and gamma["max"] == 1.0 and gamma["default"] == 0.3 and gamma["tooltip"]
    order = info["TCD_Sampler"]["input"]["optional"]["tcf_order"]
    assert order[0] == "INT" and (order[1]["default"], order[1]["min"], order[1]["max"]) == (1, 1, 2)
    assert "2 model calls per step" in order[1]["tooltip"]
    pack_lines = [ln for ln in server.log_tail(10 ** 6).splitlines() if ln.endswith("custom_nodes/comfyui-tcd-suite")]
    assert pack_lines and all("IMPORT FAILED" not in ln for ln in pack_lines), pack_lines


def png_size(data):
    img = Image.open(io.BytesIO(data))
    return img.size


def test_ksampler_tcd_prompt_completes_and_png_is_fetched(server):
    out = server.run_prompt(graphs.txt2img(seed=101))
    assert len(out["images"]) == 1 and out["images"][0][:8] == b"\x89PNG\r\n\x1a\n"
    assert png_size(out["images"][0]) == (64, 64)


def test_custom_advanced_with_tcd_nodes_completes(server):
    out = server.run_prompt(graphs.tcd_custom_advanced(seed=102, gamma_schedule="0.5, 0.3", tcf_order=2))
    assert png_size(out["images"][0]) == (64, 64)


def test_same_seed_same_image_over_http(server):
    a = server.run_prompt(graphs.tcd_custom_advanced(seed=103, prefix="det_a"))["images"][0]
    b = server.run_prompt(graphs.tcd_custom_advanced(seed=103, prefix="det_b"))["images"][0]
    assert Image.open(io.BytesIO(a)).tobytes() == Image.open(io.BytesIO(b)).tobytes()


def test_gamma_out_of_range_is_rejected_and_server_keeps_serving(server):
    bad = graphs.tcd_custom_advanced(gamma=1.5, seed=104)
    with pytest.raises(comfyhost.PromptRejected) as err:
        server.queue(bad)
    details = str(err.value.body)
    assert "gamma" in details and "1.5" in details and "1.0" in details   # value given and the maximum allowed
    assert server.run_prompt(graphs.tcd_custom_advanced(seed=105))["images"]


@pytest.mark.parametrize("change, expected", [
    ({"10": {"gamma_schedule": "0.3, 2.0"}}, "outside [0, 1]"),
    ({"10": {"gamma_schedule": "0.3, x"}}, "'x' is not a number"),
    ({"11": {"steps": 60}}, "exceeds original_steps"),
    ({"11": {"denoise": 0.0}}, "denoise=0.0 must be in (0, 1]"),
])
def test_bad_values_fail_with_a_clear_node_error(server, change, expected):
    g = graphs.tcd_custom_advanced(seed=106)
    for node, inputs in change.items():
        g[node]["inputs"].update(inputs)
    with pytest.raises(comfyhost.PromptFailed) as err:
        server.run_prompt(g)
    assert expected in err.value.error.get("exception_message", ""), err.value.error
    assert server.run_prompt(graphs.txt2img(seed=107))["images"]


def test_nan_gamma_in_api_prompt_is_refused(server):
    g = graphs.tcd_custom_advanced(seed=108)
    g["10"]["inputs"]["gamma"] = float("nan")     # json.dumps writes NaN, which ComfyUI's parser accepts
    try:
        server.run_prompt(g)
    except comfyhost.PromptRejected as e:
        assert "gamma" in str(e.body)
    except comfyhost.PromptFailed as e:
        assert "outside [0, 1]" in e.error.get("exception_message", "")
    else:
        pytest.fail("a NaN gamma was accepted")
    assert server.alive()


def test_few_step_preset_node_is_listed_with_every_family(server):
    from tcd import presets
    info = server.get("/object_info/TCD_FewStepPreset")["TCD_FewStepPreset"]
    assert info["display_name"] == "Few-step Preset (TCD)"
    assert info["output"] == ["SAMPLER", "SIGMAS", "FLOAT", "FLOAT", "FLOAT", "INT", "STRING"]
    options = info["input"]["required"]["preset"][0]
    assert options[0].startswith("auto") and options[1:] == [p.name for p in presets.PRESETS]
    assert info["input"]["optional"]["family"][0] == "FEW_STEP_FAMILY"
