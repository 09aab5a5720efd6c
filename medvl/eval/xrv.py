"""torchxrayvision's DenseNet-121 as a second feature extractor and label scorer for synthesized scans
(``medvl evaluate diffusion --features xrv:PATH``), from a weights file on local disk; nothing is downloaded.

PATH is one of

* a torchxrayvision weights file as its releases ship them (e.g. ``mimic_nb-densenet121-d121-tw-lr001-rot45-
  tr15-sc15-seed0-best.pt``, the ``densenet121-res224-mimic_nb`` weights): a pickled whole ``DenseNet``. It is
  rebuilt allowing only torchxrayvision's DenseNet classes and ``torch.nn`` layers (plus tensor rebuilding), so the
  file cannot run code of its choosing; any other class in it is refused by name. A zip-format file is read with
  ``torch.load(weights_only=True)``; a file in torch's legacy format (before torch 1.6), which that loader cannot
  read, with a restricted unpickler (:class:`_RestrictedUnpickler`);
* a plain state dict (``torch.save(model.state_dict(), PATH)``) or a ``.safetensors`` file of one.

The network is built with ``xrv.models.DenseNet(weights=None, ...)`` (torchxrayvision downloads only for a
weights *name*) and the tensors are loaded into it. Its outputs are named by torchxrayvision's list for the weights
whose release file name (or short name, such as ``mimic_nb``) PATH's file name contains, else by the
``pathologies`` the saved model carries, else by torchxrayvision's default 18 pathologies; outputs without a
name (untrained ones) are not scored.

Images are given in medvl's convention, which is torchxrayvision's (one channel, ``[-1024, 1024]``), and resized
to 224 px (bilinear) as the weights expect. Metrics (under ``image.xrv.``): ``fid`` (the Fréchet distance on the
1024-d pooled features, real test scans against synthesized ones, :func:`frechet_distance`: the formula MONAI's
``FIDMetric`` and pytorch-fid compute, in a form that stays real with fewer scans than feature dimensions),
``label_auroc`` (macro ROC AUC on synthesized scans against their reports' labels, over the CheXpert labels the model predicts with both classes present;
positive = label 1) with ``per_label.<CheXpert name>.auroc``, and ``real_label_auroc`` / ``real_per_label`` on the
real test scans.
"""

from __future__ import annotations

import importlib
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvl.errors import ConfigError, RunError
from medvl.text.chexpert import CHEXPERT_LABELS

INPUT_SIZE = 224
#: torchxrayvision pathology names that differ from CheXpert's.
TO_CHEXPERT = {"Effusion": "Pleural Effusion"}
#: Modules whose ``nn.Module`` classes a pickled torchxrayvision model may rebuild.
ALLOWED_MODULE_PREFIXES = ("torchxrayvision.models", "torch.nn.modules.")
MAX_PICKLED_CLASSES = 64


def parse_features(spec: str) -> Path:
    """``xrv:PATH`` -> PATH; :class:`ConfigError` for anything else."""
    kind, sep, path = str(spec).partition(":")
    if kind != "xrv" or not sep or not path:
        raise ConfigError(
            f"--features {spec!r}: expected xrv:PATH, PATH a torchxrayvision DenseNet weights file on local disk"
        )
    return Path(path).expanduser()


def _allowed_class(name: str, path: Path) -> type:
    """The ``nn.Module`` class ``name`` when it belongs to torchxrayvision's models or ``torch.nn``, else a
    :class:`RunError` naming it."""
    module, _, attr = name.rpartition(".")
    obj = None
    if module.startswith(ALLOWED_MODULE_PREFIXES):
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            obj = None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise RunError(
            f"{path} holds {name}, which is not a torchxrayvision DenseNet layer; it is not unpickled. Save its "
            "state dict (torch.save(model.state_dict(), OUT)) where you trust the file and pass OUT"
        )
    return obj


