"""The feature cache: where the model is cut, when the cut is refused, and that training on
cached features gives the model that training on images gives (real Lightning Trainer)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf

from finetune.compose.schema import OptimConfig, SchedConfig
from finetune.data.datamodule import ImageDataModule, TensorImages
from finetune.data.readers import fake_data
from finetune.data.transforms import eval_transform
from finetune.errors import FinetuneError
from finetune.models import heads
from finetune.models.backbones import preprocessing
from finetune.training.feature_cache import FeatureCache, config_conflicts, decide
from finetune.training.feature_cuts import Cut, cut_model
from finetune.training.freezing import apply_freeze, plan_freeze
from finetune.training.lightning_module import FinetuneModule

warnings.filterwarnings("ignore")
CLASSES = 4


def _resnet(train_from: str, bn: str = "frozen", dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    heads.replace_heads(model, CLASSES, dropout=dropout)
    apply_freeze(model, plan_freeze(model, train_from, bn=bn))
    return model


@pytest.mark.parametrize(("train_from", "boundary", "shape"), [
    ("fc", "the output of flatten", (2, 512)),
    ("layer4", "the output of layer3.1", (2, 256, 2, 2)),
])
def test_the_cut_computes_what_the_model_computes(train_from: str, boundary: str,
                                                  shape: tuple[int, ...]) -> None:
    model = _resnet(train_from).eval()
    cut = cut_model(model)
    assert isinstance(cut, Cut) and cut.boundary == boundary
    x = torch.randn(2, 3, 32, 32)
    features = cut.prefix(x)
    assert tuple(features.shape) == shape
    torch.testing.assert_close(cut.suffix(features), model(x), rtol=0, atol=0)
    # The suffix holds the model's own modules: training it trains the model.
    assert cut.suffix.get_submodule("fc") is model.get_submodule("fc")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert set(cut.prefix.state_dict()) & frozen == {k for k in cut.prefix.state_dict()
                                                     if k in frozen}
    assert not any(p.requires_grad for p in cut.prefix.parameters())


def test_random_or_stateful_frozen_layers_run_every_step() -> None:
    """Dropout or BatchNorm in training mode in the frozen part: the cut comes before them."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(num_classes=CLASSES)
    apply_freeze(vgg, plan_freeze(vgg, "classifier.6"))
    cut = cut_model(vgg)
    assert isinstance(cut, Cut) and cut.boundary == "the output of classifier.1"
    assert cut.stopped == "classifier.2 (Dropout) is random in training"
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    expected = vgg(x)  # dropout on: the suffix must draw the same masks
    torch.manual_seed(1)
    torch.testing.assert_close(cut.suffix(cut.prefix(x)), expected, rtol=0, atol=0)
    bn_train = _resnet("layer4", bn="train")
    cut = cut_model(bn_train)
    assert isinstance(cut, Cut) and cut.boundary == "the output of conv1"
    assert cut.stopped == ("bn1 is a BatchNorm in training mode (freeze.bn=train): it "
                           "normalizes with batch statistics and updates its own")
    # auto does not keep a cut that computes little of the frozen part; true does
    assert decide("auto", bn_train, False, False, 3.0) == (None, (
        f"off: the cut is at the output of conv1, before {cut.stopped}; it would compute only "
        "0% of the frozen parameters once (freeze.cache=true forces it)"))
    assert isinstance(decide("true", bn_train, False, False, 3.0)[0], Cut)


def test_models_without_a_single_cut_have_no_cache() -> None:
    assert cut_model(_resnet("conv1")) == ("the first layer trains: there is no frozen prefix "
                                           "to compute once")
    torch.manual_seed(0)
    googlenet = torchvision.models.googlenet(num_classes=CLASSES, aux_logits=True,
                                             init_weights=False)
    apply_freeze(googlenet, plan_freeze(googlenet, "fc"))
    assert "differs between training and evaluation" in str(cut_model(googlenet))


def test_decide_follows_the_setting() -> None:
    model = _resnet("fc")
    assert decide("false", model, False, False, 5.0) == (None, "off (freeze.cache=false)")
    assert decide("auto", model, False, True, 5.0)[1] == "off: data.augment is random"
    assert decide("auto", model, True, False, 5.0)[0] is None
    assert decide("auto", model, False, False, 0.5)[0] is None  # it would not save work
    assert isinstance(decide("true", model, False, False, 0.5)[0], Cut)
    assert isinstance(decide(True, model, False, False, 3.0)[0], Cut)  # YAML's bool
    with pytest.raises(FinetuneError, match=r"freeze\.cache=true but nothing is frozen"):
        decide("true", _resnet("conv1"), False, False, 3.0)
    with pytest.raises(FinetuneError, match=r"freeze\.cache=.sometimes.: use auto, true or false"):
        decide("sometimes", model, False, False, 3.0)


