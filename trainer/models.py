"""Models come from timm by name; this module is the one place that calls timm.create_model."""

from __future__ import annotations

import sys
from importlib import resources

import timm
import torch
from torch import nn

from contracts.spec import ExperimentSpec
from trainer.heads import MultiHeadModel


class PretrainedWeightsError(RuntimeError):
    """timm could not get the pretrained weights (no connection and not in the Hugging Face cache)."""


def create_model(spec: ExperimentSpec, num_classes: int) -> nn.Module:
    """timm.create_model(spec.model, pretrained=spec.pretrained, num_classes=num_classes).

    With `heads: multi`, the same backbone without its classifier under three task heads.
    """
    try:
        if spec.heads == "multi":
            return MultiHeadModel(timm.create_model(spec.model, pretrained=spec.pretrained, num_classes=0))
        return timm.create_model(spec.model, pretrained=spec.pretrained, num_classes=num_classes)
    except OSError as error:  # huggingface_hub's download errors are OSErrors
        if not spec.pretrained:
            raise
        raise PretrainedWeightsError(
            f"cannot get pretrained weights for {spec.model}: {str(error).splitlines()[0]}; "
            "connect this box to huggingface.co once (the weights are cached under HF_HOME) "
            "or train from scratch with pretrained: false (--no-pretrained)"
        ) from None


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the model's pretrained weights expect (ImageNet's for most)."""
    config = timm.data.resolve_model_data_config(model)
    return tuple(config["mean"]), tuple(config["std"])


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def write_model_names() -> str:
    """Rewrite contracts/timm_models.txt from the installed timm; returns its path."""
    path = str(resources.files("contracts").joinpath("timm_models.txt"))
    names = timm.list_models()
    header = (
        f"# timm {timm.__version__} model names (timm.list_models()); "
        "regenerate: python -m trainer.models --write-names"
    )
    with open(path, "w") as handle:
        handle.write("\n".join([header, *names]) + "\n")
    return path


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-names"]:
        print(f"wrote {write_model_names()} (torch {torch.__version__}, timm {timm.__version__})")
    else:
        sys.exit("usage: python -m trainer.models --write-names")
