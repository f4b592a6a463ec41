"""Model artifacts: a directory with ``config.json`` and ``weights.pt`` (a state dict, loaded with
``torch.load(weights_only=True)``), local or in object storage; the classifier's loader."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .classifier import build_classifier

ARTIFACT_FORMAT = 1


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict: the model version written into reports."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def save_artifact(
    dest: str | os.PathLike, state: dict[str, torch.Tensor], config: dict, endpoint_url: str | None = None
) -> dict:
    """Write ``config.json`` (plus format and version) and ``weights.pt`` to a local dir or ``s3://``."""
    from .. import storage

    config = {**config, "format": ARTIFACT_FORMAT, "version": state_digest(state)}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, os.path.join(tmp, "weights.pt"))
        Path(tmp, "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if storage.is_s3(str(dest)):
            import pyarrow.fs as pafs

            loc = storage.resolve(str(dest), endpoint_url)
            pafs.copy_files(tmp, loc.path, destination_filesystem=loc.fs)
            written = loc.fs.get_file_info([loc.join("weights.pt"), loc.join("config.json")])
            if any(f.type != pafs.FileType.File for f in written):
                raise storage.StorageError(f"{dest}: the artifact upload did not complete")
        else:
            Path(dest).mkdir(parents=True, exist_ok=True)
            for f in ("weights.pt", "config.json"):
                shutil.copyfile(os.path.join(tmp, f), os.path.join(dest, f))
    return config


def read_config(src: str | os.PathLike, endpoint_url: str | None = None) -> dict:
    """An artifact's ``config.json`` alone (no weights read), checked for its format."""
    from .. import storage

    src = str(src)
    try:
        if storage.is_s3(src):
            loc = storage.resolve(src, endpoint_url)
            with loc.fs.open_input_stream(loc.join("config.json")) as fh:
                config = json.loads(fh.read())
        else:
            config = json.loads(Path(src, "config.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{src}: not a model artifact (needs config.json and weights.pt)") from None
    if config.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{src}: artifact format {config.get('format')} is not {ARTIFACT_FORMAT}")
    return config


def read_artifact(src: str | os.PathLike, endpoint_url: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of an artifact directory (local or ``s3://``), loaded safely."""
    from .. import storage

    config = read_config(src, endpoint_url)
    src = str(src)
    try:
        if storage.is_s3(src):
            import io

            loc = storage.resolve(src, endpoint_url)
            with loc.fs.open_input_stream(loc.join("weights.pt")) as fh:
                state = torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
        else:
            state = torch.load(Path(src, "weights.pt"), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{src}: not a model artifact (needs config.json and weights.pt)") from None
    return config, state


def load_classifier(src: str | os.PathLike, endpoint_url: str | None = None) -> tuple[nn.Module, dict]:
    """A classifier artifact → ``(model in eval mode, config)``."""
    config, state = read_artifact(src, endpoint_url)
    if config.get("kind") != "classifier":
        raise ValueError(f"{src}: a {config.get('kind')} artifact, not a classifier")
    model = build_classifier(
        config["architecture"],
        len(config["classes"]),
        in_channels=config["data"]["channels"],
        image_size=config["data"]["size"],
        dropout=config.get("dropout", 0.5),
        extra_outputs=int(config.get("confluence_output", False)),
    )
    model.load_state_dict(state)
    return model.eval(), config
