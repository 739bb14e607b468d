"""LoRA state dicts for SD1.x / SD2.x / SDXL and the flow-matching transformers SD3 / Flux: read safely, detect the
key format and the base architecture, convert to one canonical form, and validate it against the layers a model has.

Why this exists: ComfyUI 0.3.75's own key map (comfy.lora.model_lora_keys_unet) knows attention layers of a
diffusers-named LoRA only in the old `attn1.processor.to_q_lora` spelling, so new diffusers (`to_q.lora.down`) and
PEFT (`to_q.lora_A`) LoRAs lose every attention layer without a word, and `base_model.model.`-prefixed PEFT files
lose everything. TCD LoRAs are exported by diffusers. Here every known spelling is rewritten to one form that
ComfyUI maps completely, and every layer is either matched to a model weight (name and shape) or reported.

Canonical form (the pack's loader hands it to ComfyUI; the pack's trainer saves it):

    lora_unet_<diffusers UNet module path, '.' -> '_'>.lora_down.weight   [rank, in]  or [rank, in, k, k]
    lora_unet_<...>.lora_up.weight                                         [out, rank] or [out, rank, 1, 1]
    lora_unet_<...>.alpha                                                  0-dim float32; scale = alpha / rank
    lora_te_<HF CLIP module path '_'-joined>.*    text encoder of SD1.x / SD2.x
    lora_te1_<...>.*, lora_te2_<...>.*            SDXL's CLIP-L / CLIP-bigG

This is kohya's layout with diffusers module names, the spelling of kohya sd-scripts' SD1.x LoRAs. ComfyUI maps it
for every UNet weight (model_lora_keys_unet builds `lora_unet_` + each name of comfy.utils.unet_to_diffusers) and
for every CLIP attention/MLP weight (model_lora_keys_clip); diffusers' load_lora_weights converts it through
lora_conversion_utils._convert_non_diffusers_lora_to_diffusers.

One exception, SDXL's added-conditioning MLP (diffusers `add_embedding.linear_1` / `linear_2`): it is written with
its ldm name, `lora_unet_label_emb_0_0` / `lora_unet_label_emb_0_2`. diffusers' kohya converter
(_convert_unet_lora_key) removes the last `.<digit>` of any name containing "emb", which turns
`add_embedding.linear_1` into a module that does not exist; it maps `label_emb.0.0` explicitly, and ComfyUI maps
both spellings.

Flow transformers (SD3's MMDiT, Flux). ComfyUI keeps q, k and v fused in one weight (`img_attn.qkv`, Flux single
blocks' `linear1` = [q; k; v; mlp]); diffusers and PEFT files split them (`attn.to_q`, `attn.add_k_proj`,
`proj_mlp`). ComfyUI's key map (model_lora_keys_unet with comfy.utils.flux_to_diffusers / mmdit_to_diffusers) sends
each split diffusers module to its slice of the fused weight, and `norm_out.linear` through a scale/shift swap, but
only under the `transformer.` prefix (and, for SD3, `base_model.model.`). So the canonical form of a flow LoRA keeps
every layer under a name that map resolves, one name per layer:

    transformer.<diffusers module>.lora_down.weight / .lora_up.weight / .alpha   diffusers-named layers, any prefix
                                                     (`transformer.`, `base_model.model.`, none, OneTrainer's
                                                     `lora_transformer_` flattened names)
    lora_unet_<ldm module, '.' -> '_'>.*             ldm-named layers: kohya (`lora_unet_double_blocks_0_img_attn_qkv`,
                                                     `lora_unet_joint_blocks_0_x_block_attn_qkv`) and ComfyUI-native
                                                     (`diffusion_model.single_blocks.0.linear1.lora_up.weight`)

Each layer is validated against the exact target it patches: a whole weight, or the rows of a fused weight that
its slice covers. Text-encoder layers (CLIP-L, SD3's CLIP-G) take the SD canonical form below; T5 layers are not
handled (reported, never silently dropped).

Architecture is read from shapes, never from file names: the cross-attention key/value projections (attn2.to_k,
attn2.to_v) take the text context, 768 wide for SD1.x (CLIP-L), 1024 for SD2.x (OpenCLIP-H), 2048 for SDXL
(CLIP-L + bigG); text-encoder layers are 768 (CLIP-L), 1024 (OpenCLIP-H) or 1280 (bigG) wide. Flow transformers
are told apart by their layer names (Flux: double/single stream blocks, guidance embedding; SD3: joint blocks,
patch-embedding convolution); layers both share (`transformer_blocks.N.attn.to_q`) leave the model's names and
shapes to decide.

Pure torch + safetensors: no ComfyUI import here (tcd/backend.py supplies the model's names and shapes).
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ------------------------------------------------------------------------------------------------ names
FMT_KOHYA = "kohya"
FMT_NATIVE = "comfyui-native"
FMT_DIFFUSERS_OLD = "diffusers-old"
FMT_DIFFUSERS = "diffusers"
FMT_PEFT = "peft"
FMT_ONETRAINER = "onetrainer"

ARCH_SD1, ARCH_SD2, ARCH_SDXL, ARCH_UNKNOWN = "SD1.x", "SD2.x", "SDXL", "unknown"
ARCH_SD3, ARCH_FLUX = "SD3", "Flux"
UNET_ARCHITECTURES = (ARCH_SD1, ARCH_SD2, ARCH_SDXL)
FLOW_ARCHITECTURES = (ARCH_SD3, ARCH_FLUX)
ARCHITECTURES = UNET_ARCHITECTURES + FLOW_ARCHITECTURES
# Models with two CLIP text encoders (lora_te1 = CLIP-L, lora_te2 = the wider one).
DUAL_CLIP = (ARCH_SDXL, ARCH_SD3)
# Width of the text context that cross-attention reads (= unet_config["context_dim"] in ComfyUI).
CONTEXT_DIM = {768: ARCH_SD1, 1024: ARCH_SD2, 2048: ARCH_SDXL}
# Hidden width of a text-encoder LoRA layer -> which CLIP it belongs to.
TEXT_WIDTH = {768: "CLIP-L", 1024: "OpenCLIP-H", 1280: "CLIP-bigG"}

UP, DOWN, ALPHA = "up", "down", "alpha"
UNET, TE, TE1, TE2 = "unet", "te", "te1", "te2"

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# What a file that is not safetensors usually turns out to be (by its first bytes), named in the error so the user
# knows what they downloaded: an image, an archive, a saved web page, a Git LFS pointer of an un-pulled clone.
FILE_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                   (b"\x1f\x8b", "a gzip archive"), (b"7z\xbc\xaf", "a 7-Zip archive"), (b"Rar!", "a RAR archive"),
                   (b"version https://git-lfs", "a Git LFS pointer (the real file was never downloaded: "
                                                "run `git lfs pull` or download the file itself)"),
                   (b"<", "an HTML/XML page (a login or error page saved in place of the file)"))

# SDXL's added-conditioning MLP: written with its ldm name (see the module docstring).
SDXL_ADD_EMBEDDING_LDM = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

# First path segments of a diffusers UNet module / of an HF CLIP text model module.
_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding",
               "conv_norm_out", "class_embedding")
_TE_ROOTS = ("text_model", "text_projection")
# Underscored ldm (openaimodel) roots: a kohya SDXL LoRA names its UNet layers this way.
_LDM_ROOTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
# First path segments of a diffusers SD3 / Flux transformer module.
_DIT_ROOTS = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder", "time_text_embed",
              "norm_out", "proj_out", "pos_embed")
# ldm (ComfyUI / BFL / SAI) names of flow transformer layers, '.' -> '_', and what each root tells: Flux's double /
# single stream blocks and embedders, SD3's joint blocks and embedders. `final_layer_` exists in both.
_FLUX_LDM_ROOTS = ("double_blocks_", "single_blocks_", "img_in", "txt_in", "time_in_", "vector_in_", "guidance_in_")
_SD3_LDM_ROOTS = ("joint_blocks_", "x_embedder_", "t_embedder_", "y_embedder_", "context_embedder")
_DIT_LDM_ROOTS = _FLUX_LDM_ROOTS + _SD3_LDM_ROOTS + ("final_layer_",)
# diffusers module names only one of the two has.
_FLUX_DIFFUSERS_ROOTS = ("single_transformer_blocks", "time_text_embed.guidance_embedder", "x_embedder")
_SD3_DIFFUSERS_ROOTS = ("pos_embed",)

# Dotted formats: key suffix -> (part, format). Longest first so `.lora_B.default.weight` wins over shorter ones.
_DOTTED_SUFFIXES = (
    (".lora_linear_layer.up.weight", UP, FMT_DIFFUSERS_OLD),
    (".lora_linear_layer.down.weight", DOWN, FMT_DIFFUSERS_OLD),
    (".lora_B.default.weight", UP, FMT_PEFT),
    (".lora_A.default.weight", DOWN, FMT_PEFT),
    ("_lora.up.weight", UP, FMT_DIFFUSERS_OLD),
    ("_lora.down.weight", DOWN, FMT_DIFFUSERS_OLD),
    (".lora.up.weight", UP, FMT_DIFFUSERS),
    (".lora.down.weight", DOWN, FMT_DIFFUSERS),
    (".lora_B.weight", UP, FMT_PEFT),
    (".lora_A.weight", DOWN, FMT_PEFT),
    (".alpha", ALPHA, None),
)
_KOHYA_KEY = re.compile(r"^lora_(unet|te1|te2|te)_(.+)\.(lora_up\.weight|lora_down\.weight|alpha)$")
# OneTrainer's SD3 / Flux LoRAs: diffusers transformer names, flattened ('.' -> '_').
_ONETRAINER_KEY = re.compile(r"^lora_transformer_(.+)\.(lora_up\.weight|lora_down\.weight|alpha)$")
_NATIVE_KEY = re.compile(r"^diffusion_model\.(.+)\.(lora_up\.weight|lora_down\.weight|alpha)$")
_KOHYA_PART = {"lora_up.weight": UP, "lora_down.weight": DOWN, "alpha": ALPHA}
# Weights of other adapter kinds: named in the error so the user knows why they are not applied.
_OTHER_ADAPTERS = {
    ".lora_mid.weight": "LoCon Tucker (lora_mid)", ".dora_scale": "DoRA (dora_scale)", ".hada_": "LyCORIS LoHa",
    ".lokr_": "LyCORIS LoKr", ".oft_": "OFT", ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
}
_OTHER_SUFFIXES = {".diff": "full weight difference (.diff)", ".diff_b": "bias difference (.diff_b)",
                   ".set_weight": "weight replacement (.set_weight)", ".w_norm": "norm weight (.w_norm)",
                   ".b_norm": "norm bias (.b_norm)"}
OTHER_ADAPTER_REASON = "weights are not plain LoRA"
_OLD_ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _fail(what: str, allowed: str, todo: str) -> ValueError:
    return ValueError(f"{what}. {allowed}. {todo}.")


def _short_list(items, limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------------ reading files
def read_lora_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors LoRA, with a clear ValueError for every kind of bad file.

    Only safetensors is parsed: pickle-based files (.ckpt/.pt/.bin) can run arbitrary code when loaded, so they
    are refused by name and by content (a zip or pickle header inside a file named .safetensors).
    """
    path = Path(path)
    name = path.name
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _fail(f"{name!r} is a pickle-based file ({path.suffix})",
                    "Only .safetensors LoRA files are loaded: pickle files can run arbitrary code when opened",
                    "Convert it to .safetensors with a tool you trust, or download the .safetensors release")
    if path.suffix.lower() != ".safetensors":
        raise _fail(f"{name!r} is not a .safetensors file", "The loader reads .safetensors LoRA files only",
                    "Choose a .safetensors file from the loras folder")
    if not path.is_file():
        raise _fail(f"LoRA file {name!r} does not exist", "The name must be a file in a loras folder",
                    "Refresh the list or put the file into models/loras")
    size = path.stat().st_size
    if size == 0:
        raise _fail(f"{name!r} is empty (0 bytes)", "A LoRA file holds a safetensors header and tensors",
                    "The download or copy did not finish: get the file again")
    with open(path, "rb") as f:
        head = f.read(32)
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
    looks_safetensors = header_len is not None and header_len <= size - 8 and head[8:9] == b"{"
    # Zip (torch.save since 1.6) starts with PK\x03\x04, a raw pickle with \x80 and the protocol (2..5). Checked
    # only when the bytes are not a plausible safetensors header: its length field may start with those bytes too.
    is_zip = head[:4] == b"PK\x03\x04"
    is_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if not looks_safetensors and (is_zip or is_pickle):
        raise _fail(f"{name!r} is a pickle/zip (PyTorch .pt) file with a .safetensors name",
                    "Only real safetensors content is loaded: pickle can run arbitrary code",
                    "Convert it to safetensors with a tool you trust, or get the real .safetensors file")
    if header_len is None:
        raise _fail(f"{name!r} is truncated ({size} bytes, shorter than the 8-byte safetensors header length)",
                    "A safetensors file starts with an 8-byte header length, a JSON header, then the tensors",
                    "The download or copy did not finish: get the file again")
    if len(head) >= 9 and head[8:9] != b"{":
        # The safetensors format requires the JSON header to begin with '{' (0x7B) right after its 8-byte length.
        kind = next((what for magic, what in FILE_SIGNATURES if head.lstrip().startswith(magic)), None)
        raise _fail(f"{name!r} is not a safetensors file: "
                    + (f"it is {kind}" if kind else f"it starts with the bytes {head[:12].hex(' ')}"),
                    "A safetensors LoRA starts with an 8-byte header length and a JSON header beginning with '{'",
                    "Download the LoRA's .safetensors file again (the file itself, not its web page)")
    if header_len > size - 8:
        raise _fail(f"{name!r} is truncated or not safetensors: its header claims {header_len} bytes but the file "
                    f"has {size}", "A complete safetensors file is needed",
                    "The download or copy did not finish: get the file again")
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(f"{name!r} is corrupt: its safetensors header is not valid JSON ({e})",
                    "A safetensors file starts with a JSON header", "Get the file again") from None
    if not isinstance(header, dict):
        raise _fail(f"{name!r} is corrupt: its safetensors header is not a JSON object",
                    "A safetensors file starts with a JSON object", "Get the file again")
    data_end = max((int(v["data_offsets"][1]) for k, v in header.items()
                    if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + header_len + data_end > size:
        raise _fail(f"{name!r} is truncated: its tensors need {8 + header_len + data_end} bytes, the file has "
                    f"{size}", "A complete safetensors file is needed",
                    "The download or copy did not finish: get the file again")
    from safetensors import safe_open
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for inconsistent headers
        raise _fail(f"{name!r} is corrupt: safetensors could not read it ({type(e).__name__}: {e})",
                    "A valid safetensors file is needed", "Get the file again") from None
    return tensors, metadata


# ------------------------------------------------------------------------------------------------ parsing keys
@dataclass
class ParsedLora:
    """A LoRA state dict grouped into layers, still in its own naming.

    layers: (component, naming, module) -> {"up", "down", "alpha"}; component is unet / te (unspecified text
    encoder) / te1 / te2; naming is "diffusers" (dotted diffusers UNet or HF CLIP path), "kohya" ('_'-joined,
    diffusers or ldm names) or "ldm" (dotted ldm path, ComfyUI-native).
    """
    layers: dict = field(default_factory=dict)
    formats: dict = field(default_factory=dict)     # format label -> number of keys
    sources: dict = field(default_factory=dict)     # layer id -> one original key (for messages)
    unrecognised: dict = field(default_factory=dict)  # key -> reason
    alpha_source: str = "alpha keys"

    @property
    def format(self) -> str:
        return " + ".join(sorted(self.formats)) or "none"


def _component_of_dotted(path: str):
    """Strip PEFT/diffusers prefixes: (component, module path, prefix label) or None."""
    prefix = ""
    if path.startswith("base_model.model."):
        prefix, path = "base_model.model.", path[len("base_model.model."):]
    for p, comp in (("unet.", UNET), ("text_encoder_2.", TE2), ("text_encoder.", TE)):
        if path.startswith(p):
            return comp, path[len(p):], prefix + p
    if path.startswith("transformer."):
        return UNET, path[len("transformer."):], prefix + "transformer."
    root = path.split(".", 1)[0]
    if root in _UNET_ROOTS or root in _DIT_ROOTS:
        return UNET, path, prefix
    if root in _TE_ROOTS:
        return TE, path, prefix
    return None


def _normalise_dotted_module(module: str, component: str) -> str:
    """Old diffusers attention-processor names -> module names (`attn1.processor.to_q` -> `attn1.to_q`)."""
    if module.endswith("_lora"):
        module = module[:-len("_lora")]
    if module.endswith(".lora"):
        module = module[:-len(".lora")]
    head, _, last = module.rpartition(".")
    if component == UNET and head.endswith(".processor") and last in _OLD_ATTN:
        return head[:-len(".processor")] + "." + _OLD_ATTN[last]
    if component != UNET and head.endswith("self_attn") and last in _OLD_TE_ATTN:
        return head + "." + _OLD_TE_ATTN[last]
    return module


def _other_adapter(key: str):
    for marker, what in _OTHER_ADAPTERS.items():
        if marker in key:
            return what
    for suffix, what in _OTHER_SUFFIXES.items():
        if key.endswith(suffix):
            return what
    return None


def parse_lora(state_dict: dict) -> ParsedLora:
    """Group a LoRA state dict into layers, recognising every supported key spelling (see the module docstring)."""
    parsed = ParsedLora()

    def add(fmt, component, naming, module, part, key):
        layer = (component, naming, module)
        parts = parsed.layers.setdefault(layer, {})
        if part in parts:
            parsed.unrecognised[key] = f"a second {part} weight for layer {module!r}"
            return
        parts[part] = state_dict[key]
        parsed.sources.setdefault(layer, key)
        if fmt is not None:
            parsed.formats[fmt] = parsed.formats.get(fmt, 0) + 1

    for key in state_dict:
        if not isinstance(key, str):
            parsed.unrecognised[str(key)] = "not a string key"
            continue
        m = _KOHYA_KEY.match(key)
        if m:
            comp, body, part = m.groups()
            add(FMT_KOHYA, comp, "kohya", body, _KOHYA_PART[part], key)
            continue
        m = _NATIVE_KEY.match(key)
        if m:
            add(FMT_NATIVE, UNET, "ldm", m.group(1), _KOHYA_PART[m.group(2)], key)
            continue
        if key.startswith("lora_te3_"):
            parsed.unrecognised[key] = ("a T5-XXL text-encoder layer (lora_te3_): this loader applies transformer, "
                                        "UNet and CLIP layers only")
            continue
        m = _ONETRAINER_KEY.match(key)
        if m:
            add(FMT_ONETRAINER, UNET, "flat-diffusers", m.group(1), _KOHYA_PART[m.group(2)], key)
            continue
        other = _other_adapter(key)
        if other:
            parsed.unrecognised[key] = f"{other} {OTHER_ADAPTER_REASON}"
            continue
        for suffix, part, fmt in _DOTTED_SUFFIXES:
            if key.endswith(suffix):
                where = _component_of_dotted(key[:-len(suffix)])
                if where is None:
                    parsed.unrecognised[key] = "unknown module prefix (expected unet., transformer., text_encoder., " \
                                               "text_encoder_2., base_model.model. or a diffusers module path)"
                    break
                comp, module, prefix = where
                module = _normalise_dotted_module(module, comp)
                label = None if fmt is None else (f"{fmt} (keys under {prefix!r})" if prefix.startswith("base_")
                                                  else fmt)
                add(label, comp, "diffusers", module, part, key)
                break
        else:
            parsed.unrecognised[key] = "not a LoRA weight name"
    return parsed


def apply_peft_metadata_alphas(parsed: ParsedLora, metadata: dict | None) -> None:
    """Fill missing alphas from diffusers' `lora_adapter_metadata` (the saved peft LoraConfig), when present.

    diffusers >= 0.35 stores `{"unet.lora_alpha": a, "unet.r": r, "unet.alpha_pattern": {...}}` in the
    safetensors metadata; without it a PEFT/diffusers LoRA has scale 1 (alpha = rank), as diffusers loads it.
    """
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return
    used = False
    for (comp, naming, module), parts in parsed.layers.items():
        if ALPHA in parts or naming != "diffusers":
            continue
        prefix = {UNET: "unet", TE: "text_encoder", TE1: "text_encoder", TE2: "text_encoder_2"}[comp]
        pattern = config.get(f"{prefix}.alpha_pattern") or {}
        alpha = next((v for k, v in pattern.items() if module == k or module.endswith("." + k)), None)
        if alpha is None:
            alpha = config.get(f"{prefix}.lora_alpha")
        if alpha is not None:
            parts[ALPHA] = torch.tensor(float(alpha), dtype=torch.float32)
            used = True
    if used:
        parsed.alpha_source = "lora_adapter_metadata (peft config)"


# ------------------------------------------------------------------------------------------------ architecture
@dataclass
class Architecture:
    name: str           # SD1.x / SD2.x / SDXL / unknown
    evidence: str


def _in_features(t: torch.Tensor) -> int:
    return int(t.shape[1]) if t.ndim >= 2 else -1


def _dit_vote(naming: str, module: str):
    """ARCH_FLUX / ARCH_SD3 when a diffusion-model layer name belongs to one flow transformer only, "dit" when it
    is a transformer layer both share, None for UNet names."""
    flat = module.replace(".", "_")
    if naming in ("diffusers", "flat-diffusers"):
        dotted = module if naming == "diffusers" else None
        if dotted is not None and dotted.split(".", 1)[0] not in _DIT_ROOTS:
            return None
        if flat.startswith(tuple(r.replace(".", "_") for r in _FLUX_DIFFUSERS_ROOTS)):
            return ARCH_FLUX
        if flat.startswith(tuple(r.replace(".", "_") for r in _SD3_DIFFUSERS_ROOTS)):
            return ARCH_SD3
        return "dit" if dotted is not None or flat.startswith(tuple(_DIT_ROOTS)) else None
    if flat.startswith(_FLUX_LDM_ROOTS):
        return ARCH_FLUX
    if flat.startswith(_SD3_LDM_ROOTS):
        return ARCH_SD3
    return "dit" if flat.startswith(_DIT_LDM_ROOTS) else None


def detect_architecture(parsed: ParsedLora) -> Architecture:
    """SD1.x / SD2.x / SDXL from shapes (cross-attention context width, text-encoder width) and SDXL-only names;
    SD3 / Flux from transformer layer names."""
    votes: dict[str, list[str]] = {}
    contexts, widths = set(), set()
    shared_dit = False
    for (comp, naming, module), parts in parsed.layers.items():
        down = parts.get(DOWN)
        if down is None:
            continue
        flat = module.replace(".", "_")
        if comp == UNET:
            dit = _dit_vote(naming, module)
            if dit == "dit":
                shared_dit = True
                continue
            if dit is not None:
                votes.setdefault(dit, []).append({ARCH_FLUX: "Flux transformer layers (double/single stream blocks, "
                                                              "guidance embedding)",
                                                  ARCH_SD3: "SD3 transformer layers (joint blocks, patch "
                                                            "embedding)"}[dit])
                continue
            if flat.endswith(("attn2_to_k", "attn2_to_v")):
                contexts.add(_in_features(down))
            if flat.startswith(("add_embedding", "label_emb")):
                votes.setdefault(ARCH_SDXL, []).append("added-conditioning embedding layers (SDXL only)")
        else:
            if comp == TE2:
                votes.setdefault("dual-clip", []).append("a second text encoder (lora_te2 / text_encoder_2)")
            if flat.endswith(("q_proj", "k_proj", "v_proj", "fc1")):
                widths.add(_in_features(down))
    dual_clip = votes.pop("dual-clip", None)
    if dual_clip and not (set(votes) & set(FLOW_ARCHITECTURES)):
        votes.setdefault(ARCH_SDXL, []).extend(dual_clip)
    for c in sorted(contexts):
        arch = CONTEXT_DIM.get(c)
        if arch is None:
            return Architecture(ARCH_UNKNOWN, f"cross-attention context width {c} is not SD1.x (768), SD2.x (1024) "
                                              f"or SDXL (2048)")
        votes.setdefault(arch, []).append(f"cross-attention context {c}")
    for w in sorted(widths):
        if w == 1024:
            votes.setdefault(ARCH_SD2, []).append("text encoder width 1024 (OpenCLIP-H)")
        elif w == 1280:
            if not (set(votes) & set(FLOW_ARCHITECTURES)):
                votes.setdefault(ARCH_SDXL, []).append("text encoder width 1280 (CLIP-bigG)")
        elif w not in TEXT_WIDTH:
            return Architecture(ARCH_UNKNOWN, f"text encoder width {w} is not CLIP-L/OpenCLIP-H/bigG")
    if shared_dit and (set(votes) & set(UNET_ARCHITECTURES)):
        votes.setdefault("SD3 or Flux", []).append("flow transformer layers (transformer_blocks)")
    if not votes:
        if shared_dit:
            return Architecture(ARCH_UNKNOWN, "flow transformer layers that SD3 and Flux share (transformer_blocks); "
                                              "the model's layer names and shapes decide")
        if 768 in widths:
            return Architecture(ARCH_UNKNOWN, "only CLIP-L text-encoder layers (SD1.x or SDXL) and no "
                                              "cross-attention layers")
        return Architecture(ARCH_UNKNOWN, "no cross-attention or text-encoder layers to read the width from")
    if len(votes) > 1:
        return Architecture(ARCH_UNKNOWN, "conflicting evidence: " + "; ".join(
            f"{a}: {', '.join(sorted(set(v)))}" for a, v in sorted(votes.items())))
    (arch, why), = votes.items()
    return Architecture(arch, ", ".join(sorted(set(why))))


def check_architecture(lora_arch: Architecture, model_arch: str, lora_name: str = "this LoRA") -> None:
    """ValueError when the LoRA was made for another base model than the one it is applied to."""
    if model_arch not in ARCHITECTURES:
        raise _fail(f"the model is {model_arch}", "The TCD LoRA loader handles SD1.x, SD2.x and SDXL UNet models "
                    "and the SD3 / Flux flow transformers",
                    "Use ComfyUI's core LoraLoader for other model families")
    if lora_arch.name == ARCH_UNKNOWN:
        if lora_arch.evidence.startswith(("conflicting", "cross-attention context width", "text encoder width")):
            raise _fail(f"cannot tell which base model {lora_name} is for: {lora_arch.evidence}",
                        "A LoRA for SD1.x, SD2.x, SDXL, SD3 or Flux", "Check that the file is a LoRA for this model")
        return  # no width evidence: name and shape checks against the model still decide
    if lora_arch.name != model_arch:
        raise _fail(f"{lora_name} is for {lora_arch.name} ({lora_arch.evidence}) but the model is {model_arch}",
                    f"A LoRA must be made for the model's architecture ({model_arch})",
                    f"Load an {lora_arch.name} checkpoint, or use an {model_arch} version of this LoRA")


# ------------------------------------------------------------------------------------------------ canonical form
def canonical_unet_base(diffusers_module: str) -> str:
    """`lora_unet_` key base of a diffusers UNet module (SDXL add_embedding under its ldm name, see docstring)."""
    module = SDXL_ADD_EMBEDDING_LDM.get(diffusers_module, diffusers_module)
    return "lora_unet_" + module.replace(".", "_")


def canonical_te_base(component: str, hf_module: str) -> str:
    return f"lora_{component}_" + hf_module.replace(".", "_")


def _te_component(component: str, down: torch.Tensor | None, architecture: str) -> str:
    """lora_te (one CLIP) or lora_te1 / lora_te2 (SDXL, SD3: CLIP-L / bigG, told apart by width when unprefixed)."""
    if architecture not in DUAL_CLIP:
        return TE if component in (TE, TE1) else component
    if component == TE:
        return TE2 if down is not None and _in_features(down) == 1280 else TE1
    return component


@dataclass
class Conversion:
    state_dict: dict            # canonical keys -> tensors
    layer_sources: dict         # canonical base -> one original key
    unconverted: dict           # original key -> reason


def canonical_dit_base(component_naming: str, module: str, dit_flat: dict) -> tuple[str | None, str | None]:
    """(canonical base, None) of a flow-transformer layer (see the module docstring), or (None, reason).

    dit_flat: flattened diffusers module name -> dotted name, for the model's transformer (OneTrainer's names and
    kohya files written with diffusers names are flattened, and '_' is ambiguous inside module names)."""
    if component_naming == "diffusers":
        return "transformer." + module, None
    if component_naming == "ldm":
        return "lora_unet_" + module.replace(".", "_"), None
    if component_naming == "flat-diffusers" or not module.startswith(_DIT_LDM_ROOTS):
        dotted = dit_flat.get(module)
        if dotted is None:
            return None, f"the model has no transformer module named {module!r}"
        return "transformer." + dotted, None
    return "lora_unet_" + module, None


def to_canonical(parsed: ParsedLora, architecture: str, ldm_to_diffusers: dict | None = None,
                 dit_modules=None) -> Conversion:
    """Rewrite parsed layers to the canonical form.

    A missing alpha becomes alpha = rank (scale 1.0: how diffusers and ComfyUI apply a LoRA without alpha).
    ldm names (ComfyUI-native `diffusion_model.*`, kohya SDXL `lora_unet_input_blocks_*`) need the model's
    ldm -> diffusers module table (tcd.backend.unet_ldm_to_diffusers). For SD3 / Flux, dit_modules lists the
    model's diffusers transformer module names (to read flattened ones back).
    """
    ldm_flat = {k.replace(".", "_"): v for k, v in (ldm_to_diffusers or {}).items()}
    dit_flat = {m.replace(".", "_"): m for m in (dit_modules or ())}
    flow = architecture in FLOW_ARCHITECTURES
    out, sources, unconverted = {}, {}, dict(parsed.unrecognised)
    for layer, parts in parsed.layers.items():
        component, naming, module = layer
        src = parsed.sources[layer]
        if UP not in parts or DOWN not in parts:
            missing = "up" if UP not in parts else "down"
            unconverted[src] = f"layer {module!r} has no {missing} weight"
            continue
        up, down = parts[UP], parts[DOWN]
        if component == UNET and flow:
            base, why = canonical_dit_base(naming, module, dit_flat)
            if base is None:
                unconverted[src] = why
                continue
        elif component == UNET and naming == "flat-diffusers":
            unconverted[src] = f"OneTrainer transformer layer {module!r}: the model is {architecture}, not SD3 / Flux"
            continue
        elif component == UNET:
            if naming == "diffusers":
                base = canonical_unet_base(module)
            elif naming == "ldm" or module.startswith(_LDM_ROOTS):
                flat = module.replace(".", "_")
                if not ldm_flat:
                    unconverted[src] = "ldm layer names need the model's ldm -> diffusers table"
                    continue
                if flat not in ldm_flat:
                    unconverted[src] = f"the model has no UNet layer named {module!r}"
                    continue
                base = canonical_unet_base(ldm_flat[flat])
            else:  # kohya with diffusers names; diffusers' own spelling of add_embedding gets the ldm name
                base = "lora_unet_" + {"add_embedding_linear_1": "label_emb_0_0",
                                       "add_embedding_linear_2": "label_emb_0_2"}.get(module, module)
        else:
            base = canonical_te_base(_te_component(component, down, architecture), module)
        if base in sources:
            unconverted[src] = f"layer {base!r} appears twice (also as {sources[base]!r})"
            continue
        rank = int(down.shape[0])
        alpha = parts.get(ALPHA)
        alpha = torch.tensor(float(rank) if alpha is None else float(alpha.float().reshape(-1)[0]),
                             dtype=torch.float32)
        out[base + ".lora_down.weight"] = down
        out[base + ".lora_up.weight"] = up
        out[base + ".alpha"] = alpha
        sources[base] = src
    return Conversion(out, sources, unconverted)


def comfy_native_to_canonical(native_sd: dict, ldm_to_diffusers: dict, weight_shapes: dict | None = None) -> dict:
    """ComfyUI-native LoRA (TrainLoraNode: `diffusion_model.<ldm module>.lora_up.weight|lora_down.weight|alpha`)
    -> the canonical form.

    ldm_to_diffusers: ldm module -> diffusers module (tcd.backend.unet_ldm_to_diffusers). weight_shapes: ldm
    module -> base weight shape (tcd.backend.unet_weight_shapes); with it a convolution's flattened down weight
    [rank, in*k*k] (how ComfyUI's trainer stores it) is reshaped to [rank, in, k, k] and its up to
    [out, rank, 1, 1], the shapes diffusers/PEFT need (ComfyUI accepts both). Any other key is a ValueError.
    """
    bad = [k for k in native_sd if not _NATIVE_KEY.match(str(k))]
    if bad:
        raise _fail(f"these keys are not ComfyUI-native LoRA weights: {_short_list(bad)}",
                    "Allowed: diffusion_model.<module>.lora_up.weight / .lora_down.weight / .alpha (bias and "
                    "norm differences (.diff, .diff_b) have no place in the canonical LoRA form)",
                    "Train LoRA weights only, or drop those keys before converting")
    parsed = parse_lora(native_sd)
    conv = to_canonical(parsed, ARCH_UNKNOWN, ldm_to_diffusers)
    if conv.unconverted:
        raise _fail("cannot convert these ComfyUI-native keys: " + _short_list(
                    f"{k} ({why})" for k, why in conv.unconverted.items()),
                    "Every module must be a UNet layer of the model the LoRA was trained on",
                    "Pass the ldm -> diffusers table of that model (tcd.backend.unet_ldm_to_diffusers)")
    out = dict(conv.state_dict)
    if weight_shapes:
        diffusers_to_ldm = {canonical_unet_base(d): l for l, d in ldm_to_diffusers.items()}
        for base in conv.layer_sources:
            shape = weight_shapes.get(diffusers_to_ldm.get(base, ""))
            if shape is not None and len(shape) == 4:
                down, up = out[base + ".lora_down.weight"], out[base + ".lora_up.weight"]
                if down.ndim == 2 and down.shape[1] == math.prod(shape[1:]):
                    out[base + ".lora_down.weight"] = down.reshape(down.shape[0], *shape[1:])
                if up.ndim == 2:
                    out[base + ".lora_up.weight"] = up.reshape(*up.shape, 1, 1)
    return out


# ------------------------------------------------------------------------------------------------ validation
@dataclass
class Validation:
    matched: list               # canonical bases that match a model weight in name and shape
    unmatched: dict             # canonical base or original key -> reason
    total: int                  # LoRA layers in the file (matched + unmatched)

    def of(self, prefix: str) -> list:
        return [b for b in self.matched if b.startswith(prefix)]


def layer_bases(canonical_sd: dict) -> list[str]:
    return sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in canonical_sd})


