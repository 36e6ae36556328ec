"""The model zoo: the published COCO RetinaNets, by name, downloaded and converted on first use.

A zoo name such as `torchvision/retinanet_resnet50_fpn_v2_coco` stands for the publisher's
weight file. `resolve_weights` turns it into one of our checkpoints:

- the publisher's file is kept in torch's hub cache (`torch.hub.get_dir()/checkpoints`, i.e.
  `$TORCH_HOME/hub/checkpoints`) under the name torch.hub gives it, so a file torchvision
  already fetched is reused, and a file placed there by hand is used as is (the offline path);
- a download streams into a temporary file in that folder, checked against the publisher's
  sha256 prefix where one is given and against the announced length, then fsynced and renamed:
  a partial or corrupt download never takes the final name;
- the converted checkpoint is cached beside it as `<file>.retinanet.pt` and re-made when it is
  missing or older than the file it came from.

Files are read with the converters' safe loading (`weights_only` / a restricted unpickler).
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import logging
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DOWNLOAD_TIMEOUT_S = 30.0  # per connection attempt and per read: a stalled server is an error, not a hang
MAX_DOWNLOAD_BYTES = 2 * 1024 ** 3  # no published RetinaNet comes near this; a larger answer is not a weight file
_CHUNK = 1024 * 1024
log = logging.getLogger(__name__)
CONVERTED_SUFFIX = ".retinanet.pt"


class ZooError(RuntimeError):
    """A zoo name is unknown, or its file cannot be downloaded or used; the message is one line
    and says what to do (for a download, the URL and the exact path to put the file at)."""


@dataclass(frozen=True)
class ZooEntry:
    name: str  # "<publisher>/<model>", e.g. "torchvision/retinanet_resnet50_fpn_coco"
    source: str  # the converter: one of retinanet.convert.SOURCES
    url: str
    sha256_prefix: str | None  # torchvision's hex after the dash in the file name; None where none is published
    box_ap: float  # COCO val2017 box AP as published
    depth: int  # ResNet depth
    license: str
    size_mb: float | None  # as published, None where not

    @property
    def file_name(self) -> str:
        """The cached file's name: the URL's (torch.hub's choice), prefixed with the model's
        folder where the publisher's name says nothing (detectron2's `model_final_<id>.pkl`)."""
        parts = self.url.rstrip("/").split("/")
        return f"{parts[-3]}_{parts[-1]}" if parts[-1].startswith("model_final") else parts[-1]


_D2 = "https://dl.fbaipublicfiles.com/detectron2/COCO-Detection"
_PADDLE = "https://paddledet.bj.bcebos.com/models"

ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("torchvision/retinanet_resnet50_fpn_coco", "torchvision",
             "https://download.pytorch.org/models/retinanet_resnet50_fpn_coco-eeacb38b.pth", "eeacb38b",
             36.4, 50, "BSD-3-Clause", 130.267),
    ZooEntry("torchvision/retinanet_resnet50_fpn_v2_coco", "torchvision",
             "https://download.pytorch.org/models/retinanet_resnet50_fpn_v2_coco-5905b1c5.pth", "5905b1c5",
             41.5, 50, "BSD-3-Clause", 146.037),
    ZooEntry("detectron2/retinanet_R_50_FPN_1x", "detectron2",
             f"{_D2}/retinanet_R_50_FPN_1x/190397773/model_final_bfca0b.pkl", None, 37.4, 50, "Apache-2.0", None),
    ZooEntry("detectron2/retinanet_R_50_FPN_3x", "detectron2",
             f"{_D2}/retinanet_R_50_FPN_3x/190397829/model_final_5bd44e.pkl", None, 38.7, 50, "Apache-2.0", None),
    ZooEntry("detectron2/retinanet_R_101_FPN_3x", "detectron2",
             f"{_D2}/retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl", None, 40.4, 101, "Apache-2.0", None),
    ZooEntry("paddle/retinanet_r50_fpn_1x_coco", "paddle", f"{_PADDLE}/retinanet_r50_fpn_1x_coco.pdparams", None,
             37.5, 50, "Apache-2.0", None),
    ZooEntry("paddle/retinanet_r50_fpn_2x_coco", "paddle", f"{_PADDLE}/retinanet_r50_fpn_2x_coco.pdparams", None,
             39.1, 50, "Apache-2.0", None),
    ZooEntry("paddle/retinanet_r101_fpn_2x_coco", "paddle", f"{_PADDLE}/retinanet_r101_fpn_2x_coco.pdparams", None,
             40.6, 101, "Apache-2.0", None),
]}


def is_zoo_name(text: str | Path) -> bool:
    return str(text) in ZOO


def cache_dir() -> Path:
    """torch.hub's checkpoint folder, where torchvision keeps the files it downloads."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def download_path(entry: ZooEntry) -> Path:
    return cache_dir() / entry.file_name


def converted_path(entry: ZooEntry) -> Path:
    return cache_dir() / (entry.file_name + CONVERTED_SUFFIX)


def cache_state(entry: ZooEntry) -> str:
    """How much of `entry` is in the cache: "converted", "downloaded" or "no"."""
    if converted_path(entry).is_file():
        return "converted"
    return "downloaded" if download_path(entry).is_file() else "no"


