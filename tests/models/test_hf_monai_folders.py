"""Hugging Face and MONAI users: a custom-code (CXR-BERT style) text encoder folder loads only when allowed,
AdaMatch's text encoder is a Hugging Face folder of its own, and the autoencoder and UNet load with plain MONAI
classes from a run's saved folders."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from medvl.errors import ConfigError
from medvl.models.adamatch.encoders import TextEncoder

CONFIGURATION = """
from transformers import BertConfig


class TinyEncConfig(BertConfig):
    model_type = "tinyenc"

    def __init__(self, output_scale=2.0, **kwargs):
        super().__init__(**kwargs)
        self.output_scale = output_scale
"""

MODELING = '''
from transformers import BertModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_tinyenc import TinyEncConfig


class TinyEncModel(BertModel):
    """A BERT whose hidden states are scaled by ``config.output_scale``: code only this folder has."""

    config_class = TinyEncConfig

    def __init__(self, config, add_pooling_layer=False):
        super().__init__(config, add_pooling_layer=False)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state * self.config.output_scale)
'''


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def custom_code_folder(tmp_path):
    folder = tmp_path / "tiny-cxr-bert"
    pkg = tmp_path / "tinyenc_pkg"
    for d in (folder, pkg):
        d.mkdir()
        (d / "configuration_tinyenc.py").write_text(textwrap.dedent(CONFIGURATION))
        (d / "modeling_tinyenc.py").write_text(textwrap.dedent(MODELING))
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        conf = importlib.import_module("tinyenc_pkg.configuration_tinyenc")
        modeling = importlib.import_module("tinyenc_pkg.modeling_tinyenc")
        config = conf.TinyEncConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
        torch.manual_seed(0)
        model = modeling.TinyEncModel(config).eval()
        model.save_pretrained(str(folder))
    finally:
        sys.path.remove(str(tmp_path))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_tinyenc.TinyEncConfig",
        "AutoModel": "modeling_tinyenc.TinyEncModel",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, model


def test_custom_code_encoder_needs_opt_in(custom_code_folder, tmp_path):
    folder, reference = custom_code_folder
    with pytest.raises(ConfigError, match="trust_remote_code=true.*trust"):
        TextEncoder.from_pretrained(folder, 8)
    enc = TextEncoder.from_pretrained(folder, 8, trust_remote_code=True)
    assert type(enc.encoder).__name__ == "TinyEncModel"  # the folder's own code ran
    ids = torch.tensor([[2, 5, 7, 3]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = enc.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        feats, global_ = enc(ids, mask)
    torch.testing.assert_close(got, want)
    assert feats.shape == (1, 4, 8) and global_.shape == (1, 8)
    # saved as a Hugging Face folder with its code: loads again, and again only when allowed
    out = enc.save_pretrained(tmp_path / "saved")
    assert (out / "modeling_tinyenc.py").is_file()
    again = AutoModel.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).last_hidden_state, want)
    with pytest.raises(ConfigError, match="ships its own model code"):
        TextEncoder.from_saved_config(out, 8)
    assert (
        type(TextEncoder.from_saved_config(out, 8, trust_remote_code=True).encoder).__name__ == "TinyEncModel"
    )


def custom_code_adamatch(folder, trust_remote_code: bool = False):
    """A tiny AdaMatch config whose text encoder is the custom-code ``folder``, and a tokenizer for it."""
    from medvl.models.adamatch import AdaMatchConfig
    from medvl.models.adamatch.encoders import BackboneConfig, TextEncoderConfig
    from medvl.text.tokenizer import ReportTokenizer, train_wordpiece

    tok = ReportTokenizer(train_wordpiece(["a b c", "b c d"], vocab_size=40, min_frequency=1))
    cfg = AdaMatchConfig(
        image_size=64,
        embed_dim=8,
        backbone=BackboneConfig(channels=[8]),
        text=TextEncoderConfig(pretrained=str(folder), trust_remote_code=trust_remote_code),
    )
    return cfg, tok


def test_adamatch_config_key_reaches_the_loader(custom_code_folder, tiny_prepared):
    from medvl.models.adamatch import build_adamatch

    folder, _ = custom_code_folder
    cfg, tok = custom_code_adamatch(folder)
    with pytest.raises(ConfigError, match="trust_remote_code"):
        build_adamatch(cfg, tok)
    cfg.text.trust_remote_code = True
    model = build_adamatch(cfg, tok)
    assert type(model.text_encoder.encoder).__name__ == "TinyEncModel"


def test_a_saved_run_never_opts_itself_into_running_its_code(custom_code_folder, tmp_path, monkeypatch):
    """The run's own config says trust_remote_code: true; loading it still needs the loading person's opt-in."""
    from medvl.errors import ConfigError
    from medvl.models.adamatch import AdaMatchRun
    from medvl.models.adamatch.encoders import TRUST_REMOTE_CODE_ENV
    from medvl.models.adamatch.model import build_adamatch

    folder, _ = custom_code_folder
    cfg, tok = custom_code_adamatch(folder, trust_remote_code=True)
    AdaMatchRun(build_adamatch(cfg, tok), tok).save_pretrained(tmp_path / "adamatch")
    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    with pytest.raises(ConfigError, match=TRUST_REMOTE_CODE_ENV):
        AdaMatchRun.from_pretrained(tmp_path)
    run = AdaMatchRun.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(run.model.text_encoder.encoder).__name__ == "TinyEncModel"
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "1")
    assert type(AdaMatchRun.from_pretrained(tmp_path).model.text_encoder.encoder).__name__ == "TinyEncModel"


def test_adamatch_text_encoder_is_a_hugging_face_folder(tiny_adamatch_run):
    from medvl.models.adamatch import AdaMatchRun

    folder = tiny_adamatch_run / "adamatch" / "text_encoder"
    hf = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    run = AdaMatchRun.from_pretrained(tiny_adamatch_run)
    enc = tok(["small left pleural effusion", "heart size is normal"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        want = run.model.text_encoder.encoder(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).last_hidden_state
    torch.testing.assert_close(got, want)
    assert tok.vocab_size == run.tokenizer.hf.vocab_size


def test_autoencoder_and_unet_load_with_plain_monai_classes(tiny_prepared, tmp_path):
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from safetensors.torch import load_file
    from torch import nn

    from medvl.inference.synthesize import Synthesizer
    from medvl.models.diffusion import AutoencoderBundle
    from tests.models.diffusion_fixtures import build_tiny_runs

    run = build_tiny_runs(tmp_path / "runs", tiny_prepared, diffusion_steps=2)["diff"]
    # the autoencoder: the class and keyword arguments in config.json, the weights in model.safetensors
    spec = json.loads((run / "autoencoder" / "config.json").read_text())["monai"]
    assert spec["class"] == "monai.networks.nets.AutoencoderKL"
    ae = AutoencoderKL(**spec["kwargs"])
    ae.load_state_dict(load_file(str(run / "autoencoder" / "model.safetensors")))
    ae.eval()
    medvl_ae = AutoencoderBundle.from_pretrained(run).model
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(x)[0], medvl_ae.encode(x)[0])
    # the UNet: its weights are the "unet." entries; with a global condition, its class embedding is an MLP
    spec = json.loads((run / "diffusion" / "config.json").read_text())["monai"]
    unet = DiffusionModelUNet(**spec["kwargs"])
    if spec["class_embedding"] == "mlp":
        width, ctx = unet.time_embed[-1].out_features, spec["kwargs"]["cross_attention_dim"]
        unet.class_embedding = nn.Sequential(nn.Linear(ctx, width), nn.SiLU(), nn.Linear(width, width))
    prefix = spec["state_dict_prefix"]
    weights = load_file(str(run / "diffusion" / "model.safetensors"))
    unet.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    unet.eval()
    medvl_unet = Synthesizer.load(run).denoiser.unet
    kw = spec["kwargs"]
    z = torch.randn(2, kw["in_channels"], 8, 8)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 5, kw["cross_attention_dim"])
    pooled = context[:, 0] if spec["class_embedding"] else None
    with torch.no_grad():
        torch.testing.assert_close(
            unet(z, t, context=context, class_labels=pooled),
            medvl_unet(z, t, context=context, class_labels=pooled),
        )
