"""BoLID's example workflows, described in Python: which nodes, where, with which widget values, linked how.

Nodes are linked by reference (no hand-numbered ids; workflows/graph.py numbers them in the order they are added).
workflows/build.py compiles every workflow in WORKFLOWS into the files ComfyUI reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from workflows.graph import Node, Workflow

# File names the workflows expect (README "User guide" lists where each goes).
SDXL_LIGHTNING_CKPT = "sdxl_lightning_4step.safetensors"
SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
ADAPTER_SDXL = "bolid_sdxl.safetensors"
ADAPTER_SD15 = "bolid_sd15.safetensors"
BODY_ENCODER = "bolid_body_encoder.safetensors"
POSE_MODEL = "yolo11n-pose.onnx"
FACE_PACK = "antelopev2"
# IP-Adapter FaceID was trained on buffalo_l's ArcFace (w600k_r50); antelopev2's recogniser (glintr100) gives other
# embeddings, so the FaceID workflows preselect buffalo_l
FACEID_FACE_PACK = "buffalo_l"
BODY_ID_NAME = "my_body"
PHOTO = "person.png"
SDXL_BASE_CKPT = "sd_xl_base_1.0.safetensors"
# face-only adapters written by `python -m bolid.faceid import <FaceID .bin> --out models/bolid` (default names)
FACEID_ADAPTER = {"sd15": "bolid_ip-adapter-faceid_sd15.safetensors", "sdxl": "bolid_ip-adapter-faceid_sdxl.safetensors"}
FACEID_LORA = {"sd15": "ip-adapter-faceid_sd15_lora.safetensors", "sdxl": "ip-adapter-faceid_sdxl_lora.safetensors"}
FACEID_BIN = {"sd15": "ip-adapter-faceid_sd15.bin", "sdxl": "ip-adapter-faceid_sdxl.bin"}
FACEID_REPO = "https://huggingface.co/h94/IP-Adapter-FaceID/resolve/main/"

# Where the public files come from: ComfyUI's frontend reads a node's properties.models (name, url, directory)
# to offer the download of a missing file.
PUBLIC_MODELS: dict[str, dict[str, str]] = {
    SD15_CKPT: {"url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                       "v1-5-pruned-emaonly.safetensors", "directory": "checkpoints"},
    SDXL_LIGHTNING_CKPT: {"url": "https://huggingface.co/ByteDance/SDXL-Lightning/resolve/main/"
                                 "sdxl_lightning_4step.safetensors", "directory": "checkpoints"},
    SDXL_BASE_CKPT: {"url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                            "sd_xl_base_1.0.safetensors", "directory": "checkpoints"},
    **{name: {"url": FACEID_REPO + name, "directory": "loras"} for name in FACEID_LORA.values()},
}


def model_metadata(*names: str) -> tuple[dict[str, str], ...]:
    """properties.models entries for public files (names without a public source are left out)."""
    return tuple({"name": n, **PUBLIC_MODELS[n]} for n in names if n in PUBLIC_MODELS)


CONTROLNET_OPENPOSE_SD15 = "control_v11p_sd15_openpose.safetensors"
POSE_PHOTO = "pose_reference.png"
PHOTO_FOLDER = "my_person"  # a sub-folder of ComfyUI's input/ with the photos of one person


BOLID = "#2a363b"
NOTE = "#432"
SD15_NEGATIVE = "lowres, blurry, deformed, bad anatomy, extra limbs, watermark, text"
PROMPT = "full-body photo of a person walking in a park, natural light, detailed"
FILES_NOTE = """**BoLID files** (see the README, "User guide"):

