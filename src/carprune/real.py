"""The paper's experiment on real pretrained RGB networks, without retraining (`make real`).

For each network: photo windows at its input size, the scoring split and the test split cut
from different photographs, labelled by the unpruned network itself (`--labels model`), so
every figure is agreement with the original (top-1, and top-5 where it has more classes).

- per layer (the paper's experiment): the first two prunable conv layers, one at a time, by
  every criterion of `carprune.criteria`, agreement on test over a keep grid, no retraining;
- post-training global pruning to a MACs target: CAR with least-squares compensation against
  Torch-Pruning's global magnitude and Taylor pruning at the same MACs, no fine-tuning;
- colour: the first layer's colour-selective filters (weight colour index above
  `WEIGHT_THRESHOLD`) among the first filters each criterion removes, against the layer's share,
  with the exact permutation p-value (hypergeometric: random order draws without replacement);
- diversity of the kept first-layer bank, and class importance with top patches (report).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .compare import kept_counts, removal_order
from .compensation import consumers_of, inverses, refitted
from .compensation import remove as compensated_remove
from .criteria import CRITERIA
from .data import IMAGENET_STATS, package_photos, photo_windows
from .devices import device_of
from .errors import CarpruneError
from .groups import Surgery, Unit
from .interpret.colour import WEIGHT_THRESHOLD, colour_selectivity, diversity_comparison
from .io import from_factory
from .measure import macs_params, unit_costs
from .models.shipped import imagenet_classes, load_shipped
from .prune import group_leaders
from .scoring import ScoringSet
from .scoring.first_order import first_order
from .scoring.graph import inference, trace

SCORING_PHOTOS = ("astronaut", "coffee", "rocket", "china", "bus", "department_store", "group")
TEST_PHOTOS = ("chelsea", "grace_hopper", "flower", "motorcycle", "zidane", "luispedro")
FIRST_COLOUR = 20
MIN_KEEP = 0.1
TP_STEPS = 100
BLOCK_DAMPING = 1e-2  # block CAR refits on a few windows: a ridge 100x --compensate's
CURVE_MACS = (0.9, 0.7)  # global runs also measure agreement where they pass these MACs
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class RealConfig:
    """One place for the experiment's sizes (two cores: see docs/real.md for the costs)."""
    scoring_images: int = 32
    test_images: int = 64
    global_images: int = 16
    keep_grid: tuple[float, ...] = (0.75, 0.5)
    random_seeds: int = 5
    target_macs: float = 0.5
    block_fraction: float = 0.25
    blocks_per_round: int = 8
    seed: int = 0
    progress: bool = True

    @classmethod
    def checked(cls, args) -> RealConfig:
        """The sizes from parsed arguments (same names), each refused in one sentence."""
        config = cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__
                        if k != "progress" and hasattr(args, k)})
        config.keep_grid = tuple(config.keep_grid)
        if config.scoring_images < 2 or config.test_images < 1 or config.random_seeds < 1:
            raise CarpruneError("--scoring-images must be at least 2, --test-images and "
                                "--random-seeds at least 1")
        if not 1 <= config.global_images <= config.scoring_images:
            raise CarpruneError(f"--global-images must be between 1 and --scoring-images "
                                f"({config.scoring_images}), got {config.global_images}")
        if 0.5 not in config.keep_grid or not all(0 < k < 1 for k in config.keep_grid):
            raise CarpruneError("--keep-grid takes fractions between 0 and 1 and must hold "
                                "0.5, where the criteria are compared")
        if not 0 < config.target_macs < 1 or not 0 < config.block_fraction < 1 \
                or config.blocks_per_round < 1:
            raise CarpruneError("--target-macs and --block-fraction must be between 0 and 1, "
                                "--blocks-per-round at least 1")
        return config