#: What a legacy-format torchxrayvision model file may name besides the layer classes: tensor and parameter
#: rebuilding, ordered dicts and the object reconstruction protocol; nothing that runs code of the file's choosing.
LEGACY_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("builtins", "set"),
    ("__builtin__", "object"),  # protocol-2 pickles name builtins the Python 2 way
    ("__builtin__", "set"),
    ("copy_reg", "_reconstructor"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`LEGACY_GLOBALS` and the allowed layer classes (Python's documented
    way to restrict globals); torch's legacy loader wraps it and rebuilds the storages itself."""

    path = Path("<file>")

    def find_class(self, module: str, name: str):
        if (module, name) in LEGACY_GLOBALS:
            return super().find_class(module, name)
        try:
            return _allowed_class(f"{module}.{name}", self.path)
        except RunError as exc:
            raise pickle.UnpicklingError(str(exc)) from None


class _RestrictedPickle:
    """The ``pickle_module`` handed to ``torch.load`` for legacy-format files."""

    __name__ = "medvl.eval.xrv._RestrictedPickle"
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(f, **kwargs):
        return _RestrictedUnpickler(f, **kwargs).load()


def _read_pickled_model(path: Path) -> nn.Module:
    """A pickled whole torchxrayvision model, rebuilt with only the ``nn.Module`` classes of torchxrayvision's models
    and of ``torch.nn`` allowed (any other global is refused by name). A zip-format file (``torch.save`` since torch
    1.6) goes through torch's weights-only unpickler, each layer class allowed as it asks for it; a legacy-format
    file (older torch, as torchxrayvision's v1 releases may be), which the weights-only unpickler cannot read,
    through a restricted unpickler (:class:`_RestrictedUnpickler`)."""
    if not zipfile.is_zipfile(path):
        _RestrictedUnpickler.path = path
        try:
            model = torch.load(
                str(path), map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle
            )
        except pickle.UnpicklingError as exc:
            raise RunError(str(exc)) from None
        except Exception as exc:
            raise RunError(
                f"{path} is neither a state dict nor a torchxrayvision model file: {exc}"
            ) from None
    else:
        allowed: list[type] = []
        for _ in range(MAX_PICKLED_CLASSES):
            try:
                with torch.serialization.safe_globals(allowed):
                    model = torch.load(str(path), map_location="cpu", weights_only=True)
                break
            except pickle.UnpicklingError as exc:
                match = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(exc))
                if match is None:
                    raise RunError(
                        f"{path} is neither a state dict nor a torchxrayvision model file: {str(exc)[-200:]}"
                    ) from None
                obj = _allowed_class(match.group(1), path)
                if obj in allowed:
                    raise RunError(
                        f"{path}: {match.group(1)} is refused by the weights-only loader"
                    ) from None
                allowed.append(obj)
            except Exception as exc:
                raise RunError(
                    f"{path} is neither a state dict nor a torchxrayvision model file: {exc}"
                ) from None
        else:
            raise RunError(
                f"{path} asks for more than {MAX_PICKLED_CLASSES} classes; not a torchxrayvision model"
            )
    if not isinstance(model, nn.Module):
        raise RunError(f"{path} holds a {type(model).__name__}, not a torchxrayvision model")
    return model


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The state dict in ``path`` and the pathology names it carries (None when it carries none)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(
            f"torchxrayvision DenseNet weights file {path} does not exist (weights are read from local disk only; "
            "torchxrayvision's releases: https://github.com/mlmed/torchxrayvision/releases/tag/v1)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        obj = _read_pickled_model(path)
    if isinstance(obj, nn.Module):
        # names set on the saved model itself (a class-level default list says nothing about these weights)
        names = vars(obj).get("pathologies") or vars(obj).get("targets")
        return dict(obj.state_dict()), (list(names) if names else None)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RunError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, None


def _names_from_file_name(path: Path, num_outputs: int) -> list[str] | None:
    import torchxrayvision as xrv

    file_name = path.name.lower()
    for key, spec in xrv.models.model_urls.items():
        if not key.startswith("densenet121-res224-") or len(spec.get("labels", ())) != num_outputs:
            continue
        release_file = Path(spec["weights_url"]).name.lower()
        short = key.removeprefix("densenet121-res224-")
        if Path(release_file).stem in file_name or key in file_name or f"{short}-densenet" in file_name:
            return list(spec["labels"])
    for key, spec in xrv.models.model_urls.items():  # short names alone (e.g. "mimic_nb.pt")
        short = key.removeprefix("densenet121-res224-")
        if key.startswith("densenet121-res224-") and Path(file_name).stem == short:
            return list(spec["labels"])
    return None


@dataclass
class XrvDenseNet:
    """torchxrayvision's DenseNet-121 with the CheXpert label each output scores (None: not scored)."""

    net: nn.Module
    pathologies: list[str]
    weights_name: str

    @property
    def name(self) -> str:
        return f"torchxrayvision-densenet121 ({self.weights_name}, 1024-d pooled features, {INPUT_SIZE} px)"

    @property
    def chexpert_outputs(self) -> dict[str, int]:
        """CheXpert label name -> output index, for the outputs that predict a CheXpert label."""
        out = {}
        for j, name in enumerate(self.pathologies):
            label = TO_CHEXPERT.get(name, name)
            if name and label in CHEXPERT_LABELS and label not in out:
                out[label] = j
        return out

    def to(self, device: str | torch.device) -> XrvDenseNet:
        self.net.to(device)
        return self

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [-1024, 1024] -> (B, 1, 224, 224) float, torchxrayvision's input."""
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def run(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, S, S) scans -> pooled features (N, 1024) and output probabilities (N, outputs)."""
        device = next(self.net.parameters()).device
        feats, probs = [], []
        for i in range(0, len(images), batch_size):
            x = self.prepare(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device))
            f = self.net.features2(x)
            feats.append(f.float().cpu())
            probs.append(torch.sigmoid(self.net.classifier(f)).float().cpu())
        return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def load_xrv_densenet(path: str | Path, device: str | torch.device = "cpu") -> XrvDenseNet:
    """The DenseNet in ``path`` (see the module docstring), in eval mode on ``device``; never downloads."""
    import torchxrayvision as xrv

    path = Path(path)
    state, names = read_weights(path)
    state = {k: v for k, v in state.items() if k != "op_threshs"}
    if "classifier.weight" not in state:
        raise RunError(f"{path} does not hold a torchxrayvision DenseNet (no classifier.weight)")
    num_outputs = int(state["classifier.weight"].shape[0])
    net = xrv.models.DenseNet(weights=None, num_classes=num_outputs)  # weights=None: architecture only
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "op_threshs"]
    if missing or unexpected:
        raise RunError(
            f"{path} does not fit torchxrayvision's DenseNet-121 (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    names = _names_from_file_name(path, num_outputs) or names
    if names is None:
        names = list(xrv.datasets.default_pathologies) if num_outputs == 18 else [""] * num_outputs
    if len(names) != num_outputs:
        raise RunError(f"{path}: {len(names)} pathology names for {num_outputs} outputs")
    net.op_threshs = None  # raw sigmoid outputs (the operating-point rescaling is monotonic: same AUROC)
    return XrvDenseNet(net.eval(), [str(n) for n in names], path.name).to(device)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D), in float64, with
    ``tr sqrt(S_a S_b)`` taken as ``tr sqrt(S_a^1/2 S_b S_a^1/2)`` (symmetric, so its eigenvalues are real): stable
    when there are fewer samples than dimensions and the covariances are singular. NaN with fewer than 2 each."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root @ s_b @ root
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * cross)


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    from monai.metrics import compute_roc_auc

    return float(
        compute_roc_auc(torch.from_numpy(scores).float(), torch.from_numpy(positive.astype(np.float32)))
    )


def xrv_metrics(
    model: XrvDenseNet, real: np.ndarray, fake: np.ndarray, labels: np.ndarray, prefix: str = "image.xrv."
) -> dict[str, float | str]:
    """FID and label AUROC of ``fake`` (scans synthesized from the reports whose CheXpert ``labels`` (N, 14) are
    given) beside the ``real`` scans, on ``model``; keys under ``prefix`` (see the module docstring)."""
    real_feats, real_probs = model.run(real)
    fake_feats, fake_probs = model.run(fake)
    out: dict[str, float | str] = {
        f"{prefix}fid": frechet_distance(real_feats, fake_feats),
        f"{prefix}features": model.name,
    }
    positive = np.nan_to_num(np.asarray(labels, dtype=np.float64), nan=0.0) == 1.0
    for tag, probs in (("", fake_probs), ("real_", real_probs)):
        aucs = {}
        for label, j in model.chexpert_outputs.items():
            col = positive[:, CHEXPERT_LABELS.index(label)]
            if 0 < col.sum() < len(col):
                aucs[label] = _auroc(probs[:, j], col)
        out[f"{prefix}{tag}label_auroc"] = float(np.mean(list(aucs.values()))) if aucs else float("nan")
        out.update({f"{prefix}{tag}per_label.{name}.auroc": v for name, v in aucs.items()})
    return out


def load_features(features: str | Path, device: str | torch.device = "cpu") -> XrvDenseNet:
    """The extractor ``--features xrv:PATH`` names, loaded (errors before any scan is synthesized)."""
    return load_xrv_densenet(parse_features(str(features)), device=device)


def xrv_block(
    model: XrvDenseNet | str, real: np.ndarray, fake: np.ndarray, labels: np.ndarray
) -> tuple[dict[str, float | str], dict[str, str]]:
    """The ``image.xrv.*`` metrics of ``model`` (an :class:`XrvDenseNet` or an ``xrv:PATH`` spec) and their
    conventions."""
    if not isinstance(model, XrvDenseNet):
        model = load_features(model)
    metrics = xrv_metrics(model, real, fake, labels)
    scored = ", ".join(model.chexpert_outputs) or "none"
    conventions = {
        "image.xrv": f"{model.name} from a local file; scans as torchxrayvision expects them (1 channel, "
        f"[-1024, 1024], resized to {INPUT_SIZE} px bilinear); fid: Frechet distance (float64, symmetric form) on the "
        "pooled features, real test scans vs synthesized; label_auroc: macro ROC AUC of the model's sigmoid outputs against the "
        f"reports' CheXpert labels (positive = 1), over the labels it predicts with both classes present: {scored}"
    }
    return metrics, conventions


__all__ = [
    "XrvDenseNet",
    "load_features",
    "load_xrv_densenet",
    "parse_features",
    "read_weights",
    "xrv_block",
    "xrv_metrics",
]
