"""Model zoo: every model trains (forward, backward, a gradient for every parameter), the registry is exactly the
builders the modules define, parameter and MAC counts match the documented numbers, ``cnnscale models`` works."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cnnscale.models
from cnnscale.errors import UserError
from cnnscale.models import SEED_MODELS, _registry, create_model, list_models, model_family, register_model
from cnnscale.models._layers import make_divisible
from cnnscale.models.table import SEED_CLAIMS, measure, render
from cnnscale.profile.flops import conv_backward_flops, count_flops

# Modules of cnnscale.models that define no builders.
NON_FAMILY_MODULES = {"table"}

PARAM_COUNTS = {
    "lenet5": 62_006,
    "alexnet": 23_272_266,
    "vgg16": 14_719_818,
    "vgg16_classic": 134_301_514,
    "vgg16_gap": 14_719_818,
    "resnet18": 11_173_962,
    "mobilenet_v1": 3_217_226,
    "mobilenet_v2": 2_236_682,
}
TORCHVISION_RESNET18_IMAGENET_PARAMS = 11_689_512


def _family_modules() -> list:
    """Every public module of cnnscale.models that defines builders, found on disk (not from a list)."""
    names = [m.name for m in pkgutil.iter_modules(cnnscale.models.__path__)]
    return [
        importlib.import_module(f"cnnscale.models.{n}")
        for n in sorted(names)
        if not n.startswith("_") and n not in NON_FAMILY_MODULES
    ]


def _builders_defined_by_modules() -> dict[str, str]:
    """name -> module short name, for every public function a family module defines and exports."""
    found = {}
    for module in _family_modules():
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                found[name] = module.__name__.rsplit(".", 1)[-1]
    return found


@pytest.fixture(autouse=True)
def _one_thread():
    """Run on one intra-op thread: with the cores shared (other test processes), two OpenMP threads waiting on
    each other made resnet50's forward+backward 15x slower in wall time (1.2 s -> 17 s) than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_param_gets_grad(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: parameters without a gradient (DDP would fail): {missing}"


def test_registry_is_exactly_the_modules_builders() -> None:
    builders = _builders_defined_by_modules()
    assert set(list_models()) == set(builders)
    assert list_models() == sorted(list_models())
    for name, family in builders.items():
        assert model_family(name) == family


def test_every_module_sets_all() -> None:
    modules = [*_family_modules(), importlib.import_module("cnnscale.models._layers"), _registry]
    modules += [importlib.import_module("cnnscale.models.table"), importlib.import_module("cnnscale.profile.flops")]
    for module in modules:
        assert all(hasattr(module, n) for n in module.__all__), module.__name__


def test_builders_are_keyword_only_and_typed() -> None:
    for name in list_models():
        sig = inspect.signature(_registry.get_model_builder(name))
        assert sig.return_annotation is not inspect.Signature.empty, name
        for param in sig.parameters.values():
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, (name, param.name)
            assert param.annotation is not inspect.Parameter.empty, (name, param.name)


def test_seed_models_are_registered() -> None:
    assert SEED_MODELS == ("lenet5", "alexnet", "vgg16", "resnet18", "mobilenet_v2")
    assert set(SEED_MODELS) <= set(list_models())
    assert set(SEED_CLAIMS) <= set(list_models())


@pytest.mark.parametrize("name,expected", sorted(PARAM_COUNTS.items()))
def test_param_counts(name: str, expected: int) -> None:
    with torch.device("meta"):
        assert _n_params(create_model(name)) == expected


def test_cifar_resnet18_differs_from_torchvision_imagenet() -> None:
    with torch.device("meta"):
        assert _n_params(create_model("resnet18")) != TORCHVISION_RESNET18_IMAGENET_PARAMS


def test_num_classes_and_width_mult() -> None:
    with torch.device("meta"):
        assert create_model("resnet18", num_classes=100).fc.out_features == 100
        for name in ("mobilenet_v1", "mobilenet_v2"):
            assert _n_params(create_model(name, width_mult=0.5)) < _n_params(create_model(name)) / 2
            assert _n_params(create_model(name, width_mult=None)) == PARAM_COUNTS[name]  # None -> default
    assert create_model("mobilenet_v2", width_mult=0.35)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_make_divisible() -> None:
    assert make_divisible(32 * 1.0) == 32
    assert make_divisible(32 * 0.35) == 16  # 11.2 -> 8 would lose more than 10%
    assert make_divisible(24 * 0.5) == 16
    assert make_divisible(3) == 8


def test_lenet5_macs() -> None:
    assert count_flops(create_model("lenet5")) == {"flops": 1_303_440.0, "macs": 651_720.0}


@pytest.mark.parametrize("name,gmacs,tol", [("resnet18", 0.556, 1e-3), ("mobilenet_v2", 0.0880, 1e-4)])
def test_macs(name: str, gmacs: float, tol: float) -> None:
    with torch.device("meta"):
        model = create_model(name)
    assert count_flops(model)["macs"] == pytest.approx(gmacs * 1e9, abs=tol * 1e9)