def _shape_problem(down: torch.Tensor, up: torch.Tensor, weight_shape: tuple):
    rank = int(down.shape[0])
    out_dim, in_numel = int(weight_shape[0]), math.prod(weight_shape[1:])
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        return f"up {tuple(up.shape)} / down {tuple(down.shape)} are not LoRA matrices"
    if int(up.shape[1]) != rank:
        return f"up rank {int(up.shape[1])} != down rank {rank}"
    if int(up.shape[0]) != out_dim or down[0].numel() != in_numel:
        return (f"shape mismatch: LoRA up {tuple(up.shape)} x down {tuple(down.shape)} cannot patch the model's "
                f"weight {tuple(weight_shape)}")
    if down.ndim == 4 and len(weight_shape) == 4 and tuple(down.shape[2:]) != tuple(weight_shape[2:]):
        return f"kernel {tuple(down.shape[2:])} != the model's {tuple(weight_shape[2:])}"
    return None


def validate(conversion: Conversion, target_shapes: dict) -> Validation:
    """Match every canonical layer to a model weight (ComfyUI's key map -> weight shape), checking shapes, ranks
    and finiteness. Layers the conversion could not name are unmatched too."""
    sd = conversion.state_dict
    matched, unmatched = [], {}
    for base in layer_bases(sd):
        down, up = sd[base + ".lora_down.weight"], sd[base + ".lora_up.weight"]
        shape = target_shapes.get(base)
        if shape is None:
            unmatched[base] = "no such layer in this model"
            continue
        problem = _shape_problem(down, up, tuple(shape))
        if problem is None and not (torch.isfinite(down).all() and torch.isfinite(up).all()
                                    and torch.isfinite(sd[base + ".alpha"])):
            problem = "NaN or infinite values"
        if problem:
            unmatched[base] = problem
        else:
            matched.append(base)
    for key, why in conversion.unconverted.items():
        unmatched[key] = why
    return Validation(matched, unmatched, len(matched) + len(unmatched))