- `models/checkpoints/{ckpt}`
- `models/bolid/{adapter}`
{more}
Prompts describe the scene and clothing, not the person: identity comes from BoLID."""


LIGHTNING_SAMPLER = {"steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0}
SD15_SAMPLER = {"steps": 25, "cfg": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}
SDXL_SAMPLER = {"steps": 30, "cfg": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}
FACE_PROMPT = "portrait photo of a person in a park, natural light, detailed"
PERSON_IDS = ("person_a", "person_b")  # Body ID and Face ID names of the two people (Save Body ID / Save Face ID)
TWO_PEOPLE_PROMPT = "full-body photo of two people standing side by side in a park, natural light, detailed"


def _note(wf: Workflow, pos: tuple[int, int], text: str, size: tuple[int, int] = (380, 300)) -> Node:
    return wf.add("MarkdownNote", pos, {"text": text}, title="Read me", size=size, color=NOTE)


def _apply(wf: Workflow, pos: tuple[int, int], face: float, body: float, title: str | None = None) -> Node:
    return wf.add("BoLIDApplyAdapter", pos, {"weight_face": face, "weight_body": body, "start_at": 0.0,
                                             "end_at": 1.0}, title=title, color=BOLID)


@dataclass
class Generation:
    """The nodes every generating workflow shares: checkpoint, BoLID adapter, prompts, latent, sampler, save."""

    ckpt: Node
    adapter: Node
    positive: Node
    negative: Node
    latent: Node
    sampler: Node
    decode: Node
    save: Node


def _generation(wf: Workflow, ckpt: str, adapter: str, width: int, height: int, sampler: dict, negative: str,
                positive: str = PROMPT) -> Generation:
    """Adds and links the shared nodes; the model and the conditioning into the sampler are the workflow's."""
    g = Generation(
        ckpt=wf.add("CheckpointLoaderSimple", (40, 60), {"ckpt_name": ckpt}, models=model_metadata(ckpt)),
        adapter=wf.add("BoLIDLoadAdapter", (40, 220), {"adapter_name": adapter}, color=BOLID),
        positive=wf.add("CLIPTextEncode", (820, 60), {"text": positive}, title="Positive prompt"),
        negative=wf.add("CLIPTextEncode", (820, 300), {"text": negative}, title="Negative prompt"),
        latent=wf.add("EmptyLatentImage", (820, 540), {"width": width, "height": height, "batch_size": 1}),
        sampler=wf.add("KSampler", (1280, 60), {"seed": 42, "seed:control_after_generate": "fixed", **sampler}),
        decode=wf.add("VAEDecode", (1640, 60)),
        save=wf.add("SaveImage", (1640, 180), {"filename_prefix": "BoLID"}, size=(380, 420)),
    )
    wf.link(g.ckpt, "CLIP", g.positive, "clip")
    wf.link(g.ckpt, "CLIP", g.negative, "clip")
    wf.link(g.latent, "LATENT", g.sampler, "latent_image")
    wf.link(g.sampler, "LATENT", g.decode, "samples")
    wf.link(g.ckpt, "VAE", g.decode, "vae")
    wf.link(g.decode, "IMAGE", g.save, "images")
    return g


def _prompts_to_sampler(wf: Workflow, g: Generation) -> None:
    wf.link(g.positive, "CONDITIONING", g.sampler, "positive")
    wf.link(g.negative, "CONDITIONING", g.sampler, "negative")


def _adapter_between(wf: Workflow, g: Generation, model_from: Node, apply: Node) -> None:
    """model_from's MODEL -> Apply (with the loaded adapter) -> the sampler."""
    wf.link(model_from, "MODEL", apply, "model")
    wf.link(g.adapter, "bolid_adapter", apply, "bolid_adapter")
    wf.link(apply, "MODEL", g.sampler, "model")


def text_only_sdxl_lightning() -> Workflow:
    wf = Workflow("text_only_body_id_sdxl_lightning", "Text-only generation from a stored Body ID")
    g = _generation(wf, SDXL_LIGHTNING_CKPT, ADAPTER_SDXL, 832, 1216, LIGHTNING_SAMPLER, negative="")
    body_id = wf.add("BoLIDLoadBodyID", (40, 340), {"body_id_name": f"{BODY_ID_NAME}.safetensors"}, color=BOLID)
    apply = _apply(wf, (420, 60), face=0.0, body=0.8)
    _note(wf, (40, 480), FILES_NOTE.format(
        ckpt=SDXL_LIGHTNING_CKPT, adapter=ADAPTER_SDXL,
        more=f"- `models/bolid_body_ids/{BODY_ID_NAME}.safetensors` (made by the photos_to_body_id workflow)\n\n"
             "**Text-only mode**: no photo at run time; only the stored Body ID drives the body branch "
             "(weight_face is 0, nothing is connected to face_embeds).\n\n"
             "SDXL-Lightning 4-step: steps 4, cfg 1.0, euler + sgm_uniform (use the 8-step file with 8 steps).\n"))
    _adapter_between(wf, g, g.ckpt, apply)
    _prompts_to_sampler(wf, g)
    wf.link(body_id, "body_id", apply, "body_id")
    return wf


