"""When another pack already owns KSampler's `tcd` sampler name, this pack keeps the other's entry, registers as
`tcd_suite`, and says so loudly: an error in the log naming the owner and what to pick, repeated in the Few-step
Preset node's settings text (the shipped workflows pick `tcd`, which would otherwise run the other pack's code)."""
import importlib
import logging

import pytest


@pytest.fixture()
def other_pack_owns_tcd(pack):
    """Another pack's sampler function under the name `tcd` (core's euler, a function that is not this pack's),
    restored afterwards with this pack's registration."""
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers
    register = importlib.import_module(pack.__name__ + ".nodes.register")
    ours, listed = kds.sample_tcd, list(comfy.samplers.KSampler.SAMPLERS)
    had_fallback = hasattr(kds, "sample_tcd_suite")
    kds.sample_tcd = kds.sample_euler
    register.TAKEN_BY_OTHERS.clear()
    yield register
    kds.sample_tcd = ours
    if not had_fallback and hasattr(kds, "sample_tcd_suite"):
        del kds.sample_tcd_suite
    comfy.samplers.KSampler.SAMPLERS[:] = listed        # the same list object the menus read
    register.TAKEN_BY_OTHERS.clear()


def test_name_clash_keeps_the_other_pack_and_says_what_to_pick(other_pack_owns_tcd, caplog, tiny_ckpt):
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers
    import nodes
    register = other_pack_owns_tcd
    with caplog.at_level(logging.ERROR):
        name = register.register_sampler()
    assert name == "tcd_suite"
    assert kds.sample_tcd is kds.sample_euler                      # the other pack's entry is untouched
    assert getattr(kds.sample_tcd_suite, "tcd_suite", False)       # ours is reachable under the other name
    assert "tcd_suite" in comfy.samplers.KSampler.SAMPLERS
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("already belongs to comfy.k_diffusion.sampling" in m and "'tcd_suite'" in m for m in errors), errors

    import comfy.sd
    model = comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt))[0]
    preset = nodes.NODE_CLASS_MAPPINGS["TCD_FewStepPreset"]()
    info = preset.get_preset(model, "TCD (SD1.5 / SD2.1 / SDXL)", 4)[-1]
    assert "WARNING: KSampler's 'sampler tcd' belongs to comfy.k_diffusion.sampling" in info, info