def unmatched_message(lora_name: str, validation: Validation, model_arch: str) -> str:
    items = [f"{k} ({why})" for k, why in validation.unmatched.items()]
    return (f"{len(validation.unmatched)} of {validation.total} layers of {lora_name!r} do not match the "
            f"{model_arch} model: {_short_list(items, 10)}. All LoRA layers must match a model weight by name and "
            f"shape. Check that the LoRA is for this model, or set on_unmatched to 'warn' to apply only the "
            f"matching layers")


def not_a_lora_message(lora_name: str, state_dict: dict, parsed: ParsedLora | None = None) -> str:
    keys = list(state_dict)
    hint = ""
    kinds = sorted({why[:-len(OTHER_ADAPTER_REASON) - 1] for why in (parsed.unrecognised.values() if parsed else ())
                    if why.endswith(OTHER_ADAPTER_REASON)})
    if kinds:
        hint = (f" It holds {', '.join(kinds)} weights: this loader applies plain LoRA (up/down/alpha); load it with "
                f"ComfyUI's core LoraLoader instead.")
    elif any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        hint = " It looks like a full checkpoint: load it with a checkpoint loader."
    elif any(k.startswith(("down_blocks.", "encoder.", "decoder.")) and not ("lora" in k) for k in keys):
        hint = " It looks like a diffusers model or VAE, not a LoRA."
    return (f"{lora_name!r} is not a LoRA: none of its {len(keys)} keys is a LoRA weight "
            f"(e.g. {_short_list(keys, 3) or 'no tensors at all'}).{hint} Allowed: kohya lora_unet_/lora_te_, "
            f"diffusers (.lora.up/.lora.down, processor.to_q_lora), PEFT (lora_A/lora_B), ComfyUI-native "
            f"diffusion_model.*.lora_up. Choose a LoRA file")


