"""Library networks by name: torchvision's and timm's model zoos, sized from the data config."""

from __future__ import annotations

import difflib
import fnmatch
import socket
import threading
from urllib.parse import urlparse

from torch import nn

from trainlab.errors import TrainlabError

HUB_TIMEOUT_S = 5.0


def _unknown(name: str, library: str, known: list[str]) -> TrainlabError:
    """An unknown architecture, with the closest known names (``resnet18`` for ``resnet-18``)."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    close += difflib.get_close_matches(name.replace("-", "").replace("_", ""), known, n=3)
    hint = f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""
    return TrainlabError(
        f"model.name={name!r} is not a {library} architecture{hint} "
        f"(`trainlab models '*{name[:4]}*'` lists them)"
    )


def require_hub(url: str, name: str) -> None:
    """Fail fast, with the offline alternative, when the weights' host cannot be reached.

    Name resolution has no timeout of its own, so the probe runs in a thread we stop waiting
    for: ``model.pretrained=true`` never hangs on a machine without network.
    """
    host = urlparse(url).hostname or url
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(HUB_TIMEOUT_S + 1)
    if not outcome or outcome[0] is not None:
        reason = f"{type(outcome[0]).__name__}: {outcome[0]}" if outcome else "timed out"
        raise TrainlabError(
            f"model.pretrained=true: cannot download the weights of {name!r} from {host} "
            f"({reason}). Offline, set model.pretrained=false and "
            f"model.weights_path=FILE (a state_dict or trainlab checkpoint) instead."
        )


def _sized(create, key: str, size, **kwargs) -> nn.Module:
    """Fixed-size architectures (ViT, Swin, …) are built for the data's image size; the
    others refuse the keyword and are built without it (they take any size)."""
    if size is None:
        return create(**kwargs)
    try:
        return create(**{key: size}, **kwargs)
    except TypeError as err:
        if f"'{key}'" not in str(err):
            raise
        return create(**kwargs)


def _square_or_pair(size):
    """The data's ``image_size`` as the zoo builders take it: a plain (height, width) tuple
    (the config hands over an OmegaConf list), or the single number it was given."""
    if size is None or isinstance(size, (int, float)):
        return size
    return tuple(int(side) for side in size)


def timm_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    pretrained: bool = False,
    img_size=None,
    **kwargs,
) -> nn.Module:
    """``timm.create_model``; with ``pretrained`` the head is already new for ``num_classes``.
    ``img_size`` (the data's) sizes architectures with fixed-size position embeddings."""
    import timm

    if not timm.is_model(name):
        raise _unknown(name, "timm", timm.list_models())
    if pretrained:
        source = timm.models.get_pretrained_cfg(name)
        if source is None:
            raise TrainlabError(f"timm has no pretrained weights for {name!r}")
        if not _in_hf_cache(source.hf_hub_id):
            require_hub(source.url if not source.hf_hub_id and source.url
                        else "https://huggingface.co", name)
    return _sized(
        timm.create_model, "img_size", _square_or_pair(img_size),
        model_name=name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
        drop_rate=drop_rate, **kwargs,
    )


def _in_hf_cache(repo_id: str | None) -> bool:
    """Weights fetched once before (or copied into the cache) need no network."""
    if not repo_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo_id, filename), str):
            return True
    return False


def torchvision_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    image_size=None,
    **kwargs,
) -> nn.Module:
    """``torchvision.models.get_model``; pretrained weights get a new head and input conv.
    A square ``image_size`` (the data's) sizes the fixed-size ViTs."""
    from pathlib import Path

    import torch
    import torchvision.models as tvm

    from trainlab.models.finetune import replace_head

    classifiers = tvm.list_models(module=tvm)
    if name not in classifiers:
        if name in tvm.list_models():
            raise TrainlabError(
                f"model.name={name!r} is not an image classifier (a detection, segmentation "
                "or video network); model=torchvision trains classifiers "
                "(`trainlab models` lists them)"
            )
        raise _unknown(name, "torchvision", classifiers)
    size = _square_or_pair(image_size)
    side = (size[0] if len(set(size)) == 1 else None) if isinstance(size, tuple) else size
    if not pretrained:
        try:
            model = _sized(tvm.get_model, "image_size", side, name=name, weights=None,
                           num_classes=num_classes, **kwargs)
        except (AssertionError, ValueError) as err:  # e.g. a ViT's patches do not tile it
            shown = "×".join(map(str, size)) if isinstance(size, tuple) else size
            raise TrainlabError(
                f"model.name={name} cannot take the data's image size {shown} "
                f"(torchvision: {err}); set data.image_size to a size it takes (a ViT: a "
                "multiple of its patch size, e.g. [224,224]) or choose another model.name"
            ) from err
        return adapt_input_channels(model, in_channels)
    weights = tvm.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not cached.is_file():
        require_hub(weights.url, name)
    model = tvm.get_model(name, weights=weights, **kwargs)  # its weights fix the image size
    replace_head(model, num_classes)
    return adapt_input_channels(model, in_channels)


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Make the first convolution take ``in_channels`` (e.g. grayscale digits on an RGB net),
    keeping what pretrained filters learnt via timm's ``adapt_input_conv``."""
    from timm.models import adapt_input_conv

    for parent in model.modules():
        for child_name, conv in parent.named_children():
            if isinstance(conv, nn.Conv2d):
                if conv.in_channels == in_channels:
                    return model
                new = nn.Conv2d(
                    in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                )
                new.weight.data = adapt_input_conv(in_channels, conv.weight.data,
                                                   base_chans=conv.in_channels)
                if conv.bias is not None:
                    new.bias.data = conv.bias.data.clone()
                setattr(parent, child_name, new)
                return model
    return model


def list_architectures(pattern: str = "*") -> list[tuple[str, str, bool]]:
    """(library, name, has pretrained weights) for every architecture matching ``pattern``
    that ``model=timm|torchvision`` trains (torchvision's classifiers, every timm model)."""
    import timm
    import torchvision.models as tvm

    rows = []
    for name in tvm.list_models(module=tvm):
        if fnmatch.fnmatch(name, pattern):
            try:
                has_weights = len(list(tvm.get_model_weights(name))) > 0
            except (ValueError, KeyError):
                has_weights = False
            rows.append(("torchvision", name, has_weights))
    pretrained = {name.split(".")[0] for name in timm.list_pretrained(pattern)}
    rows += [("timm", name, name in pretrained) for name in timm.list_models(pattern)]
    return rows


def models_cli(args: list[str]) -> int:
    """`trainlab models [PATTERN ...] [--pretrained]`: timm and torchvision architectures."""
    only_pretrained = "--pretrained" in args
    patterns = [arg for arg in args if arg != "--pretrained"] or ["*"]
    if any(arg in ("-h", "--help") for arg in args):
        print("usage: trainlab models [PATTERN ...] [--pretrained]\n"
              "  e.g. trainlab models '*resnet*'   then: trainlab train model=timm "
              "model.name=NAME")
        return 0
    seen = set()
    for pattern in patterns:
        for library, name, has_weights in list_architectures(pattern):
            if (library, name) in seen or (only_pretrained and not has_weights):
                continue
            seen.add((library, name))
            print(f"{library:<12} {name:<40} {'pretrained' if has_weights else '-'}")
    if not seen:
        print(f"no architecture matches {' '.join(patterns)}")
        return 1
    print(f"{len(seen)} architectures; use with model=timm|torchvision model.name=NAME")
    return 0
