"""The small classifiers that stand in for Inception in the offline metrics.

Inception-v3 features mean nothing on 8x8 greyscale digits or 28x28 Fashion-MNIST (and its weights would have
to be downloaded), so sample quality is measured in the feature space of a small CNN instead, trained by
``recipes/train_eval_classifier.py`` (``--dataset digits`` on the digits *train* split, ``--dataset fashion``
on the Fashion-MNIST train split) and shipped in ``distill/assets/``. One architecture,
:class:`DigitsClassifier`, sized by :class:`ClassifierConfig` (stored in the weights' metadata), serves both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_WEIGHTS = ASSETS_DIR / "digits_classifier.safetensors"
FASHION_WEIGHTS = ASSETS_DIR / "fashion_classifier.safetensors"
TRAIN_COMMAND = "python recipes/train_eval_classifier.py"


@dataclass
class ClassifierConfig:
    """Architecture of :class:`DigitsClassifier`; kept in the weights' metadata so a file rebuilds itself."""

    in_channels: int = 1
    widths: tuple[int, int, int] = (32, 64, 64)
    hidden: int = 128
    feature_dim: int = 64
    num_classes: int = 10
    image_size: int = 8
    #: 2x2 average pooling after each of the three convs (1) or not (0): digits (0, 1, 1), 32x32 images
    #: (1, 1, 1) so the convs run at 32/16/8 pixels and the flattened conv features stay 64 * 4 * 4 wide
    pools: tuple[int, int, int] = (0, 1, 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClassifierConfig:
        raw = json.loads(text)
        raw["widths"] = tuple(raw["widths"])
        if "pools" in raw:
            raw["pools"] = tuple(raw["pools"])
        return cls(**raw)

    @property
    def conv_size(self) -> int:
        """Side of the last conv block's output (each pooling halves it, flooring)."""
        size = self.image_size
        for pool in self.pools:
            size = size // 2 if pool else size
        return size


class DigitsClassifier(nn.Module):
    """Three conv-SiLU blocks (each optionally followed by 2x2 average pooling: ``config.pools``; the digits'
    conv-SiLU-conv-SiLU-pool-conv-SiLU-pool by default), then an MLP whose penultimate layer is the feature.

    ``features`` returns that layer *before* its SiLU: pre-activations are closer to Gaussian than the
    non-negative-leaning activations after it, which is what the Frechet distance assumes.
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        layers: list[nn.Module] = []
        for width_in, width, pool in zip(
            (config.in_channels, *config.widths[:-1]), config.widths, config.pools, strict=True
        ):
            layers += [nn.Conv2d(width_in, width, 3, padding=1), nn.SiLU()]
            layers += [nn.AvgPool2d(2)] if pool else []
        self.conv = nn.Sequential(*layers)  # the digits' default keeps the shipped file's layer indices
        flat = config.widths[-1] * config.conv_size**2
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(flat, config.hidden), nn.SiLU())
        self.penultimate = nn.Linear(config.hidden, config.feature_dim)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(config.feature_dim, config.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> [B, feature_dim] penultimate pre-activations (the FD features)."""
        return self.penultimate(self.mlp(self.conv(x)))

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, widths[-1] * conv_size^2], the flattened last conv block (the digits' k-NN
        features).

        The 64-d head of a classifier this small maps off-manifold inputs (noise, blur) towards the middle of
        its feature cloud, inside the large k-NN balls of the few real outliers, so k-NN precision there calls
        about half of pure noise "realistic"; these spatial features keep such inputs outside the real balls.
        """
        return self.conv(x).flatten(1)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(features(x), conv_features(x), logits)`` in one pass: evaluators need all three."""
        h = self.conv(x)
        features = self.penultimate(self.mlp(h))
        return features, h.flatten(1), self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> [B, num_classes] logits."""
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Class indices [B], in batches so large sample sets fit in memory."""
        return torch.cat([self(chunk).argmax(1) for chunk in x.split(batch_size)])


def save_digits_classifier(
    model: DigitsClassifier,
    path: str | Path,
    extra: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Weights as safetensors with the architecture in the metadata (no pickles); ``dtype`` float16 halves a
    shipped file (the features then move by ~1e-3 relative: reference statistics must be computed with the
    weights as saved)."""
    state = {k: v.detach().cpu().to(dtype).contiguous() for k, v in model.state_dict().items()}
    metadata = {"config": model.config.to_json(), **(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    Path(path).chmod(0o644)  # safetensors creates 0600 files; shipped package data must be world-readable


def load_digits_classifier(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> DigitsClassifier:
    """The shipped (or a given) classifier in eval mode, gradients off: it is a fixed measuring device.

    Weights stored in float16 (the Fashion-MNIST one) load into the float32 model."""
    file = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not file.is_file():
        how = " --dataset fashion" if file.name == FASHION_WEIGHTS.name else ""
        hint = (
            f"`{TRAIN_COMMAND}{how}`"
            if path is None or file == FASHION_WEIGHTS
            else f"`{TRAIN_COMMAND}{how} --out-dir {file.parent}`"
        )
        raise FileNotFoundError(
            f"digits classifier weights not found at {str(file)!r}; create them with {hint} "
            "(about ten CPU-seconds, no downloads)"
        )
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    config = ClassifierConfig.from_json(metadata["config"]) if "config" in metadata else ClassifierConfig()
    model = DigitsClassifier(config)
    model.load_state_dict({k: v.float() for k, v in load_file(str(file)).items()})
    model.eval().requires_grad_(False)
    return model.to(device)
