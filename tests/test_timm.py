"""timm backbones and Hugging Face Hub weights: built, loaded offline from the Hub's own cache
layout, adapted (position embedding, input channels), frozen and trained like torchvision's.

Weights are random (written where huggingface_hub looks); no accuracy is claimed from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv as timm_adapt_input_conv
from timm.optim import param_groups_layer_decay

from finetune.commands.inspect import model_listing, split_points
from finetune.compose.prepare import compose_config
from finetune.errors import FinetuneError
from finetune.models.builder import assemble
from finetune.models.sources import MODEL_SOURCES, classifier_paths
from finetune.training.optim import layer_map
from finetune.training.plan import plan_run
from finetune.weights.load_report import LoadReport
from finetune.weights.loading import adapt_input_conv, load_matching, resample_pos_embed
from tests.conftest import (
    SHRINK,
    problems_here,
    read_json,
    timm_state,
    train_here,
    use_hub_cache,
    write_hub_repo,
    write_timm_weights,
)

TIMM = MODEL_SOURCES["timm"]

# One architecture per family (the smallest of each), at a small input size. Sizes follow the
# model: patch-14 ViTs take multiples of 14, windowed ones 64 px, inception 75 px.
FAMILIES = [
    ("resnet10t", 32), ("resnet18d", 32), ("resnest14d", 32), ("res2net50_14w_8s", 32),
    ("convnext_atto", 32), ("convnextv2_atto", 32), ("efficientnet_b0", 32),
    ("efficientnetv2_rw_t", 32), ("tinynet_e", 32), ("regnetx_002", 32), ("regnety_002", 32),
    ("regnetz_005", 32), ("vit_tiny_patch16_224", 32), ("deit_tiny_patch16_224", 32),
    ("deit_tiny_distilled_patch16_224", 32), ("vit_small_patch14_dinov2", 28),
    ("eva02_tiny_patch14_224", 28), ("beit_base_patch16_224", 32), ("cait_xxs24_224", 32),
    ("swin_tiny_patch4_window7_224", 64), ("swinv2_cr_tiny_ns_224", 64),
    ("mobilenetv2_050", 32), ("mobilenetv3_small_050", 32), ("mobilenetv4_conv_small", 32),
    ("mobilevit_xxs", 64), ("mobilevitv2_050", 64), ("efficientvit_b0", 64),
    ("edgenext_xx_small", 64), ("densenet121", 32), ("dla46_c", 32), ("dpn48b", 32),
    ("ghostnet_050", 32), ("lcnet_050", 32), ("mnasnet_small", 32), ("fbnetc_100", 32),
    ("rexnet_100", 32), ("hgnetv2_b0", 32), ("selecsls42b", 32), ("nf_resnet26", 32),
    ("cspresnet50", 32), ("ese_vovnet19b_slim_dw", 32), ("xception41", 32),
    ("inception_v3", 75), ("poolformer_s12", 32), ("fastvit_t8", 64), ("repvit_m1", 64),
    ("levit_128s", 64), ("pit_ti_224", 64), ("convit_tiny", 32), ("mixer_s32_224", 64),
    ("resmlp_12_224", 32), ("maxvit_nano_rw_256", 64), ("coatnet_nano_rw_224", 64),
    ("hrnet_w18_small", 64), ("twins_svt_small", 64), ("gcvit_xxtiny", 64),
    ("focalnet_tiny_srf", 64), ("davit_tiny", 64), ("hiera_tiny_224", 64),
    ("sequencer2d_s", 64),
]
# Left out: vgg11 (130M parameters: the slowest to build, 1.5 s, and torchvision's vgg is
# tested); efficientformer_l1 (its attention bias is sized for 224 px: no small input).


@pytest.mark.parametrize(("name", "size"), FAMILIES, ids=[n for n, _ in FAMILIES])
def test_timm_families_build_with_a_new_head_and_forward(name: str, size: int) -> None:
    """Through the builder as a run builds it: the size-dependent builder arguments set from
    the run's input (img_size where the model is fixed to one), timm's classifier reset to 5
    classes (its pooling kept), a dry forward giving 5 outputs."""
    kwargs = TIMM.pretrained_kwargs(name, None, size, 3)
    parts = assemble(name, kwargs, 5, 0.0, [], [], size, source="timm")
    assert parts is not None
    model = parts.model.eval()
    assert parts.head_paths and parts.head_paths == classifier_paths(model)
    for path in parts.head_paths:  # a Linear, a 1x1 conv, or a head module holding one
        layers = [m for m in model.get_submodule(path).modules()
                  if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
        assert layers and getattr(layers[-1], "out_features",
                                  getattr(layers[-1], "out_channels", None)) == 5
    with torch.no_grad():
        out = model(torch.zeros(2, 3, size, size))
    assert tuple(out.shape) == (2, 5)


def test_families_sample_is_wide() -> None:
    assert len(FAMILIES) >= 30
    assert len({n.split("_")[0].rstrip("0123456789") for n, _ in FAMILIES}) >= 30


def test_mlp_head_and_listing() -> None:
    parts = assemble("convnext_atto", {}, 4, 0.2, [16], [], 32, source="timm")
    assert parts is not None and parts.head_paths == ["head.fc"]
    head = parts.model.get_submodule("head.fc")
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert parts.model.get_submodule("head.global_pool") is not None  # timm's pooling kept
    listing = model_listing("timm", "convnext_at*")
    assert "convnext_atto " in listing and "d2_in1k" in listing
    assert model_listing("torchvision", "resnet1*").splitlines()[1:] == ["resnet101", "resnet152",
                                                                         "resnet18"]


def test_hub_cache_timm_weights_load_offline(offline_hub: Path, tmp_path: Path) -> None:
    """weights.source=timm reads timm's Hub file from huggingface_hub's cache with
    HF_HUB_OFFLINE=1: every tensor but the new head loaded bit for bit and named in the
    report; repo, commit and sha256 recorded; preprocessing from timm's pretrained config."""
    cfg, _ = compose_config(["model.source=timm", "model.name=test_resnet",
                             "weights.source=timm", "data.image_size=32"])
    plan = plan_run(cfg)
    assert not plan.problems, plan.problems
    report = plan.built.report
    state = load_file(offline_hub / "hub" / "models--timm--test_resnet.r160_in1k" /
                      "snapshots" / report.hub["commit"] / "model.safetensors")
    model_state = plan.built.model.state_dict()
    body = [k for k in model_state if not k.startswith("fc.")]
    assert sorted(report.loaded) == sorted(body)
    assert sorted(s["key"] for s in report.shape_skipped) == ["fc.bias", "fc.weight"]
    for key in body:
        assert torch.equal(model_state[key], state[key]), key
    assert report.hub["repo"] == "timm/test_resnet.r160_in1k" and report.hub["tag"] == "r160_in1k"
    pretrained = timm.models.get_pretrained_cfg("test_resnet.r160_in1k")
    assert plan.prep.interpolation == pretrained.interpolation
    assert plan.prep.mean == list(pretrained.mean) and plan.prep.crop == 32
    assert plan.prep.resize == int(32 / pretrained.crop_pct)