@dataclass
class Network:
    """A pretrained network as the experiment reads it: RGB at size x size, normalised by
    mean and std of [0, 1] pixels; `layers`, its first two conv layers, pruned one at a time."""
    name: str
    model: nn.Module
    description: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: list[str]
    layers: tuple[str, str]
    size: int = 224

    @classmethod
    def from_factory(cls, factory: str, weights: str, layers: tuple[str, str], size: int,
                     trust_pickle: bool = False) -> Network:
        """A user's network (`package.module:function`) with its weights from a file
        (safetensors; a torch.save file only with `trust_pickle`, read weights_only)."""
        model = from_factory(factory, weights, trust_pickle)
        surgery = Surgery(model, torch.zeros(1, 3, size, size))
        for layer in layers:
            surgery.check_layer(layer)
        with torch.inference_mode():
            classes = model.eval()(torch.zeros(1, 3, size, size)).shape[1]
        return cls(factory, model, f"{factory} with {weights}", *IMAGENET_STATS,
                   [str(c) for c in range(classes)], layers, size)


def shipped(name: str) -> Network:
    """A network of carprune.models.shipped, with ImageNet's class names where it has them."""
    model, info = load_shipped(name)
    classes = info.classes if isinstance(info.classes, list) else imagenet_classes()
    return Network(name, model, f"{name} ({info.pip}, {info.relative})", info.mean, info.std,
                   classes, info.first_layers, info.size)


@dataclass
class Split:
    """Scoring and test windows (normalised) with the unpruned network's labels."""
    scoring: TensorDataset
    test: TensorDataset
    info: dict = field(default_factory=dict)