def _photo_face_body(name: str, title: str, ckpt: str, adapter: str, width: int, height: int, sampler: dict,
                     negative: str, notes: str) -> Workflow:
    wf = Workflow(name, title)
    g = _generation(wf, ckpt, adapter, width, height, sampler, negative=negative)
    apply = _apply(wf, (420, 60), face=0.8, body=0.8)
    photo = wf.add("LoadImage", (-420, 470), {"image": PHOTO}, title="Photo of the person", size=(340, 420))
    face_model = wf.add("BoLIDLoadInsightFace", (-420, 60), {"model_name": FACE_PACK, "provider": "auto"},
                        color=BOLID)
    pose_model = wf.add("BoLIDLoadPoseModel", (-420, 200), {"model_name": POSE_MODEL, "provider": "auto"},
                        color=BOLID)
    encoder = wf.add("BoLIDLoadBodyEncoder", (-420, 320), {"encoder_name": BODY_ENCODER}, color=BOLID)
    face = wf.add("BoLIDEncodeFace", (40, 360), {"no_face": "error"}, color=BOLID)
    body = wf.add("BoLIDEncodeBodyFromImages", (40, 500), {"min_confidence": 0.3, "several_people": "use the largest"},
                  color=BOLID)
    views = wf.add("PreviewImage", (420, 420), title="Views used for the body", size=(340, 360))
    _note(wf, (40, 760), FILES_NOTE.format(
        ckpt=ckpt, adapter=adapter,
        more=f"- `models/bolid/{BODY_ENCODER}`\n- `models/bolid_pose/{POSE_MODEL}`\n"
             f"- `models/insightface/models/{FACE_PACK}/` (detector + ArcFace .onnx)\n\n" + notes),
        size=(420, 330))
    _adapter_between(wf, g, g.ckpt, apply)
    _prompts_to_sampler(wf, g)
    wf.link(face_model, "face_analysis", face, "face_analysis")
    wf.link(photo, "IMAGE", face, "image")
    wf.link(encoder, "body_encoder", body, "body_encoder")
    wf.link(pose_model, "pose_model", body, "pose_model")
    wf.link(photo, "IMAGE", body, "images")
    wf.link(face, "face_embeds", apply, "face_embeds")
    wf.link(body, "body_id", apply, "body_id")
    wf.link(body, "views_preview", views, "images")
    return wf


def photo_face_body_sdxl_lightning() -> Workflow:
    return _photo_face_body(
        "photo_face_body_sdxl_lightning", "One photo -> face + body -> SDXL-Lightning", SDXL_LIGHTNING_CKPT,
        ADAPTER_SDXL, 832, 1216, LIGHTNING_SAMPLER, negative="",
        notes="SDXL-Lightning 4-step: steps 4, cfg 1.0, euler + sgm_uniform (the negative prompt has no effect at "
              "cfg 1.0). Lower weight_face / weight_body if the image over-saturates.")


def photo_face_body_sd15() -> Workflow:
    return _photo_face_body(
        "photo_face_body_sd15", "One photo -> face + body -> SD1.5", SD15_CKPT, ADAPTER_SD15, 512, 768,
        SD15_SAMPLER, negative=SD15_NEGATIVE,
        notes="SD1.5: 20-30 steps, cfg 5-7; the adapter must be the SD1.5 one (16 layers, context 768).")