def resolve_weights(name_or_path: str | Path, *, trust: bool = False, progress: bool = True) -> Path:
    """An existing file -> itself. A zoo name -> the cached converted checkpoint (ours), downloading
    the publisher's file and converting it on first use. Anything else -> `ZooError` naming it and
    pointing at `retinanet zoo`. `trust` allows a full unpickle of the publisher's file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    if text not in ZOO:
        if path.is_dir():
            raise ZooError(f"{path}: is a folder, not a weights file")
        close = difflib.get_close_matches(text, ZOO, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ZooError(f"{text}: no such file, and no model-zoo entry of that name (`retinanet zoo` lists them)"
                       f"{hint}")
    entry = ZOO[text]
    source_file, converted = download_path(entry), converted_path(entry)
    if not source_file.is_file():
        download(entry.url, source_file, entry.sha256_prefix, progress=progress)
        log.info("%s: downloaded %s -> %s", entry.name, entry.url, source_file)
    if not converted.is_file() or converted.stat().st_mtime < source_file.stat().st_mtime:
        _convert(entry, source_file, converted, trust)
        log.info("%s: converted %s -> %s (%s licence)", entry.name, source_file.name, converted, entry.license)
    return converted


def _convert(entry: ZooEntry, source_file: Path, converted: Path, trust: bool) -> None:
    from .checkpoint import write_checkpoint
    from .convert import convert_state, read_source
    from .convert.common import ConversionError
    from .outputs import OutputNotWritten

    try:
        config, weights = convert_state(entry.source, read_source(entry.source, source_file, trust))
    except ConversionError as err:
        message = str(err) if str(source_file) in str(err) else f"{source_file}: {err}"
        raise ZooError(f"{message} (the model zoo's {entry.name}: delete that file to download it again)") from None
    try:
        write_checkpoint(converted, config, weights, meta={"converted_from": {
            "source": entry.source, "file": str(source_file), "zoo": entry.name, "url": entry.url}})
    except OutputNotWritten as err:  # disk full, read-only cache: write_checkpoint leaves no partial file
        raise ZooError(f"{err}; free space or set TORCH_HOME to a writable folder") from None


def download(url: str, dst: Path, sha256_prefix: str | None = None, progress: bool = True,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Stream `url` into `dst` atomically (`outputs.atomic_output`): checked (the announced
    length, the sha256 prefix when given, at most MAX_DOWNLOAD_BYTES), then renamed. On any
    failure the temporary file is removed and `dst` is left as it was."""
    from .outputs import OutputNotWritten, atomic_output

    try:
        with atomic_output(dst) as tmp, open(tmp, "wb") as f:
            _, digest = _stream(url, f, dst, progress, timeout)
            if sha256_prefix and not digest.startswith(sha256_prefix):
                raise ZooError(f"{url}: the download's sha256 {digest[:16]}... does not start with the published "
                               f"{sha256_prefix}; deleted it (a corrupt or altered file): try again, or put the "
                               f"right file at {dst}")
    except OutputNotWritten as err:  # the cache's disk: full, read-only or forbidden
        raise ZooError(f"{err}; free space or set TORCH_HOME to a writable folder") from None
    return dst


def _stream(url: str, f, dst: Path, progress: bool, timeout: float) -> tuple[int, str]:
    """Copy the response body into `f`; `(bytes received, sha256 hex)`. Network failures become
    a `ZooError` saying where to put the file by hand."""
    from tqdm import tqdm

    def offline(reason: str) -> ZooError:
        return ZooError(f"cannot download {url} ({reason}); without network, fetch that file elsewhere and "
                        f"put it at {dst}")

    digest, received = hashlib.sha256(), 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "retinanet"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")
            total = int(announced) if announced and announced.strip().isdigit() else None
            if total is not None and total > MAX_DOWNLOAD_BYTES:
                raise ZooError(f"{url}: announces {total} bytes, more than any weight file "
                               f"({MAX_DOWNLOAD_BYTES} at most); not downloaded")
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dst.name,
                      disable=not progress, leave=False) as bar:
                while chunk := response.read(_CHUNK):
                    received += len(chunk)
                    if received > MAX_DOWNLOAD_BYTES:
                        raise ZooError(f"{url}: sent more than {MAX_DOWNLOAD_BYTES} bytes, more than any weight "
                                       "file; stopped and deleted the download")
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise offline(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise offline(str(err.reason)) from None
    except http.client.IncompleteRead:  # a chunked body cut short
        raise _truncated(url, dst, received, None) from None
    except (http.client.HTTPException, socket.timeout, ConnectionError) as err:
        raise offline(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__) from None
    if total is not None and received != total:  # http.client ends a short body quietly
        raise _truncated(url, dst, received, total)
    return received, digest.hexdigest()


def _truncated(url: str, dst: Path, received: int, total: int | None) -> ZooError:
    of = f" of {total}" if total is not None else ""
    return ZooError(f"{url}: the transfer stopped after {received}{of} bytes (truncated); deleted the partial "
                    f"file: try again, or put the file at {dst}")


def format_table() -> str:
    """The zoo as a plain-text table: name, source, box AP, size, licence, cache state, URL."""
    header = ("name", "source", "box AP", "MB", "licence", "cached", "URL")
    rows = [(e.name, e.source, f"{e.box_ap:.1f}", f"{e.size_mb:.0f}" if e.size_mb else "?", e.license,
             cache_state(e), e.url) for e in ZOO.values()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in [header, *rows]]
    return "\n".join(lines) + f"\n\ncache: {cache_dir()} (set TORCH_HOME to move it); box AP: COCO val2017, " \
                              "as published"