def test_cache_true_is_refused_with_augmentation_or_unfreeze_phases() -> None:
    problems = config_conflicts(True, [{"name": "hflip"}], [{"epoch": 2, "train_from": "layer3"}],
                                "layer4", [])
    assert problems == [
        "freeze.cache=true but data.augment is random: the frozen layers' outputs differ every "
        "epoch, so they cannot be computed once; remove the augmentation or use "
        "freeze.cache=auto (off here)",
        "freeze.cache=true but freeze.unfreeze opens frozen layers at epoch 2: their outputs "
        "change then; drop the phases or use freeze.cache=auto (off here)"]
    assert config_conflicts("auto", [{"name": "hflip"}], [], "layer4", []) == []
    assert "nothing is frozen" in config_conflicts("true", [], [], None, [])[0]


def _fit(cached: bool, epochs: int = 3) -> tuple[FinetuneModule, pl.Trainer, FeatureCache | None]:
    model = _resnet("layer4", dropout=0.3)
    plan = plan_freeze(model, "layer4")
    prep = preprocessing(None, 32)
    split, names = fake_data(64, CLASSES, 32, seed=0)
    transform = eval_transform(prep)
    data = ImageDataModule(TensorImages(split.items[:48], split.labels[:48], transform),
                           TensorImages(split.items[48:], split.labels[48:], transform),
                           names, batch_size=16, num_workers=0)
    cfg = OmegaConf.merge(OmegaConf.structured(OptimConfig),
                          {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01})
    module = FinetuneModule(model, CLASSES, plan, cfg, OmegaConf.structured(SchedConfig()))
    callback = FeatureCache(cut_model(model)) if cached else None
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[callback] if callback else [])
    trainer.fit(module, datamodule=data)
    return module, trainer, callback