def photos_to_body_id() -> Workflow:
    wf = Workflow("photos_to_body_id", "Photos of any size -> Body ID -> saved")
    photos = wf.add("BoLIDLoadImagesFromFolder", (40, 60), {"folder": PHOTO_FOLDER}, title="Photos of the person",
                    color=BOLID)
    pose_model = wf.add("BoLIDLoadPoseModel", (40, 200), {"model_name": POSE_MODEL, "provider": "auto"}, color=BOLID)
    encoder = wf.add("BoLIDLoadBodyEncoder", (40, 340), {"encoder_name": BODY_ENCODER}, color=BOLID)
    detect = wf.add("BoLIDDetectBodyPose", (420, 60), {"confidence": 0.25, "person": "largest"}, color=BOLID)
    detected = wf.add("PreviewImage", (420, 260), title="Detected poses", size=(340, 360))
    body = wf.add("BoLIDEncodeBodyFromImages", (820, 60), {"min_confidence": 0.3, "several_people": "use the largest"},
                  color=BOLID)
    save = wf.add("BoLIDSaveBodyID", (1220, 60), {"name": BODY_ID_NAME, "overwrite": False}, color=BOLID)
    views = wf.add("PreviewImage", (1220, 240), title="Views used and their weights", size=(520, 360))
    _note(wf, (40, 480), f"""**Several photos -> one Body ID**, saved to `models/bolid_body_ids/{BODY_ID_NAME}.safetensors`.

Files: `models/bolid/{BODY_ENCODER}`, `models/bolid_pose/{POSE_MODEL}`; the photos in `input/{PHOTO_FOLDER}/`
(jpg, png, webp).

**Load Images From Folder** hands every photo on at its own size: portrait and landscape photos are used whole
(core Image Batch would resize and centre-crop them to the first one's size, cutting off heads or feet).
**Detect Body Pose** runs once; Encode Body uses its poses (several_people decides what a group photo gives).
Views whose body-joint confidence is below min_confidence are skipped; the preview shows the views used and their
weights. Then use the Body ID with the text-only workflow.""",
          size=(360, 360))
    wf.link(encoder, "body_encoder", body, "body_encoder")
    wf.link(pose_model, "pose_model", body, "pose_model")
    wf.link(photos, "images", body, "images")
    wf.link(pose_model, "pose_model", detect, "pose_model")
    wf.link(photos, "images", detect, "image")
    wf.link(detect, "poses", body, "poses")
    wf.link(detect, "preview", detected, "images")
    wf.link(body, "body_id", save, "body_id")
    wf.link(body, "views_preview", views, "images")
    return wf


def pose_controlnet_body_id_sd15() -> Workflow:
    """Pose from a reference photo (ControlNet OpenPose), body identity from a stored Body ID (BoLID)."""
    wf = Workflow("pose_controlnet_body_id_sd15", "Pose from a photo (ControlNet) + stored Body ID -> SD1.5")
    g = _generation(wf, SD15_CKPT, ADAPTER_SD15, 512, 768, SD15_SAMPLER, negative=SD15_NEGATIVE,
                    positive="full-body photo of a person in a park, natural light, detailed")
    body_id = wf.add("BoLIDLoadBodyID", (40, 340), {"body_id_name": f"{BODY_ID_NAME}.safetensors"}, color=BOLID)
    apply = _apply(wf, (420, 60), face=0.0, body=0.8)
    photo = wf.add("LoadImage", (-780, 420), {"image": POSE_PHOTO}, title="Pose reference photo", size=(340, 420))
    pose_model = wf.add("BoLIDLoadPoseModel", (-780, 260), {"model_name": POSE_MODEL, "provider": "auto"},
                        color=BOLID)
    detect = wf.add("BoLIDDetectBodyPose", (-400, 260), {"confidence": 0.25, "person": "largest"}, color=BOLID)
    openpose = wf.add("BoLIDPosesToOpenPose", (-400, 460), {"min_confidence": 0.3, "people": "main person",
                                                            "width": 512, "height": 768}, color=BOLID)
    controlnet = wf.add("ControlNetLoader", (-400, 60), {"control_net_name": CONTROLNET_OPENPOSE_SD15})
    control = wf.add("ControlNetApplyAdvanced", (1240, 360), {"strength": 1.0, "start_percent": 0.0,
                                                              "end_percent": 1.0})
    preview = wf.add("PreviewImage", (-20, 620), title="OpenPose control image", size=(340, 420))
    _note(wf, (420, 420), FILES_NOTE.format(
        ckpt=SD15_CKPT, adapter=ADAPTER_SD15,
        more=f"- `models/controlnet/{CONTROLNET_OPENPOSE_SD15}` (any SD1.5 OpenPose ControlNet)\n"
             f"- `models/bolid_pose/{POSE_MODEL}`\n"
             f"- `models/bolid_body_ids/{BODY_ID_NAME}.safetensors` (made by the photos_to_body_id workflow)\n\n"
             "**Pose from ControlNet, body from BoLID**: Detect Body Pose finds the reference photo's pose, "
             "Poses To OpenPose Image draws it in the OpenPose colours at the generated size (512x768, "
             "fitted in, never cut), core Apply ControlNet conditions the prompts on it, and Apply Adapter "
             "(BoLID) gives the stored body.\n"),
        size=(400, 360))
    _adapter_between(wf, g, g.ckpt, apply)
    wf.link(body_id, "body_id", apply, "body_id")
    wf.link(pose_model, "pose_model", detect, "pose_model")
    wf.link(photo, "IMAGE", detect, "image")
    wf.link(detect, "poses", openpose, "poses")
    wf.link(openpose, "image", control, "image")
    wf.link(openpose, "image", preview, "images")
    wf.link(controlnet, "CONTROL_NET", control, "control_net")
    wf.link(g.positive, "CONDITIONING", control, "positive")
    wf.link(g.negative, "CONDITIONING", control, "negative")
    wf.link(g.ckpt, "VAE", control, "vae")
    wf.link(control, "positive", g.sampler, "positive")
    wf.link(control, "negative", g.sampler, "negative")
    return wf


