"""Adapters declared in a recipe: the layers a selector names get LoRA or DoRA (peft) and
nothing else of the base trains; the run keeps the adapter alone and the model merged, the
merged model computes what the adapted one did, and predict, evaluate and export use it;
every bad declaration is one sentence; groups, the feature cache, the leaderboard, inspect
and resume compose with it."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import QUICK, SHRINK, main_here, problems_here, read_json, run_cli, train_here
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import finetune
from finetune.compose.prepare import compose_config
from finetune.errors import FinetuneError
from finetune.models import adapters
from finetune.sweeps.leaderboard import read_job
from finetune.training.plan import plan_run

LAYER4 = ["adapter.type=lora", "adapter.modules=[layer4.*.conv*]", "adapter.rank=4"]


def _adapter_cfg(**values: object) -> object:
    base = {"type": "lora", "modules": [], "rank": 8, "alpha": 16.0, "dropout": 0.0,
            "overrides": [], "train_fully": [], "lr": None}
    return OmegaConf.create({**base, **values})


@pytest.fixture(scope="module")
def base_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 state dict (random: no accuracy claimed) as the pretrained base."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("base") / "resnet18_base.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def lora_run(base_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("lora") / "run"
    return train_here(*QUICK, *SHRINK, "trainer.max_epochs=2", "weights.source=file",
                      f"weights.path={base_file}", *LAYER4, "optim.lr=0.01",
                      "trainer.limit_val_batches=1.0", run_dir=run)


def test_only_the_adapters_and_the_head_train_and_the_base_is_kept(
        lora_run: Path, base_file: Path) -> None:
    base = load_file(base_file)
    small = load_file(lora_run / "adapter.safetensors")
    merged = load_file(lora_run / "model.safetensors")
    adapted = [f"layer4.{b}.conv{c}" for b in (0, 1) for c in (1, 2)]
    # the small file: every adapter tensor (A and B of each adapted layer) and the head
    assert sorted(small) == sorted([f"{layer}.lora_{m}.default.weight" for layer in adapted
                                    for m in "AB"] + ["fc.weight", "fc.bias"])
    assert small["layer4.0.conv1.lora_A.default.weight"].shape[0] == 4  # the rank
    # the model file is the plain architecture: the base's names, merged
    assert set(merged) == set(base)
    for key, tensor in base.items():
        layer = key.rpartition(".")[0]
        if layer in adapted:  # base + B A (alpha / r): trained, so not the base any more
            assert not torch.equal(merged[key], tensor), key
        elif not key.startswith("fc."):  # frozen: bit for bit the base (BN statistics too)
            assert torch.equal(merged[key], tensor), key
    manifest = read_json(lora_run / "manifest.json")["adapter"]
    assert manifest["type"] == "lora" and manifest["modules"] == 4
    assert manifest["merge_max_diff"] <= 1e-4
    # the base's fingerprint is the file's tensors but the head
    plan = adapters.AdapterPlan("lora", {}, 0.0, ["fc"])
    plain = torchvision.models.resnet18()
    plain.load_state_dict(base)
    assert manifest["base_sha256"] == adapters.base_sha256(plain, plan)
    metrics = read_json(lora_run / "metrics.json")
    lora_params = sum(t.numel() for k, t in small.items() if "lora_" in k)
    assert metrics["trainable_params"] == lora_params + 512 * 5 + 5
    job = read_job(lora_run)
    assert job.trainable_share == pytest.approx(metrics["trainable_params"]
                                                / metrics["total_params"])


def test_predict_evaluate_and_export_use_the_merged_model(lora_run: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    model = finetune.load(lora_run)
    assert not any("lora_" in n or "base_layer" in n for n, _ in model.named_parameters())
    code, out, _ = main_here("evaluate", f"run={lora_run}", capsys=capsys)
    evaluated = read_json(lora_run / "eval.json")
    assert code == 0 and "val split, 180 images" in out
    # evaluated on the merged model, the run's own figure (on the adapted one) holds
    assert evaluated["acc"] == pytest.approx(read_json(lora_run / "metrics.json")[
        "val/acc"], abs=1e-6)
    code, out, _ = main_here("export", f"run={lora_run}", "format=onnx", capsys=capsys)
    assert code == 0 and (lora_run / "model.onnx").is_file() and "max abs difference" in out


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("arch", ["resnet18", "vit"])
def test_a_merged_model_computes_what_the_adapted_one_did(kind: str, arch: str) -> None:
    torch.manual_seed(0)
    if arch == "vit":  # timm's ViT: fused qkv and the MLP's Linear layers
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                  num_classes=3)
        selector, x = ["blocks.*.attn.qkv", "blocks.*.mlp.fc*"], torch.randn(2, 3, 32, 32)
    else:  # convolutions
        model = torchvision.models.resnet18(num_classes=3)
        selector, x = ["layer3.*.conv2", "layer4.*.conv*"], torch.randn(2, 3, 64, 64)
    plan = adapters.plan_adapter(model, _adapter_cfg(type=kind, modules=selector, rank=4),
                                 ["fc" if arch == "resnet18" else "head"])
    assert plan is not None
    before = adapters.base_sha256(model, plan)
    adapters.inject(model, plan)
    assert adapters.base_sha256(model, plan) == before  # the same base, wrapped or not
    with torch.no_grad():  # B starts at zero: train it a little by hand
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    merged = adapters.merged_copy(model).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        adapted, plain = model(x), merged(x)
    assert (adapted - plain).abs().max() <= 1e-4 * max(1.0, float(adapted.abs().max()))
    assert any("lora_" in n for n, _ in model.named_parameters())  # the model is untouched


def test_each_bad_declaration_is_one_sentence() -> None:
    resnet = torchvision.models.resnet18(num_classes=3)
    mobile = torchvision.models.mobilenet_v3_small(num_classes=3)

    def problems(model: torch.nn.Module, head: str = "fc", **values: object) -> list[str]:
        with pytest.raises(FinetuneError) as stopped:
            adapters.plan_adapter(model, _adapter_cfg(**values), [head])
        return stopped.value.problems

    assert problems(resnet, modules=[]) == [
        "adapter.type is set but adapter.modules is empty; name the layers that get adapters, "
        "e.g. [blocks.*.attn.qkv, blocks.*.mlp.fc*] or layer4.*.conv2"]
    assert problems(resnet, type="ia3", modules=["fc"])[0].startswith(
        "adapter.type='ia3' is not one of lora, dora")
    assert problems(resnet, modules=["layer9.*"])[0].startswith("adapter.modules:")
    assert problems(resnet, modules=["layer4.*.bn1"]) == [
        "adapter.modules: layer4.0.bn1 (BatchNorm2d) and 1 more cannot take an adapter; "
        "adapters go on Linear and ungrouped Conv2d layers — narrow the selector, e.g. "
        "blocks.*.attn.qkv or layer4.*.conv2"]
    grouped = problems(mobile, "classifier.3", modules=["features.1.block.0.0"])
    assert grouped[0].startswith("adapter.modules: features.1.block.0.0 (a grouped Conv2d, "
                                 "groups=16) cannot take an adapter")
    assert problems(resnet, modules=["fc"]) == [
        "adapter.modules: fc is the new head, which trains fully; adapters go on pretrained "
        "layers"]
    assert problems(resnet, modules=["layer4.0.conv1"],
                    overrides=[{"modules": "layer4.1.conv1", "rank": 2}]) == [
        "adapter.overrides[0].modules: layer4.1.conv1 gets no adapter (adapter.modules does "
        "not select it); an override changes the rank or alpha of layers adapter.modules "
        "selects"]
    assert problems(resnet, modules=["layer4.0.conv1"], train_fully=["layer4.0"]) == [
        "adapter.train_fully: layer4.0 holds (or is) a layer that gets an adapter; a layer "
        "either trains fully or gets an adapter"]
    # every problem at once
    assert len(problems(resnet, modules=["layer4.*.bn1"], train_fully=["nowhere"])) == 2


def test_what_an_adapter_cannot_go_with_is_refused_at_plan_time(tmp_path: Path) -> None:
    said = problems_here(*QUICK, *SHRINK, *LAYER4, "freeze.train_from=layer3", "head=none",
                         run_dir=tmp_path / "run")
    assert any(p.startswith("freeze.train_from / freeze.modules with adapter.type") for p in said)
    assert any(p.startswith("adapter.type with head: none") for p in said)
    said = problems_here("recipe=digits_detection", "weights.source=none", *LAYER4,
                         run_dir=tmp_path / "det")
    assert any(p.startswith("adapter.type with task=detection") for p in said)
    said = problems_here(*QUICK, *SHRINK, "adapter.type=lora", "adapter.modules=[layer4.*]",
                         "adapter.rank=0", run_dir=tmp_path / "rank")
    assert any(p.startswith("adapter.rank=0: must be in [1, 4096]") for p in said)
    assert not (tmp_path / "run").exists()


def test_the_plan_groups_adapters_apart_and_keeps_decay_off_doras_scales() -> None:
    cfg, _ = compose_config([*QUICK, "adapter.type=dora", "adapter.modules=[layer4.*.conv2]",
                             "adapter.lr=0.02", "optim.weight_decay=0.05",
                             "adapter.train_fully=[layer4.1.bn2]"])
    plan = plan_run(cfg, load=False)
    plan.raise_problems()
    groups = {g.name: g for g in plan.groups}
    assert groups["adapter"].lr == 0.02 and groups["adapter"].weight_decay == 0.05
    assert all(re.search(r"\.lora_[AB]\.", n) for n in groups["adapter"].params)
    scales = groups["adapter/no_decay"]
    assert scales.weight_decay == 0.0 and scales.params == [
        "layer4.0.conv2.lora_magnitude_vector.default.weight",
        "layer4.1.conv2.lora_magnitude_vector.default.weight"]
    trainable = {n for n, p in plan.built.model.named_parameters() if p.requires_grad}
    fully = {n for g in plan.groups if g.name.startswith("fully") for n in g.params}
    assert fully == {"fc.weight", "fc.bias", "layer4.1.bn2.weight", "layer4.1.bn2.bias"}
    assert trainable == {n for g in plan.groups for n in g.params}
    # the frozen BatchNorm layers stay in eval mode; the one trained fully does not
    assert "layer4.1.bn2" not in plan.freeze.eval_modules
    assert "layer4.0.bn2" in plan.freeze.eval_modules
    # the layers before the first adapter are a frozen prefix the feature cache can take
    assert plan.cache_cut is not None and plan.cache_cut.boundary == "the output of layer3.1"


def test_an_unfreeze_phase_opens_base_layers_later() -> None:
    cfg, _ = compose_config([*QUICK, *LAYER4, "freeze.unfreeze=[{epoch:1,modules:layer3}]"])
    plan = plan_run(cfg, load=False)
    plan.raise_problems()
    later = plan.freeze.stages[1]
    assert later.epoch == 1 and later.params and all(n.startswith("layer3.")
                                                    for n in later.params)
    assert not any(n.startswith("layer3.") for n in plan.freeze.stages[0].trainable)


def test_inspect_shows_the_adapted_layers_and_the_trainable_share(
        capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = main_here("inspect", *QUICK, *LAYER4,
                          "adapter.overrides=[{modules:layer4.1.conv2,rank:2}]", capsys=capsys)
    head = next(line for line in out.splitlines() if line.startswith("== adapter =="))
    assert head.startswith("== adapter == lora on 4 layers (layer4.*.conv*);")
    share = float(re.search(r"train, ([\d.]+)% of the base", head).group(1))
    model = torchvision.models.resnet18(num_classes=5)
    # (in x k x k + out) x rank per layer: layer4.0.conv1 takes 256 channels
    lora = 4 * (256 * 9 + 512) + 2 * 4 * (512 * 9 + 512) + 2 * (512 * 9 + 512)
    assert share == round(100 * (lora + 512 * 5 + 5) / sum(
        p.numel() for p in model.parameters()), 2)
    assert re.search(r"layer4\.1\.conv2 +rank +2", out)


def test_a_resumed_adapter_run_equals_the_uninterrupted_one(base_file: Path,
                                                            tmp_path: Path) -> None:
    args = [*QUICK, "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false", "data.batch_size=16", "eval.report=false",
            "weights.source=file", f"weights.path={base_file}", "adapter.type=dora",
            "adapter.modules=[layer4.*.conv*]", "adapter.rank=4", "adapter.dropout=0.1",
            "sched.epochs=2"]
    whole = train_here(*args, "trainer.max_epochs=2", run_dir=tmp_path / "whole")
    first = train_here(*args, "trainer.max_epochs=1", run_dir=tmp_path / "first")
    last = train_here(*args, "trainer.max_epochs=2", f"resume={first}",
                      run_dir=tmp_path / "last")
    for name in ("model.safetensors", "adapter.safetensors"):
        a, b = load_file(whole / name), load_file(last / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_run_started_from_an_adapter_run_loads_the_base_plus_the_adapter(
        lora_run: Path, tmp_path: Path) -> None:
    """weights.source=run on an adapter run starts from its merged model: every tensor loads
    (the head too: the same classes), under the plain names."""
    run = train_here(*QUICK, *SHRINK, "weights.source=run", f"weights.path={lora_run}",
                     "freeze.train_from=fc", run_dir=tmp_path / "next")
    report = read_json(run / "load_report.json")
    merged = load_file(lora_run / "model.safetensors")
    assert report["counts"]["loaded"] == len(merged) and report["counts"]["missing"] == 0
    start = load_file(run / "model.safetensors")
    assert torch.equal(start["layer4.0.conv1.weight"], merged["layer4.0.conv1.weight"])


def test_the_ema_of_an_adapted_model_is_what_gets_merged(base_file: Path,
                                                        tmp_path: Path) -> None:
    run = train_here(*QUICK, *SHRINK, "weights.source=file", f"weights.path={base_file}",
                     *LAYER4, "model.ema.decay=0.5", run_dir=tmp_path / "ema")
    manifest = read_json(run / "manifest.json")
    assert manifest["ema"]["updates"] == 2 and manifest["adapter"]["merge_max_diff"] <= 1e-4
    small = load_file(run / "adapter.safetensors")
    model = torchvision.models.resnet18(num_classes=5)
    model.load_state_dict(load_file(run / "model.safetensors"))
    assert torch.equal(model.fc.weight, small["fc.weight"])  # the saved head is the EMA's


def test_layer_decay_scales_each_blocks_adapters_on_a_timm_vit() -> None:
    cfg, _ = compose_config(["model.source=timm", "model.name=vit_tiny_patch16_224",
                             "model.kwargs={patch_size: 8}", "data=digits", "data.image_size=32",
                             "adapter.type=lora", "adapter.modules=[blocks.*.attn.qkv]",
                             "optim.layer_decay=0.5"])
    plan = plan_run(cfg, load=False)
    plan.raise_problems()
    lrs = {g.name: g.lr for g in plan.groups if g.name.startswith("adapter")}
    assert lrs["adapter/blocks.11"] == pytest.approx(2 * lrs["adapter/blocks.10"])
    assert lrs["adapter/blocks.0"] == pytest.approx(lrs["adapter/blocks.11"] * 0.5 ** 11)
    assert all(re.search(r"^blocks\.\d+\.attn\.qkv\.lora_[AB]\.", n)
               for g in plan.groups if g.name.startswith("adapter") for n in g.params)


def test_a_sweep_over_the_rank_shows_each_jobs_trainable_share(tmp_path: Path) -> None:
    result = run_cli("-m", *QUICK, *SHRINK, "adapter.type=lora",
                     "adapter.modules=[layer4.*.conv2]", "adapter.rank=2,16",
                     "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "sweep" / "leaderboard.csv", newline="") as handle:
        rows = {r["overrides"]: r for r in csv.DictReader(handle)}
    small, large = rows["adapter.rank=2"], rows["adapter.rank=16"]
    lora = 2 * (512 * 9 + 512)  # per unit of rank: A (512 x 3 x 3) and B (512) of two layers
    assert int(large["trainable_params"]) - int(small["trainable_params"]) == 14 * lora
    assert float(small["trainable_share"]) < float(large["trainable_share"]) < 0.02


def test_two_process_ddp_trains_the_adapters_alike_on_both_ranks(base_file: Path,
                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli(*QUICK, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                     "data.batch_size=8", "eval.report=false", "weights.source=file",
                     f"weights.path={base_file}", *LAYER4, "trainer.strategy=ddp",
                     "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.run.dir={run}",
                     cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    metrics = read_json(run / "metrics.json")
    assert metrics["ddp"] == {"world_size": 2, "frozen_tensors_identical_across_ranks": True,
                              "trained_tensors_identical_across_ranks": True}
    merged, base = load_file(run / "model.safetensors"), load_file(base_file)
    assert torch.equal(merged["layer3.1.conv2.weight"], base["layer3.1.conv2.weight"])
    assert not torch.equal(merged["layer4.1.conv2.weight"], base["layer4.1.conv2.weight"])


def test_the_exported_model_is_the_base_plus_the_adapter_file(lora_run: Path, base_file: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    """The chain end to end: the base weights with adapter.safetensors put back on them
    (unmerged, as peft computes) give what the exported ONNX file gives."""
    import onnxruntime

    code, _, _ = main_here("export", f"run={lora_run}", "format=onnx", capsys=capsys)
    assert code == 0
    model = torchvision.models.resnet18(num_classes=5)
    model.load_state_dict({k: v for k, v in load_file(base_file).items()
                           if not k.startswith("fc.")}, strict=False)
    plan = adapters.plan_adapter(model, _adapter_cfg(modules=["layer4.*.conv*"], rank=4),
                                 ["fc"])
    assert plan is not None
    adapters.inject(model, plan)
    missing, unexpected = model.load_state_dict(load_file(lora_run / "adapter.safetensors"),
                                                strict=False)
    assert unexpected == [] and all("lora_" not in k and not k.startswith("fc.")
                                    for k in missing)
    model.eval()
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    session = onnxruntime.InferenceSession(str(lora_run / "model.onnx"))
    exported = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        adapted = model(x).numpy()
    assert abs(exported - adapted).max() <= 1e-4 * max(1.0, abs(adapted).max())