def test_count_flops_backward_and_purity() -> None:
    model = create_model("lenet5").train()
    counts = count_flops(model, (4, 3, 32, 32), backward=True)
    # backward = grad_weight of every layer + grad_input of all but the first: 3x forward minus conv1's input grad
    conv1 = 2 * 6 * 28 * 28 * 3 * 5 * 5
    assert counts["fwd_bwd_flops"] == 3 * counts["flops"] - conv1
    assert model.training and all(p.grad is None for p in model.parameters())


def test_conv_backward_formula_fixes_groups() -> None:
    # torch's own formula is right for groups=1 (plain and transposed): ours must agree with it there ...
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    for conv, shape in [(nn.Conv2d(8, 16, 3, 2, 1), (2, 8, 9, 9)), (nn.ConvTranspose2d(8, 16, 3, 2), (2, 8, 5, 5))]:
        x = torch.randn(shape, requires_grad=True)
        with FlopCounterMode(display=False) as ref:
            conv(x).sum().backward()
        with FlopCounterMode(display=False, custom_mapping=mapping) as ours:
            conv(x).sum().backward()
        assert ours.get_total_flops() == ref.get_total_flops()
    # ... and a depthwise conv's backward (input + weight gradients) must cost twice its forward.
    dw = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
    x = torch.randn(1, 64, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        dw(x).sum().backward()
    assert counter.get_total_flops() == 3 * (2 * 64 * 8 * 8 * 9)
    with torch.device("meta"):
        counts = count_flops(create_model("mobilenet_v2"), backward=True)
    assert 2.9 < counts["fwd_bwd_flops"] / counts["flops"] < 3.0


def test_duplicate_registration_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_BUILDERS", dict(_registry._BUILDERS))
    monkeypatch.setattr(_registry, "_FAMILIES", dict(_registry._FAMILIES))

    def tiny(*, num_classes: int = 10) -> nn.Module:
        return nn.Linear(3, num_classes)

    register_model(tiny)
    assert model_family("tiny") == "test_models"  # the defining module's name
    register_model("tiny2", family="toy")(tiny)
    assert model_family("tiny2") == "toy"
    with pytest.raises(ValueError, match="already registered"):
        register_model(tiny)
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(tiny)


def test_unknown_name_raises_user_error_listing_valid_names() -> None:
    with pytest.raises(UserError) as info:
        create_model("resnet19")
    assert "'resnet19'" in str(info.value)
    assert all(name in str(info.value) for name in list_models())
    with pytest.raises(UserError, match="resnet19"):
        model_family("resnet19")


def test_unexpected_kwarg_raises_user_error() -> None:
    with pytest.raises(UserError, match="width_mult"):
        create_model("resnet18", width_mult=0.5)


def test_table_render_and_selection() -> None:
    from rich.console import Console

    from cnnscale.models.table import main

    rows = measure(["lenet5", "vgg16_classic"])
    console = Console(record=True, width=100)
    render(rows, console)
    text = " ".join(console.export_text().split())
    assert "lenet5" in text and "134.3" in text and "138.0" in text and "[2]" in text
    assert "ImageNet VGG-16" in text and "1-channel input" in text
    with pytest.raises(UserError, match="choose from: alexnet"):
        main(["--models", "lenet5,nope"])
    with pytest.raises(UserError, match="unknown family"):
        main(["--family", "nope"])


def test_cli_models_json_lists_every_model() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cnnscale", "models", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)  # stdout holds the JSON and nothing else
    # the subprocess only imports cnnscale.models, so this also checks that its __init__ imports every family
    assert {row["name"] for row in rows} == set(_builders_defined_by_modules())
    by_name = {row["name"]: row for row in rows}
    assert by_name["lenet5"]["macs"] == 651_720 and by_name["resnet18"]["params"] == 11_173_962
    assert by_name["vgg16"]["seed_params_m"] == 138 and by_name["vgg11"]["seed_label"] is None


def test_cli_help_does_not_import_torch() -> None:
    code = "import sys, cnnscale.cli; cnnscale.cli.main(['--help']); assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "models" in proc.stdout


def test_cli_commands_point_straight_at_each_commands_main(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each COMMANDS target is the ``main`` its module defines (no pass-through function), and each has argparse
    help through the one parser: ``cnnscale NAME --help`` prints ``usage: cnnscale NAME`` and exits 0."""
    from cnnscale import cli

    monkeypatch.setenv("COLUMNS", "200")
    for name, cmd in cli.COMMANDS.items():
        module, _, func = cmd.target.partition(":")
        fn = cli.command_main(name)
        assert func == "main" and fn.__module__ == module and fn.__name__ == "main", (name, fn)
        assert list(inspect.signature(fn).parameters) == ["argv"], name
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0, name
        assert " ".join(capsys.readouterr().out.split()).startswith(f"usage: cnnscale {name} "), name
    with pytest.raises(UserError, match=r"unknown command 'trian' \(choose from: models, train, bench"):
        cli.command_main("trian")