def _faceid_face_only(family: str) -> Workflow:
    """Face identity with no training: an IP-Adapter FaceID file imported as BoLID's face branch, its LoRA
    through core LoraLoaderModelOnly (as the FaceID authors recommend), the body branch absent (weight 0)."""
    sd15 = family == "sd15"
    ckpt = SD15_CKPT if sd15 else SDXL_BASE_CKPT
    adapter, lora_name = FACEID_ADAPTER[family], FACEID_LORA[family]
    label = "SD1.5" if sd15 else "SDXL"
    wf = Workflow(f"faceid_face_only_{family}", f"Face identity from IP-Adapter FaceID ({label}, no training)")
    g = _generation(wf, ckpt, adapter, *((512, 768) if sd15 else (1024, 1024)), SD15_SAMPLER if sd15 else SDXL_SAMPLER,
                    negative=SD15_NEGATIVE, positive=FACE_PROMPT)
    lora = wf.add("LoraLoaderModelOnly", (40, 340), {"lora_name": lora_name, "strength_model": 0.6},
                  title="FaceID LoRA", models=model_metadata(lora_name))
    apply = _apply(wf, (420, 60), face=0.8, body=0.0)
    photo = wf.add("LoadImage", (-420, 200), {"image": PHOTO}, title="Photo of the face", size=(340, 420))
    face_model = wf.add("BoLIDLoadInsightFace", (-420, 60), {"model_name": FACEID_FACE_PACK, "provider": "auto"},
                        color=BOLID)
    face = wf.add("BoLIDEncodeFace", (420, 360), {"no_face": "error"}, color=BOLID)
    _note(wf, (40, 500), f"""**Face identity from public files, no training.**

1. `models/checkpoints/{ckpt}`
2. FaceID: download `{FACEID_BIN[family]}` (h94/IP-Adapter-FaceID, the non-Plus file) and import it once:
   `python -m bolid.faceid import {FACEID_BIN[family]} --out ComfyUI/models/bolid` -> `models/bolid/{adapter}`
3. `models/loras/{lora_name}` (same repository)
4. `models/insightface/models/{FACEID_FACE_PACK}/` (detector + ArcFace .onnx: FaceID was trained on buffalo_l's ArcFace)

The body branch is absent in an imported FaceID file (weight_body is ignored); stage-2 training adds it.
Prompts describe the scene, not the face.""", size=(440, 360))
    wf.link(g.ckpt, "MODEL", lora, "model")
    _adapter_between(wf, g, lora, apply)
    _prompts_to_sampler(wf, g)
    wf.link(face_model, "face_analysis", face, "face_analysis")
    wf.link(photo, "IMAGE", face, "image")
    wf.link(face, "face_embeds", apply, "face_embeds")
    return wf


