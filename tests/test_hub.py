"""Model folders in the Hugging Face layout (``deeplabv2 export-hub``), ``from_pretrained`` and
``hubconf.py`` (torch.hub from a clone): on a tiny trained run, offline, on the CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import deeplabv2
from deeplabv2 import WeightsError, load_model
from deeplabv2.cli import main
from deeplabv2.config import load_config, save_config
from deeplabv2.deploy.model_folder import architecture_name
from deeplabv2.train import train

from extras import require
from test_train import TINY

REPO = Path(__file__).resolve().parents[1]
SIZE = (48, 64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny trained run (``model.pth``, ``config.yaml``, ``metrics.json``) and its model
    folder written by the command line."""
    require("huggingface_hub", "export-hub writes the model card with huggingface_hub")
    root = tmp_path_factory.mktemp("hub")
    cfg = load_config(None, [*TINY, "train.iterations=2", f"train.out_dir={root / 'run'}",
                             "data.options={num_samples: 4, size: [48, 64]}"])
    train(cfg)
    save_config(cfg, root / "tiny.yaml")
    assert main(["export-hub", str(root / "run" / "model.pth"), str(root / "out"),
                 "--license", "mit", "--repo-id", "someone/tiny-deeplab"]) == 0
    return root


def _logits(model, seed=0):
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_folder_loads_the_same_model(exported):
    ckpt = load_model(exported / "run" / "model.pth")
    folder = load_model(exported / "out")
    assert sorted(p.name for p in (exported / "out").iterdir()) == \
        ["README.md", "config.json", "model.safetensors"]
    assert torch.equal(_logits(ckpt), _logits(folder))
    assert folder.classes == ckpt.classes and len(folder.classes) == 7
    assert folder.palette == ckpt.palette
    assert folder.preprocessing == ckpt.preprocessing
    assert folder.alignment.name == ckpt.alignment.name
    assert folder.layout == ckpt.layout and folder.config == ckpt.config


def test_config_json(exported):
    config = json.loads((exported / "out" / "config.json").read_text())
    raw = torch.load(exported / "run" / "model.pth", map_location="cpu", weights_only=True)
    assert config["library_name"] == "deeplabv2"
    assert config["library_version"] == deeplabv2.__version__
    assert config["num_classes"] == 7 and config["head_mode"] == "aspp"
    assert config["architecture"] == "custom"  # blocks [1, 1, 1, 1], width 8
    assert config["weights"] == "model.safetensors"
    for key in ("model_config", "classes", "palette", "preprocessing", "alignment", "layout"):
        assert config[key] == json.loads(json.dumps(raw[key])), key
    assert config["preprocessing"]["channel_order"] == "BGR"
    assert config["alignment"] == "caffe"


def test_architecture_names():
    assert architecture_name({"backbone": "resnet", "blocks": [3, 4, 23, 3]}) == "resnet101"
    assert architecture_name({"backbone": "resnet"}) == "resnet101"
    assert architecture_name({"backbone": "resnet", "blocks": [3, 4, 6, 3]}) == "resnet50"
    assert architecture_name({"backbone": "resnet", "blocks": [3, 4, 23, 3],
                              "stem": "v1c"}) == "resnet101_v1c"
    assert architecture_name({"backbone": "vgg16", "atrous_rates": [12]}) == "vgg16_largefov"
    assert architecture_name({"backbone": "vgg16", "atrous_rates": [6, 12, 18, 24]}) == "vgg16"
    assert architecture_name({"backbone": "resnet", "blocks": [1, 1, 1, 1]}) == "custom"


