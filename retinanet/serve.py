"""`retinanet serve`: a small HTTP service (FastAPI + uvicorn) around a checkpoint or an
exported model (ONNX under onnxruntime, an OpenVINO IR).

    POST /predict   multipart upload (field `file`) or the raw image bytes -> JSON detections
    GET  /health    {"status": "ok"}
    GET  /info      the model: classes, input size, backend

One upload costs bounded memory and time: the body is at most `max_bytes`; an image of more
than `max_pixels` pixels is refused from its header (HTTP 413) before any pixel is decoded; at
most `decode_slots` images (one per CPU core by default) are decoded or waiting for the model at
once, in threads, so /health keeps answering; and large buffers go back to the operating
system when a request ends.

One worker thread runs the model. By default each request runs alone (a batch of one), so an
answer is the same whatever else is being served; `max_batch` > 1 runs concurrent requests of
equal image size together, more throughput on a GPU, at the price of answers that can differ
in the fifth decimal with the batch's composition.
"""


import asyncio
import logging
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .engine.prediction_files import cap_note, detection_cap

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # a 7,300 x 5,500 photo; the model sees it resized to its input


class Predictor:
    """The model behind the service: a checkpoint (torch) or an exported model under its
    runtime (any backend of `export.runtimes`, through the protocol of
    `engine.prediction_files`). `predict(images)` takes `(H, W, 3)` uint8 arrays."""

    def __init__(self, weights: str | Path, device: str = "cpu", amp: str = "none", compile: bool = False,
                 backend: str | None = None, max_detections: int | None = None):
        """`backend`: "torch", "onnxruntime" or "openvino" (default: onnxruntime for a
        `.onnx`, else torch). `amp` ("none", "bf16", "fp16", resolved) and `compile`
        (torch.compile the network and NMS) apply to a checkpoint; an exported model runs as
        exported. An exported model that cannot be opened raises `ExportedModelError`.
        `max_detections`: a checkpoint's `inference.detections_per_image` (None: its own).
        The first request in which an image reaches that cap logs it, once."""
        weights = Path(weights)
        backend = backend or ("onnxruntime" if weights.suffix == ".onnx" else "torch")
        if backend != "torch":
            from .export.runtimes import open_exported

            self.exported = open_exported(backend, weights)
            self.class_names, self.category_ids = self.exported.class_names, self.exported.category_ids
            self.info = {"backend": backend, "input": self.exported.input}
        else:
            from .checkpoint import load_model

            self.exported = None
            overrides = [f"inference.detections_per_image={max_detections}"] if max_detections else []
            self.model = load_model(weights, map_location=device, overrides=overrides, compile=compile)
            self.class_names, self.category_ids = self.model.class_names, self.model.category_ids
            self.device, self.amp = device, amp
            pre = self.model.preprocessor
            self.info = {"backend": "torch", "device": device, "precision": "fp32" if amp == "none" else amp,
                         "compiled": compile, "input": {"test_min_size": pre.test_min_size, "max_size": pre.max_size}}
        self.info.update({"model": weights.name, "classes": self.class_names, "category_ids": self.category_ids})
        self.cap = detection_cap(self.model if self.exported is None else self.exported)
        self.cap_noted = False

    def check_size(self, height: int, width: int, name: str) -> None:
        """Raise `ValueError` naming `name` for an image the model cannot take: so elongated
        that resizing to the model's input leaves a side of 0 pixels, or, for a fixed-shape
        exported graph, of another size than the one it was exported for."""
        if self.exported is None:
            self.model.preprocessor.check_size((height, width), name=name)
            return
        self.exported.check_size(height, width, name)

    def predict(self, arrays: list) -> list[dict]:
        if self.exported is not None:
            detections = self.exported.predict(arrays)
        else:
            import torch

            tensors = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
            from .engine.precision import autocast

            with autocast(self.amp, torch.device(self.device).type):
                detections = self.model.predict(tensors, batch_size=len(tensors))
        self.note_cap(detections)
        return [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in d.items()} for d in detections]

    def note_cap(self, detections: list[dict]) -> None:
        """Log, the first time only, that an image's detections reached the cap."""
        if self.cap_noted or self.cap is None:
            return
        hit = sum(len(d["scores"]) >= self.cap for d in detections)
        how = getattr(self.exported, "raise_cap", "retinanet serve --max-detections N")
        note = cap_note(hit, self.cap, how)
        if note:
            self.cap_noted = True
            log.warning("%s (said once per service)", note.removeprefix("note: "))