def _windows(photos: dict, n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    per_photo = math.ceil(n / (2 * len(photos)))
    pixels, origin = photo_windows(photos, per_photo, seed=seed, size=size,
                                   min_side=size // 2, max_fraction=0.9)
    pick = np.sort(np.random.default_rng(seed).choice(len(pixels), n, replace=False))
    return pixels[pick], [origin[i]["photo"] for i in pick]


def normalised(net: Network, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 255] as the network reads them."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (net.mean, net.std))
    return (pixels / 255 - mean) / std


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for images x (on the CPU), run folded (`scoring.graph.inference`), in
    batches of 64 on the model's device."""
    run = inference(model)
    return torch.cat([run(b.to(device_of(model))).cpu() for b in x.split(64)])


def labelled(net: Network, pixels: torch.Tensor) -> TensorDataset:
    """Pixels in [0, 255] as the network reads them, labelled by the network."""
    x = normalised(net, pixels)
    with torch.no_grad():  # not inference mode: Taylor pruning takes gradients on these
        return TensorDataset(x, logits(net.model, x).argmax(1))


def photo_split(net: Network, config: RealConfig) -> Split:
    """The scoring windows from SCORING_PHOTOS and the test windows from TEST_PHOTOS."""
    photos = package_photos(SCORING_PHOTOS + TEST_PHOTOS)
    missing = sorted(set(SCORING_PHOTOS + TEST_PHOTOS) - set(photos))
    if missing:
        raise CarpruneError(f"photos {', '.join(missing)} are missing: they ship in "
                            "scikit-image, scikit-learn, ultralytics, mahotas and insightface; "
                            "run make real, which installs them")
    parts = [{k: photos[k] for k in names} for names in (SCORING_PHOTOS, TEST_PHOTOS)]
    sizes = (config.scoring_images, config.test_images)
    (xs, ps), (xt, pt) = (_windows(p, n, net.size, config.seed + i)
                          for i, (p, n) in enumerate(zip(parts, sizes, strict=True)))
    scoring, test = (labelled(net, x) for x in (xs, xt))
    info = {name: {"photos": {k: list(v.shape) for k, v in part.items()}, "windows": len(x),
                   "per_photo": {k: origin.count(k) for k in part},
                   "classes_seen": len(set(d.tensors[1].tolist()))}
            for name, part, x, origin, d in (("scoring", parts[0], xs, ps, scoring),
                                             ("test", parts[1], xt, pt, test))}
    return Split(scoring, test, info)


def _folder_pixels(root: Path, size: int, n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Up to n images of a folder (a seeded draw), resized and centre-cropped as torchvision's
    ImageNet evaluation does (shorter side to size * 256 / 224, then the centre), in [0, 255],
    with their class indices (the sorted subfolders)."""
    from PIL import Image
    from torchvision.transforms import v2

    if not root.is_dir():
        raise CarpruneError(f"folder {root} does not exist; give a folder of images, laid out "
                            "as root/<class>/*.jpg")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = sorted((f, classes.index(f.parent.name) if f.parent != root else -1)
                   for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CarpruneError(f"{root} holds no .jpg, .jpeg or .png images; point it at a folder "
                            "of photographs")
    pick = np.sort(np.random.default_rng(seed).permutation(len(files))[:n])
    view = v2.Compose([v2.Resize(round(size * 256 / 224)), v2.CenterCrop(size)])
    pixels = []
    for i in pick:
        with Image.open(files[i][0]) as img:
            pixels.append(view(torch.tensor(np.asarray(img.convert("RGB"))).permute(2, 0, 1)))
    return torch.stack(pixels).float(), [files[i][1] for i in pick]


def folder_split(net: Network, scoring: Path, test: Path, config: RealConfig,
                 folder_labels: bool) -> Split:
    """Scoring and test images from two folders (other photographs), labelled by the network,
    or by their subfolders when `folder_labels` (then "agreement" is accuracy)."""
    parts = []
    for i, (root, n) in enumerate(((scoring, config.scoring_images), (test, config.test_images))):
        pixels, classes = _folder_pixels(root, net.size, n, config.seed + i)
        if folder_labels and min(classes) < 0:
            raise CarpruneError(f"{root} has images outside class subfolders; use --labels "
                                "model or lay it out as root/<class>/*.jpg")
        parts.append(TensorDataset(normalised(net, pixels), torch.tensor(classes))
                     if folder_labels else labelled(net, pixels))
    info = {name: {"folder": str(root), "windows": len(d), "photos": [str(root)],
                   "classes_seen": len(set(d.tensors[1].tolist()))}
            for name, root, d in (("scoring", scoring, parts[0]), ("test", test, parts[1]))}
    return Split(*parts, info)


@torch.inference_mode()
def agreement(model: nn.Module, data: TensorDataset) -> dict[str, float]:
    """Share of images on which `model` keeps the unpruned network's label: top-1, and top-5
    (the label among its five best) when it has more than five classes."""
    x, y = data.tensors
    out = logits(model, x)
    result = {"top1": float((out.argmax(1) == y).float().mean())}
    if out.shape[1] > 5:
        result["top5"] = float((out.topk(5, 1).indices == y[:, None]).any(1).float().mean())
    return result


def per_layer(model: nn.Module, split: Split, layer: str, config: RealConfig,
              num_classes: int) -> tuple[dict, dict[str, list[list[int]]]]:
    """Agreement on test of `layer` pruned by every criterion at every keep of the grid (random:
    the mean of `random_seeds` seeds), and the removal orders (scored on the scoring split).
    Criteria that remove the same filters share one evaluation."""
    scoring = ScoringSet.from_any(split.scoring, num_classes).to(device_of(model))
    surgery = Surgery(copy.deepcopy(model), scoring.example())
    n = surgery.size(layer)
    counts = kept_counts(n, config.keep_grid)
    table, orders, seen = {}, {}, {}

    def without(removed: list[int]) -> dict:
        key = frozenset(removed)
        if key not in seen:
            with surgery.ablated([Unit(layer, c) for c in removed]):
                seen[key] = agreement(surgery.model, split.test)
        return seen[key]

    for name in tqdm(CRITERIA, desc=f"per layer {layer}", unit="criterion",
                     disable=not config.progress):
        seeds = range(config.random_seeds) if name == "random" else [config.seed]
        orders[name] = [removal_order(model, scoring, layer, name, counts[-1], s,
                                      config.progress) for s in seeds]
        table[name] = {str(kept): _mean([without(o[:n - kept]) for o in orders[name]])
                       for kept in counts}
    return table, orders


def _mean(results: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


class Curve:
    """A global run's agreement on test the first time its MACs fall to each level of
    CURVE_MACS (one point per level, so that runs line up), and the seconds those evaluations
    took (not the run's)."""

    def __init__(self, test: TensorDataset, start: float):
        self.test, self.start = test, start
        self.left, self.points, self.seconds = list(CURVE_MACS), [], 0.0

    def __call__(self, model: nn.Module) -> float:
        """The model's share of the starting MACs, its agreement kept if it passed a level."""
        share = macs_params(model, self.test.tensors[0].shape[1:])[0] / self.start
        passed = [level for level in self.left if share <= level]
        if passed:
            began = time.perf_counter()
            kept = agreement(model, self.test)
            self.points += [{"level": level, "macs": share, **kept} for level in passed]
            self.left = self.left[len(passed):]
            self.seconds += time.perf_counter() - began
        return share


def torch_pruning(model: nn.Module, scoring: TensorDataset, target: float, importance: str,
                  curve: Curve) -> nn.Module:
    """Torch-Pruning's own global pruning (BasePruner, global_pruning=True, linear layers left
    whole) stepped until the network has at most `target` of its MACs. Taylor's gradients are
    those of the cross-entropy on the scoring split (the network's own labels), taken before
    each step."""
    model = copy.deepcopy(model).eval()
    x, y = (t.to(device_of(model)) for t in scoring.tensors)
    x = x.contiguous(memory_format=torch.channels_last)  # a fifth faster gradients on CPU
    pruner = tp.pruner.BasePruner(
        model, x[:1], global_pruning=True, pruning_ratio=0.9, iterative_steps=TP_STEPS,
        importance=(tp.importance.GroupTaylorImportance() if importance == "taylor" else
                    tp.importance.GroupMagnitudeImportance(p=2)),
        ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)])
    for _ in range(TP_STEPS):  # each step prunes 0.9 / TP_STEPS more, globally
        if curve(model) <= target:
            break
        if importance == "taylor":
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        pruner.step()
    model.zero_grad()
    return model


def _blocks(surgery: Surgery, layers: list[str], floors: dict[str, int],
            scoring: ScoringSet, fraction: float) -> dict[str, list[int]]:
    """Per layer above its floor, its `fraction` of filters (at least one) that the first-order
    estimate ranks least needed (current channel numbers)."""
    estimate = first_order(surgery, layers, scoring)
    blocks = {}
    for layer in layers:
        room = surgery.size(layer) - floors[layer]
        if room > 0:
            ranked = sorted(range(surgery.size(layer)),
                            key=lambda c, layer=layer: (estimate[Unit(layer, c)], c))
            blocks[layer] = ranked[:min(room, max(1, round(fraction * surgery.size(layer))))]
    return blocks


@torch.inference_mode()
def _lost(surgery: Surgery, units: list[Unit], p: dict, scoring: ScoringSet,
          traced: torch.fx.GraphModule | None = None) -> tuple:
    """(images whose label changes, summed loss) without the units, their consumers refit
    (`traced`: the network's trace, if the caller has one)."""
    wrong, loss = 0, 0.0
    with surgery.ablated(units), refitted(surgery, units, p):
        run = inference(surgery.model, traced)
        for x, y in scoring.batches:
            out = run(x)
            wrong += int((out.argmax(1) != y).sum())
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
    return wrong, loss


def _halves(data: TensorDataset, num_classes: int, device) -> tuple[ScoringSet, ScoringSet]:
    """The first and second half of the images (the second takes an odd one out; a single
    image serves as both)."""
    half = len(data) // 2
    return tuple(ScoringSet.from_any(TensorDataset(*(t[part] for t in data.tensors)),
                                     num_classes).to(device)
                 for part in (slice(None, max(1, half)), slice(half, None)))


def _costs(surgery: Surgery, units: dict[str, list[Unit]], fit: ScoringSet,
           judge: ScoringSet) -> dict[str, tuple[float, float]]:
    """Per layer, its block's (labels changed, loss) on `judge` per MAC saved, with the
    block's consumers refit on `fit`."""
    p = inverses(surgery, list(consumers_of(surgery, [u for us in units.values() for u in us])),
                 fit.batches, BLOCK_DAMPING)
    keys, traced = {}, trace(surgery.model)
    costs = unit_costs(surgery, list(units), "macs")
    for n, us in units.items():
        saved = sum(costs[n][u.channel] for u in us)
        wrong, loss = _lost(surgery, us, p, judge, traced)
        keys[n] = (wrong / saved, loss / saved)
    return keys


def block_car(model: nn.Module, data: TensorDataset, config: RealConfig, num_classes: int,
              curve: Curve) -> tuple[nn.Module, list[str]]:
    """Global CAR over blocks, with least-squares compensation: an approximation for networks
    where even one exact candidate per removed filter is too dear (MobileNetV2 at 224 px needs
    some 4 400 removals to halve its MACs). Every round each layer offers one block, the
    `block_fraction` of its filters that the first-order estimate ranks least needed; each
    block's joint absence is scored exactly on the second half of the images (labels changed,
    then loss) with its consumers refit on the first half, so that a refit which only fits its
    own images scores what it loses on others; the `blocks_per_round` blocks that lose least
    per MAC saved go, refit on all the images, until the MACs are at `target_macs`. No layer
    keeps under MIN_KEEP, and residual-stage channels stay whole (under compensation they
    score on the naive path). Returns the pruned network and the residual layers left whole."""
    scoring = ScoringSet.from_any(data, num_classes).to(device_of(model))
    fit, judge = _halves(data, num_classes, device_of(model))
    surgery = Surgery(copy.deepcopy(model), scoring.example())
    residual = [n for n in surgery.conv_layers() if surgery.kind(n) == "residual"]
    layers = group_leaders(surgery, [n for n in surgery.conv_layers() if n not in residual])
    floors = {n: max(1, math.ceil(MIN_KEEP * surgery.size(n))) for n in layers}
    share = 1.0
    bar = tqdm(total=round(100 * (1 - config.target_macs)), desc="block CAR (% of MACs saved)",
               disable=not config.progress)
    while share > config.target_macs:
        blocks = _blocks(surgery, layers, floors, scoring, config.block_fraction)
        if not blocks:
            warnings.warn(f"block CAR stopped at {share:.1%} of the MACs, short of "
                          f"{config.target_macs:.0%}: every layer is at its floor", stacklevel=2)
            break
        keys = _costs(surgery, {n: [Unit(n, c) for c in chans] for n, chans in blocks.items()},
                      fit, judge)
        for n in sorted(keys, key=keys.get)[:config.blocks_per_round]:
            compensated_remove(surgery, n, blocks[n], scoring.batches, BLOCK_DAMPING)
            share = curve(surgery.model)
            bar.update(min(bar.total, round(100 * (1 - share))) - bar.n)
            if share <= config.target_macs:
                break
    bar.close()
    return surgery.model, residual


def global_pruning(model: nn.Module, split: Split, config: RealConfig,
                   num_classes: int) -> dict:
    """Post-training global pruning to `target_macs`: block CAR with compensation (on the
    first `global_images` scoring windows), then Torch-Pruning's global magnitude and Taylor
    pruning down to the MACs block CAR reached; agreement on test, at the end and on the way
    (CURVE_MACS)."""
    start = macs_params(model, split.test.tensors[0].shape[1:])[0]
    data = TensorDataset(*(t[:config.global_images] for t in split.scoring.tensors))
    results, target = {}, config.target_macs
    for name in ("car-compensate", "tp-magnitude", "tp-taylor"):
        began, curve = time.perf_counter(), Curve(split.test, start)
        if name == "car-compensate":
            pruned, residual = block_car(model, data, config, num_classes, curve)
        else:
            pruned = torch_pruning(model, data, target, name[3:], curve)
        seconds, share = time.perf_counter() - began - curve.seconds, curve(pruned)
        if name == "car-compensate":
            target = share  # Torch-Pruning goes down to the MACs block CAR reached
        results[name] = {"seconds": round(seconds, 1), **agreement(pruned, split.test),
                         "macs": share, "curve": curve.points}
    return {"methods": results, "images": len(data), "ignored_residual_layers": residual,
            "block_fraction": config.block_fraction,
            "blocks_per_round": config.blocks_per_round}


def colour_tail(n: int, colour: int, first: int, observed: int) -> float:
    """P(at least `observed` colour filters among the first `first` of a uniformly random order
    of `n` filters, `colour` of them colour-selective): the permutation p-value, exactly."""
    ways = sum(math.comb(colour, j) * math.comb(n - colour, first - j)
               for j in range(observed, min(colour, first) + 1))
    return ways / math.comb(n, first)


def colour_counts(weight: torch.Tensor, orders: dict[str, list[list[int]]]) -> dict | None:
    """Colour-selective filters among the first FIRST_COLOUR removed (the first half for layers
    under twice that), per criterion (random: the mean over its seeds), the layer's share, and
    each criterion's p-value against random order. None unless the layer reads RGB."""
    index = colour_selectivity(weight)
    if index is None:
        return None
    n = len(index)
    selective = {i for i, v in enumerate(index) if v > WEIGHT_THRESHOLD}
    first = FIRST_COLOUR if n >= 2 * FIRST_COLOUR else n // 2
    counts = {name: float(np.mean([len(selective & set(o[:first])) for o in runs]))
              for name, runs in orders.items()}
    return {**counts, "share": len(selective) / n, "first": first, "filters": n,
            "colour_filters": len(selective), "threshold": WEIGHT_THRESHOLD,
            "expected_at_share": len(selective) * first / n,
            "p_value": {name: colour_tail(n, len(selective), first, int(c))
                        for name, c in counts.items() if name != "random"},
            "index": [float(v) for v in index]}


def run_network(net: Network, split: Split, config: RealConfig) -> tuple[dict, dict]:
    """Everything the experiment measures on one network: its JSON entry (the layout of
    docs/real.md), and the removal orders per layer and criterion (for the report)."""
    began = time.perf_counter()
    num_classes = len(net.classes)
    per, curves, orders = {}, {}, {}
    halves = {layer: kept_counts(net.model.get_submodule(layer).out_channels, [0.5])[0]
              for layer in net.layers}
    for layer in net.layers:
        curves[layer], orders[layer] = per_layer(net.model, split, layer, config, num_classes)
        per[layer] = {name: points[str(halves[layer])]["top1"]
                      for name, points in curves[layer].items()}
    first = net.model.get_submodule(net.layers[0])
    car_half = orders[net.layers[0]]["car"][0][:first.out_channels - halves[net.layers[0]]]
    result = {
        "network": net.description, "layers": list(net.layers), "per_layer": per,
        "per_layer_curves": curves,
        "colour": colour_counts(first.weight, orders[net.layers[0]]),
        "diversity": diversity_comparison(first.weight, car_half, config.seed),
        "split": split.info, "unpruned": agreement(net.model, split.test),
        "removal_orders": {layer: {name: runs[0] for name, runs in by.items()}
                           for layer, by in orders.items()}}
    details = global_pruning(net.model, split, config, num_classes)
    result["global_half_macs"] = {name: m["top1"] for name, m in details["methods"].items()}
    result["global"] = details
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result, orders