def test_model_card_metadata_and_sections(exported):
    hf = require("huggingface_hub", "the model card is read back with huggingface_hub")
    metrics = json.loads((exported / "run" / "metrics.json").read_text())
    text = (exported / "out" / "README.md").read_text()
    # plain YAML between the first two '---' lines
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    card = hf.ModelCard.load(exported / "out" / "README.md")
    for meta in (header, card.data.to_dict()):
        assert meta["library_name"] == "deeplabv2"
        assert meta["pipeline_tag"] == "image-segmentation"
        assert meta["license"] == "mit"
        assert meta["datasets"] == ["synthetic"]
        assert meta["metrics"] == ["mean_iou"]
        assert {"deeplabv2", "semantic-segmentation"} <= set(meta["tags"])
        result = meta["model-index"][0]["results"][0]
        assert result["dataset"]["split"] == "val"
        assert result["metrics"][0]["type"] == "mean_iou"
        assert result["metrics"][0]["value"] == round(100 * metrics["miou"], 2)
    assert card.data.eval_results[0].metric_value == round(100 * metrics["miou"], 2)
    body = card.text
    assert 'deeplabv2.load_model("' in body and 'from_pretrained("someone/tiny-deeplab")' in body
    assert "deeplabv2 predict" in body
    assert "train:\n  iterations: 2" in body  # the run's config.yaml, verbatim
    assert f"**{100 * metrics['miou']:.2f}**" in body
    for name, c in metrics["classes"].items():
        assert f"| {name} | {100 * c['iou']:.2f} |" in body
    assert "protocol `none`" in body and "split `val`" in body


def test_cli_evaluate_and_predict_take_the_folder(exported, tmp_path, capsys):
    cfg = str(exported / "tiny.yaml")
    assert main(["evaluate", str(exported / "run" / "model.pth"), "-c", cfg,
                 "--out", str(tmp_path / "ckpt.json")]) == 0
    assert main(["evaluate", str(exported / "out"), "-c", cfg,
                 "--out", str(tmp_path / "folder.json")]) == 0
    a = json.loads((tmp_path / "ckpt.json").read_text())
    b = json.loads((tmp_path / "folder.json").read_text())
    assert a["miou"] == b["miou"] and a["confusion"] == b["confusion"]

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    import numpy as np
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*SIZE, 3), dtype=np.uint8)) \
        .save(images / "a.png")
    for name, src in (("ckpt", exported / "run" / "model.pth"), ("folder", exported / "out")):
        assert main(["predict", str(src), str(images), "-o", str(tmp_path / name)]) == 0
    assert (tmp_path / "ckpt" / "a.png").read_bytes() == (tmp_path / "folder" / "a.png").read_bytes()