def test_training_on_cached_features_gives_the_same_model() -> None:
    before = {k: v.clone() for k, v in _resnet("layer4", dropout=0.3).state_dict().items()}
    cached, cached_trainer, callback = _fit(True)
    plain, plain_trainer, _ = _fit(False)
    assert callback is not None and callback.info["status"] == "computed"
    assert callback.info["shape"] == [256, 2, 2]
    assert isinstance(cached.trainer.datamodule.train_set.features, torch.Tensor)
    after_cached, after_plain = cached.model.state_dict(), plain.model.state_dict()
    for name, tensor in before.items():
        if name.startswith(("conv1", "bn1", "layer1", "layer2", "layer3")):
            assert torch.equal(after_cached[name], tensor), name  # frozen: bit-exact
        torch.testing.assert_close(after_cached[name], after_plain[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(after_cached[n], before[n]) for n in before
               if n.startswith("layer4") and "weight" in n)  # the suffix trained
    for key in ("val/acc", "val/loss"):
        assert float(cached_trainer.callback_metrics[key]) == pytest.approx(
            float(plain_trainer.callback_metrics[key]), abs=1e-5)
    assert cached.last_predictions == plain.last_predictions


def test_stored_features_are_trusted_only_with_our_record(tmp_path: Path) -> None:
    """A sweep dir can arrive from someone else with feature files planted under the right
    key: they are read only when finetune's private record of the file's sha256 matches."""
    import numpy as np

    from finetune.training.feature_cache import FeatureCache

    store = FeatureCache(None, tmp_path / "feature_cache")  # type: ignore[arg-type]
    key = "ab" * 32
    planted = store._file(key, "train")
    planted.parent.mkdir()
    np.save(planted, np.ones((4, 3), dtype=np.float32))
    assert store._read(key, "train") is None, "no record: computed again"
    ours = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    store._keep(ours, key, "train")
    assert torch.equal(torch.as_tensor(store._read(key, "train")), ours)
    np.save(planted, np.ones((4, 3), dtype=np.float32))  # replaced after we wrote it
    assert store._read(key, "train") is None


def test_the_key_changes_with_the_frozen_weights() -> None:
    """Same architecture, same code, other weights: other features, so another key."""
    from finetune.training.feature_cuts import prefix_identity

    first = cut_model(_resnet("layer4"))
    other_model = _resnet("layer4")
    with torch.no_grad():
        other_model.layer1[0].conv1.weight.add_(1.0)
    second = cut_model(other_model)
    assert isinstance(first, Cut) and isinstance(second, Cut)
    a, b = prefix_identity(first.prefix), prefix_identity(second.prefix)
    assert a["code"] == b["code"] and a["modules"] == b["modules"]
    assert a != b


# -- nested cuts: a sweep's split points share their frozen layers' work ---------------------


def test_a_prefix_cuts_again_where_one_value_carries_the_rest() -> None:
    """The points where the prefix of `train_from=fc` can be cut again, and that running it
    in segments between them computes what it computes, bit for bit."""
    from finetune.training.feature_cuts import bottlenecks, segment

    prefix = cut_model(_resnet("fc").eval()).prefix
    points = bottlenecks(prefix)
    assert points[-1] == "flatten" and {"maxpool", "layer1_1", "layer2_1", "layer3_1",
                                        "layer4_1", "avgpool"} <= set(points)
    assert "bn1" in points and points.index("layer2_1") < points.index("layer3_1")
    x = torch.randn(3, 3, 32, 32)
    whole = prefix(x)
    first, rest = segment(prefix, None, "layer2_1"), segment(prefix, "layer2_1", "flatten")
    assert torch.equal(rest(first(x)), whole)
    assert not any(n.op == "call_module" and str(n.target).startswith(("conv1", "layer1"))
                   for n in rest.graph.nodes)  # the rest starts at layer3


def test_a_shallower_split_is_keyed_as_the_start_of_a_deeper_one() -> None:
    """Job train_from=layer3 caches the output of layer2; job train_from=fc finds it under
    the same key (same code, modules, tensors) and computes only layer3 onwards."""
    from finetune.training.feature_cache import FeatureCache
    from finetune.training.feature_cuts import (
        bottlenecks,
        prefix_identity,
        segment,
        split_bottleneck,
    )

    shallow, deep = cut_model(_resnet("layer3")), cut_model(_resnet("fc"))
    own = segment(shallow.prefix, None, bottlenecks(shallow.prefix)[-1])
    inside = segment(deep.prefix, None, "layer2_1")
    assert prefix_identity(own) == prefix_identity(inside)
    points = bottlenecks(deep.prefix)
    assert split_bottleneck(deep.prefix, points, "layer3") == "layer2_1"
    assert split_bottleneck(deep.prefix, points, "layer1") == "maxpool"
    assert split_bottleneck(deep.prefix, points, "fc") is None  # not inside this prefix
    cache = FeatureCache(deep, Path("unused"), splits=["layer2", "layer3", "layer4", "fc"])
    assert cache.keep_also(deep.prefix) == ["layer1_1", "layer2_1", "layer3_1"]
    assert FeatureCache(deep, None, splits=["layer3"]).keep_also(deep.prefix) == []


def test_features_from_a_stored_cut_equal_those_from_the_images() -> None:
    from finetune.training.feature_cache import FeatureCache

    """Bit for bit: a deeper job that starts from a shallower job's stored features trains on
    exactly what it would have computed from the images."""
    deep = cut_model(_resnet("fc").eval())
    split, _ = fake_data(70, CLASSES, 32, seed=0)
    images = TensorImages(split.items, split.labels, eval_transform(preprocessing(None, 32)))
    cache = FeatureCache(deep)
    cpu = torch.device("cpu")
    direct = cache.compute(images, cpu, None, ["layer2_1", "flatten"], batch_size=64)
    assert direct["layer2_1"].shape == (70, 128, 4, 4)
    resumed = cache.compute(direct["layer2_1"], cpu, "layer2_1", ["flatten"], batch_size=64)
    assert torch.equal(resumed["flatten"], direct["flatten"])
    with torch.no_grad():
        whole = torch.cat([deep.prefix(torch.stack([images[i][0] for i in range(b, min(b + 64,
                                                                                      70))]))
                           for b in (0, 64)])
    assert torch.equal(direct["flatten"], whole)


def _fit_split(train_from: str, directory: Path, splits: list[str]) -> FeatureCache:
    """One job of a split sweep, in this process: a real Trainer, the cache kept in
    `directory`, the sweep's split points `splits`."""
    model = _resnet(train_from)
    split, names = fake_data(48, CLASSES, 32, seed=0)
    transform = eval_transform(preprocessing(None, 32))
    data = ImageDataModule(TensorImages(split.items[:32], split.labels[:32], transform),
                           TensorImages(split.items[32:], split.labels[32:], transform),
                           names, batch_size=16, num_workers=0)
    module = FinetuneModule(model, CLASSES, plan_freeze(model, train_from),
                            OmegaConf.structured(OptimConfig),
                            OmegaConf.structured(SchedConfig()))
    callback = FeatureCache(cut_model(model), directory, splits=splits)
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               callbacks=[callback]).fit(module, datamodule=data)
    return callback


def test_a_deeper_job_starts_from_a_shallower_jobs_features(tmp_path: Path) -> None:
    """layer3's job keeps the output of layer2; fc's job then computes only layer3 onwards
    (from the stored output), and what it trains on equals the images' features."""
    shallow = _fit_split("layer3", tmp_path / "features", [])
    assert shallow.info["status"] == "computed" and "from" not in shallow.info
    deep = _fit_split("fc", tmp_path / "features", [])
    assert deep.info["from"] == "the stored output of layer2.1"
    assert deep.info["stored"] == ["flatten"]
    alone = _fit_split("fc", tmp_path / "other", [])  # the same job, from the images
    assert "from" not in alone.info and alone.info["key"] == deep.info["key"]
    stored = sorted((tmp_path / "features").glob("*-train.npy"))
    import numpy as np
    assert any(np.array_equal(np.load(f), np.load(next((tmp_path / "other").glob(
        "*-train.npy")))) for f in stored)
