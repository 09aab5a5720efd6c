"""Image backbones and the report (text) encoder of AdaMatch.

Image backbones map ``(B, 1, S, S)`` images in medvl's ``[-1024, 1024]`` convention to a feature map
``(B, C, H, W)``; the adaptive patch layer (:mod:`medvl.models.adamatch.patches`) samples it. Choices:

* ``small_cnn``: a few strided conv blocks trained from scratch (tiny/demo presets);
* ``resnet18|resnet34|resnet50``: torchvision ResNets cut after ``layer3`` or ``layer4``, optionally
  initialised from a local torchvision state dict (the RGB stem is summed to one channel);
* ``xrv_densenet``: torchxrayvision's DenseNet-121 ``features`` (stride 32, 1024 channels), with
  weights from a local file only (never downloaded).

The text encoder is a Hugging Face BERT-style encoder built from a config (small for tiny/demo),
or any local Hugging Face model directory, followed by a linear projection. Word features are
the mean of their WordPiece pieces (see :mod:`medvl.text.tokenizer`). A folder that ships its own model code
(``auto_map`` in its ``config.json``, as CXR-BERT does) runs that code only with ``text.trust_remote_code: true``.
The trained encoder is saved as a Hugging Face folder of its own (:meth:`TextEncoder.save_pretrained`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from medvl.errors import ConfigError


class BackboneKind(str, Enum):
    SMALL_CNN = "small_cnn"
    RESNET18 = "resnet18"
    RESNET34 = "resnet34"
    RESNET50 = "resnet50"
    XRV_DENSENET = "xrv_densenet"


@dataclass
class BackboneConfig:
    kind: BackboneKind = BackboneKind.SMALL_CNN
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # small_cnn: one stride-2 stage each
    extra_convs: int = 1  # small_cnn: stride-1 conv blocks after the last stage
    # small_cnn: kernel of each stage's second conv and of the extra convs. 1 keeps the receptive field at
    # 15 px (stride 8): a patch then sees its own neighbourhood only, and no central patch can summarise the
    # whole chest and win every word (hub patches); the adaptive box and its k x k points widen what a
    # patch sees where a finding is large.
    second_kernel: int = 3
    resnet_layer: int = 3  # resnets: cut after layer3 (stride 16) or layer4 (stride 32)
    weights: str | None = None  # local weight file (torchvision / torchxrayvision state dict or safetensors)

    def validate(self) -> None:
        if self.kind == BackboneKind.SMALL_CNN and not self.channels:
            raise ConfigError("backbone.channels needs at least one stage for small_cnn")
        if self.second_kernel not in (1, 3):
            raise ConfigError(f"backbone.second_kernel must be 1 or 3, got {self.second_kernel}")
        if self.resnet_layer not in (3, 4):
            raise ConfigError(f"backbone.resnet_layer must be 3 or 4, got {self.resnet_layer}")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors`` or torch file (tensors only: no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weight file {path} does not exist (weights are read from local disk only)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled whole modules (torchxrayvision's .pt files) land here
        raise ConfigError(
            f"{path} is not a plain state dict ({type(exc).__name__}). torchxrayvision ships pickled models; "
            "convert once with: python -c \"import torch; m = torch.load('IN.pt', weights_only=False); "
            "torch.save(m.state_dict(), 'OUT.pt')\" and point backbone.weights at OUT.pt"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


class SmallCNN(nn.Module):
    """Strided conv blocks: (B, 1, S, S) in [-1024, 1024] -> (B, channels[-1], S/2**n, S/2**n)."""

    def __init__(self, channels: list[int], extra_convs: int = 1, second_kernel: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        k, pad = second_kernel, second_kernel // 2
        for c in channels:
            layers += [
                nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, k, padding=pad, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
        for _ in range(extra_convs):
            layers += [
                nn.Conv2d(c_in, c_in, k, padding=pad, bias=False),
                nn.BatchNorm2d(c_in),
                nn.ReLU(inplace=True),
            ]
        self.body = nn.Sequential(*layers)
        self.out_channels = c_in
        self.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN) and GPU

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body((images / 1024.0).contiguous(memory_format=torch.channels_last))


class ResNetBackbone(nn.Module):
    """torchvision ResNet on one channel, cut after ``layer3``/``layer4``."""

    def __init__(self, kind: BackboneKind, layer: int = 3, weights: str | None = None):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, kind.value)(weights=None)
        if weights:
            state = load_state_dict_file(weights)
            if "conv1.weight" in state and state["conv1.weight"].shape[1] == 3:
                state["conv1.weight"] = state["conv1.weight"].sum(1, keepdim=True)
            net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or [m for m in missing if not m.startswith("fc.")]:
                raise ConfigError(
                    f"{weights} does not match {kind.value}: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}"
                )
        else:
            net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        blocks = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3]
        if layer == 4:
            blocks.append(net.layer4)
        self.body = nn.Sequential(*blocks)
        widths = {"resnet18": (256, 512), "resnet34": (256, 512), "resnet50": (1024, 2048)}[kind.value]
        self.out_channels = widths[layer - 3]
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body((images / 1024.0).contiguous(memory_format=torch.channels_last))


class XRVDenseNetBackbone(nn.Module):
    """torchxrayvision's DenseNet-121 ``features`` (takes [-1024, 1024] as is): stride 32, 1024 channels."""

    def __init__(self, weights: str | None = None):
        super().__init__()
        import torchxrayvision as xrv

        net = xrv.models.DenseNet(weights=None)  # architecture only; weights=None never downloads
        if weights:
            state = load_state_dict_file(weights)
            state = {k: v for k, v in state.items() if k.startswith("features.")}
            if not state:
                raise ConfigError(f"{weights} holds no torchxrayvision DenseNet 'features.*' weights")
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [m for m in missing if m.startswith("features.")]
            if missing or unexpected:
                raise ConfigError(
                    f"{weights} does not match torchxrayvision's DenseNet-121: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}"
                )
        self.features = net.features
        self.out_channels = 1024

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(images))


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """A backbone with ``.out_channels``; (B, 1, S, S) -> (B, C, H, W)."""
    cfg.validate()
    kind = BackboneKind(cfg.kind)
    if kind is BackboneKind.SMALL_CNN:
        if cfg.weights:
            raise ConfigError("backbone.weights is not used by small_cnn (it trains from scratch)")
        return SmallCNN(list(cfg.channels), cfg.extra_convs, cfg.second_kernel)
    if kind is BackboneKind.XRV_DENSENET:
        return XRVDenseNetBackbone(cfg.weights)
    return ResNetBackbone(kind, cfg.resnet_layer, cfg.weights)