# ------------------------------------------------------------------------------------------------ family
# The pack's trainers write this metadata key (TCD_FAMILY or "LCM LoRA"); tcd.presets reads it back.
METADATA_FAMILY_KEY = "tcd.family"
TCD_FAMILY = "TCD LoRA"


# ------------------------------------------------------------------------------------------------ the whole plan
ON_UNMATCHED = ("error", "warn")


@dataclass
class LoraPlan:
    name: str
    format: str
    lora_arch: Architecture
    model_arch: str
    family: object              # tcd.presets.Detection: the few-step family the file names, if any
    state_dict: dict            # canonical, only the matched layers (what goes to ComfyUI)
    validation: Validation
    unet_layers: int            # matched diffusion-model layers (UNet or flow transformer)
    te_layers: int              # matched text-encoder layers
    te_skipped: int             # text-encoder layers in the file, not applied because no CLIP is connected
    alpha_source: str


def plan_lora(state_dict: dict, metadata: dict, name: str, model_arch: str, ldm_to_diffusers: dict,
              target_shapes: dict, has_clip: bool, on_unmatched: str = "error") -> LoraPlan:
    """Everything between reading a LoRA file and handing it to ComfyUI, with a ValueError for each problem:
    not a LoRA, wrong architecture, unmatched layers (unless on_unmatched='warn': they are then left out)."""
    if on_unmatched not in ON_UNMATCHED:
        raise _fail(f"on_unmatched={on_unmatched!r}", f"Allowed: {', '.join(ON_UNMATCHED)}", "Pick one of them")
    parsed = parse_lora(state_dict)
    if not parsed.layers:
        raise ValueError(not_a_lora_message(name, state_dict, parsed))
    apply_peft_metadata_alphas(parsed, metadata)
    lora_arch = detect_architecture(parsed)
    check_architecture(lora_arch, model_arch, repr(name))
    dit_modules = [k[len("transformer."):] for k in target_shapes if k.startswith("transformer.")]
    conversion = to_canonical(parsed, model_arch, ldm_to_diffusers, dit_modules)
    te_skipped = 0
    if not has_clip:  # text-encoder layers cannot be matched without a CLIP; they are reported, not errors
        te_bases = [b for b in conversion.layer_sources if b.startswith("lora_te")]
        te_skipped = len(te_bases)
        for b in te_bases:
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                conversion.state_dict.pop(b + suffix)
            conversion.layer_sources.pop(b)
    validation = validate(conversion, target_shapes)
    if validation.unmatched and on_unmatched == "error":
        raise ValueError(unmatched_message(name, validation, model_arch))
    keep = {}
    for base in validation.matched:
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            keep[base + suffix] = conversion.state_dict[base + suffix]
    from .presets import detect_family   # tcd.presets reads this module's architecture names
    return LoraPlan(name=name, format=parsed.format, lora_arch=lora_arch, model_arch=model_arch,
                    family=detect_family(metadata, name, model_arch), state_dict=keep, validation=validation,
                    unet_layers=len(validation.of("lora_unet_")) + len(validation.of("transformer.")),
                    te_layers=len(validation.of("lora_te")),
                    te_skipped=te_skipped, alpha_source=parsed.alpha_source if any(
                        p.get(ALPHA) is not None for p in parsed.layers.values()) else "none (scale 1.0)")