def test_evaluate_run_folder_is_still_the_snapshot_series(exported, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(exported / "run", run)
    assert main(["evaluate", str(run)]) == 0
    assert (run / "snapshots.json").is_file()
    assert not (exported / "out" / "snapshots.json").exists()


def test_a_folder_without_config_json_is_refused(exported, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(exported / "out" / "model.safetensors", broken)
    with pytest.raises(WeightsError, match="without config.json") as e:
        load_model(broken)
    assert "\n" not in str(e.value)
    assert main(["predict", str(broken), str(tmp_path), "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err and str(broken) in err
    # evaluate does not take it for a run folder either
    assert main(["evaluate", str(broken), "-c", str(exported / "tiny.yaml")]) == 2
    assert "without config.json" in capsys.readouterr().err
    # a run folder given where a checkpoint is expected: pointed at its model.pth
    with pytest.raises(WeightsError, match="model.pth"):
        load_model(exported / "run")


def test_a_config_json_that_disagrees_or_is_foreign_is_refused(exported, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(exported / "out", folder)
    config = json.loads((folder / "config.json").read_text())
    config["classes"] = ["a"] * 7
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="classes .* differs"):
        load_model(folder)
    config["library_name"] = "transformers"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="not a deeplabv2 model config"):
        load_model(folder)


def test_export_hub_refuses_to_overwrite_and_takes_a_run_folder(exported, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["export-hub", str(exported / "run"), str(out)]) == 0  # the run's model.pth
    assert torch.equal(_logits(load_model(out)), _logits(load_model(exported / "out")))
    assert main(["export-hub", str(exported / "run"), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export-hub", str(exported / "run"), str(out), "--overwrite"]) == 0
    # the same weights give the same file, whatever the source
    assert (out / "model.safetensors").read_bytes() == \
        (exported / "out" / "model.safetensors").read_bytes()


def test_export_hub_without_a_run_says_so(exported, tmp_path):
    hf = require("huggingface_hub", "the model card is read back with huggingface_hub")
    model = load_model(exported / "run" / "model.pth")
    deeplabv2.save_weights(model, tmp_path / "alone.safetensors", model.classes, model.palette)
    from deeplabv2.deploy.model_folder import export_hub
    export_hub(tmp_path / "alone.safetensors", tmp_path / "out")
    card = hf.ModelCard.load(tmp_path / "out" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "deeplabv2" and meta["license"] == "unknown"
    assert "model-index" not in meta and "datasets" not in meta and "metrics" not in meta
    assert card.text.count("Not recorded") == 2
    assert torch.equal(_logits(load_model(tmp_path / "out")), _logits(model))
    with pytest.raises(ValueError, match="not a folder"):
        export_hub(tmp_path / "alone.safetensors", tmp_path / "x", run=tmp_path / "nowhere")


def test_export_hub_without_huggingface_hub_says_what_to_install(exported, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    assert main(["export-hub", str(exported / "run" / "model.pth"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'deeplabv2[hub]'" in err
    assert not (tmp_path / "x").exists()


def test_load_model_of_a_folder_needs_no_huggingface_hub(exported):
    script = ("import sys; sys.modules['huggingface_hub'] = None\n"
              "import deeplabv2\n"
              f"m = deeplabv2.load_model({str(exported / 'out')!r})\n"
              "print(m.num_classes, m.classes[0])\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["7", "road"]


def test_from_pretrained_local_folder_offline(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = deeplabv2.from_pretrained(exported / "out")
    assert torch.equal(_logits(model), _logits(load_model(exported / "run" / "model.pth")))
    with pytest.raises(ValueError, match="neither a model folder"):
        deeplabv2.from_pretrained(str(exported / "no" / "such" / "folder"))


def test_from_pretrained_repo_id_downloads_the_folder(exported, monkeypatch):
    hf = require("huggingface_hub", "from_pretrained('user/repo') downloads with huggingface_hub")
    calls = []

    def snapshot_download(**kwargs):  # the Hub, offline: the folder as a snapshot would be
        calls.append(kwargs)
        return str(exported / "out")

    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    model = deeplabv2.from_pretrained("someone/tiny-deeplab", revision="v1")
    assert calls[0]["repo_id"] == "someone/tiny-deeplab" and calls[0]["revision"] == "v1"
    assert {"model.safetensors", "config.json"} <= set(calls[0]["allow_patterns"])
    assert torch.equal(_logits(model), _logits(load_model(exported / "out")))


_HUB_SCRIPT = """
import importlib.util, json, sys
from pathlib import Path
repo, folder = sys.argv[1], sys.argv[2]
# a bare clone: no installed (or editable) deeplabv2 on the path
sys.path[:] = [p for p in sys.path if not (Path(p or '.') / 'deeplabv2').exists()]
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
assert importlib.util.find_spec('deeplabv2') is None, 'deeplabv2 is installed'
import torch
# list/help read a GitHub repository only: the clone stands as its copy in the hub cache
# (what torch.hub.load('someone/deeplabv2:main') downloads), found there without the network
cached = Path(torch.hub.get_dir(), 'someone_deeplabv2_main')
cached.parent.mkdir(parents=True, exist_ok=True)
cached.symlink_to(repo, target_is_directory=True)
names = torch.hub.list('someone/deeplabv2:main', trust_repo=True)
doc = torch.hub.help('someone/deeplabv2:main', 'deeplabv2_resnet101', trust_repo=True)
model = torch.hub.load(repo, 'from_pretrained', folder, source='local')
import deeplabv2
torch.save(model.state_dict(), 'state.pt')
print(json.dumps({'names': names, 'doc': doc.strip().splitlines()[0],
                  'file': deeplabv2.__file__, 'src_on_path': str(Path(repo, 'src')) in sys.path,
                  'classes': model.classes, 'alignment': model.alignment.name,
                  'preprocessing': model.preprocessing.to_dict()}))
"""


def _hub_subprocess(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TORCH_HOME=str(tmp_path / "torch_home"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_hubconf_from_a_bare_clone(exported, tmp_path):
    out = json.loads(_hub_subprocess(tmp_path, _HUB_SCRIPT, str(REPO), str(exported / "out")))
    assert set(out["names"]) == {"deeplabv2_resnet101", "deeplabv2_resnet50",
                                 "deeplabv2_resnet101_v1c", "deeplabv2_vgg16",
                                 "deeplabv2_vgg16_largefov", "from_pretrained"}
    assert "ResNet-101" in out["doc"]
    assert Path(out["file"]).resolve() == REPO / "src" / "deeplabv2" / "__init__.py"
    assert not out["src_on_path"]  # src was on sys.path only while importing
    expected = load_model(exported / "run" / "model.pth")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state.keys() == expected.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in expected.state_dict().items())
    assert out["classes"] == expected.classes and out["alignment"] == expected.alignment.name
    assert out["preprocessing"] == expected.preprocessing.to_dict()
    hub_dir = tmp_path / "torch_home" / "hub"
    assert sorted(p.name for p in hub_dir.iterdir()) == \
        ["someone_deeplabv2_main", "trusted_list"]  # nothing downloaded


@pytest.mark.slow
def test_hubconf_builder_weights_folder_resnet101(tmp_path):
    """``torch.hub.load(CLONE, "deeplabv2_resnet101", weights=FOLDER)``: the real network with
    the weights of a model folder."""
    torch.manual_seed(0)
    model = deeplabv2.deeplabv2_resnet101(num_classes=3)
    with torch.no_grad():
        model.head.convs[0].weight.normal_()
    folder = tmp_path / "folder"  # export-hub's two files, written here without a reload
    folder.mkdir()
    deeplabv2.save_weights(model, folder / "model.safetensors", ["a", "b", "c"])
    from deeplabv2.deploy.model_folder import hub_config
    (folder / "config.json").write_text(json.dumps(hub_config(model, classes=["a", "b", "c"],
                                                              palette=None)))
    script = ("import sys, torch\n"
              "m = torch.hub.load(sys.argv[1], 'deeplabv2_resnet101', source='local', "
              "weights=sys.argv[2], num_classes=3)\n"
              "print(float(m.head.convs[0].weight.detach().double().sum()), m.config['blocks'])\n")
    out = _hub_subprocess(tmp_path, script, str(REPO), str(tmp_path / "folder")).split(maxsplit=1)
    assert float(out[0]) == float(model.head.convs[0].weight.detach().double().sum())
    assert out[1].strip() == "[3, 4, 23, 3]"


def test_hubconf_with_the_package_installed(exported, tmp_path, monkeypatch):
    """The installed (here: already imported) package serves hubconf's entry points."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = torch.hub.load(str(REPO), "from_pretrained", str(exported / "out"), source="local")
    assert type(model) is deeplabv2.DeepLabV2  # the class of the package in sys.modules
    assert torch.equal(_logits(model), _logits(load_model(exported / "out")))
    net = torch.hub.load(str(REPO), "deeplabv2_vgg16_largefov", source="local", num_classes=2)
    assert tuple(net.config["atrous_rates"]) == (12,)


def test_a_builder_loading_our_checkpoint_carries_its_classes_and_palette(tmp_path):
    """A builder (or ``load_weights``) given one of our checkpoints sets the classes and
    palette it was trained with, as ``load_model`` does; without its head, or with another
    number of classes, they are not the model's and are not set."""
    from deeplabv2.model.deeplab import build_model
    config = dict(num_classes=3, blocks=[1, 1, 1, 1], width=8)
    torch.manual_seed(0)
    trained = build_model(config)
    deeplabv2.save_weights(trained, tmp_path / "m.pth", ["road", "car", "sky"],
                           [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    model = build_model(config)
    report = deeplabv2.load_weights(model, tmp_path / "m.pth")
    assert report.head_loaded
    assert model.classes == ["road", "car", "sky"]
    assert model.palette == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert deeplabv2.load_model(tmp_path / "m.pth").classes == model.classes
    skipped = build_model(config)
    deeplabv2.load_weights(skipped, tmp_path / "m.pth", head="skip")
    assert getattr(skipped, "classes", None) is None
    other = build_model({**config, "num_classes": 5})
    deeplabv2.load_weights(other, tmp_path / "m.pth")  # head left initialised
    assert getattr(other, "classes", None) is None