class Batcher:
    """Runs the model on one worker thread; with `max_batch` > 1, concurrent requests of equal
    image size that queued up together (waiting at most `max_wait_ms` for more) run as one batch."""

    def __init__(self, predictor: Predictor, max_batch: int = 1, max_wait_ms: float = 10.0):
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000
        self.jobs: queue.Queue = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, array) -> Future:
        future: Future = Future()
        self.jobs.put((array, future))
        return future

    def _work(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            try:
                while len(jobs) < self.max_batch:
                    jobs.append(self.jobs.get(timeout=self.max_wait))
            except queue.Empty:
                pass
            # images of one size run together: padding a batch to a common size would change
            # the detections of the smaller images, and an answer must not depend on the traffic
            groups: dict[tuple, list] = {}
            for job in jobs:
                groups.setdefault(job[0].shape, []).append(job)
            for group in groups.values():
                self.batches += 1
                try:
                    results = self.predictor.predict([array for array, _ in group])
                except Exception as err:  # noqa: BLE001 - every waiting request gets the error
                    for _, future in group:
                        future.set_exception(err)
                    continue
                for (_, future), result in zip(group, results):
                    future.set_result(result)


def create_app(predictor: Predictor, max_bytes: int = 20 * 1024 * 1024, max_batch: int = 1,
               max_pixels: int = DEFAULT_MAX_PIXELS, decode_slots: int | None = None):
    """The FastAPI app. `decode_slots` (default: the CPU cores) bounds the images decoded or
    waiting for the model at once."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    from .data.image_io import ImageReadError, ImageTooLargeError, read_image_bytes

    app = FastAPI(title="retinanet", description="RetinaNet object detection")
    batcher = Batcher(predictor, max_batch)
    decode_slots = decode_slots or os.cpu_count() or 1
    decoders = ThreadPoolExecutor(decode_slots, thread_name_prefix="decode")
    slots = asyncio.Semaphore(decode_slots)

    def decode(data: bytes, name: str):
        """The image as an `(H, W, 3)` array the model can take; HTTP 4xx otherwise."""
        try:
            image = read_image_bytes(data, name, max_pixels)
            predictor.check_size(image.shape[1], image.shape[2], name)
        except ImageTooLargeError as err:
            size = f"{err.size[0]}x{err.size[1]} = " if err.size else ""
            raise HTTPException(413, f"{err.path}: {size}{err.pixels:,} pixels is over this server's limit of "
                                     f"{err.limit:,} pixels per image (its operator sets it with "
                                     "`retinanet serve --max-pixels`)") from None
        except (ImageReadError, ValueError) as err:
            raise HTTPException(400, str(err)) from None
        return image.permute(1, 2, 0).numpy()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/info")
    def info():
        return {**predictor.info, "max_bytes": max_bytes, "max_pixels": max_pixels, "max_batch": max_batch,
                "decode_slots": decode_slots, "batches_run": batcher.batches}

    @app.post("/predict")
    async def predict(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise HTTPException(413, f"request of {int(declared):,} bytes is over the limit of {max_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise HTTPException(413, f"request is over the limit of {max_bytes:,} bytes")
        data, name = bytes(body), "body"
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data, name = await _file_from_multipart(request, data)
        async with slots:  # the decoded image lives only inside its slot
            array = await asyncio.get_running_loop().run_in_executor(decoders, decode, data, name)
            result = await asyncio.wrap_future(batcher.submit(array))
            height, width = array.shape[:2]
            del array
        detections = [{"box": [round(v, 2) for v in box], "score": round(score, 5), "label": label,
                       "class_name": predictor.class_names[label], "category_id": predictor.category_ids[label]}
                      for box, score, label in zip(result["boxes"], result["scores"], result["labels"])]
        return JSONResponse({"width": width, "height": height, "detections": detections})

    return app


async def _file_from_multipart(request, body: bytes) -> tuple[bytes, str]:
    from fastapi import HTTPException
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, receive).form()
    upload = form.get("file") or next((v for v in form.values() if isinstance(v, UploadFile)), None)
    if not isinstance(upload, UploadFile):
        raise HTTPException(400, "multipart request without a file field (send the image as 'file')")
    return await upload.read(), upload.filename or "upload"


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000, max_bytes: int = 20 * 1024 * 1024,
          max_batch: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Serve until stopped. Process-wide: freed memory goes back to the OS (a large request's
    memory does not stay with the server), and Pillow's own decompression-bomb limit is raised
    to `max_pixels` where that is higher."""
    import uvicorn
    from PIL import Image

    from .allocator import return_freed_memory

    return_freed_memory()  # a large request's memory goes back to the OS, not kept by the server
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    app = create_app(predictor, max_bytes, max_batch, max_pixels)
    uvicorn.run(app, host=host, port=port, log_level="info")