def faceid_face_only_sd15() -> Workflow:
    return _faceid_face_only("sd15")


def faceid_face_only_sdxl() -> Workflow:
    return _faceid_face_only("sdxl")


def two_people_regional_sd15() -> Workflow:
    """Two people in one image: two Apply nodes on one model, each with its own stored Body ID and Face ID and a
    disjoint mask (left / right half, made with core mask nodes at the generated size)."""
    width, height = 768, 512
    a, b = PERSON_IDS
    wf = Workflow("two_people_regional_sd15", "Two people, two identities (regional masks) -> SD1.5")
    g = _generation(wf, SD15_CKPT, ADAPTER_SD15, width, height, SD15_SAMPLER, negative=SD15_NEGATIVE,
                    positive=TWO_PEOPLE_PROMPT)
    apply_left = _apply(wf, (420, 60), face=0.8, body=0.8, title="Apply Adapter (BoLID): left person")
    apply_right = _apply(wf, (420, 420), face=0.8, body=0.8, title="Apply Adapter (BoLID): right person")
    body_left = wf.add("BoLIDLoadBodyID", (-340, 60), {"body_id_name": f"{a}.safetensors"},
                       title="Body ID: left person", color=BOLID)
    face_left = wf.add("BoLIDLoadFaceID", (-340, 180), {"face_id_name": f"{a}.safetensors"},
                       title="Face ID: left person", color=BOLID)
    body_right = wf.add("BoLIDLoadBodyID", (-340, 420), {"body_id_name": f"{b}.safetensors"},
                        title="Body ID: right person", color=BOLID)
    face_right = wf.add("BoLIDLoadFaceID", (-340, 540), {"face_id_name": f"{b}.safetensors"},
                        title="Face ID: right person", color=BOLID)
    empty = wf.add("SolidMask", (40, 360), {"value": 0.0, "width": width, "height": height}, title="Empty mask")
    half = wf.add("SolidMask", (40, 540), {"value": 1.0, "width": width // 2, "height": height},
                  title="Half-width mask")
    left = wf.add("MaskComposite", (40, 720), {"x": 0, "y": 0, "operation": "add"}, title="Left half")
    right = wf.add("InvertMask", (40, 920), title="Right half")
    _note(wf, (820, 740), FILES_NOTE.format(
        ckpt=SD15_CKPT, adapter=ADAPTER_SD15,
        more=f"- `models/bolid_body_ids/{a}.safetensors`, `{b}.safetensors` (photos_to_body_id, once per person)\n"
             f"- `models/bolid_face_ids/{a}.safetensors`, `{b}.safetensors` (Encode Face -> Save Face ID)\n\n"
             "**Two people, two identities**: each Apply Adapter (BoLID) adds one person's face and body "
             "inside its attn_mask only; the second one patches the model the first one returned. The masks "
             f"split the {width}x{height} image into left and right halves and must not overlap. Draw other "
             "regions with the mask editor (Load Image -> MASK), and give a branch its own region with "
             "attn_mask_face / attn_mask_body. The prompt describes both people's scene and clothing.\n"),
        size=(400, 380))
    wf.link(g.ckpt, "MODEL", apply_left, "model")
    wf.link(g.adapter, "bolid_adapter", apply_left, "bolid_adapter")
    _adapter_between(wf, g, apply_left, apply_right)
    _prompts_to_sampler(wf, g)
    wf.link(body_left, "body_id", apply_left, "body_id")
    wf.link(face_left, "face_embeds", apply_left, "face_embeds")
    wf.link(left, "MASK", apply_left, "attn_mask")
    wf.link(body_right, "body_id", apply_right, "body_id")
    wf.link(face_right, "face_embeds", apply_right, "face_embeds")
    wf.link(right, "MASK", apply_right, "attn_mask")
    wf.link(empty, "MASK", left, "destination")
    wf.link(half, "MASK", left, "source")
    wf.link(left, "MASK", right, "mask")
    return wf


WORKFLOWS = (text_only_sdxl_lightning, photo_face_body_sdxl_lightning, photos_to_body_id, photo_face_body_sd15,
             pose_controlnet_body_id_sd15, faceid_face_only_sd15, faceid_face_only_sdxl, two_people_regional_sd15)