# --------------------------------------------------------------------------------------------- text


@dataclass
class TextEncoderConfig:
    pretrained: str | None = (
        None  # a local Hugging Face model directory; None: build BERT from the fields below
    )
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    dropout: float = 0.1
    vocab_size: int = 2000  # WordPiece vocabulary trained on the training reports
    min_frequency: int = 2
    max_tokens: int = 128  # pieces per report (truncation)
    max_words: int = 64  # content words per report (cap)
    # Add a context-free path (the word's input embeddings, projected) to each word feature. From scratch,
    # contextual features drift toward a report-wide average (a word ends up closer to the other words of
    # its report than to itself elsewhere), which blurs word-level matching; the lexical path keeps identity.
    lexical: bool = True
    # Run the model code a ``pretrained`` folder ships (``auto_map`` in its config.json, e.g. CXR-BERT). Off: such
    # a folder is refused with a message; turn on only for a folder you trust (its Python code runs on load).
    trust_remote_code: bool = False

    def validate(self) -> None:
        if self.pretrained is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"text.hidden_size ({self.hidden_size}) must be divisible by text.num_heads")


def bert_config(cfg: TextEncoderConfig, vocab_size: int, pad_token_id: int):
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=max(cfg.max_tokens, 32),
        pad_token_id=pad_token_id,
    )


#: Loading a saved run whose text encoder ships model code runs that code only when the person loading it says so:
#: ``trust_remote_code=True`` in Python, or this environment variable set to 1 (the flag saved in the run's own
#: config is never read for that, so a run from elsewhere cannot switch it on).
TRUST_REMOTE_CODE_ENV = "MEDVL_TRUST_REMOTE_CODE"

_TRAIN_HINT = "set model.text.trust_remote_code=true to run it (only for a folder you trust)"
_LOAD_HINT = (
    f"loading it runs that code: set {TRUST_REMOTE_CODE_ENV}=1 (or pass trust_remote_code=True) only for a run "
    "you trust"
)