def test_missing_hub_file_is_one_sentence_naming_where_to_put_it(
        offline_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    problems = problems_here("model.source=timm", "model.name=test_efficientnet",
                             "weights.source=timm", *SHRINK, run_dir=tmp_path / "run")
    assert len(problems) == 1
    assert problems[0].startswith(
        "weights test_efficientnet.r160_in1k: model.safetensors of timm/test_efficientnet."
        "r160_in1k is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    assert str(tmp_path / "empty" / "hub" / "models--timm--test_efficientnet.r160_in1k" /
               "snapshots") in problems[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # the command it names is one the installed huggingface_hub ships (`hf`, not the
    # `huggingface-cli` it no longer has)
    command = "hf download timm/test_efficientnet.r160_in1k model.safetensors"
    assert f"({command})" in problems[0]
    import subprocess
    import sys

    cli = Path(sys.executable).parent / command.split()[0]
    done = subprocess.run([str(cli), *command.split()[1:2], "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "REPO_ID" in done.stdout, done.stderr[-500:]


def test_bad_tags_and_sources_are_refused_together(offline_hub: Path) -> None:
    problems = problems_here("model.source=timm", "model.name=test_vit", "weights.source=timm",
                             "weights.name=in22k")
    assert problems == ["weights.name='in22k' is not a pretrained tag of timm's test_vit; its "
                        "tags: r160_in1k (or DEFAULT)"]
    assert problems_here("weights.source=timm") == [
        "weights.source=timm needs model.source=timm (a timm architecture); for torchvision "
        "models use weights.source=torchvision"]
    assert problems_here("model.source=timm", "model.name=hf-hub:timm/x")[0].startswith(
        "model.name='hf-hub:timm/x' is not a timm classification model")
    assert problems_here("model.source=timm", "model.name=test_vit",
                         "++model.kwargs.pretrained=true") == [
        "model.kwargs.pretrained: the builder would load weights by itself, unchecked and "
        "unreported; use weights.source=torchvision | timm | hf_hub | local_dir (and "
        "weights.name for the tag)"]
    assert problems_here("++model.kwargs.weights=IMAGENET1K_V1") == [  # torchvision's, too
        "model.kwargs.weights: the builder would load weights by itself, unchecked and "
        "unreported; use weights.source=torchvision | timm | hf_hub | local_dir (and "
        "weights.name for the tag)"]
    assert problems_here("weights.source=hf_hub", "weights.repo=../x") == [
        "weights.repo='../x' is not a Hugging Face repo id; write org/name, e.g. "
        "timm/convnext_tiny.fb_in1k"]


def test_vit_at_64px_resamples_the_position_embedding(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """224 px weights (a 14x14 grid) into a ViT built for 64 px (4x4): the position
    embedding is resampled as timm's resample_abs_pos_embed does, bit for bit, the report
    says adapted, the output differs from a freshly initialized embedding, and it trains."""
    home = tmp_path / "hf"
    _, state = write_timm_weights(home, "vit_tiny_patch16_224", "augreg_in21k_ft_in1k")
    use_hub_cache(home, monkeypatch)
    args = ["model.source=timm", "model.name=vit_tiny_patch16_224", "weights.source=timm",
            "data.image_size=64", "data.classes=[0,1,2]"]
    cfg, _ = compose_config(args)
    plan = plan_run(cfg)
    assert not plan.problems, plan.problems
    adapted = {a["key"]: a for a in plan.built.report.adapted}
    assert adapted["pos_embed"]["how"] == "position embedding resampled 14x14 -> 4x4 (bicubic)"
    assert adapted["pos_embed"]["checkpoint_shape"] == [1, 197, 192]
    assert "pos_embed" in plan.built.report.loaded
    model = plan.built.model.eval()
    expected = resample_abs_pos_embed(state["pos_embed"], [4, 4], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.detach(), expected)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        resampled = model(x)
        torch.nn.init.trunc_normal_(model.pos_embed, std=0.02)
        reinitialized = model(x)
    assert not torch.allclose(resampled, reinitialized, atol=1e-3)
    run = train_here(*args, *SHRINK, run_dir=tmp_path / "run")
    assert read_json(run / "metrics.json")["status"] == "complete"
    recorded = read_json(run / "load_report.json")
    assert recorded["adapted"][0]["key"] == "pos_embed"
    assert read_json(run / "manifest.json")["model"]["build_kwargs"] == {"img_size": 64}


def test_torchvision_vit_position_embedding_resampled_too() -> None:
    """torchvision's encoder.pos_embedding (class token first) is resampled the same way."""
    from torchvision.models.vision_transformer import VisionTransformer

    small = dict(patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    torch.manual_seed(0)
    big = VisionTransformer(image_size=224, **small).state_dict()
    model = VisionTransformer(image_size=64, **small)
    report = load_matching(model, big, LoadReport(source="file"))
    assert [a["key"] for a in report.adapted] == ["encoder.pos_embedding"]
    expected = resample_abs_pos_embed(big["encoder.pos_embedding"], [4, 4], num_prefix_tokens=1)
    assert torch.equal(model.encoder.pos_embedding.detach(), expected)
    assert torch.equal(resample_pos_embed(big["encoder.pos_embedding"], 17, 1), expected)


# Every way a timm ViT leads its position embedding: a class token; none (avg pooling); a
# distillation token too; registers with the class token; no class slot in the embedding
# (DeiT-3's no_embed_class), with and without registers (the tokens are prepended after it).
PREFIXES = [("vit_tiny_patch16_224", {}, 1),
            ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
            ("deit_tiny_distilled_patch16_224", {}, 2),
            ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),
            ("vit_tiny_patch16_224", {"no_embed_class": True}, 0),
            ("vit_tiny_patch16_224", {"reg_tokens": 4, "no_embed_class": True}, 0)]


@pytest.mark.parametrize(("arch", "kwargs", "prefix"), PREFIXES,
                         ids=["class", "none", "distilled", "registers", "no_embed_class",
                              "registers-no_embed_class"])
def test_every_vit_prefix_layout_is_resampled_as_timm_does(arch: str, kwargs: dict,
                                                           prefix: int) -> None:
    """224 px weights into the same ViT at 64 px: the embedding's leading tokens (as many as
    the model keeps in it) are kept and the 14x14 grid resampled to 4x4, bit for bit as timm's
    resample_abs_pos_embed with that count."""
    torch.manual_seed(0)
    source = timm.create_model(arch, img_size=224, depth=1, **kwargs).state_dict()
    model = timm.create_model(arch, img_size=64, depth=1, **kwargs)
    assert source["pos_embed"].shape[1] == prefix + 196
    report = load_matching(model, source, LoadReport(source="file"))
    assert [a["key"] for a in report.adapted] == ["pos_embed"]
    assert report.adapted[0]["how"] == "position embedding resampled 14x14 -> 4x4 (bicubic)"
    expected = resample_abs_pos_embed(source["pos_embed"], [4, 4], num_prefix_tokens=prefix)
    assert torch.equal(model.pos_embed.detach(), expected)


@pytest.mark.parametrize("channels", [1, 2, 4, 13])
def test_input_conv_adapted_as_timm_does(channels: int) -> None:
    """Any input channel count: the RGB kernel repeated and scaled (summed for one), equal
    bit for bit to timm's adapt_input_conv; loading reports it adapted."""
    torch.manual_seed(0)
    weight = torch.randn(8, 3, 3, 3)
    assert torch.equal(adapt_input_conv(weight, channels),
                       timm_adapt_input_conv(channels, weight.clone()))
    rgb = timm_state("test_resnet")
    model = timm.create_model("test_resnet", in_chans=channels)
    report = load_matching(model, rgb, LoadReport(source="file"))
    first = model.pretrained_cfg["first_conv"] + ".weight"
    assert [a["key"] for a in report.adapted] == [first]
    assert report.adapted[0]["model_shape"][1] == channels


def test_a_gray_image_gives_the_rgb_models_output(offline_hub: Path) -> None:
    """data.channels=1 on a timm model: in_chans=1 is set and the first conv's RGB kernels
    summed, so a gray image gives what the RGB model gives for three copies of it (equal up
    to float rounding of the sum's order)."""
    cfg, _ = compose_config(["model.source=timm", "model.name=test_resnet",
                             "weights.source=timm", "data.image_size=32", "data.channels=1"])
    plan = plan_run(cfg)
    assert not plan.problems, plan.problems
    assert plan.built.build_kwargs["in_chans"] == 1
    gray_model = plan.built.model.eval()
    rgb_model = timm.create_model("test_resnet", num_classes=len(plan.class_names)).eval()
    first = gray_model.pretrained_cfg["first_conv"] + ".weight"
    state = dict(gray_model.state_dict())
    state[first] = timm_state("test_resnet")[first]  # the Hub file's RGB kernel (same seed)
    rgb_model.load_state_dict(state)
    gray = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(gray_model(gray), rgb_model(gray.repeat(1, 3, 1, 1)), atol=1e-5)


def test_freeze_first_stages_of_a_timm_model_and_train_the_rest(offline_hub: Path,
                                                                 tmp_path: Path) -> None:
    """The seed's craft on timm's ResNet: stem and layer1-2 frozen (BatchNorm statistics too),
    the rest trained; the frozen tensors are bit-identical to the Hub file after training."""
    run = train_here("model.source=timm", "model.name=test_resnet", "weights.source=timm",
                     "freeze.train_from=layer3", "data.image_size=32", "trainer.max_epochs=2",
                     "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                     "trainer.enable_progress_bar=false", "checkpoint.keep=none",
                     "freeze.cache=false", run_dir=tmp_path / "run")
    manifest = read_json(run / "manifest.json")
    hub = manifest["weights"]["hub"]
    pretrained = load_file(offline_hub / "hub" / "models--timm--test_resnet.r160_in1k" /
                           "snapshots" / hub["commit"] / "model.safetensors")
    trained = load_file(run / "model.safetensors")
    frozen = [k for k in trained if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")]
    trains = [k for k in trained if k.split(".")[0] in ("layer3", "layer4")
              and trained[k].is_floating_point()]
    assert frozen and trains
    for key in frozen:
        assert torch.equal(trained[key], pretrained[key]), key
    assert any(not torch.equal(trained[k], pretrained[k]) for k in trains)
    assert manifest["model"] == {"name": "test_resnet", "source": "timm", "build_kwargs": {}}


def test_timm_run_dir_predicts_and_its_source_is_gated(offline_hub: Path, tmp_path: Path,
                                                      digits_folder: Path) -> None:
    import finetune

    run = train_here("model.source=timm", "model.name=test_convnext", "weights.source=timm",
                     "data.image_size=32", *SHRINK, run_dir=tmp_path / "run")
    model = finetune.load(run)
    images = sorted(digits_folder.rglob("*.png"))[:3]
    predictions = finetune.predict(model, images)
    assert len(predictions.rows) == 3
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"]["source"] = "evil"
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FinetuneError) as err:
        finetune.load(run)
    assert "model.source='evil' is not one of torchvision, timm" in str(err.value)


def test_layer_decay_follows_timms_grouping() -> None:
    """optim.layer_decay on a timm ViT gives every parameter the lr scale timm's own
    param_groups_layer_decay gives it (group_matcher: stem, each block, the head)."""
    model = timm.create_model("test_vit", num_classes=3)
    units, mapping = layer_map(model)
    ours = {name: 0.75 ** (len(units) - 1 - units.index(mapping[name]))
            for name, _ in model.named_parameters()}
    theirs = {}
    for group in param_groups_layer_decay(model, weight_decay=0.0, layer_decay=0.75):
        names = [n for n, p in model.named_parameters() if any(p is q for q in group["params"])]
        theirs.update(dict.fromkeys(names, group["lr_scale"]))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-12), name
    assert split_points(model)[:2] == ["blocks.0", "blocks.1"]
    assert split_points(model)[-1] == "head"


def test_vit_split_freezes_the_tokens_before_the_blocks() -> None:
    """train_from=blocks.1 freezes the class token and position embedding (the model's own
    parameters, used before the blocks) with the patch embedding; train_from=patch_embed,
    the first child, trains them."""
    from finetune.training.freezing import plan_freeze

    model = timm.create_model("test_vit", num_classes=3)
    plan = plan_freeze(model, "blocks.1")
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(plan.frozen)
    assert "blocks.1.attn.qkv.weight" in plan.trainable
    assert {"cls_token", "pos_embed"} <= set(plan_freeze(model, "patch_embed").trainable)
    tv = torchvision.models.vit_b_16(image_size=32)
    frozen = set(plan_freeze(tv, "encoder.layers.encoder_layer_1").frozen)
    assert {"class_token", "encoder.pos_embedding"} <= frozen


def test_local_dir_and_hf_hub_sources_use_the_config_json(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder timm saves (save_for_hf: config.json + model.safetensors) loads with
    weights.source=local_dir, and the same files as a Hub repo with weights.source=hf_hub;
    both take their preprocessing from its config.json."""
    from timm.models import save_for_hf

    torch.manual_seed(2)
    model = timm.create_model("test_convnext", num_classes=7)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.25, 0.25, 0.25),
                            "interpolation": "bilinear"}
    folder = tmp_path / "saved"
    save_for_hf(model, folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    args = ["model.source=timm", "model.name=test_convnext", "data.image_size=32"]
    cfg, _ = compose_config([*args, "weights.source=local_dir", f"weights.path={folder}"])
    plan = plan_run(cfg)
    assert not plan.problems, plan.problems
    assert plan.prep.mean == [0.25] * 3 and plan.prep.interpolation == "bilinear"
    body = [k for k in model.state_dict() if not k.startswith("head.fc.")]
    assert set(body) <= set(plan.built.report.loaded)

    home = tmp_path / "hf"
    state = load_file(folder / "model.safetensors")
    write_hub_repo(home, "someone/convnext-test", {"model.safetensors": state,
                                                   "config.json": config})
    use_hub_cache(home, monkeypatch)
    cfg, _ = compose_config([*args, "weights.source=hf_hub", "weights.repo=someone/convnext-test"])
    plan = plan_run(cfg)
    assert not plan.problems, plan.problems
    assert plan.prep.mean == [0.25] * 3 and plan.built.report.hub["repo"] == "someone/convnext-test"
    assert set(body) <= set(plan.built.report.loaded)

    config["architecture"] = "test_vit"
    (folder / "config.json").write_text(json.dumps(config))
    assert problems_here(*args, "weights.source=local_dir", f"weights.path={folder}") == [
        f"weights.path={str(folder)!r}: its config.json is for test_vit, model.name="
        "test_convnext; set model.name=test_vit"]


def test_a_replaced_blob_in_the_hub_cache_is_refused(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub cache keeps weights as blobs/<sha256>; one whose content no longer has its
    name's hash (anyone may write the cache) is refused before it is read."""
    home = tmp_path / "hf"
    path, _ = write_timm_weights(home, "test_vit", "r160_in1k")
    use_hub_cache(home, monkeypatch)
    args = ["model.source=timm", "model.name=test_vit", "weights.source=timm"]
    cfg, _ = compose_config(args)
    assert not plan_run(cfg).problems
    blob = path.resolve()
    blob.write_bytes(blob.read_bytes().replace(b"cls_token", b"cls_tokem", 1))
    problems = problems_here(*args)
    assert len(problems) == 1 and "is corrupt or was replaced: delete" in problems[0]
    assert str(blob) in problems[0]