def check_remote_code(directory: Path, trust_remote_code: bool, hint: str = _TRAIN_HINT) -> None:
    """:class:`ConfigError` when ``directory``'s ``config.json`` maps to model code of its own (``auto_map``) and
    running it was not allowed."""
    try:
        auto_map = json.loads((directory / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError):
        return  # transformers reports an unreadable config itself
    if auto_map and not trust_remote_code:
        files = sorted({str(v).split(".")[0] + ".py" for v in auto_map.values() if isinstance(v, str)})
        raise ConfigError(
            f"the text encoder in {directory} ships its own model code ({', '.join(files)}); {hint}"
        )


def pool_words(hidden: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """Replace each piece's feature by the mean over its word's pieces.

    hidden (B, T, H), word_ids (B, T) with -1 for special tokens/padding (left as they are) -> (B, T, H).
    """
    t = hidden.shape[1]
    onehot = (word_ids.unsqueeze(-1) == torch.arange(t, device=hidden.device)).to(hidden.dtype)  # (B, T, W)
    sums = onehot.transpose(1, 2) @ hidden  # (B, W, H)
    means = sums / onehot.sum(1).clamp_min(1).unsqueeze(-1)
    pooled = onehot @ means
    return torch.where((word_ids >= 0).unsqueeze(-1), pooled, hidden)


class TextEncoder(nn.Module):
    """BERT-style encoder + projection: (B, T) ids -> word-pooled features (B, T, D) and a global (B, D)."""

    def __init__(self, encoder: nn.Module, out_dim: int, lexical: bool = False):
        super().__init__()
        self.encoder = encoder
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused; left in, DDP would see parameters without gradients
        hidden = int(self.encoder.config.hidden_size)
        self.proj = nn.Linear(hidden, out_dim)
        self.lexical: nn.Module | None = None
        if lexical:
            emb = self.encoder.get_input_embeddings()
            self.lexical = nn.Linear(int(emb.weight.shape[1]), out_dim)

    @classmethod
    def from_config(
        cls, cfg: TextEncoderConfig, vocab_size: int, pad_token_id: int, out_dim: int
    ) -> TextEncoder:
        cfg.validate()
        return cls(
            BertModel(bert_config(cfg, vocab_size, pad_token_id), add_pooling_layer=False),
            out_dim,
            lexical=cfg.lexical,
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, out_dim: int, lexical: bool = False, trust_remote_code: bool = False
    ) -> TextEncoder:
        """Any local Hugging Face encoder directory (``local_files_only``: nothing is downloaded). A folder with its
        own model code (``auto_map``) needs ``trust_remote_code``."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise ConfigError(
                f"text.pretrained: {path} is not a local Hugging Face model directory (no config.json)"
            )
        check_remote_code(path, trust_remote_code)
        try:
            enc = AutoModel.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, ImportError) as exc:
            raise ConfigError(f"cannot load the text encoder in {path}: {exc}") from None
        return cls(enc, out_dim, lexical=lexical)

    @classmethod
    def from_saved_config(
        cls, directory: str | Path, out_dim: int, lexical: bool = False, trust_remote_code: bool = False
    ) -> TextEncoder:
        """Architecture from a saved ``config.json`` (weights come from the run's safetensors). ``trust_remote_code``
        is the loading person's choice (or :data:`TRUST_REMOTE_CODE_ENV`), never the saved config's."""
        trust_remote_code = trust_remote_code or os.environ.get(TRUST_REMOTE_CODE_ENV) == "1"
        check_remote_code(Path(directory), trust_remote_code, _LOAD_HINT)
        config = AutoConfig.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=trust_remote_code
        )
        kwargs = {"add_pooling_layer": False} if config.model_type == "bert" else {}
        return cls(
            AutoModel.from_config(config, trust_remote_code=trust_remote_code, **kwargs),
            out_dim,
            lexical=lexical,
        )

    def save_config(self, directory: str | Path) -> None:
        self.encoder.config.save_pretrained(str(directory))

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> Path:
        """The encoder as a Hugging Face folder of its own: ``config.json``, ``model.safetensors`` (the encoder
        without medvl's projection; a pooler medvl does not use is left out), the model code of a custom-code
        encoder, and ``tokenizer``'s files when given; ``transformers.AutoModel.from_pretrained(directory)`` (with
        ``trust_remote_code=True`` for custom code) and ``AutoTokenizer.from_pretrained(directory)`` load it."""
        directory = Path(directory)
        self.encoder.save_pretrained(str(directory), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        return directory

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (features (B, T, D), global (B, D)) before normalisation; global is the first token's."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        feats = self.proj(hidden)
        if self.lexical is not None:
            feats = feats + self.lexical(self.encoder.get_input_embeddings()(input_ids))
        if word_ids is not None:
            feats = pool_words(feats, word_ids)  # linear maps commute with the mean over pieces
        return feats, self.proj(hidden[:, 0])
